//! Benchmark 1b: latency at a fixed request rate below saturation.
//!
//! wrk keeps nginx flat out, so its latencies mostly measure throughput lost (in a closed
//! loop, latency ≈ connections / throughput). `tapir-load` sends at a fixed rate instead
//! and counts each latency from when the request was due, which is what a service's
//! clients see at the load it normally runs at.
use std::{path::Path, time::Duration};

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

use super::{or_stop, pinned_json, services::Agent, stats::Summary, wait_quiet, Ctx};

/// Share of the keep-alive baseline's throughput the fixed rate runs at.
pub const RATE_SHARE: f64 = 0.3;
/// The rate when the keep-alive benchmark did not run.
pub const FALLBACK_RATE: u32 = 20_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateVariant {
    Baseline,
    /// The agent as configured (both ends observed, exporting).
    Agent,
    /// The agent with `--exe nginx`.
    NginxOnly,
}

#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    pair: usize,
    variant: RateVariant,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    completed: u64,
    planned: u64,
    errors: u64,
    spans_received: u64,
    spans_expected: u64,
    server_cpu_per_req_us: f64,
    agent_cpu_per_req_us: f64,
}

/// One variant against the baseline of the same pair.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RateCost {
    pub p50_added_us: Summary,
    pub p99_added_us: Summary,
    pub p999_added_us: Summary,
    pub server_added_per_req_us: Summary,
    pub agent_cpu_per_req_us: Summary,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RateBench {
    pub rate: u32,
    pub conns: u32,
    pub secs: u32,
    pub base_p50_us: Summary,
    pub base_p99_us: Summary,
    pub base_p999_us: Summary,
    pub agent: RateCost,
    pub nginx_only: RateCost,
    runs: Vec<RateRun>,
}

pub fn rate_bench(ctx: &mut Ctx, load_bin: &Path, rate: u32) -> Result<RateBench> {
    let (pairs, secs, conns) = (ctx.cfg.rate_pairs, ctx.cfg.rate_secs, ctx.cfg.ka_conns);
    let mut runs = Vec::new();
    for pair in 0..pairs {
        let mut order = vec![RateVariant::Baseline, RateVariant::Agent];
        if ctx.cfg.nginx_only && ctx.receiver.is_some() {
            order.push(RateVariant::NginxOnly);
        }
        let n = order.len();
        order.rotate_left(pair % n);
        for variant in order {
            runs.push(one_rate_run(
                ctx, load_bin, rate, conns, secs, variant, pair,
            )?);
        }
    }
    Ok(summarize(rate, conns, secs, runs))
}

fn one_rate_run(
    ctx: &mut Ctx,
    load_bin: &Path,
    rate: u32,
    conns: u32,
    secs: u32,
    variant: RateVariant,
    pair: usize,
) -> Result<RateRun> {
    wait_quiet(ctx.cfg.quiet_wait_s);
    let mut agent = if variant == RateVariant::Baseline {
        None
    } else {
        let nginx_only = variant == RateVariant::NginxOnly;
        let mut args = ctx.agent_args.clone();
        if nginx_only {
            args.extend(["--exe".into(), "nginx".into()]);
        }
        let tag = if nginx_only {
            "rate-nginx-only"
        } else {
            "rate"
        };
        Some(ctx.start_agent(tag, &args, &[])?)
    };
    let spans0 = match &mut ctx.receiver {
        Some(r) => r.counts()?.spans,
        None => 0,
    };
    let (a0, n0) = (agent.as_ref().map_or(0.0, Agent::cpu_s), ctx.nginx.cpu_s());
    let log = ctx.work.join("tapir-load.log");
    let load = run_load(load_bin, &log, ctx.nginx.port, rate, conns, secs);
    let n1 = ctx.nginx.cpu_s();
    let load = or_stop(load, &mut agent)?;
    let num = |k: &str| load[k].as_f64().unwrap_or(f64::NAN);
    let completed = load["completed"].as_u64().unwrap_or(0);
    let expected = match variant {
        RateVariant::Baseline => 0,
        RateVariant::Agent => 2 * completed,
        RateVariant::NginxOnly => completed,
    };
    let mut spans = 0;
    let mut a1 = a0;
    if let Some(a) = agent {
        if let Some(r) = &mut ctx.receiver {
            r.settle(
                spans0 + expected,
                Duration::from_millis(1500),
                Duration::from_secs(20),
            );
        }
        a1 = a.cpu_s();
        a.stop()?;
        if let Some(r) = &mut ctx.receiver {
            spans = r.counts()?.spans - spans0;
        }
    }
    let per_req = |s: f64| s / completed.max(1) as f64 * 1e6;
    let run = RateRun {
        pair,
        variant,
        p50_us: num("p50_us"),
        p90_us: num("p90_us"),
        p99_us: num("p99_us"),
        p999_us: num("p999_us"),
        completed,
        planned: load["planned"].as_u64().unwrap_or(0),
        errors: load["errors"].as_u64().unwrap_or(0),
        spans_received: spans,
        spans_expected: if ctx.receiver.is_some() { expected } else { 0 },
        server_cpu_per_req_us: per_req(n1 - n0),
        agent_cpu_per_req_us: per_req(a1 - a0),
    };
    eprintln!(
        "xtask: bench:   pair {pair} {:<8} {rate} req/s  p50 {:>5.0} µs  p99 {:>6.0} µs  p99.9 {:>6.0} µs{}",
        match variant {
            RateVariant::Baseline => "baseline",
            RateVariant::Agent => "agent",
            RateVariant::NginxOnly => "nginx",
        },
        run.p50_us,
        run.p99_us,
        run.p999_us,
        if run.spans_expected > 0 {
            format!("  spans {}/{}", run.spans_received, run.spans_expected)
        } else {
            String::new()
        }
    );
    Ok(run)
}

