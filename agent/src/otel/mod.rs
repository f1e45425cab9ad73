//! OpenTelemetry out: one span per captured exchange and RED metrics per observed process,
//! over OTLP (gRPC or HTTP/protobuf), on the console, and/or on a Prometheus endpoint.
//!
//! Data flow (the capture thread never waits on the network):
//!
//! ```text
//! capture thread, per exchange (OtelSink): resource, route, RED metrics (metrics/),
//!   ids, sampler, span encoded to OTLP bytes (wire.rs) ──push──▶ retry queue (bounded,
//!                                                                drops oldest, counted)
//!   export loop (tokio): batches by process into one request, backoff ◀┘──▶ OTLP (client.rs)
//!   metrics loop (tokio): collect every process's series each interval ──▶ OTLP
//!   Prometheus /metrics: read the same series on scrape
//! ```
pub mod client;
mod coalesce;
pub mod conn_attrs;
pub mod counters;
pub mod export;
pub mod metrics;
pub mod prometheus;
pub mod queue;
pub mod resource;
pub mod route;
pub mod rpc;
pub mod sampler;
pub mod span;
pub mod text;
pub mod tracecontext;
pub mod wire;
pub mod yielding;

use std::{io::Write, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{runtime::Handle, sync::watch, task::JoinHandle, time::Instant};

pub use counters::{OtelStats, SpanDrop};
pub use export::{OtlpProtocol, Signal, Target};
pub use route::{RoutePattern, RouteTable, OVERFLOW_ROUTE};
pub use sampler::Sampler;

use crate::{exchange::CapturedExchange, pipeline::ExchangeSink, stats::Stats};
use client::{ClientSettings, OtlpClient};
use conn_attrs::ConnAttrCache;
use export::OtlpSpanSender;
pub use export::QueuedSpan;
use metrics::{AgentSources, EntryCache, Registry, RegistryConfig, Temporality};
use queue::LoopConfig;
pub use queue::SharedQueue;
use wire::ConnAttrs;
use yielding::ExportYield;

/// The standard variables `tapir run` honours (for `--help`).
pub const ENV_HELP: &str = "\
OpenTelemetry environment variables honoured (Tapir's flags win over them, except that
OTEL_SDK_DISABLED=true, and OTEL_{TRACES,METRICS}_EXPORTER=none for its signal, turn
export off whatever the flags say):
  OTEL_SDK_DISABLED=true              export nothing at all (capture still runs)
  OTEL_EXPORTER_OTLP_ENDPOINT         base URL (http/protobuf: /v1/traces, /v1/metrics appended)
  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT  full URL for spans (used as is)
  OTEL_EXPORTER_OTLP_METRICS_ENDPOINT full URL for metrics (used as is)
  OTEL_EXPORTER_OTLP_PROTOCOL         grpc | http/protobuf (unset: grpc if the port is 4317)
  OTEL_EXPORTER_OTLP_{TRACES,METRICS}_PROTOCOL     per signal
  OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]HEADERS    k1=v1,k2=v2 (values percent-decoded)
  OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]TIMEOUT    per export call, milliseconds (10000)
  OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]COMPRESSION  gzip | none
  OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]INSECURE   true: plain gRPC to an endpoint without scheme
  OTEL_EXPORTER_OTLP_[{TRACES,METRICS}_]CERTIFICATE  PEM file of the collector's CA (TLS)
  OTEL_TRACES_EXPORTER, OTEL_METRICS_EXPORTER      none: no OTLP export of that signal
  OTEL_METRIC_EXPORT_INTERVAL         milliseconds between metric exports (60000)
  OTEL_BSP_MAX_EXPORT_BATCH_SIZE      most spans per export request (512)
  OTEL_BSP_SCHEDULE_DELAY             milliseconds a span waits for its batch to fill (1000)
  OTEL_BSP_MAX_QUEUE_SIZE             spans held while the collector is slow or down
                                      (32768; --export-queue-spans wins)
  OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE  cumulative (default) | delta | lowmemory
  OTEL_TRACES_SAMPLER                 always_on | always_off | traceidratio |
                                      parentbased_always_on (default) |
                                      parentbased_always_off | parentbased_traceidratio
  OTEL_TRACES_SAMPLER_ARG             sampling ratio in [0, 1] (default 1)
  OTEL_RESOURCE_ATTRIBUTES            attributes of the node, on every resource (e.g.
                                      k8s.node.name=…,k8s.cluster.name=…; host.name=…
                                      replaces the host name); an observed process's own
                                      win; service.* and process.* stay the agent's
  OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS  comma-separated HTTP methods reported as they are
                                      (replaces GET,HEAD,POST,PUT,DELETE,CONNECT,OPTIONS,
                                      TRACE,PATCH; others are http.request.method=_OTHER)
