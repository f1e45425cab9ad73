//! `cargo xtask bench [--quick]`: what Tapir costs the services it observes, and itself.
//!
//! Everything runs on 127.0.0.1 and stops by itself (every load loop is bounded in count
//! and time). On a small shared host throughput swings by tens of percent from run to run,
//! so runs are done in groups — baseline, agent, and agent with `--exporter none` — whose
//! order rotates from group to group ("pairs" below), nginx (one worker) and
//! wrk are pinned to different cores, each figure is the median of the per-pair values with
//! its spread (min … max), and CPU time per request — read from /proc, where the kernel
//! programs' time is charged to the observed process — is reported next to throughput.
//!
//! 1. nginx, small responses, HTTP/1.1 keep-alive, wrk with fixed connections.
//!    1b. The same at a fixed rate below saturation (`tapir-load`, open loop; see `rate`).
//! 2. The same with `Connection: close`: a TCP connection per request.
//! 3. The agent's own CPU and memory during 1 and 2, exporting every span to a real OTLP
//!    receiver (when `tapir run` has an OTLP exporter): over gRPC, and in 1 also over
//!    OTLP/HTTP (Tapir's protocol for endpoints not on port 4317).
//! 4. The userspace pipeline alone on recorded and synthesized ring-buffer records
//!    (`agent/src/bin/tapir-replay.rs`), on one core.
//! 5. Agent memory with 10k idle keep-alive connections, then across 1,000 short-lived
//!    client processes.
//! 6. What programs the agent does not trace pay per hooked syscall (`syscalls`).
//! 7. What each kernel program spends per keep-alive request, as the kernel counts it
//!    (`tapir run --ebpf-stats`; `programs`).
//!
//! Results: a Markdown table on stdout and in target/bench/results.md, raw numbers in
//! target/bench/results.json, logs in target/bench/work/. Environment: `TAPIR_BENCH_BIN`
//! benchmarks another tapir binary; `TAPIR_BENCH_PROFILE=0|1` skips or forces the callgrind
//! profile (default: full runs only). BENCHMARKS.md says how to read the numbers.
mod programs;
mod rate;
mod services;
mod stats;
mod sys;
mod syscalls;

use std::{
    fs,
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};

use self::{
    services::{wrk, Agent, AgentExit, Nginx, Receiver, WrkResult, CLIENT_CPU},
    stats::{human_count, mib, Summary},
    sys::{Mem, MemSampler},
};

/// Sizes of one benchmark session.
#[derive(Debug, Clone, Serialize)]
struct Config {
    quick: bool,
    /// Keep-alive: baseline/agent pairs, seconds per run, wrk connections.
    ka_pairs: usize,
    ka_secs: u32,
    ka_conns: u32,
    /// Unrecorded load before each load benchmark (nginx, the page cache, the TCP stack).
    warmup_secs: u32,
    /// Connection: close.
    close_pairs: usize,
    close_secs: u32,
    close_conns: u32,
    /// Pipeline replay: synthesized connections × requests, rounds, recording seconds.
    replay_conns: u32,
    replay_requests: u32,
    replay_rounds: u32,
    record_secs: u32,
    /// Memory: idle keep-alive connections, short-lived client processes.
    idle_conns: usize,
    churn_procs: usize,
    churn_parallel: usize,
    /// How long memory is watched after the churn (the OTLP metrics interval is 60 s).
    churn_settle_s: u64,
    /// Longest wait for the host to calm down before a run.
    quiet_wait_s: f64,
    /// callgrind profile of the pipeline.
    profile: bool,
    /// Also run the agent with `--exporter none` in each pair (capture cost alone).
    capture_only: bool,
    /// Also run the agent with a 10 % trace-id ratio sampler in each pair.
    sampled: bool,
    /// Also run the agent observing nginx alone (`--exe nginx`) in each pair.
    nginx_only: bool,
    /// Also run the agent exporting over OTLP/HTTP in each keep-alive pair.
    otlp_http: bool,
    /// Fixed-rate keep-alive (1b): baseline/agent pairs, seconds per run.
    rate_pairs: usize,
    rate_secs: u32,
    /// Other programs' syscalls (6): groups, bytes `dd` copies one at a time per run.
    syscall_groups: usize,
    syscall_bytes: u64,
    /// Kernel programs' own time (7): keep-alive runs with `--ebpf-stats`.
    program_runs: usize,
}

impl Config {
    fn new(quick: bool) -> Self {
        let profile = std::env::var("TAPIR_BENCH_PROFILE")
            .map(|v| v != "0")
            .unwrap_or(!quick);
        if quick {
            // A smoke run of every benchmark in about two minutes: one group each, the
            // variants that take other code paths (export over gRPC and over HTTP, nginx
            // alone), none of the repeats that make the figures steady.
            Self {
                quick,
                ka_pairs: 1,
                ka_secs: 2,
                ka_conns: 16,
                warmup_secs: 1,
                close_pairs: 1,
                close_secs: 2,
                close_conns: 16,
                replay_conns: 256,
                replay_requests: 100,
                replay_rounds: 1,
                record_secs: 1,
                idle_conns: 10_000,
                churn_procs: 100,
                churn_parallel: 4,
                churn_settle_s: 2,
                quiet_wait_s: 0.5,
                profile,
                capture_only: false,
                sampled: false,
                nginx_only: true,
                otlp_http: true,
                rate_pairs: 1,
                rate_secs: 2,
                syscall_groups: 1,
                syscall_bytes: 300_000,
                program_runs: 1,
            }
        } else {
            Self {
                quick,
                ka_pairs: 5,
                ka_secs: 10,
                ka_conns: 16,
                warmup_secs: 2,
                close_pairs: 3,
                close_secs: 6,
                close_conns: 16,
                replay_conns: 1000,
                replay_requests: 200,
                replay_rounds: 7,
                record_secs: 2,
                idle_conns: 10_000,
                churn_procs: 1_000,
                churn_parallel: 4,
                churn_settle_s: 65,
                quiet_wait_s: 5.0,
                profile,
                capture_only: true,
                sampled: true,
                nginx_only: true,
                otlp_http: true,
                rate_pairs: 5,
                rate_secs: 8,
                syscall_groups: 3,
                syscall_bytes: 1_000_000,
                program_runs: 3,
            }
        }
    }
}

/// Targets of the benchmark issue.
const TARGET_ADDED_CPU_PCT: f64 = 10.0;
const TARGET_KA_THROUGHPUT: f64 = 0.97;
const TARGET_ADDED_P99_US: f64 = 50.0;
const TARGET_PIPELINE_EPS: f64 = 300_000.0;
const TARGET_RSS_10K_KIB: u64 = 64 * 1024;
/// "Flat after churn": what may stay after 1,000 processes (allocator slack).
const CHURN_SLACK_KIB: u64 = 2 * 1024;

/// Shared state of a session.
struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    cfg: Config,
    nginx: Nginx,
    receiver: Option<Receiver>,
    agent_args: Vec<String>,
    /// The start of `agent_args` that picks nginx's ports (variants replace the rest).
    port_args: Vec<String>,
    /// Agents started so far (log file numbering, and telling ours from foreign ones).
    agents_started: usize,
    mine: Vec<u32>,
}

impl Ctx {
    /// `tapir run ARGS` with `envs`, logging to `agent-NN-{tag}.log` in the work directory
    /// (NN counts the agents started), and remembered as ours.
    fn start_agent(&mut self, tag: &str, args: &[String], envs: &[(&str, &str)]) -> Result<Agent> {
        self.agents_started += 1;
        let log = self
            .work
            .join(format!("agent-{:02}-{tag}.log", self.agents_started));
        let agent = Agent::start(&self.bin, args, envs, &log)?;
        self.mine.push(agent.pid);
        Ok(agent)
    }
}

