//! RED metrics per observed process and the agent's own `tapir.*` metrics.
//!
//! The SDK aggregates: one `SdkMeterProvider` per observed process (its resource is the
//! process's), read by a `ManualReader` that Tapir's single metrics task collects on every
//! interval and hands to ONE shared OTLP exporter (the `ResourceMetrics` carries the
//! resource). The same collections feed the Prometheus endpoint. The table of providers
//! is a bounded LRU; evicted and long-idle providers are collected one last time, then
//! shut down.
use std::{
    num::NonZeroUsize,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, Weak,
    },
    time::{Duration, Instant},
};

use lru::LruCache;
use opentelemetry::{
    metrics::{Histogram, Meter, MeterProvider as _},
    KeyValue,
};
use opentelemetry_sdk::{
    error::OTelSdkResult,
    metrics::{
        data::ResourceMetrics, reader::MetricReader, InstrumentKind, ManualReader, Pipeline,
        SdkMeterProvider, Temporality,
    },
    Resource,
};
use opentelemetry_semantic_conventions::{attribute as sc, metric as sm};

use super::{
    counters::{OtelStats, SpanDrop},
    resource::{agent_resource, process_resource, resource_service_name},
    span::{is_error, normalize_method, scope, server_address},
};
use crate::{exchange::CapturedExchange, process::ProcessInfo, stats::Stats};

/// Duration buckets (seconds) of the stable HTTP semantic conventions.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Body size buckets (bytes).
pub const SIZE_BUCKETS: [f64; 14] = [
    0.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
    262144.0, 1048576.0,
];
/// A process with no exchange for this long has its provider collected a last time and
/// dropped (short-lived clients would otherwise fill the table).
pub const IDLE_RETIRE: Duration = Duration::from_secs(300);

/// A `MetricReader` the provider owns while Tapir keeps a handle to collect it.
#[derive(Debug, Clone)]
struct SharedReader(Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// A meter provider and the reader Tapir collects it with.
struct Meters {
    provider: SdkMeterProvider,
    reader: Arc<ManualReader>,
}

impl Meters {
    fn new(resource: Resource) -> Self {
        // Cumulative: an export that fails loses no counts, the next one carries them.
        let reader = Arc::new(
            ManualReader::builder()
                .with_temporality(Temporality::Cumulative)
                .build(),
        );
        let provider = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_reader(SharedReader(reader.clone()))
            .build();
        Self { provider, reader }
    }

    fn meter(&self) -> Meter {
        self.provider.meter_with_scope(scope())
    }

    fn collect(&self) -> Option<ResourceMetrics> {
        let mut rm = ResourceMetrics::default();
        match self.reader.collect(&mut rm) {
            Ok(()) => Some(rm),
            Err(e) => {
                tracing::debug!(error = %e, "metrics collection failed");
                None
            }
        }
    }

    fn shutdown(&self) {
        let _ = self.provider.shutdown();
    }
}

struct HttpInstruments {
    server_duration: Histogram<f64>,
    client_duration: Histogram<f64>,
    server_request_size: Histogram<u64>,
    server_response_size: Histogram<u64>,
    client_request_size: Histogram<u64>,
    client_response_size: Histogram<u64>,
}

impl HttpInstruments {
    fn new(m: &Meter) -> Self {
        let dur = |name: &'static str, desc: &'static str| {
            m.f64_histogram(name)
                .with_unit("s")
                .with_description(desc)
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build()
        };
        let size = |name: &'static str, desc: &'static str| {
            m.u64_histogram(name)
                .with_unit("By")
                .with_description(desc)
                .with_boundaries(SIZE_BUCKETS.to_vec())
                .build()
        };
        Self {
            server_duration: dur(
                sm::HTTP_SERVER_REQUEST_DURATION,
                "Duration of HTTP server requests.",
            ),
            client_duration: dur(
                sm::HTTP_CLIENT_REQUEST_DURATION,
                "Duration of HTTP client requests.",
            ),
            server_request_size: size(
                sm::HTTP_SERVER_REQUEST_BODY_SIZE,
                "Size of HTTP server request bodies.",
            ),
            server_response_size: size(
                sm::HTTP_SERVER_RESPONSE_BODY_SIZE,
                "Size of HTTP server response bodies.",
            ),
            client_request_size: size(
                sm::HTTP_CLIENT_REQUEST_BODY_SIZE,
                "Size of HTTP client request bodies.",
            ),
            client_response_size: size(
                sm::HTTP_CLIENT_RESPONSE_BODY_SIZE,
                "Size of HTTP client response bodies.",
            ),
        }
    }
}

/// What Tapir keeps per observed process: its resource, and its meters (none when
/// metrics are not exported anywhere).
pub struct ServiceEntry {
    pub resource: Resource,
    pub service_name: String,
    meters: Option<(Meters, HttpInstruments)>,
    /// Seconds since the registry's epoch when it was last used.
    last_used: AtomicU64,
}

impl std::fmt::Debug for ServiceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceEntry")
            .field("service_name", &self.service_name)
            .finish_non_exhaustive()
    }
}