An observed process's own OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES name its telemetry.

Tapir's own, besides each flag's TAPIR_* variable above:
  RUST_LOG                            log filter (info; e.g. info,tapir=debug)
  TAPIR_TLS_RESCAN_SECS               seconds between looks for new OpenSSL copies to probe (30)
  TAPIR_EBPF_COMPAT=1                 load the programs built for kernels without bpf_loop";

/// Where spans and metrics go, and how much the agent may hold.
#[derive(Debug, Clone)]
pub struct OtelConfig {
    /// Export spans and metrics over OTLP.
    pub otlp: bool,
    /// Print one JSON line per span on stdout.
    pub console: bool,
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: Option<OtlpProtocol>,
    pub prometheus_port: Option<u16>,
    pub routes: Vec<RoutePattern>,
    pub max_routes_per_service: usize,
    /// Bound of the retry queue, in spans, when given on the command line (else
    /// `OTEL_BSP_MAX_QUEUE_SIZE`, else [`DEFAULT_EXPORT_QUEUE_SPANS`]).
    pub export_queue_spans: Option<usize>,
    /// Bound of the per-process resource/metrics table.
    pub max_services: usize,
    pub shutdown_timeout: Duration,
    /// The export thread runs idle-class while it keeps up (`yielding.rs`).
    pub yield_cpu: bool,
}

impl Default for OtelConfig {
    fn default() -> Self {
        Self {
            otlp: true,
            console: false,
            otlp_endpoint: None,
            otlp_protocol: None,
            prometheus_port: None,
            routes: Vec::new(),
            max_routes_per_service: 100,
            export_queue_spans: None,
            max_services: 256,
            shutdown_timeout: Duration::from_secs(10),
            yield_cpu: false,
        }
    }
}

/// Spans held for export while the collector is slow or down, unless configured.
pub const DEFAULT_EXPORT_QUEUE_SPANS: usize = 32768;

/// Most spans per export request whatever `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says: a larger
/// request risks the collector's message limit (4 MiB by default), and a refused batch
/// would be retried as it is.
pub const MAX_EXPORT_BATCH: usize = 8192;

/// The batch size used: at most the queue's bound (a batch larger than the queue would
/// never fill, as the SDKs also enforce) and [`MAX_EXPORT_BATCH`].
fn batch_size(wanted: usize, queue_spans: usize) -> usize {
    let used = wanted.min(queue_spans).clamp(1, MAX_EXPORT_BATCH);
    if used != wanted {
        tracing::warn!(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE={wanted} is larger than the export queue ({queue_spans} spans) or {MAX_EXPORT_BATCH}; using {used}"
        );
    }
    used
}

/// What the standard `OTEL_*` variables of the agent's own environment say.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvSettings {
    pub sdk_disabled: bool,
    pub traces_otlp: bool,
    pub metrics_otlp: bool,
    pub metric_interval: Duration,
    /// `OTEL_BSP_*`: spans per export request, how long a span waits for its batch, and
    /// the export queue's bound (when set).
    pub span_batch: usize,
    pub span_delay: Duration,
    pub span_queue: Option<usize>,
    pub metrics_temporality: Temporality,
    pub sampler: Sampler,
    pub resource_attributes: Option<String>,
    /// `OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS`: replaces the conventions' method list.
    pub known_methods: Option<Vec<String>>,
    pub warnings: Vec<String>,
}