/// `tapir-load` pinned to the client core; its JSON line.
fn run_load(bin: &Path, log: &Path, port: u16, rate: u32, conns: u32, secs: u32) -> Result<Value> {
    let args = [
        "--port".to_string(),
        port.to_string(),
        "--rate".into(),
        rate.to_string(),
        "--conns".into(),
        conns.to_string(),
        "--secs".into(),
        secs.to_string(),
    ];
    let v = pinned_json(bin, &args, log)?;
    if v["completed"].as_u64().unwrap_or(0) == 0 {
        bail!("tapir-load completed no request: {v}");
    }
    Ok(v)
}

fn summarize(rate: u32, conns: u32, secs: u32, runs: Vec<RateRun>) -> RateBench {
    let base_of = |pair: usize| {
        runs.iter()
            .find(|r| r.pair == pair && r.variant == RateVariant::Baseline)
    };
    let cost = |variant: RateVariant| {
        let mut d: [Vec<f64>; 5] = Default::default();
        for r in runs.iter().filter(|r| r.variant == variant) {
            let Some(b) = base_of(r.pair) else { continue };
            d[0].push(r.p50_us - b.p50_us);
            d[1].push(r.p99_us - b.p99_us);
            d[2].push(r.p999_us - b.p999_us);
            d[3].push(r.server_cpu_per_req_us - b.server_cpu_per_req_us);
            d[4].push(r.agent_cpu_per_req_us);
        }
        RateCost {
            p50_added_us: Summary::of(&d[0]),
            p99_added_us: Summary::of(&d[1]),
            p999_added_us: Summary::of(&d[2]),
            server_added_per_req_us: Summary::of(&d[3]),
            agent_cpu_per_req_us: Summary::of(&d[4]),
        }
    };
    let base = |f: fn(&RateRun) -> f64| {
        Summary::of(
            &runs
                .iter()
                .filter(|r| r.variant == RateVariant::Baseline)
                .map(f)
                .collect::<Vec<_>>(),
        )
    };
    RateBench {
        rate,
        conns,
        secs,
        base_p50_us: base(|r| r.p50_us),
        base_p99_us: base(|r| r.p99_us),
        base_p999_us: base(|r| r.p999_us),
        agent: cost(RateVariant::Agent),
        nginx_only: cost(RateVariant::NginxOnly),
        runs,
    }
}

/// The section of results.md.
pub fn table(md: &mut String, b: &RateBench) {
    md.push_str(&format!(
        "\n#### 1b) nginx keep-alive at a fixed rate: {} requests/s ({:.0} % of the keep-alive baseline's throughput), {} connections, {} s per run\n\n",
        b.rate,
        RATE_SHARE * 100.0,
        b.conns,
        b.secs
    ));
    md.push_str("`tapir-load` (open loop: each latency counts from when its request was due). Added = agent run − baseline run of the same pair; median (min … max) over pairs.\n\n");
    md.push_str("| | baseline | added, agent as configured | added, nginx alone observed (`--exe nginx`) |\n|---|---|---|---|\n");
    let row = |md: &mut String, name: &str, base: &Summary, a: &Summary, n: &Summary| {
        md.push_str(&format!(
            "| {name} | {} | {} | {} |\n",
            base.show(0),
            a.show(0),
            n.show(0)
        ));
    };
    row(
        md,
        "p50 latency (µs)",
        &b.base_p50_us,
        &b.agent.p50_added_us,
        &b.nginx_only.p50_added_us,
    );
    row(
        md,
        "p99 latency (µs)",
        &b.base_p99_us,
        &b.agent.p99_added_us,
        &b.nginx_only.p99_added_us,
    );
    row(
        md,
        "p99.9 latency (µs)",
        &b.base_p999_us,
        &b.agent.p999_added_us,
        &b.nginx_only.p999_added_us,
    );
    md.push_str(&format!(
        "| nginx CPU per request (µs) | | {} | {} |\n| agent CPU per request (µs) | | {} | {} |\n",
        b.agent.server_added_per_req_us.show(2),
        b.nginx_only.server_added_per_req_us.show(2),
        b.agent.agent_cpu_per_req_us.show(2),
        b.nginx_only.agent_cpu_per_req_us.show(2),
    ));
    let spans: Vec<String> = b
        .runs
        .iter()
        .filter(|r| r.spans_expected > 0)
        .map(|r| format!("{}/{}", r.spans_received, r.spans_expected))
        .collect();
    if !spans.is_empty() {
        md.push_str(&format!(
            "\nSpans received / expected per agent run: {}.\n",
            spans.join(", ")
        ));
    }
}