/// Identity of an observed process for the table: pid plus what makes a reused pid a
/// different process.
type ProcessKey = (u32, String, Option<String>, Option<String>, Option<String>);

fn key_of(p: &ProcessInfo) -> ProcessKey {
    (
        p.pid,
        p.exe_name.clone(),
        p.exe_path.clone(),
        p.otel_service_name.clone(),
        p.otel_resource_attributes.clone(),
    )
}

/// The metric attributes of an exchange: bounded (no path, no client address).
pub fn metric_attributes(ex: &CapturedExchange, route: Option<&str>) -> Vec<KeyValue> {
    let server = ex.is_server();
    let mut a = Vec::with_capacity(8);
    a.push(KeyValue::new(
        sc::HTTP_REQUEST_METHOD,
        normalize_method(&ex.http.method).0,
    ));
    a.push(KeyValue::new(
        sc::HTTP_RESPONSE_STATUS_CODE,
        i64::from(ex.http.status),
    ));
    if let Some(r) = route {
        a.push(KeyValue::new(sc::HTTP_ROUTE, r.to_string()));
    }
    a.push(KeyValue::new(sc::URL_SCHEME, "http"));
    a.push(KeyValue::new(
        sc::NETWORK_PROTOCOL_VERSION,
        ex.http.version.as_str(),
    ));
    if is_error(server, ex.http.status) {
        a.push(KeyValue::new(sc::ERROR_TYPE, ex.http.status.to_string()));
    }
    if !server {
        let (addr, port) = server_address(ex);
        a.push(KeyValue::new(sc::SERVER_ADDRESS, addr));
        a.push(KeyValue::new(sc::SERVER_PORT, i64::from(port)));
    }
    a
}

/// Every observed process's resource and meters, and the agent's own meters.
pub struct Registry {
    entries: Mutex<LruCache<ProcessKey, Arc<ServiceEntry>>>,
    retired: Mutex<Vec<Arc<ServiceEntry>>>,
    agent: Meters,
    /// Observable instruments must stay registered.
    _agent_instruments: Vec<Box<dyn std::any::Any + Send + Sync>>,
    host: String,
    metrics: bool,
    /// Evicted providers wait for one last periodic collection (only when something
    /// collects periodically: the OTLP metrics loop).
    collect_retired: bool,
    epoch: Instant,
    stats: Arc<OtelStats>,
}

/// Reads the current length of the span retry queue (for a gauge).
pub type QueueLen = Arc<dyn Fn() -> u64 + Send + Sync>;