impl EnvSettings {
    pub fn from_lookup(env: &dyn Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| {
            env(k)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let mut warnings = Vec::new();
        let sdk_disabled = get("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let exporter_on = |var: &str, warnings: &mut Vec<String>| match get(var) {
            None => true,
            Some(v) => {
                let names: Vec<String> = v
                    .split(',')
                    .map(|s| s.trim().to_ascii_lowercase())
                    .collect();
                if names.iter().any(|n| n == "none") {
                    return false;
                }
                if !names.iter().any(|n| n == "otlp") {
                    warnings.push(format!(
                        "{var}={v:?}: only otlp and none are understood; exporting OTLP"
                    ));
                }
                true
            }
        };
        let traces_otlp = exporter_on("OTEL_TRACES_EXPORTER", &mut warnings);
        let metrics_otlp = exporter_on("OTEL_METRICS_EXPORTER", &mut warnings);
        // A positive whole number, or the default (with a warning when set otherwise).
        let mut positive = |var: &str, default: u64, unit: &str| match get(var) {
            None => None,
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n > 0 => Some(n),
                _ => {
                    warnings.push(format!(
                        "{var}={v:?} is not a positive number{unit}; using {default}"
                    ));
                    None
                }
            },
        };
        let metric_interval = Duration::from_millis(
            positive("OTEL_METRIC_EXPORT_INTERVAL", 60_000, " of milliseconds").unwrap_or(60_000),
        );
        let default_batch = LoopConfig::default().max_batch as u64;
        let span_batch = positive("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", default_batch, "")
            .unwrap_or(default_batch) as usize;
        let default_delay = LoopConfig::default().linger.as_millis() as u64;
        let span_delay = Duration::from_millis(
            positive("OTEL_BSP_SCHEDULE_DELAY", default_delay, " of milliseconds")
                .unwrap_or(default_delay),
        );
        let default_queue = DEFAULT_EXPORT_QUEUE_SPANS as u64;
        let span_queue = positive("OTEL_BSP_MAX_QUEUE_SIZE", default_queue, "").map(|n| n as usize);
        let temporality_var = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";
        let metrics_temporality = match get(temporality_var).map(|v| v.parse::<Temporality>()) {
            None => Temporality::default(),
            Some(Ok(t)) => t,
            Some(Err(e)) => {
                warnings.push(format!("{temporality_var}: {e}; using cumulative"));
                Temporality::default()
            }
        };
        let s = get("OTEL_TRACES_SAMPLER");
        let a = get("OTEL_TRACES_SAMPLER_ARG");
        let (sampler, w) = Sampler::from_env_values(s.as_deref(), a.as_deref());
        warnings.extend(w);
        let known_methods = get("OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS").and_then(|v| {
            let (methods, w) = span::parse_known_methods(&v);
            warnings.extend(w);
            methods
        });
        Self {
            sdk_disabled,
            traces_otlp,
            metrics_otlp,
            metric_interval,
            span_batch,
            span_delay,
            span_queue,
            metrics_temporality,
            sampler,
            resource_attributes: get("OTEL_RESOURCE_ATTRIBUTES"),
            known_methods,
            warnings,
        }
    }

    pub fn from_env() -> Self {
        Self::from_lookup(&|k| std::env::var(k).ok())
    }
}

/// The capture side's handle. Each exchange is turned into metrics and an encoded span
/// right on the capture thread: a hand-off per exchange to another thread cost more (a
/// wake-up and a copy each) than the work itself (about a microsecond). What may block —
/// the collector — is behind the bounded span queue.
pub struct OtelSink {
    ingest: Ingest,
}

impl ExchangeSink for OtelSink {
    fn on_exchange(&mut self, ex: &CapturedExchange) {
        self.ingest.handle(ex);
    }

    fn flush(&mut self) {
        self.ingest.push_pending();
    }

    fn release_idle(&mut self) {
        self.ingest.conn_attrs.release_idle();
    }

    fn on_process_exit(&mut self, pid: u32) {
        // After its last exchanges (same thread): export its metrics a last time, free them.
        self.ingest.registry.process_exited(pid);
    }
}

