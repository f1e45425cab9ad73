//! `tapir run`: the agent. Captures HTTP exchanges and exports them as OpenTelemetry spans
//! and metrics (see `tapir::otel`).
use std::{
    process::ExitCode,
    sync::{atomic::Ordering, Arc},
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use tapir::{
    capture::reader::{drain_loop, RecordSink},
    exchange::CapturedExchange,
    otel::{EnvSettings, OtelConfig, OtelStats, OtlpProtocol, RoutePattern, Telemetry},
    pipeline::{ExchangeSink, Filter, Pipeline},
    stats::Stats,
};

use super::{attach, CaptureArgs, CaptureThread};

/// Where spans and metrics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Exporter {
    /// Spans and metrics over OTLP (endpoint: --otlp-endpoint or OTEL_EXPORTER_OTLP_*).
    Otlp,
    /// One JSON line per span on stdout (for debugging).
    Console,
    /// Nothing (e.g. with only --prometheus-port).
    None,
}

#[derive(Args, Debug, Clone)]
#[command(after_help = tapir::otel::ENV_HELP)]
pub struct RunArgs {
    #[command(flatten)]
    pub capture: CaptureArgs,
    #[command(flatten)]
    pub inject: super::InjectArgs,
    /// Only observe connections with this local or remote port (repeatable).
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,
    /// Where spans and metrics go: otlp, console (one JSON line per span on stdout), none.
    /// Repeatable or comma-separated, e.g. `--exporter otlp,console`.
    #[arg(
        long = "exporter",
        value_name = "KIND",
        env = "TAPIR_EXPORTER",
        value_enum,
        value_delimiter = ',',
        default_value = "otlp"
    )]
    pub exporters: Vec<Exporter>,
    /// OTLP collector URL, e.g. http://collector:4317 (gRPC) or http://collector:4318
    /// (HTTP; /v1/traces and /v1/metrics are appended). Overrides OTEL_EXPORTER_OTLP_*ENDPOINT.
    /// Default: from the environment, else localhost:4318 (or :4317 for grpc).
    #[arg(long, value_name = "URL", env = "TAPIR_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// OTLP transport: grpc or http/protobuf. Default: OTEL_EXPORTER_OTLP_*PROTOCOL, else
    /// grpc when the endpoint's port is 4317, else http/protobuf.
    #[arg(long, value_name = "PROTOCOL", env = "TAPIR_OTLP_PROTOCOL", value_parser = parse_protocol)]
    pub otlp_protocol: Option<OtlpProtocol>,
    /// Also serve the metrics in Prometheus text format at http://0.0.0.0:PORT/metrics
    /// (RED histograms with a service_name label, and the agent's tapir_* metrics).
    #[arg(long, value_name = "PORT", env = "TAPIR_PROMETHEUS_PORT")]
    pub prometheus_port: Option<u16>,
    /// A route template for http.route, e.g. '/users/{id}' ({name} = one path segment; a
    /// last '*' or '{name...}' = the rest). Repeatable (or comma-separated in the env); the
    /// first match wins over the built-in heuristic, which replaces id-like segments by '*'.
    #[arg(
        long = "route",
        value_name = "PATTERN",
        env = "TAPIR_ROUTES",
        value_delimiter = ','
    )]
    pub routes: Vec<RoutePattern>,
    /// Distinct heuristic routes kept per service (count); further routes are reported as
    /// http.route="/*overflow*" and counted in tapir.routes.overflow.
    #[arg(
        long,
        value_name = "N",
        env = "TAPIR_MAX_ROUTES_PER_SERVICE",
        default_value_t = 100
    )]
    pub max_routes_per_service: usize,
    /// Spans held for export while the collector is slow or down (count). Beyond it the
    /// oldest are dropped and counted in tapir.spans.dropped{reason=export_queue_full}.
    /// Default: OTEL_BSP_MAX_QUEUE_SIZE, else 32768
    #[arg(long, value_name = "N", env = "TAPIR_EXPORT_QUEUE_SPANS")]
    pub export_queue_spans: Option<usize>,
    /// On SIGINT/SIGTERM, how long to keep trying to deliver pending spans and metrics
    /// (seconds).
    #[arg(
        long,
        value_name = "SECONDS",
        env = "TAPIR_SHUTDOWN_TIMEOUT",
        default_value_t = 10
    )]
    pub shutdown_timeout: u64,
    /// Measure what each of Tapir's kernel programs costs, as OBI's bpf_probe metrics do:
    /// switches on the kernel's BPF run-time statistics while the agent runs, and exports
    /// each program's runs and time (tapir.ebpf.program.runs, tapir.ebpf.program.run_time
    /// in ns, by program; also logged at exit). While they are on, the kernel times every
    /// run of every BPF program on the host, which adds tens of nanoseconds to each.
    #[arg(long, env = "TAPIR_EBPF_STATS")]
    pub ebpf_stats: bool,
    /// Keep the capture and export threads at normal scheduling priority. By default they
    /// run as SCHED_IDLE while they keep up, so that their bursts of work never hold a CPU
    /// that an observed service wakes up to use (latency), and go back to normal priority
    /// when busy CPUs leave them behind (a ring 1/8 full, four batches of spans queued),
    /// so that nothing is lost.
    #[arg(long, env = "TAPIR_NORMAL_PRIORITY")]
    pub normal_priority: bool,
}

