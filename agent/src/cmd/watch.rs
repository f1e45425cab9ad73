//! `tapir watch`: one line (or JSON object) per finished exchange, on stdout.
use std::{
    io::{self, Write},
    process::ExitCode,
    sync::Arc,
};

use anyhow::{Context, Result};
use clap::Args;
use tapir::{
    capture::reader::drain_loop,
    exchange::CapturedExchange,
    pipeline::{fmt_addr, ExchangeSink, Filter, Pipeline},
    stats::Stats,
};

use super::{attach, CaptureArgs, CaptureThread, ShutdownSignals};

#[derive(Args, Debug, Clone)]
pub struct WatchArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    #[command(flatten)]
    pub inject: super::InjectArgs,
    /// One JSON object per exchange (keys follow OpenTelemetry semantic conventions).
    #[arg(long)]
    pub json: bool,
    /// Only connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
}

struct Printer {
    json: bool,
    out: io::BufWriter<io::Stdout>,
}

impl ExchangeSink for Printer {
    fn on_exchange(&mut self, ex: &CapturedExchange) {
        let _ = if self.json {
            writeln!(self.out, "{}", ex.to_json())
        } else {
            writeln!(self.out, "{}", human_line(ex))
        };
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

/// ` grpc=NAME` for a gRPC call whose status came.
fn grpc_status(ex: &CapturedExchange) -> String {
    match ex.http.grpc.and_then(|call| call.status) {
        Some(code) => format!(" grpc={}", tapir::otel::rpc::status_text(code).as_str()),
        None => String::new(),
    }
}

fn human_line(ex: &CapturedExchange) -> String {
    let (server, client) = ex.server_client();
    let secs = ex.start_unix_ns / 1_000_000_000;
    let (h, m, s, ms) = (
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        (ex.start_unix_ns / 1_000_000) % 1000,
    );
    let peer = if ex.is_server() { client } else { server };
    format!(
        "{h:02}:{m:02}:{s:02}.{ms:03} {pid:>7} {name:<16} {kind:<6} {method:<7} {path} {status} {dur:.3}ms peer={peer}",
        pid = ex.process.pid,
        name = ex.process.exe_name,
        kind = if ex.is_server() { "server" } else { "client" },
        method = ex.http.method,
        path = if ex.http.redis.is_some() {
            "redis"
        } else {
            &ex.http.path
        },
        status = match (ex.http.failure, ex.http.redis) {
            // The status seen, if any, then why the exchange ended early.
            (Some(f), _) if ex.http.status != 0 => format!("{} {}", ex.http.status, f.as_str()),
            (Some(f), _) => f.as_str().to_string(),
            // A Redis reply: its error's prefix, if it was one.
            (None, Some(call)) => call.error.map_or("ok".to_string(), |p| p.to_string()),
            (None, None) => ex.http.status.to_string(),
        } + &grpc_status(ex),
        dur = ex.duration_ns() as f64 / 1e6,
        peer = fmt_addr(peer),
    )
}

pub fn run(args: WatchArgs) -> Result<ExitCode> {
    let mut attached = attach(&args.capture, &args.inject, &args.ports)?;
    let rings = tapir::capture::reader::take_rings(&mut attached)?;
    let rescan = super::RescanThread::spawn(&mut attached)?;
    let logger = super::take_logger(&mut attached);
    let maps = super::PipelineMaps::take(&mut attached);
    let filter = Filter {
        ports: args.ports.clone(),
    };
    let max_conns = args.capture.max_connections as usize;
    let json = args.json;
    let stats = Arc::new(Stats::default());
    let pipeline_stats = stats.clone();
    let capture = CaptureThread::spawn(move |stop| {
        let printer = Printer {
            json,
            out: io::BufWriter::new(io::stdout()),
        };
        let mut pipeline = Pipeline::new(max_conns, filter, pipeline_stats.clone(), printer);
        maps.install(&mut pipeline, pipeline_stats);
        drain_loop(rings, &mut pipeline, &stop, logger, None);
        pipeline.read_kernel_counters();
        pipeline.sink_mut().flush();
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?;
    let signals = {
        let _guard = rt.enter();
        ShutdownSignals::register()?
    };
    // The heap used while loading (BTF, programs) is all freed by now.
    tapir::heap::trim();
    tracing::info!("ready: watching HTTP exchanges (Ctrl-C to stop)");
    signals.wait_rescanning_tls(&rt, &mut attached);
    capture.stop();
    if let Some(r) = rescan {
        r.stop();
    }
    drop(attached);
    super::log_final_counts(&stats);
    Ok(ExitCode::SUCCESS)
}