impl OtelSink {
    /// `tapir run`'s per-exchange work with no exporter task: RED metrics, and spans encoded
    /// into a bounded queue that nothing drains (its oldest are dropped). For measuring the
    /// pipeline alone (`tapir-replay`). Returns the sink and the queue.
    pub fn without_export(
        capture: Arc<Stats>,
        stats: Arc<OtelStats>,
    ) -> (Self, Arc<SharedQueue<QueuedSpan>>) {
        let cfg = OtelConfig::default();
        let queue = Arc::new(SharedQueue::new(
            cfg.export_queue_spans.unwrap_or(DEFAULT_EXPORT_QUEUE_SPANS),
            usize::MAX,
            stats.clone(),
        ));
        let registry = Arc::new(Registry::new(
            RegistryConfig {
                max_services: cfg.max_services,
                metrics: true,
                node: resource::Node::new("bench-host".into(), None),
                agent_attrs: None,
                temporality: Temporality::Cumulative,
            },
            AgentSources {
                capture,
                stats: stats.clone(),
                ..AgentSources::default()
            },
        ));
        let ingest = Ingest {
            registry,
            routes: RouteTable::new(Vec::new(), cfg.max_routes_per_service),
            sampler: Sampler::default(),
            console: false,
            queue: Some(queue.clone()),
            scope: span::scope(),
            stats,
            spans: SpanArena::default(),
            entries: EntryCache::default(),
            conn_attrs: ConnAttrCache::default(),
            pending: Vec::with_capacity(PENDING_SPANS),
        };
        (Self { ingest }, queue)
    }
}

/// Everything one exchange goes through on its way out.
struct Ingest {
    registry: Arc<Registry>,
    routes: RouteTable,
    sampler: Sampler,
    console: bool,
    queue: Option<Arc<SharedQueue<QueuedSpan>>>,
    scope: opentelemetry::InstrumentationScope,
    stats: Arc<OtelStats>,
    spans: SpanArena,
    entries: EntryCache,
    conn_attrs: ConnAttrCache,
    /// Spans encoded but not yet in the shared queue: handed over [`PENDING_SPANS`] at a
    /// time (and after each drain of the ring), one lock instead of one per span.
    pending: Vec<QueuedSpan>,
}

const PENDING_SPANS: usize = 64;

impl Drop for Ingest {
    fn drop(&mut self) {
        self.push_pending();
    }
}

/// Where encoded spans live until they are exported: encoded in place, one after the
/// other, in shared 64 KiB blocks (freed when their last span is dropped), instead of one
/// allocation per span on this thread and one free per span on the export thread.
#[derive(Default)]
struct SpanArena {
    block: bytes::BytesMut,
}

impl SpanArena {
    const BLOCK_BYTES: usize = 64 << 10;

    /// Encodes with `encode` into `room` bytes (a size hint) and returns the span's bytes.
    /// `encode` returns the size its output needs; when that is more than it was given,
    /// it is called once more with that much room.
    fn encode(&mut self, mut room: usize, encode: impl Fn(&mut [u8]) -> usize) -> bytes::Bytes {
        loop {
            if self.block.capacity() - self.block.len() < room {
                // The rest of the old block stays with the spans already carved from it.
                self.block = bytes::BytesMut::with_capacity(Self::BLOCK_BYTES.max(room));
            }
            let start = self.block.len();
            self.block.resize(start + room, 0);
            let needed = encode(&mut self.block[start..]);
            if needed <= room {
                self.block.truncate(start + needed);
                return self.block.split().freeze();
            }
            self.block.truncate(start);
            room = needed;
        }
    }
}