pub fn run(root: &Path, bin: &Path, quick: bool) -> Result<()> {
    if !crate::is_root() {
        bail!("the benchmarks load eBPF programs: run `cargo xtask bench` as root");
    }
    crate::setup::ensure_debian(&[
        ("nginx", "nginx"),
        ("wrk", "wrk"),
        ("curl", "curl"),
        ("openssl", "openssl"),
        ("taskset", "util-linux"),
    ])?;
    let started = Instant::now();
    // TAPIR_BENCH_BIN: benchmark another tapir build (e.g. the last release) instead.
    let bin_override = std::env::var_os("TAPIR_BENCH_BIN").map(PathBuf::from);
    let bin = bin_override.as_deref().unwrap_or(bin);
    let cfg = Config::new(quick);
    let nofile = sys::raise_nofile();
    let out = root.join("target/bench");
    let work = out.join("work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let mut machine = machine_info(root, nofile);
    machine["tapir_binary"] = json!(bin.display().to_string());
    eprintln!(
        "xtask: bench ({}) on {} — {}",
        if quick { "quick" } else { "full" },
        machine["cpu"].as_str().unwrap_or("?"),
        machine["kernel"].as_str().unwrap_or("?")
    );
    let tools = build_bench_tools(root)?;

    let help = sys::run_output(Command::new(bin).args(["run", "--help"]))?;
    let otlp = help.contains("--otlp-endpoint");
    let receiver = if otlp {
        Some(Receiver::start(
            &tools.sink,
            &work.join("otlp-receiver.log"),
        )?)
    } else {
        eprintln!(
            "xtask: bench: `tapir run` has no --otlp-endpoint yet: measuring it without export"
        );
        None
    };
    let nginx = Nginx::start(root, &work.join("nginx"))?;
    let port_args = vec![
        "--port".to_string(),
        nginx.port.to_string(),
        "--port".to_string(),
        nginx.tls_port.to_string(),
    ];
    let mut agent_args = port_args.clone();
    if let Some(r) = &receiver {
        agent_args.extend(exporter_args("grpc", r.grpc_port));
    }
    machine["exporter"] = json!(if otlp {
        "OTLP/gRPC to a local receiver (tapir-otlp-sink); keep-alive also over OTLP/HTTP"
    } else {
        "none (tapir run had no OTLP exporter)"
    });
    let mut mine = vec![std::process::id(), nginx.worker];
    if let Some(r) = &receiver {
        mine.push(r.pid());
    }
    let mut ctx = Ctx {
        bin: bin.to_path_buf(),
        work: work.clone(),
        cfg: cfg.clone(),
        nginx,
        receiver,
        agent_args,
        port_args,
        agents_started: 0,
        mine,
    };
    let result = run_all(&mut ctx, &tools);
    let Ctx {
        nginx, receiver, ..
    } = ctx;
    nginx.stop();
    if let Some(r) = receiver {
        r.stop();
    }
    let mut results = result?;
    machine["foreign_agents_at_end"] = json!(sys::foreign_agents(&[]).len());
    machine["loadavg_at_end"] = json!(sys::loadavg());
    machine["duration_s"] = json!(started.elapsed().as_secs_f64());
    results.machine = machine;
    let md = render(&results);
    fs::write(out.join("results.md"), &md)?;
    fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    println!("{md}");
    eprintln!(
        "xtask: bench done in {:.0} s: {} and {}",
        started.elapsed().as_secs_f64(),
        out.join("results.md").display(),
        out.join("results.json").display()
    );
    Ok(())
}

#[derive(Debug, Default, Serialize)]
struct Results {
    machine: Value,
    config: Value,
    keepalive: Option<LoadBench>,
    large_body: Option<LoadBench>,
    https: Option<LoadBench>,
    fixed_rate: Option<rate::RateBench>,
    close: Option<LoadBench>,
    pipeline: Vec<Value>,
    pipeline_profiles: Vec<Profile>,
    memory: Option<MemoryBench>,
    syscalls: Option<syscalls::SyscallBench>,
    programs: Option<programs::ProgramBench>,
    errors: Vec<String>,
}

fn run_all(ctx: &mut Ctx, tools: &BenchTools) -> Result<Results> {
    let replay_bin = &tools.replay;
    let mut res = Results {
        config: serde_json::to_value(&ctx.cfg)?,
        ..Default::default()
    };
    // Each part reports its own failure and the others still run.
    let attempt = |name: &str, res: &mut Results, f: &mut dyn FnMut(&mut Results) -> Result<()>| {
        eprintln!("xtask: bench: {name}");
        if let Err(e) = f(res) {
            eprintln!("xtask: bench: {name} failed: {e:#}");
            res.errors.push(format!("{name}: {e:#}"));
        }
    };
    attempt("1) keep-alive", &mut res, &mut |r| {
        r.keepalive = Some(load_bench(ctx, false)?);
        Ok(())
    });
    attempt("1b) keep-alive at a fixed rate", &mut res, &mut |r| {
        // A share of what nginx managed without the agent: well below saturation.
        let rate = r
            .keepalive
            .as_ref()
            .map(|k| k.base_rps.median * rate::RATE_SHARE)
            .filter(|v| v.is_finite() && *v >= 1000.0)
            .map_or(rate::FALLBACK_RATE, |v| (v / 1000.0).round() as u32 * 1000);
        r.fixed_rate = Some(rate::rate_bench(ctx, &tools.load, rate)?);
        Ok(())
    });
    attempt("1c) keep-alive, 16 KiB responses", &mut res, &mut |r| {
        // Fewer, shorter groups: the per-request costs are larger and steadier here.
        let (pairs, secs) = (ctx.cfg.ka_pairs, ctx.cfg.ka_secs);
        ctx.cfg.ka_pairs = pairs.min(3);
        ctx.cfg.ka_secs = secs.min(6);
        ctx.nginx.path = services::BODY16K;
        let b = load_bench(ctx, false);
        (ctx.cfg.ka_pairs, ctx.cfg.ka_secs, ctx.nginx.path) = (pairs, secs, "/");
        r.large_body = Some(b?);
        Ok(())
    });
    attempt("1d) keep-alive over HTTPS", &mut res, &mut |r| {
        let (pairs, secs) = (ctx.cfg.ka_pairs, ctx.cfg.ka_secs);
        ctx.cfg.ka_pairs = pairs.min(3);
        ctx.cfg.ka_secs = secs.min(6);
        ctx.nginx.tls = true;
        let b = load_bench(ctx, false);
        (ctx.cfg.ka_pairs, ctx.cfg.ka_secs, ctx.nginx.tls) = (pairs, secs, false);
        r.https = Some(b?);
        Ok(())
    });
    attempt("2) Connection: close", &mut res, &mut |r| {
        r.close = Some(load_bench(ctx, true)?);
        Ok(())
    });
    attempt("4) userspace pipeline", &mut res, &mut |r| {
        r.pipeline = pipeline_bench(ctx, replay_bin)?;
        Ok(())
    });
    if ctx.cfg.profile {
        attempt("4b) pipeline profile (callgrind)", &mut res, &mut |r| {
            for sink in ["count", "otel"] {
                r.pipeline_profiles.push(profile(ctx, replay_bin, sink)?);
            }
            Ok(())
        });
    }
    attempt("6) syscalls of programs not traced", &mut res, &mut |r| {
        r.syscalls = Some(syscalls::syscall_bench(ctx)?);
        Ok(())
    });
    attempt(
        "7) kernel programs' own time (--ebpf-stats)",
        &mut res,
        &mut |r| {
            r.programs = Some(programs::program_bench(ctx)?);
            Ok(())
        },
    );
    attempt(
        "5) memory: idle connections and process churn",
        &mut res,
        &mut |r| {
            r.memory = Some(memory_bench(ctx)?);
            Ok(())
        },
    );
    Ok(res)
}

// ---------------------------------------------------------------------------------------------
// Benchmarks 1–3: wrk against nginx, baseline vs agent

#[derive(Debug, Clone, Default, Serialize)]
struct Run {
    pair: usize,
    agent: bool,
    /// The agent ran with `--exporter none`.
    capture_only: bool,
    /// The agent ran with the sampler [`SAMPLED_ENV`].
    sampled: bool,
    /// The agent observed nginx alone (`--exe nginx`): wrk's side was not captured.
    nginx_only: bool,
    /// The agent exported over OTLP/HTTP instead of gRPC.
    otlp_http: bool,
    wrk: WrkResult,
    /// nginx worker CPU during the wrk run.
    server_cpu_s: f64,
    /// Agent CPU from just before wrk started until its exports settled.
    agent_cpu_s: f64,
    agent_startup_s: f64,
    agent_startup_cpu_s: f64,
    /// Largest RSS sampled during the run (agent runs), and the lifetime peak (VmHWM,
    /// which includes start-up).
    agent_mem_peak: Mem,
    agent_ringbuf_rss_kib: u64,
    agent_exit: Option<AgentExit>,
    /// Spans the receiver got during this run, and what 100 % would be (both ends of every
    /// completed request; wrk's last in-flight requests may add or miss a few).
    spans_received: u64,
    spans_expected: u64,
    receiver_cpu_s: f64,
    /// Host CPU during the run not used by nginx, wrk, the agent or the receiver.
    foreign_cpu_s: f64,
    foreign_agents: usize,
    waited_for_quiet_s: f64,
    loadavg: String,
}

impl Run {
    /// `cpu_s` seconds spread over this run's requests, in µs per request.
    fn per_req_us(&self, cpu_s: f64) -> f64 {
        cpu_s / self.wrk.requests.max(1) as f64 * 1e6
    }

    /// The agent as configured: not one of the extra variants.
    fn is_default_agent(&self) -> bool {
        self.agent && !self.capture_only && !self.sampled && !self.nginx_only && !self.otlp_http
    }
}

#[derive(Debug, Clone, Default, Serialize)]
struct LoadBench {
    close: bool,
    runs: Vec<Run>,
    /// Per-pair values, summarized. The agent as configured against the baseline (its
    /// fields sit at this level in results.json, as before the variants had their own).
    #[serde(flatten)]
    agent: VariantCost,
    base_rps: Summary,
    agent_rps: Summary,
    p50_added_us: Summary,
    base_p99_us: Summary,
    server_cpu_per_req_us: Summary,
    client_added_per_req_us: Summary,
    /// The local OTLP receiver's CPU per request (it shares the host's cores).
    receiver_cpu_per_req_us: Summary,
    agent_cpu_s_per_100k: Summary,
    agent_peak_rss_kib: u64,
    agent_hwm_kib: u64,
    agent_ringbuf_rss_kib: u64,
    agent_anon_peak_kib: u64,
    agent_startup_s: Summary,
    agent_startup_cpu_s: Summary,
    span_ratio: Summary,
    /// Spans the agent itself reported dropped, over exported + dropped.
    span_drop_ratio: Summary,
    /// The same per-pair figures for `--exporter none` runs, for sampled runs, for runs
    /// observing nginx alone, and for runs exporting over OTLP/HTTP.
    capture: VariantCost,
    sampled: VariantCost,
    nginx_only: VariantCost,
    otlp_http: VariantCost,
    foreign_cpu_share: Summary,
    foreign_agents_max: usize,
}

/// Waits (bounded) until the host is nearly idle: other work on 2 cores moves every number.
fn wait_quiet(max_s: f64) -> f64 {
    let t0 = Instant::now();
    loop {
        let (b0, _) = sys::host_cpu_s();
        thread::sleep(Duration::from_millis(500));
        let (b1, _) = sys::host_cpu_s();
        let busy_cores = (b1 - b0) / 0.5;
        if busy_cores < 0.25 || t0.elapsed().as_secs_f64() >= max_s {
            return t0.elapsed().as_secs_f64();
        }
    }
}

/// `tapir run`'s flags to export over OTLP `protocol` to the local receiver's `port`.
fn exporter_args(protocol: &str, port: u16) -> Vec<String> {
    [
        "--exporter",
        "otlp",
        "--otlp-protocol",
        protocol,
        "--otlp-endpoint",
        &format!("http://127.0.0.1:{port}"),
    ]
    .map(String::from)
    .to_vec()
}

fn proc_cpu(pid: Option<u32>) -> f64 {
    pid.and_then(sys::proc_cpu_s).unwrap_or(0.0)
}

/// What runs next to nginx in one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Baseline,
    /// `tapir run` as configured (exporting to the receiver when it can).
    Agent,
    /// `tapir run --exporter none`: capture and pairing, nothing exported.
    CaptureOnly,
    /// `tapir run` as configured, with the sampler [`SAMPLED_ENV`].
    Sampled,
    /// `tapir run` as configured, observing nginx alone (`--exe nginx`), as when the
    /// clients are on other hosts.
    NginxOnly,
    /// `tapir run` as configured, exporting over OTLP/HTTP (binary protobuf), the protocol
    /// Tapir picks for an endpoint not on port 4317, to the receiver's HTTP port.
    OtlpHttp,
}

