//! What Tapir's kernel programs cost, measured by the kernel itself: with `--ebpf-stats` the
//! agent switches on BPF run-time statistics (`BPF_ENABLE_STATS`, kernel 5.8+; off again
//! when the agent exits) and reads each program's run count and total run time from
//! `/proc/self/fdinfo`, the numbers `bpftool prog` shows. Exported as
//! `tapir.ebpf.program.runs` and `tapir.ebpf.program.run_time` by program, as OBI exports
//! its `bpf_probe_*` metrics.
//!
//! Off by default: while statistics are on, the kernel reads its clock twice around every
//! run of every BPF program on the host, Tapir's and others'.
use std::{
    fmt,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    sync::Mutex,
};

use aya::{programs::ProgramFd, Ebpf};

use crate::probes::program_names;

const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

#[derive(Debug, thiserror::Error)]
pub enum ProgramStatsError {
    #[error(
        "the kernel refused to switch on BPF run-time statistics ({0}); it needs Linux 5.8+ \
         and CAP_SYS_ADMIN, or `sysctl -w kernel.bpf_stats_enabled=1` before starting Tapir"
    )]
    Enable(String),
}

/// One program's cumulative cost since it was loaded (while statistics were on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProgramCost {
    pub program: &'static str,
    pub runs: u64,
    pub run_time_ns: u64,
}

/// The loaded programs, and the switch that keeps the kernel's statistics on.
pub struct ProgramStats {
    programs: Vec<(&'static str, ProgramFd)>,
    /// Each program's (runs, run time) at the last read: a read that fails reports these
    /// again, so that every program is always there, in the same place (the agent's delta
    /// bookkeeping goes by position) and never goes backwards.
    last: Mutex<Vec<(u64, u64)>>,
    /// Statistics stay on while this is open (`None`: the sysctl had them on already).
    _switch: Option<OwnedFd>,
}

impl fmt::Debug for ProgramStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.programs.iter().map(|(n, _)| *n).collect();
        f.debug_struct("ProgramStats")
            .field("programs", &names)
            .finish()
    }
}

impl ProgramStats {
    /// Switches statistics on and keeps a handle on each loaded program of `ebpf` (a
    /// program that failed to load is left out).
    pub fn enable(ebpf: &Ebpf) -> Result<Self, ProgramStatsError> {
        let switch = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            Ok(fd) => Some(fd),
            Err(_) if sysctl_on() => None,
            Err(e) => return Err(ProgramStatsError::Enable(e.to_string())),
        };
        let programs = program_names()
            .into_iter()
            .filter_map(|name| {
                let fd = ebpf.program(name)?.fd().ok()?.try_clone().ok()?;
                Some((name, fd))
            })
            .collect::<Vec<_>>();
        Ok(Self {
            last: Mutex::new(vec![(0, 0); programs.len()]),
            programs,
            _switch: switch,
        })
    }

    /// Each program's cost so far, in [`program_names`] order.
    pub fn read(&self) -> Vec<ProgramCost> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        self.programs
            .iter()
            .zip(last.iter_mut())
            .map(|((program, fd), last)| {
                let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                if let Some(now) = std::fs::read_to_string(path)
                    .ok()
                    .and_then(|text| parse_fdinfo(&text))
                {
                    *last = now;
                }
                ProgramCost {
                    program,
                    runs: last.0,
                    run_time_ns: last.1,
                }
            })
            .collect()
    }
}

fn sysctl_on() -> bool {
    std::fs::read_to_string(SYSCTL).is_ok_and(|s| s.trim() == "1")
}

/// `run_cnt` and `run_time_ns` of a BPF program's fdinfo (both present, or `None`).
fn parse_fdinfo(text: &str) -> Option<(u64, u64)> {
    let field = |key: &str| {
        text.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            (k.trim() == key).then(|| v.trim().parse::<u64>().ok())?
        })
    };
    Some((field("run_cnt")?, field("run_time_ns")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_counts_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t16\nino:\t2085\nprog_type:\t5\n\
                    prog_jited:\t1\nprog_tag:\tbdf8d8ad5a1a1f4b\nmemlock:\t4096\nprog_id:\t99038\n\
                    run_time_ns:\t409123\nrun_cnt:\t1000\nrecursion_misses:\t0\n\
                    verified_insns:\t5120\n";
        assert_eq!(parse_fdinfo(text), Some((1000, 409123)));
    }

    #[test]
    fn refuses_fdinfo_without_both_counts_or_with_garbage() {
        assert_eq!(parse_fdinfo(""), None);
        assert_eq!(parse_fdinfo("run_cnt:\t5\n"), None);
        assert_eq!(parse_fdinfo("run_time_ns:\t5\n"), None);
        assert_eq!(parse_fdinfo("run_cnt:\tx\nrun_time_ns:\t5\n"), None);
        assert_eq!(parse_fdinfo("run_cnt:\t-1\nrun_time_ns:\t5\n"), None);
        assert_eq!(
            parse_fdinfo("run_cnt:\t18446744073709551615\nrun_time_ns:\t0\n"),
            Some((u64::MAX, 0))
        );
        // A key that only starts like ours is not ours.
        assert_eq!(parse_fdinfo("run_cnt_x:\t1\nrun_time_ns:\t2\n"), None);
    }

    proptest::proptest! {
        #[test]
        fn finds_the_counts_among_any_other_lines(
            runs: u64,
            ns: u64,
            noise in proptest::collection::vec("[a-z_]{0,12}:?\t?[ -~]{0,20}", 0..8),
            at in 0usize..8,
        ) {
            let mut lines: Vec<String> = noise
                .into_iter()
                .filter(|l| !l.starts_with("run_cnt") && !l.starts_with("run_time_ns"))
                .collect();
            let at = at.min(lines.len());
            lines.insert(at, format!("run_time_ns:\t{ns}"));
            lines.insert(at, format!("run_cnt:\t{runs}"));
            proptest::prop_assert_eq!(parse_fdinfo(&lines.join("\n")), Some((runs, ns)));
        }

        #[test]
        fn never_panics_on_any_text(text in "\\PC{0,200}") {
            let _ = parse_fdinfo(&text);
        }
    }

    #[test]
    fn every_program_name_is_known_once() {
        let mut names: Vec<&str> = program_names();
        let n = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), n);
    }
}