fn parse_protocol(s: &str) -> Result<OtlpProtocol, String> {
    s.parse()
}

impl RunArgs {
    fn otel_config(&self) -> OtelConfig {
        let has = |e| self.exporters.contains(&e);
        OtelConfig {
            otlp: has(Exporter::Otlp),
            console: has(Exporter::Console),
            otlp_endpoint: self.otlp_endpoint.clone(),
            otlp_protocol: self.otlp_protocol,
            prometheus_port: self.prometheus_port,
            routes: self.routes.clone(),
            max_routes_per_service: self.max_routes_per_service.max(1),
            export_queue_spans: self.export_queue_spans.map(|n| n.max(1)),
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            yield_cpu: !self.normal_priority,
            ..OtelConfig::default()
        }
    }
}

/// Without any exporter, finished exchanges are only logged at debug level.
struct LogSink;

impl ExchangeSink for LogSink {
    fn on_exchange(&mut self, ex: &CapturedExchange) {
        tracing::debug!(exchange = %ex.to_json(), "exchange");
    }
}

/// Either sink, so the pipeline has one concrete type (one of them, once per run: the
/// size difference between the variants costs nothing).
#[allow(clippy::large_enum_variant)]
enum Sink {
    Otel(tapir::otel::OtelSink),
    Log(LogSink),
}

impl ExchangeSink for Sink {
    fn on_exchange(&mut self, ex: &CapturedExchange) {
        match self {
            Self::Otel(s) => s.on_exchange(ex),
            Self::Log(s) => s.on_exchange(ex),
        }
    }

    fn flush(&mut self) {
        if let Self::Otel(s) = self {
            s.flush();
        }
    }

    fn release_idle(&mut self) {
        if let Self::Otel(s) = self {
            s.release_idle();
        }
    }

    fn on_process_exit(&mut self, pid: u32) {
        if let Self::Otel(s) = self {
            s.on_process_exit(pid);
        }
    }
}

/// The pipeline, plus the tracked-connections gauge refreshed after each drain.
struct Gauged {
    pipeline: Pipeline<Sink>,
    otel: Arc<OtelStats>,
}

impl RecordSink for Gauged {
    fn on_record(&mut self, bytes: &[u8]) {
        self.pipeline.on_record(bytes);
    }

    fn on_out_of_order(&mut self, n: u64) {
        self.pipeline.on_out_of_order(n);
    }

    fn on_idle(&mut self) {
        self.pipeline.on_idle();
        self.otel.connections_tracked.store(
            self.pipeline.tracked_connections() as u64,
            Ordering::Relaxed,
        );
    }
}