/// The sampler of [`Variant::Sampled`]: what the README suggests for busy services.
const SAMPLED_ENV: [(&str, &str); 2] = [
    ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
    ("OTEL_TRACES_SAMPLER_ARG", "0.1"),
];

fn one_run(ctx: &mut Ctx, close: bool, variant: Variant, pair: usize) -> Result<Run> {
    let agent_on = variant != Variant::Baseline;
    let capture_only = variant == Variant::CaptureOnly;
    let sampled = variant == Variant::Sampled;
    let nginx_only = variant == Variant::NginxOnly;
    let otlp_http = variant == Variant::OtlpHttp;
    let (secs, conns) = if close {
        (ctx.cfg.close_secs, ctx.cfg.close_conns)
    } else {
        (ctx.cfg.ka_secs, ctx.cfg.ka_conns)
    };
    let waited = wait_quiet(ctx.cfg.quiet_wait_s);
    let mut agent = if agent_on {
        let tag = format!(
            "{}{}",
            if close { "close" } else { "keepalive" },
            match variant {
                Variant::CaptureOnly => "-capture-only",
                Variant::Sampled => "-sampled",
                Variant::NginxOnly => "-nginx-only",
                Variant::OtlpHttp => "-otlp-http",
                _ => "",
            }
        );
        let mut args = ctx.agent_args.clone();
        if capture_only {
            args.clone_from(&ctx.port_args);
            args.extend(["--exporter".into(), "none".into()]);
        }
        if nginx_only {
            args.extend(["--exe".into(), "nginx".into()]);
        }
        if let (true, Some(port)) = (otlp_http, ctx.receiver.as_ref().and_then(|r| r.http_port)) {
            args.clone_from(&ctx.port_args);
            args.extend(exporter_args("http/protobuf", port));
        }
        let envs: &[(&str, &str)] = if sampled { &SAMPLED_ENV } else { &[] };
        Some(ctx.start_agent(&tag, &args, envs)?)
    } else {
        None
    };
    let sampler = agent.as_ref().map(|a| MemSampler::start(a.pid));
    let rpid = ctx.receiver.as_ref().map(Receiver::pid);
    let spans0 = match &mut ctx.receiver {
        Some(r) => r.counts()?.spans,
        None => 0,
    };
    let foreign_agents = sys::foreign_agents(&ctx.mine).len();
    let loadavg = sys::loadavg();
    let (host0, _) = sys::host_cpu_s();
    let (r0, a0, n0) = (
        proc_cpu(rpid),
        agent.as_ref().map_or(0.0, Agent::cpu_s),
        ctx.nginx.cpu_s(),
    );
    let w = wrk(&ctx.nginx.url(), conns, secs, close);
    let n1 = ctx.nginx.cpu_s();
    let w = or_stop(w, &mut agent)?;
    // A span for each end of every request; nginx's end alone when wrk is not observed.
    let expected = if nginx_only { 1 } else { 2 } * w.requests;
    let mut spans = 0;
    if let Some(a) = &agent {
        match &mut ctx.receiver {
            Some(r) => {
                let c = r.settle(
                    spans0 + expected,
                    Duration::from_millis(1500),
                    Duration::from_secs(20),
                );
                spans = c.spans - spans0;
            }
            None => thread::sleep(Duration::from_millis(300)),
        }
        let _ = a;
    }
    let a1 = agent.as_ref().map_or(0.0, Agent::cpu_s);
    let r1 = proc_cpu(rpid);
    let (host1, _) = sys::host_cpu_s();
    let mut run = Run {
        pair,
        agent: agent_on,
        capture_only,
        sampled,
        nginx_only,
        otlp_http,
        server_cpu_s: n1 - n0,
        agent_cpu_s: a1 - a0,
        receiver_cpu_s: r1 - r0,
        foreign_agents,
        waited_for_quiet_s: waited,
        loadavg,
        spans_expected: if matches!(
            variant,
            Variant::Agent | Variant::NginxOnly | Variant::OtlpHttp
        ) && ctx.receiver.is_some()
        {
            expected
        } else {
            0
        },
        ..Default::default()
    };
    if let (Some(a), Some(s)) = (agent, sampler) {
        run.agent_ringbuf_rss_kib = sys::mapping_rss_kib(a.pid, "anon_inode:bpf-map");
        let (peak, _) = s.finish();
        run.agent_mem_peak = peak;
        run.agent_startup_s = a.startup_s;
        run.agent_startup_cpu_s = a.startup_cpu_s;
        let exit = a.stop()?;
        // Spans flushed at shutdown count too.
        if let Some(r) = &mut ctx.receiver {
            spans = r.counts()?.spans - spans0;
        } else {
            spans = counter(&exit, "tapir.exchanges");
        }
        run.agent_exit = Some(exit);
    }
    run.spans_received = spans;
    run.foreign_cpu_s = ((host1 - host0)
        - (run.server_cpu_s + w.cpu_s + run.agent_cpu_s + run.receiver_cpu_s))
        .max(0.0);
    run.wrk = w;
    eprintln!(
        "xtask: bench:   pair {pair} {:<8} {:>9.0} req/s  p99 {:>7.0} µs  nginx {:>5.1} µs/req  agent {:>5.1} µs/req{}",
        match variant {
            Variant::Baseline => "baseline",
            Variant::Agent => "agent",
            Variant::CaptureOnly => "capture",
            Variant::Sampled => "sampled",
            Variant::NginxOnly => "nginx",
            Variant::OtlpHttp => "http",
        },
        run.wrk.rps,
        run.wrk.p99_us,
        run.server_cpu_s / run.wrk.requests as f64 * 1e6,
        run.agent_cpu_s / run.wrk.requests as f64 * 1e6,
        if run.spans_expected > 0 {
            format!("  spans {}/{}", run.spans_received, run.spans_expected)
        } else {
            String::new()
        }
    );
    Ok(run)
}

