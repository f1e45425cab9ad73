//! `tapir run`: the agent.
use std::{process::ExitCode, sync::Arc};

use anyhow::Result;
use clap::Args;
use tapir::{
    capture::reader::drain_loop,
    exchange::CapturedExchange,
    pipeline::{ExchangeSink, Filter, Pipeline},
    stats::Stats,
};

use super::{attach, wait_for_shutdown_signal, CaptureArgs, CaptureThread};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    /// Only observe this process id (repeatable; default: every process).
    #[arg(long = "pid", value_name = "PID")]
    pub pids: Vec<u32>,
    /// Only observe connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
}

/// Until the OTLP exporter exists, finished exchanges are logged at debug level.
struct LogSink;

impl ExchangeSink for LogSink {
    fn on_exchange(&mut self, ex: CapturedExchange) {
        tracing::debug!(exchange = %ex.to_json(), "exchange");
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let mut attached = attach(&args.capture)?;
    let ring = super::take_ring(&mut attached)?;
    let logger = super::take_logger(&mut attached);
    let filter = Filter {
        pids: args.pids.clone(),
        ports: args.ports.clone(),
    };
    let stats = Arc::new(Stats::default());
    let max_conns = args.capture.max_connections as usize;
    let st = stats.clone();
    let capture = CaptureThread::spawn(move |stop| {
        let mut pipeline = Pipeline::new(max_conns, filter, st, LogSink);
        drain_loop(ring, &mut pipeline, &stop, logger);
    })?;
    tracing::info!(
        probes = tapir::probes::PROBES.len() - attached.failures.len(),
        "ready: all probes attached"
    );
    wait_for_shutdown_signal()?;
    tracing::info!("shutting down: detaching probes");
    capture.stop();
    drop(attached);
    for (name, value) in stats.snapshot() {
        tracing::info!(counter = name, value, "final count");
    }
    Ok(ExitCode::SUCCESS)
}
