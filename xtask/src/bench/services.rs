//! The processes a benchmark run drives: nginx, the agent, the OTLP receiver, wrk.
use std::{
    fs,
    io::{BufRead, BufReader, Read, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::sys::{self, Exit};

/// Core nginx is pinned to; wrk (and the replay benchmark) get the other one.
pub const SERVER_CPU: &str = "0";
pub const CLIENT_CPU: &str = "1";

// ---------------------------------------------------------------------------------------------
// nginx

pub struct Nginx {
    child: Child,
    pub port: u16,
    /// The HTTPS listener's port (the same responses, over TLS).
    pub tls_port: u16,
    pub worker: u32,
    /// The path wrk asks for: `/` (17-byte body) or [`BODY16K`].
    pub path: &'static str,
    /// wrk asks over HTTPS.
    pub tls: bool,
}

/// A 16 KiB response body, read from a file and written by nginx (no sendfile).
pub const BODY16K: &str = "/body16k";

impl Nginx {
    /// Renders bench/nginx.conf.in into `dir` and starts nginx (one worker) pinned to
    /// [`SERVER_CPU`].
    pub fn start(root: &Path, dir: &Path) -> Result<Self> {
        let port = sys::free_port()?;
        let tls_port = sys::free_port()?;
        for sub in ["body", "proxy", "fastcgi", "uwsgi", "scgi"] {
            fs::create_dir_all(dir.join("tmp").join(sub))?;
        }
        let cert = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
            ])
            .args(["-nodes", "-subj", "/CN=127.0.0.1", "-days", "2", "-keyout"])
            .arg(dir.join("tls-key.pem"))
            .arg("-out")
            .arg(dir.join("tls-cert.pem"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("running openssl for the HTTPS benchmark's certificate")?;
        if !cert.success() {
            bail!("openssl req (the HTTPS benchmark's certificate) failed: {cert}");
        }
        let tpl = fs::read_to_string(root.join("bench/nginx.conf.in"))
            .context("reading bench/nginx.conf.in")?;
        fs::write(dir.join(&BODY16K[1..]), vec![b'x'; 16 << 10])?;
        let conf = dir.join("nginx.conf");
        fs::write(
            &conf,
            tpl.replace("@DIR@", &dir.display().to_string())
                .replace("@PORT@", &port.to_string())
                .replace("@TLS_PORT@", &tls_port.to_string()),
        )?;
        let child = Command::new("taskset")
            .args(["-c", SERVER_CPU, "nginx", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("nginx-stderr.log"))?)
            .spawn()
            .context("starting nginx")?;
        let mut n = Self {
            worker: 0,
            child,
            port,
            tls_port,
            path: "/",
            tls: false,
        };
        if let Err(e) = sys::wait_port(port, Duration::from_secs(15)) {
            bail!(
                "{e}; nginx log:\n{}",
                sys::tail(&dir.join("nginx-error.log"), 20)
            );
        }
        n.worker = sys::child_of(n.child.id(), Duration::from_secs(5))?;
        Ok(n)
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://127.0.0.1:{}{}", self.tls_port, self.path)
        } else {
            format!("http://127.0.0.1:{}{}", self.port, self.path)
        }
    }

    pub fn cpu_s(&self) -> f64 {
        sys::task_cpu_s(self.worker).unwrap_or(0.0)
    }

    pub fn stop(mut self) {
        // SIGQUIT: graceful; the master waits for its worker.
        sys::signal(self.child.id(), libc::SIGQUIT);
        let _ = sys::wait_child(
            &mut self.child,
            Instant::now() + Duration::from_secs(10),
            libc::SIGTERM,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The agent

pub struct Agent {
    child: Child,
    pub pid: u32,
    pub log: PathBuf,
    /// Seconds from spawn to the `ready` line, and CPU spent by then (start-up cost).
    pub startup_s: f64,
    pub startup_cpu_s: f64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct AgentExit {
    pub code: Option<i32>,
    pub cpu_s: f64,
    pub max_rss_kib: u64,
    /// `final count` lines of the log: (counter, value).
    pub counters: Vec<(String, u64)>,
    /// From the exporter's last log line: spans exported and dropped over the agent's life.
    pub spans_exported: Option<u64>,
    pub spans_dropped: Option<u64>,
    /// `kernel program cost` lines of the log (with `--ebpf-stats`).
    pub programs: Vec<ProgramCost>,
}

/// One kernel program's runs and time over the agent's life, from its exit log.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProgramCost {
    pub program: String,
    pub runs: u64,
    pub run_time_ns: u64,
}

impl Agent {
    /// `tapir run ARGS` with `envs` added to the environment.
    pub fn start(bin: &Path, args: &[String], envs: &[(&str, &str)], log: &Path) -> Result<Self> {
        let t0 = Instant::now();
        let child = Command::new(bin)
            .arg("run")
            .args(args)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(fs::File::create(log.with_extension("stdout.log"))?)
            .stderr(fs::File::create(log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child.id();
        let mut a = Self {
            child,
            pid,
            log: log.to_path_buf(),
            startup_s: 0.0,
            startup_cpu_s: 0.0,
        };
        let end = t0 + Duration::from_secs(90);
        loop {
            let text = fs::read_to_string(log).unwrap_or_default();
            if text.lines().any(|l| l.contains("ready")) {
                break;
            }
            if let Ok(Some(st)) = a.child.try_wait() {
                bail!(
                    "the agent exited ({st}) before it was ready:\n{}",
                    sys::tail(log, 15)
                );
            }
            if Instant::now() >= end {
                a.stop()?;
                bail!(
                    "the agent was not ready after 90 s:\n{}",
                    sys::tail(log, 15)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        a.startup_s = t0.elapsed().as_secs_f64();
        a.startup_cpu_s = a.cpu_s();
        Ok(a)
    }

    pub fn cpu_s(&self) -> f64 {
        sys::proc_cpu_s(self.pid).unwrap_or(0.0)
    }

    /// SIGINT, then wait (SIGKILL after 40 s); parses the final counters from the log.
    pub fn stop(mut self) -> Result<AgentExit> {
        sys::signal(self.pid, libc::SIGINT);
        let Exit {
            code,
            cpu_s,
            max_rss_kib,
            ..
        } = sys::wait_child(
            &mut self.child,
            Instant::now() + Duration::from_secs(30),
            libc::SIGTERM,
        )?;
        let (spans_exported, spans_dropped) = flushed_spans(&self.log);
        Ok(AgentExit {
            code,
            cpu_s,
            max_rss_kib,
            counters: final_counters(&self.log),
            spans_exported,
            spans_dropped,
            programs: program_costs(&self.log),
        })
    }
}

/// `... final count counter="tapir.events.received" value=123` → (name, value).
fn final_counters(log: &Path) -> Vec<(String, u64)> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("final count"))
        .filter_map(|l| {
            let name = log_field(l, "counter=")?;
            Some((name.to_string(), log_field(l, "value=")?.parse().ok()?))
        })
        .collect()
}

/// The `kernel program cost` lines of the log (`--ebpf-stats`).
fn program_costs(log: &Path) -> Vec<ProgramCost> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.contains("kernel program cost"))
        .filter_map(|l| {
            Some(ProgramCost {
                program: log_field(l, "program=")?.to_string(),
                runs: log_field(l, "runs=")?.parse().ok()?,
                run_time_ns: log_field(l, "run_time_ns=")?.parse().ok()?,
            })
        })
        .collect()
}

/// The value of ` key=value` (or ` key="value"`) in a log line.
fn log_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}"))? + key.len() + 1;
    let rest = line[at..].trim_start_matches('"');
    let end = rest.find(['"', ' ']).unwrap_or(rest.len());
    Some(&rest[..end])
}

/// `telemetry flushed: 411375 spans exported, 312389 dropped in total` → (exported, dropped).
fn flushed_spans(log: &Path) -> (Option<u64>, Option<u64>) {
    let text = fs::read_to_string(log).unwrap_or_default();
    let Some(l) = text.lines().rev().find(|l| l.contains("spans exported")) else {
        return (None, None);
    };
    let num_before = |word: &str| -> Option<u64> {
        let i = l.find(word)?;
        l[..i].split_whitespace().last()?.parse().ok()
    };
    (num_before(" spans exported"), num_before(" dropped"))
}

// ---------------------------------------------------------------------------------------------
// OTLP receiver

pub struct Receiver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub grpc_port: u16,
    /// Its OTLP/HTTP port (older receivers printed none).
    pub http_port: Option<u16>,
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct ReceiverCounts {
    pub spans: u64,
    pub metric_points: u64,
    pub exports: u64,
    pub errors: u64,
}

impl Receiver {
    /// Starts `tapir-otlp-sink` (agent/src/bin/tapir-otlp-sink.rs) on a free port.
    pub fn start(sink: &Path, log: &Path) -> Result<Self> {
        let mut child = Command::new(sink)
            .args(["--grpc-port", "0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log)?)
            .spawn()
            .context("starting the OTLP receiver")?;
        let stdin = child.stdin.take().context("receiver stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("receiver stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        let (Some(&"listening"), Some(g)) = (parts.first(), parts.get(1)) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the OTLP receiver did not start (said {line:?}):\n{}",
                sys::tail(log, 15)
            );
        };
        Ok(Self {
            grpc_port: g.parse()?,
            http_port: parts.get(2).and_then(|h| h.parse().ok()),
            child,
            stdin,
            stdout,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn counts(&mut self) -> Result<ReceiverCounts> {
        self.stdin.write_all(b"stats\n")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        serde_json::from_str(&line).with_context(|| format!("receiver said {line:?}"))
    }

    /// Waits until the span count stops growing for `quiet` (or reaches `want`), at most
    /// `timeout`; returns the last counts.
    pub fn settle(&mut self, want: u64, quiet: Duration, timeout: Duration) -> ReceiverCounts {
        let end = Instant::now() + timeout;
        let mut last = self.counts().unwrap_or_default();
        let mut since = Instant::now();
        while Instant::now() < end {
            thread::sleep(Duration::from_millis(100));
            let c = self.counts().unwrap_or(last);
            if c.spans != last.spans {
                since = Instant::now();
            }
            last = c;
            if last.spans >= want || since.elapsed() >= quiet {
                break;
            }
        }
        last
    }

    pub fn stop(self) {
        let Self {
            mut child, stdin, ..
        } = self;
        drop(stdin);
        let _ = sys::wait_child(
            &mut child,
            Instant::now() + Duration::from_secs(10),
            libc::SIGTERM,
        );
    }
}

// ---------------------------------------------------------------------------------------------
// wrk

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct WrkResult {
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub socket_errors: u64,
    pub non_2xx: u64,
    /// wrk's own CPU time (it is observed by the agent too: the client side).
    pub cpu_s: f64,
}

/// wrk, one thread pinned to [`CLIENT_CPU`], `conns` connections, `secs` seconds.
pub fn wrk(url: &str, conns: u32, secs: u32, close: bool) -> Result<WrkResult> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", CLIENT_CPU, "wrk", "-t1"])
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .args(["--latency", "--timeout", "5s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    let mut child = cmd
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting wrk")?;
    let mut out = child.stdout.take().context("wrk stdout")?;
    let reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let exit = sys::wait_child(
        &mut child,
        Instant::now() + Duration::from_secs(u64::from(secs) + 30),
        libc::SIGKILL,
    )?;
    let text = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if exit.code != Some(0) {
        bail!("wrk failed ({:?}): {text}{err}", exit.code);
    }
    let mut r = parse_wrk(&text).with_context(|| format!("unexpected wrk output:\n{text}"))?;
    r.cpu_s = exit.cpu_s;
    Ok(r)
}

fn parse_duration_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v,
        "ms" => v * 1e3,
        "s" => v * 1e6,
        "m" => v * 60e6,
        "h" => v * 3600e6,
        _ => return None,
    })
}

fn parse_wrk(text: &str) -> Option<WrkResult> {
    let mut r = WrkResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.p50_us = parse_duration_us(v)?,
            ["90%", v] => r.p90_us = parse_duration_us(v)?,
            ["99%", v] => r.p99_us = parse_duration_us(v)?,
            [n, "requests", "in", secs, ..] => {
                r.requests = n.parse().ok()?;
                r.seconds = parse_duration_us(secs.trim_end_matches(','))? / 1e6;
            }
            ["Requests/sec:", v] => r.rps = v.parse().ok()?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum();
            }
            _ => {}
        }
    }
    (r.requests > 0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:18080/
  1 threads and 16 connections
  Latency Distribution
     50%  255.00us
     75%    3.46ms
     90%    6.69ms
     99%   13.02ms
  79509 requests in 5.05s, 12.51MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
Requests/sec:  15749.66
Transfer/sec:      2.48MB
";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests, 79509);
        assert!((r.seconds - 5.05).abs() < 1e-9);
        assert!((r.p50_us - 255.0).abs() < 1e-9);
        assert!((r.p99_us - 13020.0).abs() < 1e-6);
        assert!((r.rps - 15749.66).abs() < 1e-9);
        assert_eq!(r.socket_errors, 4);
    }

    #[test]
    fn parses_final_counters() {
        let dir = std::env::temp_dir().join(format!("xtask-bench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let log = dir.join("a.log");
        fs::write(
            &log,
            "2026 INFO tapir: final count counter=\"tapir.exchanges\" value=42\n\
             2026 INFO tapir: final count counter=tapir.events.received value=7\n\
             2026 INFO tapir::cmd: kernel program cost program=\"tapir_exit_write_vec\" runs=453011 \
             run_time_ns=216801716 mean_ns=478\n\
             2026 INFO tapir::cmd: kernel program cost program=\"tapir_exit_read_buf\" runs=0 \
             run_time_ns=0 mean_ns=0\n\
             2026 INFO tapir::cmd: kernel program cost program=\"broken\" runs=x run_time_ns=1\n",
        )
        .unwrap();
        fs::write(
            dir.join("b.log"),
            "x INFO tapir::otel: telemetry flushed: 411375 spans exported, 312389 dropped in total\n",
        )
        .unwrap();
        assert_eq!(
            flushed_spans(&dir.join("b.log")),
            (Some(411375), Some(312389))
        );
        assert_eq!(
            final_counters(&log),
            vec![
                ("tapir.exchanges".to_string(), 42),
                ("tapir.events.received".to_string(), 7)
            ]
        );
        let cost = |program: &str, runs, run_time_ns| ProgramCost {
            program: program.into(),
            runs,
            run_time_ns,
        };
        assert_eq!(
            program_costs(&log),
            vec![
                cost("tapir_exit_write_vec", 453011, 216801716),
                cost("tapir_exit_read_buf", 0, 0)
            ]
        );
        let _ = fs::remove_dir_all(dir);
    }
}
