//! Which processes are observed (`--pid`, `--exe`, `--open-port`, `--exclude-exe`). The kernel keeps the answer per process
//! (`TAPIR_SELECTED`) and follows fork and exec itself; this module seeds it from /proc with
//! the processes that were running before Tapir started.
use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
};

use agent_common::select::{BY_NAME, BY_PID, BY_PORT, COMM_LEN, EXCLUDED};

/// Programs left out unless the user says otherwise: telemetry collectors and other eBPF
/// instrumentation agents. Observing a collector's OTLP/HTTP receiver would turn every
/// export into a span of its own (as OBI's default exclusions also avoid).
pub const DEFAULT_EXCLUDED: &[&str] = &[
    "otelcol",
    "otelcol-contrib",
    "otelcol-k8s",
    "otelcol-otlp",
    "alloy",
    "beyla",
    "ebpf-instrument",
];

/// The user's choice of processes. Empty: every process on the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// These processes and every process they fork.
    pub pids: Vec<u32>,
    /// Programs by file name (`nginx`, `python3`, `node`): processes whose executable or
    /// process name is one of these, and their forked children until they exec another.
    pub names: Vec<String>,
    /// Programs never observed, matched like `names`; they win over `names` and `pids`.
    pub excluded: Vec<String>,
    /// `--exe` glob patterns (`python3*`, `*node*`), matched like `names` but in
    /// userspace: from /proc when Tapir starts, then for each exec() the kernel queues
    /// (the kernel matches exact names only).
    pub patterns: Vec<glob::Pattern>,
    /// `--open-port`: processes listening on these TCP ports (sorted), and what they fork.
    pub open_ports: Vec<u16>,
}

/// Whether an `--exe` value is a glob pattern rather than a name.
fn is_pattern(name: &str) -> bool {
    name.contains(['*', '?', '['])
}

/// What /proc says about one running process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcEntry {
    pub pid: u32,
    pub ppid: u32,
    /// `/proc/PID/comm`: the kernel's process name (at most 15 bytes).
    pub comm: String,
    /// File name of `/proc/PID/exe` (None for kernel threads and vanished processes).
    pub exe_name: Option<String>,
}

/// Program names as given (`--exe`, `--exclude-exe`): a path counts for its file name
/// (what exec() puts in the process name); repeats are dropped.
fn program_names(flag: &str, given: &[String]) -> Result<Vec<String>, String> {
    let mut kept: Vec<String> = Vec::new();
    for n in given {
        let base = n.trim().rsplit('/').next().unwrap_or_default();
        if base.is_empty() {
            return Err(format!(
                "{flag} {n:?}: give a program's file name, e.g. {flag} nginx"
            ));
        }
        if base.contains('\0') {
            return Err(format!("{flag} {n:?}: a program name has no NUL byte"));
        }
        if !kept.iter().any(|k| k == base) {
            kept.push(base.to_string());
        }
    }
    Ok(kept)
}

