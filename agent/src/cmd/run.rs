//! `tapir run`: the agent.
use std::{process::ExitCode, sync::Arc};

use anyhow::Result;
use clap::Args;
use tapir::{
    capture::{
        events::{decode, KernelEvent},
        reader::{drain_loop, RecordSink},
    },
    stats::Stats,
};

use super::{attach, wait_for_shutdown_signal, CaptureArgs, CaptureThread};

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
}

struct ConnLogger(Arc<Stats>);

impl RecordSink for ConnLogger {
    fn on_record(&mut self, bytes: &[u8]) {
        Stats::inc(&self.0.records);
        if let Ok(KernelEvent::ConnOpen(ev)) = decode(bytes) {
            Stats::inc(&self.0.conns_opened);
            tracing::debug!(pid = ev.header.tgid, fd = ev.header.fd, role = ev.role, lport = ev.tuple.local_port, rport = ev.tuple.remote_port, "tcp connection opened");
        }
    }
    fn on_idle(&mut self) {}
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let mut attached = attach(&args.capture)?;
    let ring = super::take_ring(&mut attached)?;
    let logger = super::take_logger(&mut attached);
    let stats = Arc::new(Stats::default());
    let st = stats.clone();
    let capture = CaptureThread::spawn(move |stop| {
        let mut sink = ConnLogger(st);
        drain_loop(ring, &mut sink, &stop, logger);
    })?;
    tracing::info!("ready: all probes attached");
    wait_for_shutdown_signal()?;
    capture.stop();
    drop(attached);
    for (name, value) in stats.snapshot() {
        tracing::info!(counter = name, value, "final count");
    }
    Ok(ExitCode::SUCCESS)
}