pub fn run(args: RunArgs) -> Result<ExitCode> {
    let env = EnvSettings::from_env();
    // Before the runtime's threads exist (mallopt is not thread-safe); for the batches
    // actually sent, which never exceed MAX_EXPORT_BATCH whatever the variable says.
    tapir::heap::fit_export_batches(env.span_batch.min(tapir::otel::MAX_EXPORT_BATCH));
    // One worker: exports are serialized anyway, and with two the export task and its
    // HTTP/2 connection task woke each other across threads (~10 % more export CPU).
    // The capture thread is separate.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("tapir-export")
        .enable_all()
        .build()
        .context("starting the export runtime")?;
    let stats = Arc::new(Stats::default());
    let otel_stats = Arc::new(OtelStats::default());
    let telemetry = Telemetry::start(
        rt.handle(),
        args.otel_config(),
        env,
        stats.clone(),
        otel_stats.clone(),
    )?;
    let (telemetry, sink) = match telemetry {
        Some((t, s)) => (Some(t), Sink::Otel(s)),
        None => (None, Sink::Log(LogSink)),
    };

    let mut inject = args.inject.clone();
    inject.default_on = true;
    let mut attached = attach(&args.capture, &inject, &args.ports)?;
    if args.ebpf_stats {
        match tapir::program_stats::ProgramStats::enable(&attached.ebpf) {
            Ok(p) => {
                tracing::info!("kernel program statistics on: exported as tapir.ebpf.program.*");
                let _ = stats.programs.set(p);
            }
            Err(e) => eprintln!("tapir: warning: --ebpf-stats: {e}"),
        }
    }
    let rings = tapir::capture::reader::take_rings(&mut attached)?;
    let logger = super::take_logger(&mut attached);
    let maps = super::PipelineMaps::take(&mut attached);
    let rescan = super::RescanThread::spawn(&mut attached)?;
    let filter = Filter {
        ports: args.ports.clone(),
    };
    let max_conns = args.capture.max_connections as usize;
    let st = stats.clone();
    let os = otel_stats.clone();
    let yielding = if args.normal_priority {
        None
    } else {
        let levels = rings
            .iter()
            .map(|r| r.level())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| std::io::Error::other(format!("{e:#}")));
        match levels.and_then(tapir::capture::yielding::CpuYield::new) {
            Ok(y) => Some(y),
            Err(e) => {
                tracing::warn!("capture stays at normal priority: starting its rescuer: {e}");
                None
            }
        }
    };
    let (cpu_yield, rescuer) = yielding.unzip();
    let capture = CaptureThread::spawn(move |stop| {
        let cpu_yield = cpu_yield.filter(|y| match y.start() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!("capture stays at normal priority: setting SCHED_IDLE: {e}");
                false
            }
        });
        let mut pipeline = Pipeline::new(max_conns, filter, st.clone(), sink);
        maps.install(&mut pipeline, st);
        let mut sink = Gauged { pipeline, otel: os };
        drain_loop(rings, &mut sink, &stop, logger, cpu_yield.as_ref());
        sink.pipeline.read_kernel_counters();
        // The OTLP sink goes with the pipeline; `Telemetry::shutdown` flushes the queue.
    })?;
    let signals = {
        let _guard = rt.enter();
        super::ShutdownSignals::register()?
    };
    // The heap used while loading (BTF, programs) is all freed by now.
    tapir::heap::trim();
    tracing::info!(
        probes = tapir::probes::PROBES.len() - attached.failures.len(),
        exporting = telemetry.as_ref().map_or("nothing", |t| t.summary.as_str()),
        "{}",
        if attached.failures.is_empty() {
            "ready: all probes attached"
        } else {
            "ready: probes attached, some optional ones missing (warned above)"
        }
    );
    signals.wait_rescanning_tls(&rt, &mut attached);
    tracing::info!("shutting down: detaching probes");
    // Stops capture after a last drain of the ring buffer.
    capture.stop();
    if let Some(r) = rescuer {
        tracing::debug!(
            rescues = r.rescues(),
            "capture thread put back to normal priority when busy CPUs left it behind"
        );
    }
    if let Some(r) = rescan {
        r.stop();
    }
    drop(attached);
    if let Some(t) = telemetry {
        t.shutdown(&rt);
    }
    super::log_final_counts(&stats);
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}