impl Selection {
    /// `excluded`: `--exclude-exe` as given; a single `none` (or empty) value leaves
    /// nothing out.
    pub fn new(pids: Vec<u32>, names: &[String], excluded: &[String]) -> Result<Self, String> {
        let excluded = match excluded {
            [one] if one.trim().is_empty() || one.trim() == "none" => Vec::new(),
            _ => program_names("--exclude-exe", excluded)?,
        };
        if let Some(p) = excluded.iter().find(|n| is_pattern(n)) {
            return Err(format!(
                "--exclude-exe {p:?}: give exact program names (patterns are matched by the \
                 agent shortly after exec, so a process to leave out could be seen before that)"
            ));
        }
        let (patterns, names): (Vec<String>, Vec<String>) = program_names("--exe", names)?
            .into_iter()
            .partition(|n| is_pattern(n));
        let patterns = patterns
            .iter()
            .map(|p| {
                glob::Pattern::new(p).map_err(|e| format!("--exe {p:?}: not a valid pattern: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            pids,
            names,
            excluded,
            patterns,
            open_ports: Vec::new(),
        })
    }

    /// Also chooses the processes listening on `--open-port` ports (as given).
    pub fn with_open_ports(mut self, specs: &[String]) -> Result<Self, String> {
        self.open_ports = crate::listen::parse_open_ports(specs)?;
        Ok(self)
    }

    /// Only the chosen processes are observed (`--pid`, `--exe` or `--open-port` given).
    pub fn is_selective(&self) -> bool {
        !self.pids.is_empty()
            || !self.names.is_empty()
            || !self.patterns.is_empty()
            || !self.open_ports.is_empty()
    }

    /// Programs started later are matched by the agent (`loader::SelectionRescan`), not by
    /// the kernel.
    pub fn needs_rescan(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Processes the kernel chooses at listen() (`--open-port`) are handed to the agent,
    /// which chooses the children they forked before (`loader::SelectionRescan`).
    pub fn follows_listeners(&self) -> bool {
        !self.open_ports.is_empty()
    }

    /// Every process is observed: nothing chosen, nothing left out.
    pub fn is_everything(&self) -> bool {
        !self.is_selective() && self.excluded.is_empty()
    }

    /// The kernel's names to match at exec(), with what a match means (`BY_NAME` or
    /// `EXCLUDED`; left out wins): each name's first 15 bytes, NUL-padded, as the kernel
    /// stores a process name.
    pub fn comm_keys(&self) -> Vec<([u8; COMM_LEN], u8)> {
        let mut keys: Vec<([u8; COMM_LEN], u8)> = Vec::new();
        let named = self.names.iter().map(|n| (n, BY_NAME));
        for (n, why) in self.excluded.iter().map(|n| (n, EXCLUDED)).chain(named) {
            let key = comm_key(n);
            if !keys.iter().any(|(k, _)| *k == key) {
                keys.push((key, why));
            }
        }
        keys
    }

    fn name_matches(names: &[String], p: &ProcEntry) -> bool {
        names
            .iter()
            .any(|n| p.exe_name.as_deref() == Some(n.as_str()) || comm_key(&p.comm) == comm_key(n))
    }

    fn pattern_matches(patterns: &[glob::Pattern], p: &ProcEntry) -> bool {
        patterns
            .iter()
            .any(|g| p.exe_name.as_deref().is_some_and(|e| g.matches(e)) || g.matches(&p.comm))
    }

    /// The processes among `procs` that are observed, with why (`agent_common::select`).
    /// A named pid's descendants are observed too: they were forked before Tapir could
    /// follow the fork (nginx's workers when `--pid` names the master).
    pub fn judge(&self, procs: &[ProcEntry]) -> Vec<(u32, u8)> {
        self.judge_listening(procs, &HashSet::new())
    }

    /// [`Selection::judge`], where `listening` holds the pids listening on an
    /// `--open-port` port (`listen::listening_pids`).
    pub fn judge_listening(&self, procs: &[ProcEntry], listening: &HashSet<u32>) -> Vec<(u32, u8)> {
        let by_pid: HashMap<u32, &ProcEntry> = procs.iter().map(|p| (p.pid, p)).collect();
        let descends_from_named = |mut pid: u32| {
            // Bounded: a parent loop in a racy /proc snapshot must not hang the agent.
            for _ in 0..64 {
                if self.pids.contains(&pid) {
                    return true;
                }
                match by_pid.get(&pid).map(|p| p.ppid) {
                    Some(pp) if pp != 0 && pp != pid => pid = pp,
                    _ => return false,
                }
            }
            false
        };
        // `p`, or an ancestor it was forked from without an exec since (the same
        // executable), runs one of `names`: a worker that renamed itself (setproctitle) is
        // still its master's program, as the fork hook would have said.
        let runs = |names: &[String], patterns: &[glob::Pattern], p: &ProcEntry| {
            let mut cur = p;
            for _ in 0..64 {
                if Self::name_matches(names, cur) || Self::pattern_matches(patterns, cur) {
                    return true;
                }
                match by_pid.get(&cur.ppid) {
                    Some(parent)
                        if parent.pid != cur.pid
                            && parent.exe_name.is_some()
                            && parent.exe_name == p.exe_name =>
                    {
                        cur = parent
                    }
                    _ => return false,
                }
            }
            false
        };
        procs
            .iter()
            .filter_map(|p| {
                if runs(&self.excluded, &[], p) {
                    Some((p.pid, EXCLUDED))
                } else if descends_from_named(p.pid) {
                    Some((p.pid, BY_PID))
                } else if listening.contains(&p.pid) && p.pid != 1 {
                    // Before names: a listener keeps its socket across exec, so it stays
                    // chosen when it runs a program not named (the kernel's rule too).
                    Some((p.pid, BY_PORT))
                } else if runs(&self.names, &self.patterns, p) {
                    Some((p.pid, BY_NAME))
                } else {
                    None
                }
            })
            .collect()
    }

    /// Named pids that are not running: nothing to observe (and a pid put in anyway
    /// would select whichever process is given that number next).
    pub fn missing_pids(&self, procs: &[ProcEntry]) -> Vec<u32> {
        let mut missing: Vec<u32> = self
            .pids
            .iter()
            .copied()
            .filter(|pid| !procs.iter().any(|p| p.pid == *pid))
            .collect();
        missing.dedup();
        missing
    }
}

fn comm_key(name: &str) -> [u8; COMM_LEN] {
    let mut key = [0u8; COMM_LEN];
    let b = name.as_bytes();
    let n = b.len().min(COMM_LEN - 1);
    key[..n].copy_from_slice(&b[..n]);
    key
}

/// The processes among `procs` whose parent is one of `parents` (never pid 1's: the init
/// process, which may listen for socket-activated services, is never chosen by port).
pub fn children(procs: &[ProcEntry], parents: &[u32]) -> Vec<u32> {
    procs
        .iter()
        .filter(|p| p.ppid != 1 && p.pid != p.ppid && parents.contains(&p.ppid))
        .map(|p| p.pid)
        .collect()
}

/// Every process under `proc_root` (normally `/proc`). Processes that vanish while being
/// read are skipped.
pub fn scan_proc(proc_root: &Path) -> Vec<ProcEntry> {
    let Ok(dir) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        read_proc_entry(&e.path(), pid)
    })
    .collect()
}

/// One process's entry, `None` once it is gone.
pub fn read_proc(pid: u32) -> Option<ProcEntry> {
    read_proc_entry(&Path::new("/proc").join(pid.to_string()), pid)
}

fn read_proc_entry(dir: &Path, pid: u32) -> Option<ProcEntry> {
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
    let exe: Option<PathBuf> = std::fs::read_link(dir.join("exe")).ok();
    Some(ProcEntry {
        pid,
        ppid: parse_ppid(&stat)?,
        comm: comm.trim_end_matches('\n').to_string(),
        exe_name: exe.and_then(|p| {
            // A replaced binary reads "/usr/bin/x (deleted)".
            let name = p.file_name()?.to_str()?.to_string();
            Some(
                name.strip_suffix(" (deleted)")
                    .map_or(name.clone(), str::to_string),
            )
        }),
    })
}

/// The parent pid from `/proc/PID/stat`: the 4th field, counted after the `(comm)` field,
/// whose name may itself hold spaces and parentheses.
fn parse_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(pid: u32, ppid: u32, comm: &str, exe: Option<&str>) -> ProcEntry {
        ProcEntry {
            pid,
            ppid,
            comm: comm.into(),
            exe_name: exe.map(Into::into),
        }
    }