/// `r`, or its error once `agent` is stopped: a failed load run leaves no agent behind.
fn or_stop<T>(r: Result<T>, agent: &mut Option<Agent>) -> Result<T> {
    r.inspect_err(|_| {
        if let Some(a) = agent.take() {
            let _ = a.stop();
        }
    })
}

fn counter(exit: &AgentExit, name: &str) -> u64 {
    exit.counters
        .iter()
        .find(|(n, _)| n == name)
        .map_or(0, |(_, v)| *v)
}

fn load_bench(ctx: &mut Ctx, close: bool) -> Result<LoadBench> {
    let pairs = if close {
        ctx.cfg.close_pairs
    } else {
        ctx.cfg.ka_pairs
    };
    // Warm-up (not recorded): nginx, the page cache, the TCP stack.
    let conns = if close {
        ctx.cfg.close_conns
    } else {
        ctx.cfg.ka_conns
    };
    wrk(&ctx.nginx.url(), conns, ctx.cfg.warmup_secs, close)?;
    let mut runs = Vec::new();
    for pair in 0..pairs {
        // Rotate the order so that no variant always runs first or last.
        let mut order = vec![Variant::Baseline, Variant::Agent];
        if ctx.cfg.capture_only && ctx.receiver.is_some() {
            order.push(Variant::CaptureOnly);
        }
        if ctx.cfg.sampled && ctx.receiver.is_some() {
            order.push(Variant::Sampled);
        }
        if ctx.cfg.nginx_only && ctx.receiver.is_some() {
            order.push(Variant::NginxOnly);
        }
        // Keep-alive only: the export path is what differs, and that is where spans flow.
        if ctx.cfg.otlp_http
            && !close
            && ctx.receiver.as_ref().is_some_and(|r| r.http_port.is_some())
        {
            order.push(Variant::OtlpHttp);
        }
        let n = order.len();
        order.rotate_left(pair % n);
        for variant in order {
            runs.push(one_run(ctx, close, variant, pair)?);
        }
    }
    Ok(summarize_load(close, runs))
}

/// A variant's cost against the baseline of its pair (capture only, sampled, nginx alone).
#[derive(Debug, Clone, Default, Serialize)]
struct VariantCost {
    throughput_ratio: Summary,
    p99_added_us: Summary,
    server_added_per_req_us: Summary,
    agent_cpu_per_req_us: Summary,
    added_cpu_pct: Summary,
    /// The local OTLP receiver's CPU per request (what the export costs on its side).
    receiver_cpu_per_req_us: Summary,
}

impl VariantCost {
    /// Over the pairs that have both a baseline and a run for which `is_variant` holds.
    fn of(runs: &[Run], is_variant: impl Fn(&Run) -> bool) -> Self {
        let mut v: [Vec<f64>; 6] = Default::default();
        for base in runs.iter().filter(|r| !r.agent) {
            let Some(c) = runs.iter().find(|r| r.pair == base.pair && is_variant(r)) else {
                continue;
            };
            let server_base = base.per_req_us(base.server_cpu_s);
            let added = c.per_req_us(c.server_cpu_s) - server_base;
            let agent = c.per_req_us(c.agent_cpu_s);
            v[0].push(c.wrk.rps / base.wrk.rps);
            v[1].push(c.wrk.p99_us - base.wrk.p99_us);
            v[2].push(added);
            v[3].push(agent);
            v[4].push((added + agent) / server_base * 100.0);
            v[5].push(c.per_req_us(c.receiver_cpu_s));
        }
        Self {
            throughput_ratio: Summary::of(&v[0]),
            p99_added_us: Summary::of(&v[1]),
            server_added_per_req_us: Summary::of(&v[2]),
            agent_cpu_per_req_us: Summary::of(&v[3]),
            added_cpu_pct: Summary::of(&v[4]),
            receiver_cpu_per_req_us: Summary::of(&v[5]),
        }
    }

    /// Report rows, labelled "— {long}: …" first and "— {short}: …" after.
    fn rows(&self, long: &str, short: &str, unit: &str) -> Vec<(String, String)> {
        if self.throughput_ratio.n == 0 {
            return Vec::new();
        }
        vec![
            (
                format!("— {long}: throughput ratio"),
                self.throughput_ratio.pct(1),
            ),
            (
                format!("— {short}: p99 latency added (µs)"),
                self.p99_added_us.show(0),
            ),
            (
                format!("— {short}: nginx CPU added per {unit} (µs)"),
                self.server_added_per_req_us.show(2),
            ),
            (
                format!("— {short}: agent CPU per {unit} (µs)"),
                self.agent_cpu_per_req_us.show(2),
            ),
            (
                format!("— {short}: added CPU / nginx's own"),
                self.added_cpu_pct.show(1) + " %",
            ),
            (
                format!("— {short}: the local OTLP receiver's CPU per {unit} (µs)"),
                self.receiver_cpu_per_req_us.show(2),
            ),
        ]
    }
}

fn summarize_load(close: bool, runs: Vec<Run>) -> LoadBench {
    let mut b = LoadBench {
        close,
        ..Default::default()
    };
    let mut v: [Vec<f64>; 12] = Default::default();
    let mut drops = Vec::new();
    let pairs = runs.iter().map(|r| r.pair).max().map_or(0, |p| p + 1);
    for p in 0..pairs {
        let base = runs.iter().find(|r| r.pair == p && !r.agent);
        let ag = runs.iter().find(|r| r.pair == p && r.is_default_agent());
        let (Some(base), Some(ag)) = (base, ag) else {
            continue;
        };
        v[0].push(base.wrk.rps);
        v[1].push(ag.wrk.rps);
        v[2].push(ag.wrk.p50_us - base.wrk.p50_us);
        v[3].push(base.wrk.p99_us);
        v[4].push(base.per_req_us(base.server_cpu_s));
        v[5].push(ag.per_req_us(ag.wrk.cpu_s) - base.per_req_us(base.wrk.cpu_s));
        v[6].push(ag.per_req_us(ag.agent_cpu_s) / 10.0); // s per 100k requests
        v[7].push(ag.agent_startup_s);
        v[8].push(ag.agent_startup_cpu_s);
        if ag.spans_expected > 0 {
            v[9].push(ag.spans_received as f64 / ag.spans_expected as f64);
        }
        v[11].push(ag.per_req_us(ag.receiver_cpu_s));
        if let Some(AgentExit {
            spans_exported: Some(e),
            spans_dropped: Some(d),
            ..
        }) = &ag.agent_exit
        {
            drops.push(*d as f64 / (*e + *d).max(1) as f64);
        }
    }
    for r in &runs {
        let dur = r.wrk.seconds.max(0.1);
        v[10].push(r.foreign_cpu_s / dur);
        b.foreign_agents_max = b.foreign_agents_max.max(r.foreign_agents);
        if r.is_default_agent() {
            b.agent_peak_rss_kib = b.agent_peak_rss_kib.max(r.agent_mem_peak.rss_kib);
            b.agent_anon_peak_kib = b.agent_anon_peak_kib.max(r.agent_mem_peak.anon_kib);
            b.agent_hwm_kib = b.agent_hwm_kib.max(r.agent_mem_peak.hwm_kib);
            b.agent_ringbuf_rss_kib = b.agent_ringbuf_rss_kib.max(r.agent_ringbuf_rss_kib);
        }
    }
    b.base_rps = Summary::of(&v[0]);
    b.agent_rps = Summary::of(&v[1]);
    b.p50_added_us = Summary::of(&v[2]);
    b.base_p99_us = Summary::of(&v[3]);
    b.server_cpu_per_req_us = Summary::of(&v[4]);
    b.client_added_per_req_us = Summary::of(&v[5]);
    b.agent_cpu_s_per_100k = Summary::of(&v[6]);
    b.agent_startup_s = Summary::of(&v[7]);
    b.agent_startup_cpu_s = Summary::of(&v[8]);
    b.span_ratio = Summary::of(&v[9]);
    b.foreign_cpu_share = Summary::of(&v[10]);
    b.receiver_cpu_per_req_us = Summary::of(&v[11]);
    b.span_drop_ratio = Summary::of(&drops);
    b.agent = VariantCost::of(&runs, Run::is_default_agent);
    b.capture = VariantCost::of(&runs, |r| r.capture_only);
    b.sampled = VariantCost::of(&runs, |r| r.sampled);
    b.nginx_only = VariantCost::of(&runs, |r| r.nginx_only);
    b.otlp_http = VariantCost::of(&runs, |r| r.otlp_http);
    b.runs = runs;
    b
}

