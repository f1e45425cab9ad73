//! Benchmark 6: what Tapir costs the programs on the host that it does not trace. Every
//! process that makes a syscall the agent hooks (read, write, …) pays for the tracepoint,
//! observed or not. `dd` copies /dev/zero to /dev/null one byte at a time (a read and a
//! write per byte, on fds that are not sockets), pinned to the client core: without the
//! agent, with the agent observing it (the kernel programs find its fds are not sockets
//! and stop), and with the agent leaving it out (`--exe nginx`: the programs stop at the
//! process check). Its CPU time comes from wait4(2); the groups rotate their order.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::{or_stop, services::CLIENT_CPU, stats::Summary, sys, wait_quiet, Ctx};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Who {
    Baseline,
    /// The agent as configured: it observes every process, `dd` included.
    Observed,
    /// The agent with `--exe nginx`: `dd` is left out.
    LeftOut,
}

#[derive(Debug, Clone, Serialize)]
pub struct SyscallRun {
    group: usize,
    who: Who,
    /// read + write calls `dd` made.
    calls: u64,
    /// `dd`'s user + system CPU.
    cpu_s: f64,
    wall_s: f64,
}

impl SyscallRun {
    fn ns_per_call(&self) -> f64 {
        self.cpu_s / self.calls.max(1) as f64 * 1e9
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SyscallBench {
    /// Bytes `dd` copies per run (a read and a write each).
    bytes: u64,
    /// `dd`'s CPU per call without the agent.
    base_ns: Summary,
    /// Added per call, against the baseline of the same group.
    observed_added_ns: Summary,
    left_out_added_ns: Summary,
    runs: Vec<SyscallRun>,
}

pub fn syscall_bench(ctx: &mut Ctx) -> Result<SyscallBench> {
    let (groups, bytes) = (ctx.cfg.syscall_groups, ctx.cfg.syscall_bytes);
    let mut runs = Vec::new();
    for group in 0..groups {
        let mut order = vec![Who::Baseline, Who::Observed, Who::LeftOut];
        order.rotate_left(group % 3);
        for who in order {
            runs.push(one_run(ctx, bytes, who, group)?);
        }
    }
    Ok(summarize(bytes, runs))
}

fn summarize(bytes: u64, runs: Vec<SyscallRun>) -> SyscallBench {
    let added = |who: Who| {
        let v: Vec<f64> = runs
            .iter()
            .filter(|r| r.who == who)
            .filter_map(|r| {
                let base = runs
                    .iter()
                    .find(|b| b.group == r.group && b.who == Who::Baseline)?;
                Some(r.ns_per_call() - base.ns_per_call())
            })
            .collect();
        Summary::of(&v)
    };
    let base: Vec<f64> = runs
        .iter()
        .filter(|r| r.who == Who::Baseline)
        .map(SyscallRun::ns_per_call)
        .collect();
    SyscallBench {
        bytes,
        base_ns: Summary::of(&base),
        observed_added_ns: added(Who::Observed),
        left_out_added_ns: added(Who::LeftOut),
        runs,
    }
}

fn one_run(ctx: &mut Ctx, bytes: u64, who: Who, group: usize) -> Result<SyscallRun> {
    wait_quiet(ctx.cfg.quiet_wait_s);
    let mut agent = match who {
        Who::Baseline => None,
        Who::Observed | Who::LeftOut => {
            let left_out = who == Who::LeftOut;
            let mut args = ctx.agent_args.clone();
            if left_out {
                args.extend(["--exe".into(), "nginx".into()]);
            }
            let tag = if left_out {
                "syscalls-left-out"
            } else {
                "syscalls"
            };
            Some(ctx.start_agent(tag, &args, &[])?)
        }
    };
    let run = or_stop(dd(ctx, bytes), &mut agent)?;
    if let Some(a) = agent {
        a.stop()?;
    }
    Ok(SyscallRun {
        group,
        who,
        calls: 2 * bytes,
        cpu_s: run.0,
        wall_s: run.1,
    })
}

/// `dd` copying `bytes` one at a time on the client core: (CPU seconds, wall seconds).
fn dd(ctx: &Ctx, bytes: u64) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    // taskset execs dd in place: wait4 reports dd's own CPU.
    let mut child = Command::new("taskset")
        .args([
            "-c",
            CLIENT_CPU,
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=1",
        ])
        .arg(format!("count={bytes}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(ctx.work.join("dd.log"))?)
        .spawn()
        .context("running dd")?;
    let exit = sys::wait_child(
        &mut child,
        Instant::now() + Duration::from_secs(120),
        libc::SIGTERM,
    )?;
    if exit.code != Some(0) {
        bail!(
            "dd exited with {:?}:\n{}",
            exit.code,
            sys::tail(&ctx.work.join("dd.log"), 5)
        );
    }
    Ok((exit.cpu_s, t0.elapsed().as_secs_f64()))
}

/// The section of results.md.
pub fn table(md: &mut String, b: &SyscallBench) {
    md.push_str(&format!(
        "\n### 6) What programs the agent does not trace pay: `dd bs=1` copying {} bytes from /dev/zero to /dev/null ({} read + write calls, not on sockets), on CPU {CLIENT_CPU}\n\n",
        b.bytes,
        2 * b.bytes
    ));
    md.push_str("Every process pays for the syscall tracepoints the agent hooks, whether it is observed or not. `dd`'s CPU per call; added = agent run − baseline run of the same group; median (min … max) over groups.\n\n| | ns per call |\n|---|---|\n");
    md.push_str(&format!(
        "| baseline (no agent) | {} |\n| added, `dd` observed (the agent as configured) | {} |\n| added, `dd` left out (`--exe nginx`) | {} |\n",
        b.base_ns.show(0),
        b.observed_added_ns.show(0),
        b.left_out_added_ns.show(0),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(group: usize, who: Who, cpu_s: f64) -> SyscallRun {
        SyscallRun {
            group,
            who,
            calls: 1_000_000,
            cpu_s,
            wall_s: 1.0,
        }
    }

    #[test]
    fn each_run_is_measured_against_its_own_groups_baseline() {
        let b = summarize(
            500_000,
            vec![
                run(0, Who::Observed, 0.35),
                run(0, Who::Baseline, 0.20),
                run(0, Who::LeftOut, 0.33),
                run(1, Who::Baseline, 0.30),
                run(1, Who::LeftOut, 0.42),
                run(1, Who::Observed, 0.43),
            ],
        );
        let near = |s: &Summary, median: f64, min: f64, max: f64| {
            (s.median - median).abs() < 1e-6
                && (s.min - min).abs() < 1e-6
                && (s.max - max).abs() < 1e-6
        };
        assert!(near(&b.base_ns, 250.0, 200.0, 300.0), "{:?}", b.base_ns);
        assert!(
            near(&b.observed_added_ns, 140.0, 130.0, 150.0),
            "{:?}",
            b.observed_added_ns
        );
        assert!(
            near(&b.left_out_added_ns, 125.0, 120.0, 130.0),
            "{:?}",
            b.left_out_added_ns
        );
        let mut md = String::new();
        table(&mut md, &b);
        assert!(
            md.contains("| added, `dd` observed (the agent as configured) | 140 (130 … 150) |"),
            "{md}"
        );
        assert!(md.contains("1000000 read + write calls"), "{md}");
    }

    #[test]
    fn a_group_without_its_baseline_adds_nothing() {
        let b = summarize(
            500_000,
            vec![run(0, Who::Observed, 0.35), run(1, Who::Baseline, 0.2)],
        );
        assert_eq!(b.observed_added_ns.n, 0);
        assert_eq!(b.base_ns.n, 1);
    }
}
