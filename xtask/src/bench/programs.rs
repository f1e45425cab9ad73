//! Benchmark 7: what each kernel program spends per keep-alive request, as the kernel
//! itself measures it. The agent runs with `--ebpf-stats` (capture only, both ends
//! observed) while wrk drives nginx, and its exit log gives each program's runs and time.
//! nginx reads requests with `recvfrom` and writes responses with `writev`; wrk writes with
//! `write` and reads with `read`. `read` and `recvfrom` share a program
//! (`tapir_exit_read_buf`), as do `write` and `sendto`, so with both ends observed the
//! ingress row holds both nginx's and wrk's reads.
//!
//! A second run observes nginx alone (`--exe nginx`): wrk's calls then stop at the process
//! check, and nginx's programs no longer share the ring buffer with another CPU. Its
//! server row is nginx's own cost (plus wrk's reads stopping at the check, tens of ns).
//!
//! Unlike the rows of 1, which subtract two noisy CPU figures, this one is a direct count:
//! the repeats of one session agree to a few percent (sessions hours apart need not). The statistics add to what they measure (the kernel reads its
//! clock around every run), so no other benchmark runs with them.

use anyhow::{bail, Result};
use serde::Serialize;

use super::{
    or_stop,
    services::{wrk, ProgramCost},
    stats::Summary,
    wait_quiet, Ctx,
};

/// Programs that ran less often than this per request (accept, close, exec…) are left out
/// of the table; their time still counts in the total.
const MIN_RUNS_PER_REQUEST: f64 = 0.05;

/// The programs of nginx's calls in this benchmark (`recvfrom`, `writev`). With both ends
/// observed the first also runs wrk's `read`s in full, so only the runs with nginx alone
/// give nginx's share.
const SERVER_PROGRAMS: [&str; 2] = ["tapir_exit_read_buf", "tapir_exit_write_vec"];

#[derive(Debug, Clone, Serialize)]
pub struct ProgramRun {
    /// `--exe nginx`: wrk's side left out.
    nginx_only: bool,
    requests: u64,
    /// Over the agent's life: start-up and shutdown add a few calls to wrk's millions.
    costs: Vec<ProgramCost>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProgramRow {
    program: String,
    runs_per_request: Summary,
    ns_per_run: Summary,
    ns_per_request: Summary,
}

/// The programs of one way of running the agent, summarized over its runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgramRows {
    rows: Vec<ProgramRow>,
    /// Every program's time, over the requests.
    total_ns_per_request: Summary,
    /// The time of [`SERVER_PROGRAMS`], over the requests.
    server_ns_per_request: Summary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgramBench {
    both_ends: ProgramRows,
    nginx_only: ProgramRows,
    runs: Vec<ProgramRun>,
}

pub fn program_bench(ctx: &mut Ctx) -> Result<ProgramBench> {
    let mut runs = Vec::new();
    for i in 0..ctx.cfg.program_runs {
        let mut order = [false, true];
        order.rotate_left(i % 2);
        for nginx_only in order {
            runs.push(one_run(ctx, nginx_only)?);
        }
    }
    Ok(ProgramBench::of(runs))
}

impl ProgramBench {
    /// Each way of running the agent summarized over its runs.
    fn of(runs: Vec<ProgramRun>) -> Self {
        Self {
            both_ends: summarize(runs.iter().filter(|r| !r.nginx_only)),
            nginx_only: summarize(runs.iter().filter(|r| r.nginx_only)),
            runs,
        }
    }
}

fn one_run(ctx: &mut Ctx, nginx_only: bool) -> Result<ProgramRun> {
    wait_quiet(ctx.cfg.quiet_wait_s);
    let mut args = ctx.port_args.clone();
    args.extend(["--exporter", "none", "--ebpf-stats"].map(String::from));
    if nginx_only {
        args.extend(["--exe", "nginx"].map(String::from));
    }
    let tag = if nginx_only {
        "ebpf-stats-nginx-only"
    } else {
        "ebpf-stats"
    };
    let mut agent = Some(ctx.start_agent(tag, &args, &[])?);
    let w = wrk(&ctx.nginx.url(), ctx.cfg.ka_conns, ctx.cfg.ka_secs, false);
    let w = or_stop(w, &mut agent)?;
    let exit = match agent {
        Some(a) => a.stop()?,
        None => bail!("the agent is gone"),
    };
    if exit.programs.is_empty() {
        bail!("the agent logged no kernel program costs: was --ebpf-stats refused?");
    }
    eprintln!(
        "xtask: bench:   {tag}: {} requests, kernel programs {:.0} ns/request",
        w.requests,
        time_ns(&exit.programs, |_| true) as f64 / w.requests.max(1) as f64
    );
    Ok(ProgramRun {
        nginx_only,
        requests: w.requests,
        costs: exit.programs,
    })
}

/// The time of the programs `of` picks by name.
fn time_ns(costs: &[ProgramCost], of: impl Fn(&str) -> bool) -> u64 {
    costs
        .iter()
        .filter(|c| of(&c.program))
        .map(|c| c.run_time_ns)
        .sum()
}

/// `names` without repeats, in the order first seen.
fn distinct<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

fn summarize<'a>(runs: impl Iterator<Item = &'a ProgramRun>) -> ProgramRows {
    let runs: Vec<&ProgramRun> = runs.collect();
    let per_req = |r: &ProgramRun, v: u64| v as f64 / r.requests.max(1) as f64;
    let rows = distinct(
        runs.iter()
            .flat_map(|r| &r.costs)
            .map(|c| c.program.as_str()),
    )
    .into_iter()
    .filter_map(|program| {
        let of_runs: Vec<(&ProgramRun, &ProgramCost)> = runs
            .iter()
            .filter_map(|&r| Some((r, r.costs.iter().find(|c| c.program == program)?)))
            .collect();
        let summary = |f: &dyn Fn(&ProgramRun, &ProgramCost) -> f64| {
            Summary::of(&of_runs.iter().map(|(r, c)| f(r, c)).collect::<Vec<_>>())
        };
        let row = ProgramRow {
            program: program.to_string(),
            runs_per_request: summary(&|r, c| per_req(r, c.runs)),
            ns_per_run: summary(&|_, c| c.run_time_ns as f64 / c.runs.max(1) as f64),
            ns_per_request: summary(&|r, c| per_req(r, c.run_time_ns)),
        };
        (row.runs_per_request.median >= MIN_RUNS_PER_REQUEST).then_some(row)
    })
    .collect();
    let per_request = |of: &dyn Fn(&str) -> bool| {
        let v: Vec<f64> = runs
            .iter()
            .map(|r| per_req(r, time_ns(&r.costs, of)))
            .collect();
        Summary::of(&v)
    };
    ProgramRows {
        rows,
        total_ns_per_request: per_request(&|_| true),
        server_ns_per_request: per_request(&|p| SERVER_PROGRAMS.contains(&p)),
    }
}