// ---------------------------------------------------------------------------------------------
// Benchmark 4: the userspace pipeline alone

/// The benchmark's own programs, built from this tree whatever `TAPIR_BENCH_BIN` says.
struct BenchTools {
    /// `tapir-replay`: the pipeline benchmark.
    replay: PathBuf,
    /// `tapir-otlp-sink`: the counting OTLP/gRPC receiver.
    sink: PathBuf,
    /// `tapir-load`: fixed-rate load.
    load: PathBuf,
}

fn build_bench_tools(root: &Path) -> Result<BenchTools> {
    crate::status(
        Command::new(crate::cargo())
            .args(["build", "--release", "-p", "tapir"])
            .args(["--bin", "tapir-replay", "--bin", "tapir-otlp-sink"])
            .args(["--bin", "tapir-load"])
            .env("TAPIR_EBPF_OBJECT", crate::ebpf_object(root))
            .env("TAPIR_EBPF_COMPAT_OBJECT", crate::ebpf_compat_object(root))
            .current_dir(root),
        "building tapir-replay, tapir-otlp-sink and tapir-load (the benchmark's tools)",
    )?;
    Ok(BenchTools {
        replay: root.join("target/release/tapir-replay"),
        sink: root.join("target/release/tapir-otlp-sink"),
        load: root.join("target/release/tapir-load"),
    })
}