impl Ingest {
    fn handle(&mut self, ex: &CapturedExchange) {
        let entry = self.registry.entry_cached(&ex.process, &mut self.entries);
        // A gRPC call is named by its method (`otel::rpc`), a Redis call by its command,
        // not by a route: they take no slot of the service's routes.
        let route = if ex.http.grpc.is_some() || ex.http.redis.is_some() {
            None
        } else {
            self.routes.route(&entry.service_name, &ex.http.path)
        };
        if route.as_ref().is_some_and(|r| r.overflow) {
            OtelStats::add(&self.stats.routes_overflow, 1);
        }
        let route = route.map(|r| r.route);
        // Spans are built only for a span exporter (its queue) or the console, and only
        // when sampled.
        let ids = if self.queue.is_some() || self.console {
            let ids = span::span_context_for(ex, span::kernel_ids(ex));
            let sampled = self.sampler.should_sample(ids.trace_id, ids.parent_sampled);
            if !sampled {
                OtelStats::add(&self.stats.spans_not_sampled, 1);
            }
            sampled.then_some(ids)
        } else {
            None
        };
        // The connection's attributes: for the span, and for a CLIENT's metrics (its
        // server.address; a SERVER's need none). Looked up once, and only then.
        let conn = (ids.is_some() || !ex.is_server()).then(|| self.conn_attrs.get(ex));
        let server_address = conn.and_then(ConnAttrs::server_address);
        self.registry
            .record_with(&entry, ex, route.as_deref(), server_address);
        let (Some(ids), Some(conn)) = (ids, conn) else {
            return;
        };
        if self.console {
            let data = span::build_span(ex, &ids, route.as_deref(), &self.scope);
            let line = export::span_json(&data, &entry).to_string();
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        if let Some(q) = &self.queue {
            // Encoded here, once, straight from the exchange: no SpanData on this path.
            let route = route.as_deref();
            let hint = wire::span_size_hint(ex, &ids, route, conn);
            let span = self.spans.encode(hint, |buf| {
                wire::encode_span_into(buf, ex, &ids, route, conn)
            });
            self.pending.push(QueuedSpan { entry, span });
            if self.pending.len() >= PENDING_SPANS {
                q.push_all(&mut self.pending);
            }
        }
    }

    fn push_pending(&mut self) {
        if let Some(q) = &self.queue {
            q.push_all(&mut self.pending);
        }
    }
}

/// The running export side.
pub struct Telemetry {
    span_loop: Option<JoinHandle<u64>>,
    metrics_loop: Option<JoinHandle<()>>,
    prometheus: Option<prometheus::Server>,
    close_spans: watch::Sender<Option<Instant>>,
    stop_metrics: watch::Sender<Option<Instant>>,
    queue: Option<Arc<SharedQueue<QueuedSpan>>>,
    stats: Arc<OtelStats>,
    shutdown_timeout: Duration,
    /// One line for the `ready` log: where things go.
    pub summary: String,
}

impl Telemetry {
    /// Builds the exporters and starts the tasks on `rt`. `None` when `OTEL_SDK_DISABLED`
    /// or nothing is to be exported (the caller then keeps no sink at all).
    pub fn start(
        rt: &Handle,
        cfg: OtelConfig,
        env: EnvSettings,
        capture: Arc<Stats>,
        stats: Arc<OtelStats>,
    ) -> Result<Option<(Self, OtelSink)>> {
        for w in &env.warnings {
            tracing::warn!("{w}");
        }
        if let Some(methods) = &env.known_methods {
            span::set_known_methods(methods);
        }
        if env.sdk_disabled {
            tracing::info!(
                "OTEL_SDK_DISABLED=true: exporting no spans and no metrics (capture still runs)"
            );
            return Ok(None);
        }
        let _ = rustls::crypto::ring::default_provider().install_default();
        let _guard = rt.enter();
        let lookup = |k: &str| std::env::var(k).ok();
        let mut parts = Vec::new();

        // The endpoint/protocol of one signal, when it is exported over OTLP at all.
        let target = |signal, enabled: bool| {
            (cfg.otlp && enabled).then(|| {
                let (t, w) = export::resolve_target(
                    signal,
                    cfg.otlp_protocol,
                    cfg.otlp_endpoint.as_deref(),
                    &lookup,
                );
                w.iter().for_each(|w| tracing::warn!("{w}"));
                t
            })
        };
        let span_target = target(Signal::Traces, env.traces_otlp);
        let metric_target = target(Signal::Metrics, env.metrics_otlp);
        // One OTLP client per exported signal, set up from the target and OTEL_* variables.
        let client = |t: &Target, signal: Signal| {
            let (settings, w) = ClientSettings::resolve(t, signal, &lookup);
            w.iter().for_each(|w| tracing::warn!("{w}"));
            OtlpClient::new(settings, signal).with_context(|| {
                format!(
                    "building the OTLP {signal} exporter ({} {})",
                    t.protocol, t.url
                )
            })
        };
        let span_exporter = match &span_target {
            Some(t) => {
                let client = client(t, Signal::Traces)?;
                parts.push(format!("spans → {} {}", t.protocol, client.url()));
                Some(OtlpSpanSender::new(client, stats.clone()))
            }
            None => None,
        };
        let metric_exporter = match &metric_target {
            Some(t) => {
                let e = client(t, Signal::Metrics)?;
                parts.push(format!(
                    "metrics → {} {} every {} ms",
                    t.protocol,
                    e.url(),
                    env.metric_interval.as_millis()
                ));
                Some(e)
            }
            None => None,
        };
        if cfg.console {
            parts.push("spans → stdout (JSON lines)".into());
        }
        let prometheus_listener = match cfg.prometheus_port {
            Some(port) => {
                let l = prometheus::Server::bind(port)
                    .with_context(|| format!("listening on --prometheus-port {port}"))?;
                parts.push(format!("metrics → http://0.0.0.0:{port}/metrics"));
                Some(l)
            }
            None => None,
        };
        if parts.is_empty() {
            tracing::info!(
                "no exporter configured (--exporter none): no spans or metrics leave the agent"
            );
            return Ok(None);
        }

        let queue_spans = cfg
            .export_queue_spans
            .or(env.span_queue)
            .unwrap_or(DEFAULT_EXPORT_QUEUE_SPANS);
        let loop_config = LoopConfig {
            max_batch: batch_size(env.span_batch, queue_spans),
            linger: env.span_delay,
            ..LoopConfig::default()
        };
        let queue = span_exporter.as_ref().map(|_| {
            let q = SharedQueue::new(queue_spans, loop_config.max_batch, stats.clone());
            if !cfg.yield_cpu {
                return Arc::new(q);
            }
            match ExportYield::new(loop_config.max_batch, queue_spans) {
                Ok(y) => Arc::new(q.with_yielding(y)),
                Err(e) => {
                    tracing::warn!("the export thread stays at normal priority: {e}");
                    Arc::new(q)
                }
            }
        });
        let q = queue.clone();
        let queue_len: metrics::QueueLen =
            Arc::new(move || q.as_ref().map_or(0, |q| q.len() as u64));
        let metrics_on = metric_exporter.is_some() || prometheus_listener.is_some();
        let mut registry = Registry::new(
            RegistryConfig {
                max_services: cfg.max_services,
                metrics: metrics_on,
                node: resource::Node::new(
                    resource::host_name(),
                    env.resource_attributes.as_deref(),
                ),
                agent_attrs: env.resource_attributes.clone(),
                temporality: env.metrics_temporality,
            },
            AgentSources {
                capture,
                stats: stats.clone(),
                queue_len,
            },
        );
        if metric_exporter.is_none() {
            registry = registry.without_final_collection();
        }
        let registry = Arc::new(registry);

        let ingest = Ingest {
            registry: registry.clone(),
            routes: RouteTable::new(cfg.routes.clone(), cfg.max_routes_per_service),
            sampler: env.sampler,
            console: cfg.console,
            queue: queue.clone(),
            spans: SpanArena::default(),
            scope: span::scope(),
            stats: stats.clone(),
            entries: EntryCache::default(),
            conn_attrs: ConnAttrCache::default(),
            pending: Vec::with_capacity(PENDING_SPANS),
        };
        let (close_spans, close_rx) = watch::channel(None);
        let span_loop = match (span_exporter, &queue) {
            (Some(sender), Some(q)) => {
                Some(rt.spawn(queue::export_loop(q.clone(), sender, loop_config, close_rx)))
            }
            _ => None,
        };
        let (stop_metrics, stop_rx) = watch::channel(None);
        let metrics_loop = metric_exporter.map(|e| {
            rt.spawn(export::metrics_loop(
                registry.clone(),
                e,
                env.metric_interval,
                stats.clone(),
                stop_rx,
            ))
        });
        let prometheus = prometheus_listener
            .map(|l| prometheus::Server::start(l, registry.clone()))
            .transpose()
            .context("starting the Prometheus endpoint's thread")?;
        let summary = format!("sampler {}; {}", env.sampler.describe(), parts.join("; "));
        Ok(Some((
            Self {
                span_loop,
                metrics_loop,
                prometheus,
                close_spans,
                stop_metrics,
                queue,
                stats: stats.clone(),
                shutdown_timeout: cfg.shutdown_timeout,
                summary,
            },
            OtelSink { ingest },
        )))
    }

