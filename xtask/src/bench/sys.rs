//! What the benchmark reads from /proc and asks of the kernel: CPU time, memory, load.
use std::{
    fs,
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Clock ticks per second of /proc/PID/stat times.
pub fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Fields of /proc/PID/stat after the command name (field 3 is index 0).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// utime + stime of every thread of the process, alive or exited, in seconds
/// (clock-tick resolution).
pub fn proc_cpu_s(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / clk_tck())
}

/// Time on CPU of one task (a single-threaded process such as the nginx worker), from
/// /proc/PID/schedstat: nanosecond resolution. Falls back to utime + stime.
pub fn task_cpu_s(pid: u32) -> Option<f64> {
    fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|ns| ns / 1e9)
        .or_else(|| proc_cpu_s(pid))
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Mem {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub shmem_kib: u64,
    pub hwm_kib: u64,
}

impl Mem {
    pub fn read(pid: u32) -> Option<Self> {
        let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let get = |key: &str| -> u64 {
            s.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Some(Self {
            rss_kib: get("VmRSS:"),
            anon_kib: get("RssAnon:"),
            file_kib: get("RssFile:"),
            shmem_kib: get("RssShmem:"),
            hwm_kib: get("VmHWM:"),
        })
    }
}

/// Resident size of the mappings of one kind of file (e.g. `anon_inode:bpf-map`), KiB.
pub fn mapping_rss_kib(pid: u32, name: &str) -> u64 {
    let Ok(s) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return 0;
    };
    let mut total = 0;
    let mut in_it = false;
    for l in s.lines() {
        let mut parts = l.split_whitespace();
        let first = parts.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            in_it = l.ends_with(name);
        } else if in_it && first == "Rss:" {
            total += parts
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    total
}

/// Samples a process's memory every 50 ms until stopped; keeps the maximum and the last.
pub struct MemSampler {
    stop: Arc<AtomicBool>,
    state: Arc<Mutex<(Mem, Mem)>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl MemSampler {
    pub fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(Mutex::new((Mem::default(), Mem::default())));
        let (s, st) = (stop.clone(), state.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Acquire) {
                if let Some(m) = Mem::read(pid) {
                    let mut g = st.lock().unwrap_or_else(|e| e.into_inner());
                    g.1 = m;
                    g.0.rss_kib = g.0.rss_kib.max(m.rss_kib);
                    g.0.anon_kib = g.0.anon_kib.max(m.anon_kib);
                    g.0.file_kib = g.0.file_kib.max(m.file_kib);
                    g.0.shmem_kib = g.0.shmem_kib.max(m.shmem_kib);
                    g.0.hwm_kib = m.hwm_kib;
                }
                thread::sleep(Duration::from_millis(50));
            }
        });
        Self {
            stop,
            state,
            handle: Some(handle),
        }
    }

    /// (maximum of each field, last sample)
    pub fn finish(mut self) -> (Mem, Mem) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Busy and total CPU seconds of the whole host since boot, from /proc/stat.
pub fn host_cpu_s() -> (f64, f64) {
    let s = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = s.lines().find(|l| l.starts_with("cpu ")) else {
        return (0.0, 0.0);
    };
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    ((total - idle) / clk_tck(), total / clk_tck())
}

pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Other Tapir agents on this host (their kernel programs tax every process we measure):
/// processes named `tapir` that we did not start, with their command lines.
pub fn foreign_agents(mine: &[u32]) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if mine.contains(&pid) {
            continue;
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let comm = comm.trim();
        if comm != "tapir" && comm != "tapir-replay" {
            continue;
        }
        // Only real agents load probes: a binary named tapir running `run`/`watch`/`record`.
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !(exe.ends_with("/tapir") || exe.ends_with("/tapir-replay")) {
            continue;
        }
        let cmd = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                String::from_utf8_lossy(&b)
                    .split('\0')
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        if cmd.contains(" run") || cmd.contains(" watch") || cmd.contains(" record") {
            out.push((pid, cmd));
        }
    }
    out.sort();
    out
}

/// Raises the open-files limit to the hard limit (children inherit it); returns it.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) };
    r.rlim_cur = r.rlim_max;
    // SAFETY: valid pointer to an initialized rlimit.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) };
    r.rlim_cur
}

pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn wait_port(port: u16, timeout: Duration) -> Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("nothing accepts connections on 127.0.0.1:{port} after {timeout:?}")
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: plain syscall; `pid` is a child we started and have not reaped yet.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// How a child ended, with its resource usage (µs-resolution CPU time, max RSS).
#[derive(Debug, Clone, Copy, Default)]
pub struct Exit {
    pub code: Option<i32>,
    pub cpu_s: f64,
    pub max_rss_kib: u64,
}

/// Reaps `child` with wait4(2) (for its rusage), sending `sig` at `deadline` and SIGKILL
/// 10 s later if it is still there.
pub fn wait_child(child: &mut Child, deadline: Instant, sig: libc::c_int) -> Result<Exit> {
    let pid = child.id() as libc::pid_t;
    let mut signalled = false;
    let mut killed_at = None;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: all-zero is a valid rusage; wait4 fills it.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointers; `pid` is our unreaped child.
        let r = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
        if r == pid {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            let code = if libc::WIFEXITED(status) {
                Some(libc::WEXITSTATUS(status))
            } else {
                None
            };
            return Ok(Exit {
                code,
                cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime),
                max_rss_kib: ru.ru_maxrss as u64,
            });
        }
        if r < 0 {
            bail!("wait4({pid}): {}", std::io::Error::last_os_error());
        }
        let now = Instant::now();
        if now >= deadline && !signalled {
            signal(pid as u32, sig);
            signalled = true;
            killed_at = Some(now + Duration::from_secs(10));
        }
        if killed_at.is_some_and(|k| now >= k) {
            signal(pid as u32, libc::SIGKILL);
            killed_at = None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The only child of `parent` (nginx's worker).
pub fn child_of(parent: u32, timeout: Duration) -> Result<u32> {
    let end = Instant::now() + timeout;
    loop {
        let kids = fs::read_to_string(format!("/proc/{parent}/task/{parent}/children"))
            .unwrap_or_default();
        if let Some(k) = kids.split_whitespace().next().and_then(|k| k.parse().ok()) {
            return Ok(k);
        }
        if Instant::now() >= end {
            bail!("process {parent} has no child after {timeout:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The last `n` lines of a log file, for error messages.
pub fn tail(path: &Path, n: usize) -> String {
    let s = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run_output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