impl Registry {
    /// `max_services`: bound of the table; `metrics`: whether to keep meters at all.
    pub fn new(
        max_services: usize,
        metrics: bool,
        host: String,
        agent_attrs: Option<&str>,
        capture: Arc<Stats>,
        stats: Arc<OtelStats>,
        queue_len: QueueLen,
    ) -> Self {
        let agent = Meters::new(agent_resource(&host, agent_attrs));
        let instruments = agent_instruments(&agent.meter(), capture, stats.clone(), queue_len);
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_services.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            retired: Mutex::new(Vec::new()),
            agent,
            _agent_instruments: instruments,
            host,
            metrics,
            collect_retired: true,
            epoch: Instant::now(),
            stats,
        }
    }

    /// Without a periodic collector (Prometheus only), evicted providers are shut down at
    /// once instead of waiting for a last collection that would never come.
    pub fn without_final_collection(mut self) -> Self {
        self.collect_retired = false;
        self
    }

    fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// The entry of an observed process, created on first use.
    pub fn entry(&self, p: &ProcessInfo) -> Arc<ServiceEntry> {
        let key = key_of(p);
        let now = self.now_secs();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(&key) {
            e.last_used.store(now, Ordering::Relaxed);
            return e.clone();
        }
        let resource = process_resource(p, &self.host);
        let meters = self.metrics.then(|| {
            let m = Meters::new(resource.clone());
            let i = HttpInstruments::new(&m.meter());
            (m, i)
        });
        let entry = Arc::new(ServiceEntry {
            service_name: resource_service_name(&resource),
            resource,
            meters,
            last_used: AtomicU64::new(now),
        });
        if let Some((k, old)) = entries.push(key.clone(), entry.clone()) {
            if k != key {
                OtelStats::add(&self.stats.services_evicted, 1);
                self.retire(old);
            }
        }
        entry
    }

    fn retire(&self, e: Arc<ServiceEntry>) {
        if !self.collect_retired {
            if let Some((m, _)) = &e.meters {
                m.shutdown();
            }
        } else if e.meters.is_some() {
            self.retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(e);
        }
    }

    /// Records an exchange in its process's RED metrics.
    pub fn record(&self, entry: &ServiceEntry, ex: &CapturedExchange, route: Option<&str>) {
        let Some((_, inst)) = &entry.meters else {
            return;
        };
        let attrs = metric_attributes(ex, route);
        let secs = ex.duration_ns() as f64 / 1e9;
        if ex.is_server() {
            inst.server_duration.record(secs, &attrs);
            inst.server_request_size
                .record(ex.http.request_body_bytes, &attrs);
            inst.server_response_size
                .record(ex.http.response_body_bytes, &attrs);
        } else {
            inst.client_duration.record(secs, &attrs);
            inst.client_request_size
                .record(ex.http.request_body_bytes, &attrs);
            inst.client_response_size
                .record(ex.http.response_body_bytes, &attrs);
        }
    }

    /// Collects every provider: the agent's, each observed process's, and (one last time)
    /// the retired ones, which are then shut down. Processes idle for `IDLE_RETIRE` retire.
    pub fn collect(&self) -> Vec<ResourceMetrics> {
        let now = self.now_secs();
        let live: Vec<Arc<ServiceEntry>> = {
            let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            while let Some((_, e)) = entries.peek_lru() {
                if now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < IDLE_RETIRE.as_secs() {
                    break;
                }
                if let Some((_, e)) = entries.pop_lru() {
                    self.retire(e);
                }
            }
            entries.iter().map(|(_, e)| e.clone()).collect()
        };
        let retired = std::mem::take(&mut *self.retired.lock().unwrap_or_else(|e| e.into_inner()));
        let mut out = Vec::with_capacity(live.len() + retired.len() + 1);
        out.extend(self.agent.collect());
        for e in live.iter().chain(retired.iter()) {
            if let Some((m, _)) = &e.meters {
                out.extend(m.collect().filter(|rm| rm.scope_metrics().next().is_some()));
            }
        }
        for e in &retired {
            if let Some((m, _)) = &e.meters {
                m.shutdown();
            }
        }
        out
    }

    /// Collects without retiring anything (for a Prometheus scrape).
    pub fn peek(&self) -> Vec<ResourceMetrics> {
        let live: Vec<Arc<ServiceEntry>> = {
            let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
            entries.iter().map(|(_, e)| e.clone()).collect()
        };
        let mut out: Vec<ResourceMetrics> = self.agent.collect().into_iter().collect();
        for e in &live {
            if let Some((m, _)) = &e.meters {
                out.extend(m.collect());
            }
        }
        out
    }

    /// Shuts every provider down (after the final collection).
    pub fn shutdown(&self) {
        let entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        for (_, e) in entries.iter() {
            if let Some((m, _)) = &e.meters {
                m.shutdown();
            }
        }
        self.agent.shutdown();
    }
}