    /// Flushes everything: call after the capture thread stopped (its sink is dropped, so
    /// the channel drains and closes). Waits at most the shutdown timeout for the collector.
    pub fn shutdown(self, rt: &tokio::runtime::Runtime) {
        let Self {
            span_loop,
            metrics_loop,
            prometheus,
            close_spans,
            stop_metrics,
            queue,
            stats,
            shutdown_timeout,
            ..
        } = self;
        rt.block_on(async move {
            let deadline = Instant::now() + shutdown_timeout;
            if let Some(q) = &queue {
                tracing::debug!(
                    rescues = q.rescues(),
                    "export thread put back to normal priority when spans piled up"
                );
            }
            let pending = queue.as_ref().map_or(0, |q| q.len());
            if pending > 0 {
                tracing::info!("flushing {pending} pending spans (at most {} s)", shutdown_timeout.as_secs());
            }
            let _ = close_spans.send(Some(deadline));
            if let Some(q) = &queue {
                q.wake();
            }
            let _ = stop_metrics.send(Some(deadline));
            let lost = match span_loop {
                Some(h) => h.await.unwrap_or(0),
                None => 0,
            };
            if let Some(h) = metrics_loop {
                let _ = h.await;
            }
            let exported = OtelStats::get(&stats.spans_exported);
            let dropped: u64 = SpanDrop::ALL.iter().map(|d| stats.dropped_count(*d)).sum();
            if lost > 0 {
                tracing::warn!(
                    "shutdown: the collector did not take {lost} spans within {} s: they are lost ({exported} spans exported in total)",
                    shutdown_timeout.as_secs()
                );
            } else {
                tracing::info!("telemetry flushed: {exported} spans exported, {dropped} dropped in total");
            }
        });
        // Scrapes are answered until everything else has been flushed.
        if let Some(server) = prometheus {
            server.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn spans_reach_the_queue_in_handfuls_and_on_flush() {
        let (mut sink, queue) =
            OtelSink::without_export(Arc::default(), Arc::new(OtelStats::default()));
        let ex = span::tests::exchange(crate::http::ExchangeRole::Server, "GET", "/", 200);
        for _ in 0..PENDING_SPANS - 1 {
            sink.on_exchange(&ex);
        }
        assert_eq!(queue.pushed(), 0);
        sink.on_exchange(&ex);
        assert_eq!(queue.pushed(), PENDING_SPANS as u64);
        sink.on_exchange(&ex);
        sink.flush();
        assert_eq!(queue.pushed(), PENDING_SPANS as u64 + 1);
        // What is pending when the sink goes away is handed over too.
        sink.on_exchange(&ex);
        drop(sink);
        assert_eq!(queue.pushed(), PENDING_SPANS as u64 + 2);
    }

    #[test]
    fn span_arena_hands_out_each_encoding_intact_across_blocks() {
        let mut arena = SpanArena::default();
        // Sizes that straddle block boundaries, and one span larger than a block.
        let sizes = [
            1,
            300,
            70_000,
            5,
            SpanArena::BLOCK_BYTES - 2,
            17,
            40_000,
            40_000,
        ];
        let spans: Vec<_> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                // A hint too small for some: those are encoded a second time.
                arena.encode(n.min(1000), |buf| {
                    for (k, b) in buf.iter_mut().enumerate().take(n) {
                        *b = (i + k) as u8;
                    }
                    n
                })
            })
            .collect();
        for (i, (span, &n)) in spans.iter().zip(&sizes).enumerate() {
            assert_eq!(span.len(), n);
            assert!(
                span.iter().enumerate().all(|(k, &b)| b == (i + k) as u8),
                "span {i}"
            );
        }
    }