/// The programs' time on nginx's own calls as a share of nginx's own CPU per request
/// (`nginx_own_us`, from the baseline runs of 1), with nginx alone observed: the kernel's
/// part of the added-CPU target, counted rather than subtracted. Returns the text for the
/// Targets table and the share, if any.
pub fn server_share(b: &ProgramBench, nginx_own_us: f64) -> (String, Option<f64>) {
    let s = &b.nginx_only.server_ns_per_request;
    if s.n == 0 || nginx_own_us <= 0.0 {
        return ("n/a".to_string(), None);
    }
    let pct = s.median / 1000.0 / nginx_own_us * 100.0;
    let text = format!(
        "{} ns per request = {pct:.1} % of nginx's own {nginx_own_us:.2} µs, nginx alone observed (`--exe nginx`)",
        s.show(0)
    );
    (text, Some(pct))
}

/// The section of results.md: a row per program that runs with most requests (in either
/// way of running the agent).
pub fn table(md: &mut String, b: &ProgramBench) {
    md.push_str(&format!(
        "\n### 7) What the kernel programs spend per keep-alive request, as the kernel measures it (`--ebpf-stats`, capture only; {} runs each)\n\n",
        b.runs.len() / 2
    ));
    md.push_str("nginx reads with `recvfrom` and writes with `writev`; wrk writes with `write` and reads with `read`; `read` and `recvfrom` share `tapir_exit_read_buf`, `write` and `sendto` share `tapir_exit_write_buf`. Both ends observed (the agent as configured), then nginx alone (`--exe nginx`: wrk's calls stop at the process check, and only nginx's CPU writes records). Median (min … max) over runs. The statistics themselves add a little to each run.\n\n| program | runs per request | ns per run, both ends | ns per request, both ends | ns per run, nginx alone |\n|---|---|---|---|---|\n");
    let names = distinct(
        b.both_ends
            .rows
            .iter()
            .chain(&b.nginx_only.rows)
            .map(|r| r.program.as_str()),
    );
    let find =
        |rows: &ProgramRows, name: &str| rows.rows.iter().find(|r| r.program == name).cloned();
    for name in names {
        let (both, alone) = (find(&b.both_ends, name), find(&b.nginx_only, name));
        let show = |r: &Option<ProgramRow>, f: fn(&ProgramRow) -> &Summary, prec| {
            r.as_ref().map_or("–".to_string(), |r| f(r).show(prec))
        };
        md.push_str(&format!(
            "| `{name}` | {} | {} | {} | {} |\n",
            show(&both, |r| &r.runs_per_request, 2),
            show(&both, |r| &r.ns_per_run, 0),
            show(&both, |r| &r.ns_per_request, 0),
            show(&alone, |r| &r.ns_per_run, 0),
        ));
    }
    md.push_str(&format!(
        "| all programs, per request | | | {} | {} |\n",
        b.both_ends.total_ns_per_request.show(0),
        b.nginx_only.total_ns_per_request.show(0)
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(nginx_only: bool, requests: u64, costs: &[(&str, u64, u64)]) -> ProgramRun {
        ProgramRun {
            nginx_only,
            requests,
            costs: costs
                .iter()
                .map(|&(program, runs, run_time_ns)| ProgramCost {
                    program: program.into(),
                    runs,
                    run_time_ns,
                })
                .collect(),
        }
    }

    #[test]
    fn costs_are_per_request_and_rare_programs_only_count_in_the_total() {
        let b = ProgramBench::of(vec![
            run(
                false,
                1000,
                &[
                    ("tapir_exit_read_buf", 1000, 400_000),
                    ("tapir_exit_write_vec", 1000, 500_000),
                    ("tapir_exit_accept4", 16, 16_000),
                ],
            ),
            run(true, 1000, &[("tapir_exit_read_buf", 1000, 300_000)]),
            run(
                false,
                2000,
                &[
                    ("tapir_exit_read_buf", 2000, 760_000),
                    ("tapir_exit_write_vec", 2000, 1_000_000),
                    ("tapir_exit_accept4", 16, 16_000),
                ],
            ),
            run(true, 1000, &[("tapir_exit_read_buf", 1000, 320_000)]),
        ]);
        let names: Vec<&str> = b
            .both_ends
            .rows
            .iter()
            .map(|r| r.program.as_str())
            .collect();
        assert_eq!(names, ["tapir_exit_read_buf", "tapir_exit_write_vec"]);
        let recv = &b.both_ends.rows[0];
        assert!((recv.runs_per_request.median - 1.0).abs() < 1e-9);
        assert!((recv.ns_per_run.min - 380.0).abs() < 1e-9);
        assert!((recv.ns_per_run.max - 400.0).abs() < 1e-9);
        assert!((recv.ns_per_request.median - 390.0).abs() < 1e-9);
        // 916 and 888 ns per request, accept4's 16 and 8 included.
        let total = &b.both_ends.total_ns_per_request;
        assert!((total.min - 888.0).abs() < 1e-9 && (total.max - 916.0).abs() < 1e-9);
        assert!((b.nginx_only.total_ns_per_request.median - 310.0).abs() < 1e-9);
        // nginx's recvfrom + writev: 900 and 880 ns per request with both ends.
        let server = &b.both_ends.server_ns_per_request;
        assert!((server.min - 880.0).abs() < 1e-9 && (server.max - 900.0).abs() < 1e-9);
        let (share, pct) = server_share(&b, 6.2);
        assert!(pct.is_some_and(|p| (p - 5.0).abs() < 1e-9), "{pct:?}");
        assert_eq!(
            share,
            "310 (300 … 320) ns per request = 5.0 % of nginx's own 6.20 µs, nginx alone observed \
             (`--exe nginx`)"
        );
        assert_eq!(server_share(&b, 0.0), ("n/a".to_string(), None));
        let mut md = String::new();
        table(&mut md, &b);
        assert!(
            md.contains("| `tapir_exit_read_buf` | 1.00 (1.00 … 1.00) | 390 (380 … 400) | 390 (380 … 400) | 310 (300 … 320) |"),
            "{md}"
        );
        assert!(md.contains("| `tapir_exit_write_vec` | 1.00 (1.00 … 1.00) | 500 (500 … 500) | 500 (500 … 500) | – |"), "{md}");
        assert!(
            md.contains("| all programs, per request | | | 902 (888 … 916) | 310 (300 … 320) |"),
            "{md}"
        );
        assert!(md.contains("2 runs each"), "{md}");
        assert!(!md.contains("accept4"), "{md}");
    }

    #[test]
    fn a_program_missing_from_a_run_is_summarized_over_the_others() {
        let runs = [
            run(false, 100, &[("a", 100, 1000)]),
            run(false, 100, &[("a", 100, 3000), ("b", 100, 500)]),
        ];
        let rows = summarize(runs.iter());
        assert_eq!(rows.rows[0].ns_per_run.n, 2);
        assert_eq!(rows.rows[1].program, "b");
        assert_eq!(rows.rows[1].ns_per_run.n, 1);
        assert!((rows.total_ns_per_request.median - 22.5).abs() < 1e-9);
    }
}