/// The agent's own metrics, read from the counters at each collection.
fn agent_instruments(
    m: &Meter,
    capture: Arc<Stats>,
    stats: Arc<OtelStats>,
    queue_len: QueueLen,
) -> Vec<Box<dyn std::any::Any + Send + Sync>> {
    let mut keep: Vec<Box<dyn std::any::Any + Send + Sync>> = Vec::new();
    for (i, (name, _)) in capture.snapshot().into_iter().enumerate() {
        let c = capture.clone();
        keep.push(Box::new(
            m.u64_observable_counter(name)
                .with_callback(move |o| {
                    if let Some((_, v)) = c.snapshot().get(i) {
                        o.observe(*v, &[]);
                    }
                })
                .build(),
        ));
    }
    let c = capture.clone();
    keep.push(Box::new(
        m.u64_observable_counter("tapir.http.dropped")
            .with_description("HTTP messages the agent could not turn into exchanges, by reason")
            .with_callback(move |o| {
                for (reason, n) in c.http_drops() {
                    o.observe(n, &[KeyValue::new("reason", reason)]);
                }
            })
            .build(),
    ));
    let s = stats.clone();
    keep.push(Box::new(
        m.u64_observable_counter("tapir.spans.dropped")
            .with_description("Spans (for queue_full: whole exchanges) never exported, by reason")
            .with_callback(move |o| {
                for why in SpanDrop::ALL {
                    o.observe(
                        s.dropped_count(why),
                        &[KeyValue::new("reason", why.as_str())],
                    );
                }
            })
            .build(),
    ));
    let s = stats.clone();
    keep.push(Box::new(
        m.u64_observable_counter("tapir.export.failures")
            .with_description("Failed OTLP export calls, by signal")
            .with_callback(move |o| {
                o.observe(
                    OtelStats::get(&s.trace_export_failures),
                    &[KeyValue::new("signal", "traces")],
                );
                o.observe(
                    OtelStats::get(&s.metric_export_failures),
                    &[KeyValue::new("signal", "metrics")],
                );
            })
            .build(),
    ));
    type Field = fn(&OtelStats) -> &AtomicU64;
    let simple: [(&'static str, &'static str, Field); 5] = [
        (
            "tapir.export.retries",
            "Trace batches sent again after a failed export",
            |s| &s.trace_export_retries,
        ),
        (
            "tapir.spans.exported",
            "Spans accepted by the collector",
            |s| &s.spans_exported,
        ),
        (
            "tapir.spans.not_sampled",
            "Exchanges whose span the sampler dropped (still in metrics)",
            |s| &s.spans_not_sampled,
        ),
        (
            "tapir.routes.overflow",
            "Exchanges whose route became /*overflow* (too many routes in the service)",
            |s| &s.routes_overflow,
        ),
        (
            "tapir.services.evicted",
            "Observed processes evicted from the agent's bounded resource/metrics table",
            |s| &s.services_evicted,
        ),
    ];
    for (name, desc, field) in simple {
        let s = stats.clone();
        keep.push(Box::new(
            m.u64_observable_counter(name)
                .with_description(desc)
                .with_callback(move |o| o.observe(OtelStats::get(field(&s)), &[]))
                .build(),
        ));
    }
    let s = stats.clone();
    keep.push(Box::new(
        m.u64_observable_gauge("tapir.connections.tracked")
            .with_description("TCP connections in the agent's table")
            .with_callback(move |o| o.observe(OtelStats::get(&s.connections_tracked), &[]))
            .build(),
    ));
    keep.push(Box::new(
        m.u64_observable_gauge("tapir.spans.queued")
            .with_description("Spans waiting in the export queue")
            .with_callback(move |o| o.observe(queue_len(), &[]))
            .build(),
    ));
    keep
}