/// Runs one of the benchmark's tools (tapir-replay, tapir-load) pinned to the client
/// core, its stderr in `log`; returns the JSON line it ends with.
fn pinned_json(bin: &Path, args: &[String], log: &Path) -> Result<Value> {
    let name = bin.file_name().unwrap_or_default().to_string_lossy();
    let out = Command::new("taskset")
        .args(["-c", CLIENT_CPU])
        .arg(bin)
        .args(args)
        .stderr(fs::File::create(log)?)
        .output()
        .with_context(|| format!("running {name}"))?;
    if !out.status.success() {
        bail!(
            "{name} {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            sys::tail(log, 15)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or(""))
        .with_context(|| format!("{name} said {text:?}"))
}

fn pipeline_bench(ctx: &mut Ctx, replay_bin: &Path) -> Result<Vec<Value>> {
    let cfg = &ctx.cfg;
    let mut out = Vec::new();
    let shape = [
        "--connections".to_string(),
        cfg.replay_conns.to_string(),
        "--requests".into(),
        cfg.replay_requests.to_string(),
        "--rounds".into(),
        cfg.replay_rounds.to_string(),
    ];
    for sink in ["count", "json", "otel"] {
        wait_quiet(cfg.quiet_wait_s);
        let mut args = vec!["synth".to_string()];
        args.extend(shape.iter().cloned());
        args.extend(["--sink".into(), sink.into()]);
        let mut v = pinned_json(
            replay_bin,
            &args,
            &ctx.work.join(format!("replay-synth-{sink}.log")),
        )?;
        v["stream"] = json!(format!(
            "synthesized: {} keep-alive connections × {} requests, both ends",
            cfg.replay_conns, cfg.replay_requests
        ));
        v["sink_label"] = json!(sink);
        eprintln!(
            "xtask: bench:   synthesized, {sink:<5}: {} events/s per CPU-second ({} wall)",
            human_count(v["events_per_s_cpu_median"].as_f64().unwrap_or(0.0)),
            human_count(v["events_per_s_wall_median"].as_f64().unwrap_or(0.0)),
        );
        out.push(v);
    }
    // A real stream: the kernel's records while wrk drives nginx.
    let file = ctx.work.join("recorded.tapirrec");
    match record_stream(ctx, replay_bin, &file) {
        Ok(rec) => {
            for sink in ["count", "otel"] {
                wait_quiet(ctx.cfg.quiet_wait_s);
                let args = vec![
                    "replay".to_string(),
                    file.display().to_string(),
                    "--rounds".into(),
                    ctx.cfg.replay_rounds.to_string(),
                    "--sink".into(),
                    sink.into(),
                ];
                let mut v = pinned_json(
                    replay_bin,
                    &args,
                    &ctx.work.join(format!("replay-recorded-{sink}.log")),
                )?;
                v["stream"] = json!(format!(
                    "recorded: wrk → nginx keep-alive, {} records from the kernel",
                    rec["records"]
                ));
                v["sink_label"] = json!(sink);
                eprintln!(
                    "xtask: bench:   recorded,    {sink:<5}: {} events/s per CPU-second ({} wall)",
                    human_count(v["events_per_s_cpu_median"].as_f64().unwrap_or(0.0)),
                    human_count(v["events_per_s_wall_median"].as_f64().unwrap_or(0.0)),
                );
                out.push(v);
            }
            let _ = fs::remove_file(&file);
        }
        Err(e) => {
            eprintln!("xtask: bench:   recording a real stream failed: {e:#}");
            out.push(json!({"stream": "recorded", "error": format!("{e:#}")}));
        }
    }
    Ok(out)
}

/// `tapir-replay record` while wrk drives nginx with keep-alive connections.
fn record_stream(ctx: &mut Ctx, replay_bin: &Path, file: &Path) -> Result<Value> {
    let log = ctx.work.join("replay-record.log");
    let secs = ctx.cfg.record_secs;
    let mut child = Command::new(replay_bin)
        .args(["record", "--out"])
        .arg(file)
        .args(["--seconds", &(secs + 2).to_string()])
        .stdout(Stdio::piped())
        .stderr(fs::File::create(&log)?)
        .spawn()
        .context("starting tapir-replay record")?;
    let end = Instant::now() + Duration::from_secs(90);
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("recording")
    {
        if child.try_wait()?.is_some() || Instant::now() >= end {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "tapir-replay record did not start:\n{}",
                sys::tail(&log, 15)
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    ctx.mine.push(child.id());
    let w = wrk(&ctx.nginx.url(), 64, secs, false);
    let mut stdout = child.stdout.take().context("record stdout")?;
    let exit = sys::wait_child(
        &mut child,
        Instant::now() + Duration::from_secs(u64::from(secs) + 30),
        libc::SIGINT,
    )?;
    let mut text = String::new();
    stdout.read_to_string(&mut text)?;
    w?;
    if exit.code != Some(0) {
        bail!("tapir-replay record failed:\n{}", sys::tail(&log, 15));
    }
    serde_json::from_str(text.trim()).with_context(|| format!("record said {text:?}"))
}

#[derive(Debug, Clone, Default, Serialize)]
struct Profile {
    sink: String,
    instructions_per_record: f64,
    /// (function, % of the instructions, self cost), largest first
    top: Vec<(String, f64)>,
}

/// callgrind over the replay of a synthesized stream (64 connections × 200 requests, both
/// ends: 51,456 records), collecting only inside `on_record`: top functions by self cost
/// (instructions), and instructions per record.
fn profile(ctx: &mut Ctx, replay_bin: &Path, sink: &str) -> Result<Profile> {
    if !Path::new("/usr/bin/valgrind").exists() {
        crate::setup::ensure_debian(&[("valgrind", "valgrind")])?;
    }
    let outf = ctx.work.join(format!("callgrind-{sink}.out"));
    let st = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--toggle-collect=*on_record*",
            &format!("--callgrind-out-file={}", outf.display()),
        ])
        .arg(replay_bin)
        .args([
            "synth",
            "--connections",
            "64",
            "--requests",
            "200",
            "--rounds",
            "1",
            "--sink",
            sink,
        ])
        .stdout(Stdio::null())
        .stderr(fs::File::create(ctx.work.join("callgrind.log"))?)
        .status()
        .context("running valgrind")?;
    if !st.success() {
        bail!(
            "valgrind failed:\n{}",
            sys::tail(&ctx.work.join("callgrind.log"), 15)
        );
    }
    let text = sys::run_output(
        Command::new("callgrind_annotate")
            .args(["--inclusive=no", "--threshold=99", "--auto=no"])
            .arg(&outf),
    )?;
    fs::write(ctx.work.join(format!("callgrind-{sink}.txt")), &text)?;
    let records = f64::from(2 * 64 * 2 + 4 * 64 * 200);
    Ok(Profile {
        sink: sink.to_string(),
        top: parse_callgrind(&text),
        instructions_per_record: callgrind_total(&text).unwrap_or(f64::NAN) / records,
    })
}

/// `  1,234 (12.34%)  file:function [obj]` lines → (function, percent), summed over the
/// files a function's inlined pieces come from, largest first.
fn parse_callgrind(text: &str) -> Vec<(String, f64)> {
    let mut by_func: Vec<(String, f64)> = Vec::new();
    // Only the table under the `file:function` header, up to the first blank line (what
    // follows, in annotated sources, are inclusive costs of calls).
    let table = text
        .lines()
        .skip_while(|l| !l.contains("file:function"))
        .skip(2)
        .take_while(|l| !l.trim().is_empty());
    for l in table {
        let l = l.trim();
        let (Some(open), Some(close)) = (l.find(" ("), l.find("%)")) else {
            continue;
        };
        if open == 0 || !l[..open].chars().all(|c| c.is_ascii_digit() || c == ',') {
            continue;
        }
        let Ok(pct) = l[open + 2..close].trim().parse::<f64>() else {
            continue;
        };
        let rest = l[close + 2..].trim();
        if rest.starts_with("PROGRAM TOTALS") || rest.is_empty() {
            continue;
        }
        // "file:function [object]": the file never contains ':', the function may.
        let func = rest.split_once(':').map_or(rest, |(_, f)| f);
        let func = func.rsplit_once(" [").map_or(func, |(f, _)| f).trim();
        match by_func.iter_mut().find(|(f, _)| f == func) {
            Some(e) => e.1 += pct,
            None => by_func.push((func.to_string(), pct)),
        }
    }
    by_func.sort_by(|a, b| b.1.total_cmp(&a.1));
    by_func.truncate(15);
    by_func
}

/// Total instructions of a callgrind annotate ("PROGRAM TOTALS").
fn callgrind_total(text: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.contains("PROGRAM TOTALS"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.replace(',', "").parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Benchmark 5: memory with idle connections and process churn

#[derive(Debug, Clone, Default, Serialize)]
struct MemoryBench {
    idle_conns: usize,
    opened: usize,
    /// RSS samples (KiB) at each step.
    idle_before: Mem,
    with_conns: Mem,
    with_conns_peak: Mem,
    after_close: Mem,
    churn_procs: usize,
    churn_failures: usize,
    churn_checkpoints: Vec<(usize, Mem)>,
    after_churn: Mem,
    /// Seconds after the churn, and memory then.
    after_churn_settled: Vec<(u64, Mem)>,
    ringbuf_rss_kib: u64,
    churn_growth_kib: i64,
    churn_seconds: f64,
    agent_exit: Option<AgentExit>,
}

fn open_idle(port: u16, n: usize) -> Result<Vec<TcpStream>> {
    let req = b"GET /idle HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    let mut conns = Vec::with_capacity(n);
    let mut buf = [0u8; 1024];
    for i in 0..n {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .with_context(|| format!("connection {i} of {n} (open files limit?)"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(req)?;
        let mut got = Vec::new();
        while !got.ends_with(b"hello from nginx\n") {
            let k = s.read(&mut buf)?;
            if k == 0 {
                bail!("nginx closed idle connection {i}");
            }
            got.extend_from_slice(&buf[..k]);
        }
        conns.push(s);
    }
    Ok(conns)
}

/// How often the agent sweeps idle connections (`IDLE_SWEEP` in agent/src/pipeline.rs).
const AGENT_IDLE_SWEEP: Duration = Duration::from_secs(5);

fn memory_bench(ctx: &mut Ctx) -> Result<MemoryBench> {
    let cfg = ctx.cfg.clone();
    wait_quiet(cfg.quiet_wait_s);
    let args = ctx.agent_args.clone();
    let agent = ctx.start_agent("memory", &args, &[])?;
    let pid = agent.pid;
    let mem = || Mem::read(pid).unwrap_or_default();
    let settle = || thread::sleep(Duration::from_millis(1500));
    let mut m = MemoryBench {
        idle_conns: cfg.idle_conns,
        churn_procs: cfg.churn_procs,
        ..Default::default()
    };
    let res = (|| -> Result<()> {
        settle();
        m.idle_before = mem();
        let sampler = MemSampler::start(pid);
        let conns = open_idle(ctx.nginx.port, cfg.idle_conns)?;
        m.opened = conns.len();
        settle();
        thread::sleep(Duration::from_secs(2));
        m.with_conns = mem();
        m.ringbuf_rss_kib = sys::mapping_rss_kib(pid, "anon_inode:bpf-map");
        drop(conns);
        // The agent frees idle buffers and returns heap to the OS on its sweep: read after
        // the next one.
        settle();
        thread::sleep(AGENT_IDLE_SWEEP);
        m.with_conns_peak = sampler.finish().0;
        m.after_close = mem();
        let url = ctx.nginx.url();
        let t0 = Instant::now();
        let step = (cfg.churn_procs / 5).max(1);
        let deadline = t0 + Duration::from_secs(300);
        let mut started = 0;
        let mut running: Vec<std::process::Child> = Vec::new();
        while (started < cfg.churn_procs || !running.is_empty()) && Instant::now() < deadline {
            while running.len() < cfg.churn_parallel && started < cfg.churn_procs {
                // curl, and every fourth a Python client: two kinds of short-lived processes.
                let child = if started % 4 != 3 {
                    Command::new("curl")
                        .args(["-s", "-o", "/dev/null", "--max-time", "10", &url])
                        .stdin(Stdio::null())
                        .spawn()
                } else {
                    Command::new("python3")
                        .args([
                            "-c",
                            "import sys,urllib.request;urllib.request.urlopen(sys.argv[1],timeout=10).read()",
                            &url,
                        ])
                        .stdin(Stdio::null())
                        .spawn()
                };
                running.push(child.context("starting a short-lived client")?);
                started += 1;
            }
            let mut i = 0;
            while i < running.len() {
                if let Some(st) = running[i].try_wait()? {
                    if !st.success() {
                        m.churn_failures += 1;
                    }
                    let _ = running.swap_remove(i).wait();
                } else {
                    i += 1;
                }
            }
            let done = started - running.len();
            if done > 0
                && done.is_multiple_of(step)
                && m.churn_checkpoints.last().map(|c| c.0) != Some(done)
            {
                m.churn_checkpoints.push((done, mem()));
            }
            thread::sleep(Duration::from_millis(2));
        }
        for mut c in running {
            let _ = c.kill();
            let _ = c.wait();
            m.churn_failures += 1;
        }
        m.churn_seconds = t0.elapsed().as_secs_f64();
        m.after_churn = mem();
        // Watch whether what the churn added goes away (e.g. at the next metrics export).
        let t1 = Instant::now();
        let settle_s = cfg.churn_settle_s.max(2);
        let mut at: Vec<u64> = [2, 10, 40].into_iter().filter(|&t| t < settle_s).collect();
        at.push(settle_s);
        for t in at {
            thread::sleep(Duration::from_secs(t).saturating_sub(t1.elapsed()));
            m.after_churn_settled.push((t, mem()));
        }
        let first = m
            .churn_checkpoints
            .first()
            .map_or(m.after_close.rss_kib, |c| c.1.rss_kib);
        let last = m.after_churn_settled.last().map_or(m.after_churn, |c| c.1);
        m.churn_growth_kib = last.rss_kib as i64 - first as i64;
        Ok(())
    })();
    let exit = agent.stop();
    res?;
    m.agent_exit = Some(exit?);
    Ok(m)
}

// ---------------------------------------------------------------------------------------------
// Report

fn machine_info(root: &Path, nofile: u64) -> Value {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_kib: u64 = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let out = |c: &mut Command| sys::run_output(c).unwrap_or_default().trim().to_string();
    let foreign = sys::foreign_agents(&[]);
    json!({
        "cpu": cpu,
        "cores": thread::available_parallelism().map_or(0, |n| n.get()),
        "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": out(Command::new("uname").args(["-sr"])),
        "date": out(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"])),
        "git": out(Command::new("git").args(["-C"]).arg(root).args(["describe", "--always", "--dirty"])),
        "nginx": out(Command::new("sh").args(["-c", "nginx -v 2>&1"])),
        "wrk": out(Command::new("sh").args(["-c", "wrk -v 2>&1 | head -1"])),
        "open_files_limit": nofile,
        "loadavg_at_start": sys::loadavg(),
        "foreign_agents_at_start": foreign.len(),
        "foreign_agent_cmdlines": foreign.iter().map(|(p, c)| format!("{p}: {c}")).collect::<Vec<_>>(),
    })
}

fn verdict(ok: Option<bool>, noisy: bool) -> &'static str {
    match (ok, noisy) {
        (Some(true), false) => "**met**",
        (Some(false), false) => "**not met**",
        (Some(true), true) => "met by the median; runs on both sides (noisy)",
        (Some(false), true) => "not met by the median; runs on both sides (noisy)",
        (None, _) => "n/a",
    }
}

/// "X; capture only: Y; nginx alone: Z" for the variants that ran.
fn with_variants(
    b: &LoadBench,
    pick: impl Fn(&VariantCost) -> &Summary,
    show: impl Fn(&Summary) -> String,
) -> String {
    let mut out = show(pick(&b.agent));
    for (label, v) in [
        ("capture only (`--exporter none`)", &b.capture),
        ("nginx alone observed (`--exe nginx`)", &b.nginx_only),
        ("over OTLP/HTTP", &b.otlp_http),
    ] {
        if pick(v).n > 0 {
            out.push_str(&format!("; {label}: {}", show(pick(v))));
        }
    }
    out
}

/// The repeats fall on both sides of `limit`: the verdict rests on the median alone.
fn straddles(s: &Summary, limit: f64) -> bool {
    s.n > 1 && s.min < limit && s.max > limit
}

fn load_table(md: &mut String, b: &LoadBench, title: &str, unit: &str) {
    let mut rows: Vec<(String, String)> = vec![
        (format!("{unit}/s, baseline"), b.base_rps.show(0)),
        (format!("{unit}/s, with agent"), b.agent_rps.show(0)),
        (
            "throughput ratio agent/baseline".into(),
            b.agent.throughput_ratio.pct(1),
        ),
        ("p50 latency added (µs)".into(), b.p50_added_us.show(0)),
        ("p99 latency added (µs)".into(), b.agent.p99_added_us.show(0)),
        ("p99 latency, baseline (µs)".into(), b.base_p99_us.show(0)),
        (
            format!("nginx CPU per {unit}, baseline (µs)"),
            b.server_cpu_per_req_us.show(2),
        ),
        (
            format!("nginx CPU added per {unit} by the kernel programs (µs)"),
            b.agent.server_added_per_req_us.show(2),
        ),
        (
            format!("agent CPU per {unit} (µs)"),
            b.agent.agent_cpu_per_req_us.show(2),
        ),
        (
            "added CPU (nginx's extra + agent) / nginx's own".into(),
            b.agent.added_cpu_pct.show(1) + " %",
        ),
        (
            format!("wrk (client) CPU added per {unit} (µs, its side is observed too)"),
            b.client_added_per_req_us.show(2),
        ),
        (
            format!(
                "the local OTLP receiver's CPU per {unit} (µs; on the same 2 cores: it delays nginx or wrk as the agent does)"
            ),
            b.receiver_cpu_per_req_us.show(2),
        ),
    ];
    rows.extend(
        b.capture
            .rows("capture only (`--exporter none`)", "capture only", unit),
    );
    rows.extend(b.sampled.rows(
        "10 % sampled (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`)",
        "10 % sampled",
        unit,
    ));
    rows.extend(b.nginx_only.rows(
        "nginx alone observed (`--exe nginx`; wrk's side not captured, as with remote clients)",
        "nginx alone",
        unit,
    ));
    rows.extend(b.otlp_http.rows(
        "exported over OTLP/HTTP (`--otlp-protocol http/protobuf`, Tapir's choice for an endpoint not on port 4317)",
        "OTLP/HTTP",
        unit,
    ));
    rows.push((
        "other load on the host during runs (cores)".into(),
        b.foreign_cpu_share.show(2),
    ));
    md.push_str(&format!(
        "\n### {title}\n\n| measure | median (min … max) over {} pairs |\n|---|---|\n",
        b.agent.throughput_ratio.n
    ));
    for (k, v) in rows {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
}

fn render(r: &Results) -> String {
    let m = &r.machine;
    let mut md = String::new();
    md.push_str("## Tapir benchmark results\n\n");
    md.push_str(&format!(
        "- machine: {} ({} cores, {} GiB), {}\n- date: {}; commit {}\n- mode: {}; nginx 1 worker on CPU {}, wrk 1 thread on CPU {}; exporter: {}\n- load average at start: {}; other Tapir agents running on the host: {} at start, {} at end\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or("?"),
        m["date"].as_str().unwrap_or("?"),
        m["git"].as_str().unwrap_or("?"),
        if r.config["quick"].as_bool() == Some(true) { "--quick" } else { "full" },
        services::SERVER_CPU,
        CLIENT_CPU,
        m["exporter"].as_str().unwrap_or("?"),
        m["loadavg_at_start"].as_str().unwrap_or("?"),
        m["foreign_agents_at_start"],
        m["foreign_agents_at_end"],
    ));

    // Targets first.
    md.push_str("\n### Targets\n\n| target | measured | verdict |\n|---|---|---|\n");
    let mut target = |name: &str, measured: String, ok: Option<bool>, noisy: bool| {
        md.push_str(&format!(
            "| {name} | {measured} | {} |\n",
            verdict(ok, noisy)
        ));
    };
    let ka = r.keepalive.as_ref();
    let fin = |s: &Summary| (s.n > 0).then_some(s.median);
    // A p99 from one group says little: one stall on a shared host moves it by
    // milliseconds either way. Judged only over repeats (not in a quick run).
    let repeated = |s: &Summary| (s.n > 1).then_some(s.median);
    target(
        "added CPU per request ≤ 10 % of nginx's own (keep-alive)",
        ka.map_or("n/a".into(), |b| {
            with_variants(b, |v| &v.added_cpu_pct, |c| c.show(1) + " %")
        }),
        ka.and_then(|b| fin(&b.agent.added_cpu_pct))
            .map(|v| v <= TARGET_ADDED_CPU_PCT),
        ka.is_some_and(|b| straddles(&b.agent.added_cpu_pct, TARGET_ADDED_CPU_PCT)),
    );
    // The kernel's part of it, counted by the kernel (7) rather than subtracted.
    let (share, kernel_pct) = r
        .programs
        .as_ref()
        .zip(ka.and_then(|b| fin(&b.server_cpu_per_req_us)))
        .map_or(("n/a".into(), None), |(p, own)| {
            programs::server_share(p, own)
        });
    target(
        "… of which the kernel programs on nginx's own calls (7: the `recvfrom` and `writev` programs, counted by the kernel)",
        share,
        kernel_pct.map(|v| v <= TARGET_ADDED_CPU_PCT),
        false,
    );
    target(
        "keep-alive throughput ≥ 97 % of baseline",
        ka.map_or("n/a".into(), |b| {
            with_variants(b, |v| &v.throughput_ratio, |c| c.pct(1))
        }),
        ka.and_then(|b| fin(&b.agent.throughput_ratio))
            .map(|v| v >= TARGET_KA_THROUGHPUT),
        ka.is_some_and(|b| straddles(&b.agent.throughput_ratio, TARGET_KA_THROUGHPUT)),
    );
    target(
        "added p99 latency ≤ 50 µs (keep-alive)",
        ka.map_or("n/a".into(), |b| {
            with_variants(b, |v| &v.p99_added_us, |c| c.show(0) + " µs")
        }),
        ka.and_then(|b| repeated(&b.agent.p99_added_us))
            .map(|v| v <= TARGET_ADDED_P99_US),
        ka.is_some_and(|b| straddles(&b.agent.p99_added_us, TARGET_ADDED_P99_US)),
    );
    // The same limit below saturation (1b), where latency is not throughput lost.
    let fr = r.fixed_rate.as_ref();
    target(
        "… and at a fixed rate below saturation (1b)",
        fr.map_or("n/a".into(), |b| {
            let mut s = format!("{} µs at {} req/s", b.agent.p99_added_us.show(0), b.rate);
            if b.nginx_only.p99_added_us.n > 0 {
                s += &format!(
                    "; nginx alone observed (`--exe nginx`): {} µs",
                    b.nginx_only.p99_added_us.show(0)
                );
            }
            s
        }),
        fr.and_then(|b| repeated(&b.agent.p99_added_us))
            .map(|v| v <= TARGET_ADDED_P99_US),
        fr.is_some_and(|b| straddles(&b.agent.p99_added_us, TARGET_ADDED_P99_US)),
    );
    let pipe_otel = r
        .pipeline
        .iter()
        .find(|v| v["mode"] == "synth" && v["sink"] == "otel");
    let eps = pipe_otel.and_then(|v| v["events_per_s_cpu_median"].as_f64());
    let eps_min = pipe_otel.and_then(|v| v["events_per_s_cpu_min"].as_f64());
    target(
        "userspace pipeline ≥ 300,000 events/s on one core (decode → pair → span + metrics, synthesized)",
        eps.map_or("n/a".into(), |e| format!("{} events/s", human_count(e))),
        eps.map(|e| e >= TARGET_PIPELINE_EPS),
        eps_min.is_some_and(|m| m < TARGET_PIPELINE_EPS) && eps.is_some_and(|e| e >= TARGET_PIPELINE_EPS),
    );
    let mem = r.memory.as_ref();
    target(
        "agent RSS ≤ 64 MiB with 10k idle connections",
        mem.map_or("n/a".into(), |m| {
            mib(m.with_conns_peak.rss_kib.max(m.with_conns.rss_kib))
        }),
        mem.map(|m| m.with_conns_peak.rss_kib.max(m.with_conns.rss_kib) <= TARGET_RSS_10K_KIB),
        false,
    );
    target(
        "RSS flat after 1,000 short-lived processes",
        mem.map_or("n/a".into(), |m| {
            format!(
                "{:+.1} MiB from the first checkpoint to {} s after {} processes",
                m.churn_growth_kib as f64 / 1024.0,
                m.after_churn_settled.last().map_or(0, |c| c.0),
                m.churn_procs
            )
        }),
        mem.map(|m| m.churn_growth_kib <= CHURN_SLACK_KIB as i64),
        false,
    );
    if r.config["quick"].as_bool() == Some(true) {
        md.push_str(
            "\nA quick run is a smoke test: one group per benchmark, 2-second runs, no capture-only or sampled variant, 100 short-lived processes instead of 1,000. Its figures move with the host; p99 latency is not judged from one group. `cargo xtask bench` gives the figures of record.\n",
        );
    }

    if let Some(b) = &r.keepalive {
        load_table(
            &mut md,
            b,
            "1) nginx keep-alive, small responses",
            "request",
        );
    }
    if let Some(b) = &r.large_body {
        load_table(
            &mut md,
            b,
            "1c) nginx keep-alive, 16 KiB responses (written, not sendfile'd)",
            "request",
        );
    }
    if let Some(b) = &r.https {
        load_table(
            &mut md,
            b,
            "1d) nginx keep-alive over HTTPS (TLS read through the libssl probes)",
            "request",
        );
    }
    if let Some(b) = &r.fixed_rate {
        rate::table(&mut md, b);
    }
    if let Some(b) = &r.close {
        load_table(
            &mut md,
            b,
            "2) nginx, Connection: close (a connection per request)",
            "connection",
        );
    }
    md.push_str("\n### 3) Agent cost during 1) and 2)\n\n| measure | keep-alive | Connection: close |\n|---|---|---|\n");
    let both = |f: &dyn Fn(&LoadBench) -> String| {
        (
            r.keepalive.as_ref().map_or("n/a".into(), f),
            r.close.as_ref().map_or("n/a".into(), f),
        )
    };
    let rows: Vec<(&str, (String, String))> = vec![
        (
            "agent CPU seconds per 100k requests",
            both(&|b| b.agent_cpu_s_per_100k.show(3)),
        ),
        (
            "spans received / expected (both ends of each request)",
            both(&|b| b.span_ratio.pct(1)),
        ),
        (
            "spans the agent reports dropped (of exported + dropped)",
            both(&|b| b.span_drop_ratio.pct(1)),
        ),
        (
            "agent peak RSS during load",
            both(&|b| mib(b.agent_peak_rss_kib)),
        ),
        (
            "… of which anonymous (heap)",
            both(&|b| mib(b.agent_anon_peak_kib)),
        ),
        (
            "… of which the ring buffer mapping",
            both(&|b| mib(b.agent_ringbuf_rss_kib)),
        ),
        (
            "agent lifetime peak RSS (VmHWM, includes start-up)",
            both(&|b| mib(b.agent_hwm_kib)),
        ),
        (
            "agent start-up: seconds to ready",
            both(&|b| b.agent_startup_s.show(2)),
        ),
        (
            "agent start-up: CPU seconds",
            both(&|b| b.agent_startup_cpu_s.show(2)),
        ),
    ];
    for (k, (a, b)) in rows {
        md.push_str(&format!("| {k} | {a} | {b} |\n"));
    }

    if !r.pipeline.is_empty() {
        md.push_str("\n### 4) Userspace pipeline alone (no kernel), one core\n\nRecords go through `RecordSink::on_record` of `Pipeline` (decode → connection state → HTTP pairing → exchange); then the sink: *count* stops there, *JSON* adds the `watch --json` encoding, *span + metrics* adds what `tapir run` does per exchange on the same thread (service entry, route, RED metrics, ids, sampling, the span's OTLP protobuf encoding and its push into the export queue; not the export task's batching and network). An event is one ring-buffer record.\n\n| stream | per exchange | records | events/s per CPU-second | events/s wall (pinned) | ns/event |\n|---|---|---|---|---|---|\n");
        for v in &r.pipeline {
            if let Some(e) = v.get("error") {
                md.push_str(&format!(
                    "| {} | | | error: {} | | |\n",
                    v["stream"].as_str().unwrap_or("?"),
                    e
                ));
                continue;
            }
            let s = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            md.push_str(&format!(
                "| {} | {} | {} | {} ({} … {}) | {} | {:.0} |\n",
                v["stream"].as_str().unwrap_or("?"),
                match v["sink"].as_str() {
                    Some("json") => "JSON encode",
                    Some("otel") => "span + metrics",
                    _ => "count",
                },
                v["records"],
                human_count(s("events_per_s_cpu_median")),
                human_count(s("events_per_s_cpu_min")),
                human_count(s("events_per_s_cpu_max")),
                human_count(s("events_per_s_wall_median")),
                s("ns_per_event_cpu_median"),
            ));
        }
    }
    for p in &r.pipeline_profiles {
        md.push_str(&format!(
            "\n#### Profile, {} sink (callgrind: self cost inside `on_record`, synthesized stream; {:.0} instructions per record)\n\n| % of instructions | function |\n|---|---|\n",
            if p.sink == "otel" { "span + metrics" } else { "count" },
            p.instructions_per_record
        ));
        for (f, pct) in p.top.iter().take(10) {
            md.push_str(&format!("| {pct:.1} | `{}` |\n", f.replace('|', "\\|")));
        }
    }
    if let Some(m) = &r.memory {
        md.push_str(&format!(
            "\n### 5) Agent memory: {} idle keep-alive connections, then {} short-lived clients\n\n| moment | RSS | anonymous | file/ring buffer |\n|---|---|---|---|\n",
            m.opened, m.churn_procs
        ));
        let mut row = |k: String, x: &Mem| {
            md.push_str(&format!(
                "| {k} | {} | {} | {} |\n",
                mib(x.rss_kib),
                mib(x.anon_kib),
                mib(x.file_kib + x.shmem_kib)
            ));
        };
        row("agent ready, idle".into(), &m.idle_before);
        row(
            format!("{} connections open, idle", m.opened),
            &m.with_conns,
        );
        row("peak while they were open".into(), &m.with_conns_peak);
        row(
            "after closing them (after the next idle sweep)".into(),
            &m.after_close,
        );
        for (n, x) in &m.churn_checkpoints {
            row(format!("after {n} short-lived clients"), x);
        }
        for (secs, x) in &m.after_churn_settled {
            row(format!("{secs} s after the churn"), x);
        }
        md.push_str(&format!(
            "\nChurn took {:.1} s ({} failed clients); ring buffer mapping resident: {}.\n",
            m.churn_seconds,
            m.churn_failures,
            mib(m.ringbuf_rss_kib)
        ));
    }
    if let Some(b) = &r.syscalls {
        syscalls::table(&mut md, b);
    }
    if let Some(b) = &r.programs {
        programs::table(&mut md, b);
    }
    if !r.errors.is_empty() {
        md.push_str("\n### Errors\n\n");
        for e in &r.errors {
            md.push_str(&format!("- {}\n", e.replace('\n', " ")));
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_callgrind_annotate() {
        let text = "--------------------------------------------------------------------------------
Ir                  
--------------------------------------------------------------------------------
12,345,678 (100.0%)  PROGRAM TOTALS

--------------------------------------------------------------------------------
Ir                  file:function
--------------------------------------------------------------------------------
2,000,000 (16.20%)  ./string/../sysdeps/x86_64/multiarch/memmove-vec-unaligned-erms.S:__memmove_avx_unaligned_erms [/usr/lib/x86_64-linux-gnu/libc.so.6]
1,000,000 ( 8.10%)  agent/src/http/head.rs:tapir::http::head::parse [/work/main/target/release/tapir-replay]
  500,000 ( 4.05%)  /rustc/abc/library/core/src/option.rs:tapir::http::head::parse

-- Auto-annotated source: agent/src/http/head.rs
9,000,000 (72.90%)  => agent/src/http/stream.rs:tapir::http::stream::on_chunk (51,200x)
";
        let v = parse_callgrind(text);
        assert_eq!(v.len(), 2);
        assert_eq!(callgrind_total(text), Some(12_345_678.0));
        assert_eq!(v[0].0, "__memmove_avx_unaligned_erms");
        assert!((v[0].1 - 16.2).abs() < 1e-9);
        assert_eq!(v[1].0, "tapir::http::head::parse");
        assert!((v[1].1 - 12.15).abs() < 1e-9);
    }
}