    fn env(pairs: &[(&str, &str)]) -> EnvSettings {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        EnvSettings::from_lookup(&move |k| m.get(k).cloned())
    }

    #[test]
    fn env_defaults() {
        let e = env(&[]);
        assert!(!e.sdk_disabled);
        assert!(e.traces_otlp && e.metrics_otlp);
        assert_eq!(e.metric_interval, Duration::from_secs(60));
        assert_eq!(
            (e.span_batch, e.span_delay, e.span_queue),
            (512, Duration::from_secs(1), None)
        );
        assert_eq!(e.sampler, Sampler::default());
        assert_eq!(e.metrics_temporality, Temporality::Cumulative);
        assert!(e.warnings.is_empty());
    }

    #[test]
    fn env_metrics_temporality() {
        let var = "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE";
        assert_eq!(
            env(&[(var, "DELTA")]).metrics_temporality,
            Temporality::Delta
        );
        assert_eq!(
            env(&[(var, "lowmemory")]).metrics_temporality,
            Temporality::LowMemory
        );
        assert_eq!(
            env(&[(var, "cumulative")]).metrics_temporality,
            Temporality::Cumulative
        );
        let e = env(&[(var, "sometimes")]);
        assert_eq!(e.metrics_temporality, Temporality::Cumulative);
        assert_eq!(e.warnings.len(), 1);
    }