    fn host() -> Vec<ProcEntry> {
        vec![
            entry(1, 0, "systemd", Some("systemd")),
            entry(2, 0, "kthreadd", None),
            entry(100, 1, "nginx", Some("nginx")),
            entry(101, 100, "nginx", Some("nginx")),
            entry(102, 100, "nginx", Some("nginx")),
            entry(200, 1, "python3", Some("python3.11")),
            entry(201, 200, "sh", Some("dash")),
            entry(300, 1, "wrk", Some("wrk")),
            entry(400, 1, "a-very-long-pro", Some("a-very-long-program-name")),
        ]
    }

    fn pids(v: &[(u32, u8)]) -> Vec<u32> {
        let mut p: Vec<u32> = v.iter().map(|&(p, _)| p).collect();
        p.sort_unstable();
        p
    }

    #[test]
    fn listeners_on_open_ports_are_chosen_unless_chosen_otherwise_or_left_out() {
        let s = Selection::new(vec![], &["wrk".into()], &["python3".into()])
            .and_then(|s| s.with_open_ports(&["8080".into()]))
            .unwrap();
        assert!(s.is_selective());
        // nginx's master and a worker listen; python3 listens too but is left out; wrk is
        // named and listens: chosen by port, which outlives an exec.
        let listening: HashSet<u32> = [1, 100, 101, 200, 300].into();
        let mut got = s.judge_listening(&host(), &listening);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                (100, BY_PORT),
                (101, BY_PORT),
                (200, EXCLUDED),
                (300, BY_PORT)
            ]
        );
        // Without listeners, only names decide.
        assert_eq!(s.judge(&host()), [(200, EXCLUDED), (300, BY_NAME)]);
        assert!(Selection::new(vec![], &[], &[])
            .and_then(|s| s.with_open_ports(&["x".into()]))
            .is_err());
    }

    #[test]
    fn children_of_listeners() {
        let mut c = children(&host(), &[100]);
        c.sort_unstable();
        assert_eq!(c, [101, 102]);
        assert_eq!(children(&host(), &[200, 999]), [201]);
        assert!(children(&host(), &[300]).is_empty());
        // Not grandchildren, and never init's children.
        assert_eq!(children(&host(), &[1, 200]), [201]);
    }

    #[test]
    fn names_match_the_executable_or_the_process_name() {
        let names = |n: &[&str]| {
            let n: Vec<String> = n.iter().map(|s| s.to_string()).collect();
            Selection::new(vec![], &n, &[]).unwrap()
        };
        let got = names(&["nginx"]).judge(&host());
        assert_eq!(pids(&got), [100, 101, 102]);
        assert!(got.iter().all(|&(_, why)| why == BY_NAME));
        // python3 by its process name, python3.11 by its executable; a path is its file name.
        assert_eq!(pids(&names(&["python3"]).judge(&host())), [200]);
        assert_eq!(pids(&names(&["/usr/bin/python3.11"]).judge(&host())), [200]);
        // A long name matches the kernel's 15-byte process name, and the full exe name.
        assert_eq!(
            pids(&names(&["a-very-long-program-name"]).judge(&host())),
            [400]
        );
        assert_eq!(pids(&names(&["a-very-long-pro"]).judge(&host())), [400]);
        // Not a prefix or substring match.
        assert!(names(&["ngin", "nginx2", "pyth"]).judge(&host()).is_empty());
        assert_eq!(pids(&names(&["wrk", "dash"]).judge(&host())), [201, 300]);
    }

    #[test]
    fn patterns_match_the_executable_or_the_process_name() {
        let sel = |n: &[&str]| {
            let n: Vec<String> = n.iter().map(|s| s.to_string()).collect();
            Selection::new(vec![], &n, &[]).unwrap()
        };
        let s = sel(&["python3*", "ngin?"]);
        assert_eq!(s.names, Vec::<String>::new());
        assert!(s.is_selective() && s.needs_rescan());
        assert!(
            s.comm_keys().is_empty(),
            "the kernel matches exact names only"
        );
        assert_eq!(pids(&s.judge(&host())), [100, 101, 102, 200]);
        // Against the whole exe name (past the kernel's 15 bytes) or the process name.
        assert_eq!(pids(&sel(&["*-program-name"]).judge(&host())), [400]);
        assert_eq!(pids(&sel(&["[wx]rk", "da*"]).judge(&host())), [201, 300]);
        // Names and patterns mix; exact names stay the kernel's.
        let s = sel(&["wrk", "*nginx*"]);
        assert_eq!(s.names, ["wrk"]);
        assert_eq!(pids(&s.judge(&host())), [100, 101, 102, 300]);
        assert!(!sel(&["nginx"]).needs_rescan());
        assert!(sel(&["zzz*"]).judge(&host()).is_empty());
    }

    #[test]
    fn bad_patterns_and_excluded_patterns_are_refused() {
        let err = Selection::new(vec![], &["[abc".into()], &[]).unwrap_err();
        assert!(err.contains("not a valid pattern"), "{err}");
        let err = Selection::new(vec![], &[], &["python*".into()]).unwrap_err();
        assert!(err.contains("exact program names"), "{err}");
    }

    #[test]
    fn renamed_workers_follow_their_master_but_exec_children_do_not() {
        let procs = vec![
            entry(1, 0, "systemd", Some("systemd")),
            entry(500, 1, "gunicorn", Some("python3.11")),
            // setproctitle renamed the forked workers; same executable as the master.
            entry(501, 500, "gunicorn: worke", Some("python3.11")),
            entry(502, 501, "gunicorn: worke", Some("python3.11")),
            // exec'd another program.
            entry(503, 500, "sh", Some("dash")),
            // An unrelated python.
            entry(600, 1, "python3", Some("python3.11")),
        ];
        let s = Selection::new(vec![], &["gunicorn".into()], &[]).unwrap();
        assert_eq!(pids(&s.judge(&procs)), [500, 501, 502]);
        let s = Selection::new(vec![], &[], &["gunicorn".into()]).unwrap();
        assert_eq!(pids(&s.judge(&procs)), [500, 501, 502]);
        assert!(s.judge(&procs).iter().all(|&(_, why)| why == EXCLUDED));
    }

    #[test]
    fn a_named_pid_brings_its_descendants() {
        let s = Selection::new(vec![100, 200], &[], &[]).unwrap();
        let got = s.judge(&host());
        assert_eq!(pids(&got), [100, 101, 102, 200, 201]);
        assert!(got.iter().all(|&(_, why)| why == BY_PID));
        // Named by pid wins over named by name (exec keeps it selected).
        let s = Selection::new(vec![100], &["nginx".into()], &[]).unwrap();
        assert!(s.judge(&host()).iter().all(|&(_, why)| why == BY_PID));
        // A pid /proc does not list is reported, not selected; a parent loop ends.
        let looped = vec![entry(7, 8, "a", None), entry(8, 7, "b", None)];
        let s = Selection::new(vec![9], &[], &[]).unwrap();
        assert!(s.judge(&looped).is_empty());
        assert_eq!(s.missing_pids(&looped), [9]);
        let s = Selection::new(vec![7], &[], &[]).unwrap();
        assert_eq!(pids(&s.judge(&looped)), [7, 8]);
        assert!(s.missing_pids(&looped).is_empty());
    }

    #[test]
    fn bad_names_are_refused_and_repeats_dropped() {
        assert!(Selection::new(vec![], &["".into()], &[]).is_err());
        assert!(Selection::new(vec![], &["/usr/bin/".into()], &[]).is_err());
        let s = Selection::new(vec![], &["nginx".into(), "/sbin/nginx".into()], &[]).unwrap();
        assert_eq!(s.names, ["nginx"]);
        assert!(!s.is_everything());
        assert!(Selection::default().is_everything());
        let keys = Selection::new(vec![], &["a-very-long-program-name".into()], &[])
            .unwrap()
            .comm_keys();
        assert_eq!(keys, [(*b"a-very-long-pro\0", BY_NAME)]);
    }

    #[test]
    fn left_out_programs_win_and_can_be_cleared() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // Left out wins over a name and over a pid (and its descendants' pid rule).
        let s = Selection::new(vec![100], &names(&["nginx", "wrk"]), &names(&["nginx"])).unwrap();
        let got = s.judge(&host());
        assert!(got.contains(&(100, EXCLUDED)) && got.contains(&(101, EXCLUDED)));
        assert!(got.contains(&(300, BY_NAME)));
        assert_eq!(
            s.comm_keys(),
            [(comm_key("nginx"), EXCLUDED), (comm_key("wrk"), BY_NAME)]
        );
        // Leaving out alone is not selective: everything else is observed.
        let s = Selection::new(vec![], &[], &names(&["python3.11"])).unwrap();
        assert!(!s.is_selective() && !s.is_everything());
        assert_eq!(s.judge(&host()), [(200, EXCLUDED)]);
        // `none` or an empty value clears the list; any other empty name is an error.
        for clear in ["none", ""] {
            let s = Selection::new(vec![], &[], &names(&[clear])).unwrap();
            assert!(s.is_everything());
        }
        assert!(Selection::new(vec![], &[], &names(&["a", ""])).is_err());
        let defaults = names(DEFAULT_EXCLUDED);
        let s = Selection::new(vec![], &[], &defaults).unwrap();
        assert_eq!(s.excluded.len(), DEFAULT_EXCLUDED.len());
        assert!(s.comm_keys().iter().all(|&(_, why)| why == EXCLUDED));
    }

    #[test]
    fn stat_parent_pid_survives_odd_process_names() {
        assert_eq!(parse_ppid("42 (nginx) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parse_ppid("42 (a) b) (c) R 9 1 1"), Some(9));
        assert_eq!(parse_ppid("42 (x y z) S 12 0"), Some(12));
        assert_eq!(parse_ppid("42 nginx S 7"), None);
        assert_eq!(parse_ppid("42 (nginx) S"), None);
        assert_eq!(parse_ppid(""), None);
    }

    #[test]
    fn this_process_is_found_in_proc() {
        let me = std::process::id();
        let all = scan_proc(Path::new("/proc"));
        let mine = all.iter().find(|p| p.pid == me).expect("own /proc entry");
        assert_eq!(mine.ppid, std::os::unix::process::parent_id());
        assert!(mine.exe_name.is_some());
        assert_eq!(read_proc(me).as_ref(), Some(mine));
        assert!(scan_proc(Path::new("/nonexistent")).is_empty());
    }
}