#[cfg(test)]
mod tests {
    use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};

    use super::*;
    use crate::{http::ExchangeRole, otel::span::tests::exchange};

    fn registry(max: usize) -> Registry {
        Registry::new(
            max,
            true,
            "h".into(),
            None,
            Arc::new(Stats::default()),
            Arc::new(OtelStats::default()),
            Arc::new(|| 0),
        )
    }

    fn histogram_count(rms: &[ResourceMetrics], name: &str) -> u64 {
        let mut n = 0;
        for rm in rms {
            for sm in rm.scope_metrics() {
                for m in sm.metrics().filter(|m| m.name() == name) {
                    match m.data() {
                        AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                            n += h.data_points().map(|p| p.count()).sum::<u64>()
                        }
                        AggregatedMetrics::U64(MetricData::Histogram(h)) => {
                            n += h.data_points().map(|p| p.count()).sum::<u64>()
                        }
                        _ => {}
                    }
                }
            }
        }
        n
    }

    #[test]
    fn records_red_metrics_with_bounded_attributes() {
        let r = registry(4);
        let ex = exchange(ExchangeRole::Server, "GET", "/users/42", 500);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, Some("/users/*"));
        r.record(&e, &ex, Some("/users/*"));
        let cl = exchange(ExchangeRole::Client, "GET", "/x", 404);
        r.record(&e, &cl, Some("/x"));
        let rms = r.collect();
        assert_eq!(histogram_count(&rms, "http.server.request.duration"), 2);
        assert_eq!(histogram_count(&rms, "http.server.response.body.size"), 2);
        assert_eq!(histogram_count(&rms, "http.client.request.duration"), 1);
        let a = metric_attributes(&ex, Some("/users/*"));
        let keys: Vec<String> = a.iter().map(|kv| kv.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "http.request.method",
                "http.response.status_code",
                "http.route",
                "url.scheme",
                "network.protocol.version",
                "error.type"
            ]
        );
        let keys: Vec<String> = metric_attributes(&cl, None)
            .iter()
            .map(|kv| kv.key.to_string())
            .collect();
        assert!(keys.contains(&"server.address".to_string()));
        assert!(keys.contains(&"server.port".to_string()));
        assert!(keys.contains(&"error.type".to_string()));
        // Cumulative: collecting again reports the same counts.
        assert_eq!(
            histogram_count(&r.collect(), "http.server.request.duration"),
            2
        );
    }

    #[test]
    fn duration_buckets_are_explicit() {
        let r = registry(4);
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, Some("/"));
        for rm in r.collect() {
            for sm in rm.scope_metrics() {
                for m in sm.metrics() {
                    if let AggregatedMetrics::F64(MetricData::Histogram(h)) = m.data() {
                        for p in h.data_points() {
                            assert_eq!(p.bounds().collect::<Vec<_>>(), DURATION_BUCKETS.to_vec());
                        }
                        assert_eq!(m.unit(), "s");
                    }
                }
            }
        }
    }

    #[test]
    fn the_table_is_bounded_and_evicted_metrics_are_collected_once_more() {
        let r = registry(2);
        for pid in 1..=3 {
            let mut ex = exchange(ExchangeRole::Server, "GET", "/", 200);
            Arc::make_mut(&mut ex.process).pid = pid;
            let e = r.entry(&ex.process);
            r.record(&e, &ex, Some("/"));
        }
        assert_eq!(OtelStats::get(&r.stats.services_evicted), 1);
        // 3 processes: two live, one retired (collected a last time).
        assert_eq!(
            histogram_count(&r.collect(), "http.server.request.duration"),
            3
        );
        assert_eq!(
            histogram_count(&r.collect(), "http.server.request.duration"),
            2
        );
    }

    #[test]
    fn agent_metrics_are_under_the_tapir_resource() {
        let capture = Arc::new(Stats::default());
        Stats::inc(&capture.exchanges);
        let stats = Arc::new(OtelStats::default());
        stats.dropped(SpanDrop::QueueFull, 3);
        let r = Registry::new(2, true, "h".into(), None, capture, stats, Arc::new(|| 7));
        let rms = r.collect();
        let agent = rms
            .iter()
            .find(|rm| resource_service_name(rm.resource()) == "tapir")
            .unwrap();
        let names: Vec<String> = agent
            .scope_metrics()
            .flat_map(|s| s.metrics().map(|m| m.name().to_string()))
            .collect();
        for want in [
            "tapir.exchanges",
            "tapir.events.received",
            "tapir.http.dropped",
            "tapir.spans.dropped",
            "tapir.export.failures",
            "tapir.export.retries",
            "tapir.connections.tracked",
            "tapir.spans.queued",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
    }
}