    #[test]
    fn env_known_methods() {
        let var = "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS";
        assert_eq!(env(&[]).known_methods, None);
        let e = env(&[(var, "GET,PROPFIND")]);
        assert_eq!(e.known_methods, Some(vec!["GET".into(), "PROPFIND".into()]));
        assert!(e.warnings.is_empty());
        let e = env(&[(var, "not a method")]);
        assert_eq!(e.known_methods, None);
        assert_eq!(e.warnings.len(), 2, "{:?}", e.warnings);
    }

    #[test]
    fn env_values() {
        let e = env(&[
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
            ("OTEL_TRACES_EXPORTER", "none"),
            ("OTEL_TRACES_SAMPLER", "always_off"),
        ]);
        assert!(e.sdk_disabled);
        assert!(!e.traces_otlp && e.metrics_otlp);
        assert_eq!(e.metric_interval, Duration::from_millis(500));
        assert!(!e
            .sampler
            .should_sample(opentelemetry::trace::TraceId::from(1u128), None));
        let e = env(&[
            ("OTEL_SDK_DISABLED", "false"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "soon"),
        ]);
        assert!(!e.sdk_disabled);
        assert_eq!(e.metric_interval, Duration::from_secs(60));
        assert_eq!(e.warnings.len(), 1);
    }

    #[test]
    fn env_batch_span_processor() {
        let e = env(&[
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048"),
            ("OTEL_BSP_SCHEDULE_DELAY", "5000"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "100000"),
        ]);
        assert_eq!(
            (e.span_batch, e.span_delay, e.span_queue),
            (2048, Duration::from_secs(5), Some(100_000))
        );
        assert!(e.warnings.is_empty());
        let e = env(&[
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "0"),
            ("OTEL_BSP_SCHEDULE_DELAY", "-1"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
        ]);
        assert_eq!(
            (e.span_batch, e.span_delay, e.span_queue),
            (512, Duration::from_secs(1), None)
        );
        assert_eq!(e.warnings.len(), 3, "{:?}", e.warnings);
    }

    #[test]
    fn batches_never_exceed_the_queue_or_the_request_limit() {
        assert_eq!(batch_size(512, DEFAULT_EXPORT_QUEUE_SPANS), 512);
        assert_eq!(batch_size(4096, 1000), 1000);
        assert_eq!(batch_size(100_000, 1_000_000), MAX_EXPORT_BATCH);
        assert_eq!(batch_size(3, 2), 2);
    }
}
