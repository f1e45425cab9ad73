//! RED metrics per observed process and the agent's own `tapir.*` metrics, aggregated here
//! (no SDK) and encoded as OTLP protobuf messages.
//!
//! Each observed process (a [`ServiceEntry`]) owns a small hash table of series. A series'
//! key is the metric attributes of an exchange (role, method, status, route, protocol
//! version and, for clients, the server address), hashed once per exchange from parts
//! borrowed from the exchange; its value is three fixed-bucket histograms (duration,
//! request and response body size). Recording into an existing series takes one short
//! per-process lock and allocates nothing. A service has at most `max_series` series;
//! further attribute sets go to one overflow series (`otel.metric.overflow=true`), counted.
//!
//! [`Registry::collect`] builds one OTLP request (the agent's resource, then each
//! process's) for the metrics loop, which reports with [`Registry::acknowledge`] how much
//! of it the collector took; [`Registry::peek`] builds the cumulative view a Prometheus
//! scrape renders. The table of processes is a bounded LRU: evicted, exited and long-idle
//! processes are exported one last time and freed once the collector has taken them.
//!
//! Temporality: cumulative (default) never resets a series, so a failed export loses
//! nothing. Delta moves what was recorded since the last collection into a per-series
//! pending histogram that is cleared only once acknowledged: a failed export is merged
//! into the next one.
use std::{
    hash::BuildHasher,
    num::NonZeroUsize,
    str::FromStr,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use hashbrown::HashTable;
use lru::LruCache;
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue},
    metrics::v1::{
        metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
        Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
    },
    resource::v1::Resource as ProtoResource,
};
use opentelemetry_sdk::Resource;
use opentelemetry_semantic_conventions::{attribute as sc, metric as sm};
use prost::Message as _;

use super::{
    counters::{OtelStats, SpanDrop},
    resource::{agent_resource, process_resource, resource_service_name},
    span::{is_error, normalize_method, scope, server_address_in, IpBuf},
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
/// A process with no exchange for this long is exported a last time and dropped
/// (short-lived clients would otherwise fill the table).
pub const IDLE_RETIRE: Duration = Duration::from_secs(300);
/// Series per observed process before new attribute sets go to the overflow series (the
/// SDK's default cardinality limit).
pub const MAX_SERIES_PER_SERVICE: usize = 2000;
/// `otel.metric.overflow`: the one attribute of an overflow series.
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// `OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Temporality {
    #[default]
    Cumulative,
    /// Delta for the HTTP histograms and for the agent's counters.
    Delta,
    /// Delta for synchronous instruments (the HTTP histograms); the agent's counters,
    /// asynchronous, stay cumulative.
    LowMemory,
}

impl FromStr for Temporality {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cumulative" => Ok(Self::Cumulative),
            "delta" => Ok(Self::Delta),
            "lowmemory" => Ok(Self::LowMemory),
            other => Err(format!(
                "unsupported temporality {other:?}: use cumulative, delta or lowmemory"
            )),
        }
    }
}

impl Temporality {
    fn histograms_delta(self) -> bool {
        self != Self::Cumulative
    }

    fn counters_delta(self) -> bool {
        self == Self::Delta
    }
}

fn aggregation(delta: bool) -> i32 {
    if delta {
        AggregationTemporality::Delta as i32
    } else {
        AggregationTemporality::Cumulative as i32
    }
}

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One explicit-bucket histogram: `counts[i]` holds the values in `(bounds[i-1], bounds[i]]`,
/// the last count those above every bound.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hist {
    counts: [u64; BUCKETS],
    count: u64,
    sum: f64,
    min: f64,
    max: f64,
}

impl Hist {
    const EMPTY: Self = Self {
        counts: [0; BUCKETS],
        count: 0,
        sum: 0.0,
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
    };

    fn record(&mut self, bounds: &[f64; BUCKETS - 1], v: f64) {
        // The first bound >= v: a value equal to a bound belongs to that bound's bucket.
        let i = bounds.partition_point(|b| *b < v);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.count += 1;
        self.sum += v;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
    }

    fn merge(&mut self, o: &Hist) {
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.count += o.count;
        self.sum += o.sum;
        self.min = self.min.min(o.min);
        self.max = self.max.max(o.max);
    }
}

/// The three histograms of a series: duration, request body size, response body size.
type Hists = [Hist; 3];

const BOUNDS: [&[f64; BUCKETS - 1]; 3] = [&DURATION_BUCKETS, &SIZE_BUCKETS, &SIZE_BUCKETS];

struct Instrument {
    name: &'static str,
    unit: &'static str,
    description: &'static str,
}

/// Server then client instruments, in [`Hists`] order.
const INSTRUMENTS: [[Instrument; 3]; 2] = [
    [
        Instrument {
            name: sm::HTTP_SERVER_REQUEST_DURATION,
            unit: "s",
            description: "Duration of HTTP server requests.",
        },
        Instrument {
            name: sm::HTTP_SERVER_REQUEST_BODY_SIZE,
            unit: "By",
            description: "Size of HTTP server request bodies.",
        },
        Instrument {
            name: sm::HTTP_SERVER_RESPONSE_BODY_SIZE,
            unit: "By",
            description: "Size of HTTP server response bodies.",
        },
    ],
    [
        Instrument {
            name: sm::HTTP_CLIENT_REQUEST_DURATION,
            unit: "s",
            description: "Duration of HTTP client requests.",
        },
        Instrument {
            name: sm::HTTP_CLIENT_REQUEST_BODY_SIZE,
            unit: "By",
            description: "Size of HTTP client request bodies.",
        },
        Instrument {
            name: sm::HTTP_CLIENT_RESPONSE_BODY_SIZE,
            unit: "By",
            description: "Size of HTTP client response bodies.",
        },
    ],
];

fn instruments(server: bool) -> &'static [Instrument; 3] {
    &INSTRUMENTS[usize::from(!server)]
}

/// A series key borrowed from an exchange: what is hashed and compared per exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct KeyView<'a> {
    server: bool,
    overflow: bool,
    method: &'static str,
    status: u16,
    version: &'static str,
    route: Option<&'a str>,
    server_address: Option<(&'a str, u16)>,
}

impl KeyView<'static> {
    fn overflow(server: bool) -> Self {
        Self {
            server,
            overflow: true,
            method: "",
            status: 0,
            version: "",
            route: None,
            server_address: None,
        }
    }
}

/// The metric attributes of a series, owned by it. Strings are shared with snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SeriesKey {
    server: bool,
    /// Where exchanges go once the service has its maximum of series.
    overflow: bool,
    method: &'static str,
    status: u16,
    version: &'static str,
    route: Option<Arc<str>>,
    server_address: Option<(Arc<str>, u16)>,
}

impl SeriesKey {
    fn view(&self) -> KeyView<'_> {
        KeyView {
            server: self.server,
            overflow: self.overflow,
            method: self.method,
            status: self.status,
            version: self.version,
            route: self.route.as_deref(),
            server_address: self.server_address.as_ref().map(|(a, p)| (&**a, *p)),
        }
    }

    fn from_view(v: KeyView<'_>) -> Self {
        Self {
            server: v.server,
            overflow: v.overflow,
            method: v.method,
            status: v.status,
            version: v.version,
            route: v.route.map(Arc::from),
            server_address: v.server_address.map(|(a, p)| (Arc::from(a), p)),
        }
    }

    /// The attributes, in the order and with the types an SDK-instrumented server reports.
    fn attributes(&self) -> Vec<KeyValue> {
        if self.overflow {
            return vec![kv(OVERFLOW_ATTRIBUTE, any_value::Value::BoolValue(true))];
        }
        let s = |v: &str| any_value::Value::StringValue(v.to_string());
        let mut a = Vec::with_capacity(8);
        a.push(kv(sc::HTTP_REQUEST_METHOD, s(self.method)));
        a.push(kv(
            sc::HTTP_RESPONSE_STATUS_CODE,
            any_value::Value::IntValue(i64::from(self.status)),
        ));
        if let Some(r) = &self.route {
            a.push(kv(sc::HTTP_ROUTE, s(r)));
        }
        a.push(kv(sc::URL_SCHEME, s("http")));
        a.push(kv(sc::NETWORK_PROTOCOL_VERSION, s(self.version)));
        if is_error(self.server, self.status) {
            a.push(kv(
                sc::ERROR_TYPE,
                any_value::Value::StringValue(self.status.to_string()),
            ));
        }
        if let Some((addr, port)) = &self.server_address {
            a.push(kv(sc::SERVER_ADDRESS, s(addr)));
            a.push(kv(
                sc::SERVER_PORT,
                any_value::Value::IntValue(i64::from(*port)),
            ));
        }
        a
    }
}

fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

/// Delta bookkeeping of a series: what was recorded since the last collection, and what
/// was collected but not yet acknowledged (sent again, merged, until it is).
struct DeltaState {
    current: Hists,
    current_start_ns: u64,
    pending: Option<(Hists, u64)>,
}

struct Series {
    hash: u64,
    key: SeriesKey,
    /// When the series began: the start of its cumulative points.
    start_ns: u64,
    /// Everything recorded (cumulative points, Prometheus).
    total: Hists,
    /// Only with delta temporality.
    delta: Option<Box<DeltaState>>,
}

impl Series {
    fn new(hash: u64, key: SeriesKey, now_ns: u64, delta: bool) -> Self {
        Self {
            hash,
            key,
            start_ns: now_ns,
            total: [Hist::EMPTY; 3],
            delta: delta.then(|| {
                Box::new(DeltaState {
                    current: [Hist::EMPTY; 3],
                    current_start_ns: now_ns,
                    pending: None,
                })
            }),
        }
    }

    fn record(&mut self, values: &[f64; 3]) {
        for ((h, b), v) in self.total.iter_mut().zip(BOUNDS).zip(values) {
            h.record(b, *v);
        }
        if let Some(d) = self.delta.as_deref_mut() {
            for ((h, b), v) in d.current.iter_mut().zip(BOUNDS).zip(values) {
                h.record(b, *v);
            }
        }
    }
}

#[derive(Default)]
struct SeriesTable {
    series: HashTable<Series>,
    /// Exported for the last time and freed: late records are ignored.
    closed: bool,
}

/// A series copied out of its table (the lock is held only for the copy).
struct Snap {
    key: SeriesKey,
    start_ns: u64,
    hists: Hists,
}

#[derive(Clone, Copy)]
enum Read {
    /// Cumulative values; nothing changes.
    Totals,
    /// Moves what was recorded since the last collection to the pending delta and reads
    /// the pending delta.
    Delta,
}

/// A resource as OTLP carries it.
struct OtlpResource {
    resource: ProtoResource,
    schema_url: String,
}

impl OtlpResource {
    fn new(r: &Resource) -> Self {
        let mut attributes: Vec<KeyValue> = r
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.to_string(),
                value: Some(any(v)),
                ..Default::default()
            })
            .collect();
        // The resource iterates in hash order: sort for a stable encoding.
        attributes.sort_by(|a, b| a.key.cmp(&b.key));
        Self {
            resource: ProtoResource {
                attributes,
                ..Default::default()
            },
            schema_url: r.schema_url().unwrap_or_default().to_string(),
        }
    }

    fn with(&self, metrics: Vec<Metric>) -> ResourceMetrics {
        let s = scope();
        ResourceMetrics {
            resource: Some(self.resource.clone()),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: s.name().to_string(),
                    version: s.version().unwrap_or_default().to_string(),
                    ..Default::default()
                }),
                metrics,
                schema_url: s.schema_url().unwrap_or_default().to_string(),
            }],
            schema_url: self.schema_url.clone(),
        }
    }
}

fn any(v: &opentelemetry::Value) -> AnyValue {
    use opentelemetry::{Array, Value};
    let value = match v {
        Value::Bool(b) => any_value::Value::BoolValue(*b),
        Value::I64(i) => any_value::Value::IntValue(*i),
        Value::F64(f) => any_value::Value::DoubleValue(*f),
        Value::String(s) => any_value::Value::StringValue(s.to_string()),
        Value::Array(a) => {
            let values = match a {
                Array::Bool(v) => v.iter().map(|b| any(&Value::Bool(*b))).collect(),
                Array::I64(v) => v.iter().map(|i| any(&Value::I64(*i))).collect(),
                Array::F64(v) => v.iter().map(|f| any(&Value::F64(*f))).collect(),
                Array::String(v) => v.iter().map(|s| any(&Value::String(s.clone()))).collect(),
                other => vec![any(&Value::String(other.to_string().into()))],
            };
            any_value::Value::ArrayValue(ArrayValue { values })
        }
        other => any_value::Value::StringValue(other.to_string()),
    };
    AnyValue { value: Some(value) }
}

/// The metric state of an observed process.
struct EntryMetrics {
    resource: OtlpResource,
    table: Mutex<SeriesTable>,
}

/// What Tapir keeps per observed process: its resource, and its series (none when
/// metrics are not exported anywhere).
pub struct ServiceEntry {
    pub resource: Resource,
    pub service_name: String,
    metrics: Option<EntryMetrics>,
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

impl ServiceEntry {
    fn read(&self, how: Read, now_ns: u64) -> Vec<Snap> {
        let Some(m) = &self.metrics else {
            return Vec::new();
        };
        let mut t = lock(&m.table);
        let mut out = Vec::with_capacity(t.series.len());
        for s in t.series.iter_mut() {
            match how {
                Read::Totals => out.push(Snap {
                    key: s.key.clone(),
                    start_ns: s.start_ns,
                    hists: s.total,
                }),
                Read::Delta => {
                    let Some(d) = s.delta.as_deref_mut() else {
                        continue;
                    };
                    if d.current[0].count > 0 {
                        match &mut d.pending {
                            Some((p, _)) => {
                                for (a, b) in p.iter_mut().zip(&d.current) {
                                    a.merge(b);
                                }
                            }
                            None => d.pending = Some((d.current, d.current_start_ns)),
                        }
                        d.current = [Hist::EMPTY; 3];
                    }
                    d.current_start_ns = now_ns;
                    if let Some((p, start)) = &d.pending {
                        out.push(Snap {
                            key: s.key.clone(),
                            start_ns: *start,
                            hists: *p,
                        });
                    }
                }
            }
        }
        out
    }

    /// The collector took the last collection: pending deltas are done.
    fn acknowledged(&self) {
        if let Some(m) = &self.metrics {
            for s in lock(&m.table).series.iter_mut() {
                if let Some(d) = s.delta.as_deref_mut() {
                    d.pending = None;
                }
            }
        }
    }

    /// Frees every series (the entry itself may live on in queued spans); returns how many.
    fn close(&self) -> usize {
        let Some(m) = &self.metrics else {
            return 0;
        };
        let mut t = lock(&m.table);
        t.closed = true;
        let n = t.series.len();
        t.series = HashTable::new();
        n
    }

    fn series_count(&self) -> usize {
        self.metrics
            .as_ref()
            .map_or(0, |m| lock(&m.table).series.len())
    }

    /// This process's metrics as OTLP, or `None` when there is nothing to report.
    fn resource_metrics(&self, how: Read, now_ns: u64) -> Option<ResourceMetrics> {
        let m = self.metrics.as_ref()?;
        let snaps = self.read(how, now_ns);
        if snaps.is_empty() {
            return None;
        }
        let temporality = aggregation(matches!(how, Read::Delta));
        let mut metrics = Vec::with_capacity(6);
        for server in [true, false] {
            let mine: Vec<&Snap> = snaps.iter().filter(|s| s.key.server == server).collect();
            if mine.is_empty() {
                continue;
            }
            let attrs: Vec<Vec<KeyValue>> = mine.iter().map(|s| s.key.attributes()).collect();
            for (i, inst) in instruments(server).iter().enumerate() {
                let data_points = mine
                    .iter()
                    .zip(&attrs)
                    .map(|(s, a)| {
                        histogram_point(&s.hists[i], BOUNDS[i], a.clone(), s.start_ns, now_ns)
                    })
                    .collect();
                metrics.push(Metric {
                    name: inst.name.to_string(),
                    description: inst.description.to_string(),
                    unit: inst.unit.to_string(),
                    data: Some(metric::Data::Histogram(Histogram {
                        data_points,
                        aggregation_temporality: temporality,
                    })),
                    ..Default::default()
                });
            }
        }
        Some(m.resource.with(metrics))
    }
}

fn histogram_point(
    h: &Hist,
    bounds: &[f64],
    attributes: Vec<KeyValue>,
    start_ns: u64,
    now_ns: u64,
) -> HistogramDataPoint {
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        count: h.count,
        sum: Some(h.sum),
        bucket_counts: h.counts.to_vec(),
        explicit_bounds: bounds.to_vec(),
        min: (h.count > 0).then_some(h.min),
        max: (h.count > 0).then_some(h.max),
        ..Default::default()
    }
}

/// Reads the current length of the span retry queue (for a gauge).
pub type QueueLen = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One point of an agent counter.
struct CounterPoint {
    name: &'static str,
    description: &'static str,
    attr: Option<(&'static str, &'static str)>,
    value: u64,
}

/// Delta bookkeeping of the agent's counters: values at the last acknowledged export, and
/// at the last collection.
struct CounterDelta {
    acked: Vec<u64>,
    acked_ns: u64,
    sent: Vec<u64>,
    sent_ns: u64,
}

/// The agent's own metrics, read from its counters at each collection.
struct AgentMetrics {
    resource: OtlpResource,
    capture: Arc<Stats>,
    stats: Arc<OtelStats>,
    queue_len: QueueLen,
    start_ns: u64,
    delta: Mutex<CounterDelta>,
}

impl AgentMetrics {
    fn counters(&self) -> Vec<CounterPoint> {
        let point = |name, description, attr, value| CounterPoint {
            name,
            description,
            attr,
            value,
        };
        let mut v: Vec<CounterPoint> = self
            .capture
            .snapshot()
            .into_iter()
            .map(|(name, value)| point(name, "", None, value))
            .collect();
        for (reason, n) in self.capture.http_drops() {
            v.push(point(
                "tapir.http.dropped",
                "HTTP messages the agent could not turn into exchanges, by reason",
                Some(("reason", reason)),
                n,
            ));
        }
        let s = &self.stats;
        for why in SpanDrop::ALL {
            v.push(point(
                "tapir.spans.dropped",
                "Spans (for queue_full: whole exchanges) never exported, by reason",
                Some(("reason", why.as_str())),
                s.dropped_count(why),
            ));
        }
        for (signal, c) in [
            ("traces", &s.trace_export_failures),
            ("metrics", &s.metric_export_failures),
        ] {
            v.push(point(
                "tapir.export.failures",
                "Failed OTLP export calls, by signal",
                Some(("signal", signal)),
                OtelStats::get(c),
            ));
        }
        for (name, description, c) in [
            (
                "tapir.export.retries",
                "Trace batches sent again after a failed export",
                &s.trace_export_retries,
            ),
            (
                "tapir.spans.exported",
                "Spans accepted by the collector",
                &s.spans_exported,
            ),
            (
                "tapir.spans.not_sampled",
                "Exchanges whose span the sampler dropped (still in metrics)",
                &s.spans_not_sampled,
            ),
            (
                "tapir.routes.overflow",
                "Exchanges whose route became /*overflow* (too many routes in the service)",
                &s.routes_overflow,
            ),
            (
                "tapir.services.evicted",
                "Observed processes evicted from the agent's bounded resource/metrics table",
                &s.services_evicted,
            ),
            (
                "tapir.metrics.series_overflow",
                "Exchanges recorded in an overflow series (otel.metric.overflow): their service had reached the series limit",
                &s.metric_series_overflow,
            ),
            (
                "tapir.metrics.services_lost",
                "Exited or evicted processes whose last metrics were dropped unexported (too many waiting for the collector)",
                &s.metric_services_lost,
            ),
        ] {
            v.push(point(name, description, None, OtelStats::get(c)));
        }
        v
    }

    /// `delta`: report counters as deltas since the last acknowledged collection (and
    /// remember these values for `acknowledged`).
    fn resource_metrics(&self, now_ns: u64, delta: bool) -> ResourceMetrics {
        let points = self.counters();
        let (start_ns, values): (u64, Vec<u64>) = if delta {
            let mut d = lock(&self.delta);
            let values = points
                .iter()
                .enumerate()
                .map(|(i, p)| p.value.saturating_sub(d.acked.get(i).copied().unwrap_or(0)))
                .collect();
            d.sent = points.iter().map(|p| p.value).collect();
            d.sent_ns = now_ns;
            (d.acked_ns, values)
        } else {
            (self.start_ns, points.iter().map(|p| p.value).collect())
        };
        let temporality = aggregation(delta);
        let number = |attr: Option<(&str, &str)>, start: u64, v: u64| NumberDataPoint {
            attributes: attr
                .map(|(k, v)| vec![kv(k, any_value::Value::StringValue(v.to_string()))])
                .unwrap_or_default(),
            start_time_unix_nano: start,
            time_unix_nano: now_ns,
            value: Some(number_data_point::Value::AsInt(
                i64::try_from(v).unwrap_or(i64::MAX),
            )),
            ..Default::default()
        };
        let mut metrics: Vec<Metric> = Vec::new();
        for (p, v) in points.iter().zip(values) {
            let dp = number(p.attr, start_ns, v);
            // Points of one counter are adjacent.
            if let Some(Metric {
                name,
                data: Some(metric::Data::Sum(s)),
                ..
            }) = metrics.last_mut()
            {
                if name == p.name {
                    s.data_points.push(dp);
                    continue;
                }
            }
            metrics.push(Metric {
                name: p.name.to_string(),
                description: p.description.to_string(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: vec![dp],
                    aggregation_temporality: temporality,
                    is_monotonic: true,
                })),
                ..Default::default()
            });
        }
        for (name, description, v) in [
            (
                "tapir.connections.tracked",
                "TCP connections in the agent's table",
                OtelStats::get(&self.stats.connections_tracked),
            ),
            (
                "tapir.spans.queued",
                "Spans waiting in the export queue",
                (self.queue_len)(),
            ),
        ] {
            metrics.push(Metric {
                name: name.to_string(),
                description: description.to_string(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![number(None, 0, v)],
                })),
                ..Default::default()
            });
        }
        self.resource.with(metrics)
    }

    fn acknowledged(&self) {
        let mut d = lock(&self.delta);
        if !d.sent.is_empty() {
            d.acked = std::mem::take(&mut d.sent);
            d.acked_ns = d.sent_ns;
        }
    }
}

/// What one resource of the last collection was, for [`Registry::acknowledge`].
enum Sent {
    Agent,
    Live(Arc<ServiceEntry>),
    /// Exported for the last time: freed once acknowledged.
    Retired(Arc<ServiceEntry>),
}

/// Every observed process's resource and series, and the agent's own metrics.
pub struct Registry {
    entries: Mutex<LruCache<ProcessInfo, Arc<ServiceEntry>>>,
    /// Evicted, exited and idle processes waiting for their last export.
    retired: Mutex<Vec<Arc<ServiceEntry>>>,
    /// The resources of the last `collect()`, in request order.
    in_flight: Mutex<Vec<Sent>>,
    agent: AgentMetrics,
    host: String,
    metrics: bool,
    /// Retired processes wait for one last periodic collection (only when something
    /// collects periodically: the OTLP metrics loop).
    collect_retired: bool,
    temporality: Temporality,
    max_services: usize,
    max_series: usize,
    hasher: foldhash::fast::RandomState,
    /// Series in every table (for tests and sanity: returns to 0 once all are retired).
    series: AtomicUsize,
    epoch: Instant,
    stats: Arc<OtelStats>,
}

impl Registry {
    /// `max_services`: bound of the table; `metrics`: whether to keep series at all.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        max_services: usize,
        metrics: bool,
        host: String,
        agent_attrs: Option<&str>,
        capture: Arc<Stats>,
        stats: Arc<OtelStats>,
        queue_len: QueueLen,
        temporality: Temporality,
    ) -> Self {
        let start_ns = unix_now_ns();
        let agent = AgentMetrics {
            resource: OtlpResource::new(&agent_resource(&host, agent_attrs)),
            capture,
            stats: stats.clone(),
            queue_len,
            start_ns,
            delta: Mutex::new(CounterDelta {
                acked: Vec::new(),
                acked_ns: start_ns,
                sent: Vec::new(),
                sent_ns: start_ns,
            }),
        };
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_services.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            retired: Mutex::new(Vec::new()),
            in_flight: Mutex::new(Vec::new()),
            agent,
            host,
            metrics,
            collect_retired: true,
            temporality,
            max_services: max_services.max(1),
            max_series: MAX_SERIES_PER_SERVICE,
            hasher: foldhash::fast::RandomState::default(),
            series: AtomicUsize::new(0),
            epoch: Instant::now(),
            stats,
        }
    }

    /// Without a periodic collector (Prometheus only), retired processes are freed at once
    /// instead of waiting for a last collection that would never come.
    pub fn without_final_collection(mut self) -> Self {
        self.collect_retired = false;
        self
    }

    /// Series per process before the overflow series (default [`MAX_SERIES_PER_SERVICE`]).
    pub fn with_max_series(mut self, n: usize) -> Self {
        self.max_series = n.max(1);
        self
    }

    fn now_secs(&self) -> u64 {
        self.epoch.elapsed().as_secs()
    }

    /// The entry of an observed process, created on first use.
    pub fn entry(&self, p: &ProcessInfo) -> Arc<ServiceEntry> {
        let now = self.now_secs();
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.get(p) {
            e.last_used.store(now, Ordering::Relaxed);
            return e.clone();
        }
        let resource = process_resource(p, &self.host);
        let metrics = self.metrics.then(|| EntryMetrics {
            resource: OtlpResource::new(&resource),
            table: Mutex::new(SeriesTable::default()),
        });
        let entry = Arc::new(ServiceEntry {
            service_name: resource_service_name(&resource),
            resource,
            metrics,
            last_used: AtomicU64::new(now),
        });
        if let Some((k, old)) = entries.push(p.clone(), entry.clone()) {
            if k != *p {
                OtelStats::add(&self.stats.services_evicted, 1);
                self.retire(old);
            }
        }
        entry
    }

    /// A process left the table: its series wait for a last export, or are freed now.
    fn retire(&self, e: Arc<ServiceEntry>) {
        if !self.collect_retired || e.series_count() == 0 {
            self.free(&e);
            return;
        }
        let mut retired = lock(&self.retired);
        retired.push(e);
        // Bounded while the collector is unreachable: the oldest go unexported.
        if retired.len() > self.max_services {
            let old = retired.remove(0);
            OtelStats::add(&self.stats.metric_services_lost, 1);
            self.free(&old);
        }
    }

    fn free(&self, e: &ServiceEntry) {
        let n = e.close();
        self.series.fetch_sub(n, Ordering::Relaxed);
    }

    /// Retires every process with this pid (it exited): exported one last time, then freed.
    /// Returns how many entries it had.
    pub fn process_exited(&self, pid: u32) -> usize {
        let mut entries = lock(&self.entries);
        let keys: Vec<ProcessInfo> = entries
            .iter()
            .filter(|(k, _)| k.pid == pid)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &keys {
            if let Some(e) = entries.pop(k) {
                self.retire(e);
            }
        }
        keys.len()
    }

    /// Records an exchange in its process's RED metrics. Allocates only for a new series.
    pub fn record(&self, entry: &ServiceEntry, ex: &CapturedExchange, route: Option<&str>) {
        let Some(m) = &entry.metrics else {
            return;
        };
        let server = ex.is_server();
        let mut buf = IpBuf::default();
        let server_address = if server {
            None
        } else {
            Some(server_address_in(ex, &mut buf))
        };
        let view = KeyView {
            server,
            overflow: false,
            method: normalize_method(&ex.http.method).0,
            status: ex.http.status,
            version: ex.http.version.as_str(),
            route,
            server_address,
        };
        let values = [
            ex.duration_ns() as f64 / 1e9,
            ex.http.request_body_bytes as f64,
            ex.http.response_body_bytes as f64,
        ];
        let hash = self.hasher.hash_one(view);
        let mut t = lock(&m.table);
        if t.closed {
            return;
        }
        if let Some(s) = t.series.find_mut(hash, |s| s.key.view() == view) {
            s.record(&values);
            return;
        }
        let (view, hash) = if t.series.len() >= self.max_series {
            OtelStats::add(&self.stats.metric_series_overflow, 1);
            let o = KeyView::overflow(server);
            let h = self.hasher.hash_one(o);
            if let Some(s) = t.series.find_mut(h, |s| s.key.view() == o) {
                s.record(&values);
                return;
            }
            (o, h)
        } else {
            (view, hash)
        };
        let mut s = Series::new(
            hash,
            SeriesKey::from_view(view),
            unix_now_ns(),
            self.temporality.histograms_delta(),
        );
        s.record(&values);
        t.series.insert_unique(hash, s, |s| s.hash);
        self.series.fetch_add(1, Ordering::Relaxed);
    }

    /// Retires the processes idle for `IDLE_RETIRE`.
    fn retire_idle(&self) {
        let now = self.now_secs();
        let mut entries = lock(&self.entries);
        while let Some((_, e)) = entries.peek_lru() {
            if now.saturating_sub(e.last_used.load(Ordering::Relaxed)) < IDLE_RETIRE.as_secs() {
                break;
            }
            if let Some((_, e)) = entries.pop_lru() {
                self.retire(e);
            }
        }
    }

    fn live(&self) -> Vec<Arc<ServiceEntry>> {
        lock(&self.entries).iter().map(|(_, e)| e.clone()).collect()
    }

    /// The OTLP request for the metrics loop: the agent's metrics, then each process's
    /// (live ones, then retired ones for the last time). Processes idle for `IDLE_RETIRE`
    /// retire first. Report what the collector took with [`Registry::acknowledge`].
    /// `None` when metrics are off. Called by one task at a time.
    pub fn collect(&self) -> Option<ExportMetricsServiceRequest> {
        if !self.metrics {
            return None;
        }
        self.retire_idle();
        let live = self.live();
        let retired = lock(&self.retired).clone();
        let now = unix_now_ns();
        let read = if self.temporality.histograms_delta() {
            Read::Delta
        } else {
            Read::Totals
        };
        let mut out = Vec::with_capacity(live.len() + retired.len() + 1);
        let mut sent = Vec::with_capacity(out.capacity());
        out.push(
            self.agent
                .resource_metrics(now, self.temporality.counters_delta()),
        );
        sent.push(Sent::Agent);
        for e in live {
            if let Some(rm) = e.resource_metrics(read, now) {
                out.push(rm);
                sent.push(Sent::Live(e));
            }
        }
        let mut nothing_left = Vec::new();
        for e in retired {
            match e.resource_metrics(read, now) {
                Some(rm) => {
                    out.push(rm);
                    sent.push(Sent::Retired(e));
                }
                None => nothing_left.push(e),
            }
        }
        self.drop_retired(&nothing_left);
        *lock(&self.in_flight) = sent;
        Some(ExportMetricsServiceRequest {
            resource_metrics: out,
        })
    }

    /// The collector took the first `delivered` resources of the last `collect()` (in
    /// request order; `usize::MAX`: all): their pending deltas are done and retired
    /// processes among them are freed. The others are sent again by the next collection
    /// (cumulative: its newer totals; delta: merged into its deltas).
    pub fn acknowledge(&self, delivered: usize) {
        let sent = std::mem::take(&mut *lock(&self.in_flight));
        let mut done = Vec::new();
        for s in sent.into_iter().take(delivered) {
            match s {
                Sent::Agent => self.agent.acknowledged(),
                Sent::Live(e) => e.acknowledged(),
                Sent::Retired(e) => done.push(e),
            }
        }
        self.drop_retired(&done);
    }

    fn drop_retired(&self, done: &[Arc<ServiceEntry>]) {
        if done.is_empty() {
            return;
        }
        lock(&self.retired).retain(|r| !done.iter().any(|d| Arc::ptr_eq(d, r)));
        for e in done {
            self.free(e);
        }
    }

    /// The cumulative view of the live processes and the agent, changing nothing (for a
    /// Prometheus scrape). Without a periodic collector it also retires idle processes.
    pub fn peek(&self) -> ExportMetricsServiceRequest {
        if !self.metrics {
            return ExportMetricsServiceRequest::default();
        }
        if !self.collect_retired {
            self.retire_idle();
        }
        let live = self.live();
        let now = unix_now_ns();
        let mut resource_metrics = Vec::with_capacity(live.len() + 1);
        resource_metrics.push(self.agent.resource_metrics(now, false));
        resource_metrics.extend(
            live.iter()
                .filter_map(|e| e.resource_metrics(Read::Totals, now)),
        );
        ExportMetricsServiceRequest { resource_metrics }
    }

    /// Frees every process's series (after the final collection).
    pub fn shutdown(&self) {
        let live: Vec<Arc<ServiceEntry>> = {
            let mut entries = lock(&self.entries);
            let v = entries.iter().map(|(_, e)| e.clone()).collect();
            entries.clear();
            v
        };
        let retired = std::mem::take(&mut *lock(&self.retired));
        lock(&self.in_flight).clear();
        for e in live.iter().chain(&retired) {
            self.free(e);
        }
    }

    /// Series held in every table, live and retired.
    pub fn series_count(&self) -> usize {
        self.series.load(Ordering::Relaxed)
    }

    /// (live, retired) processes in the table.
    pub fn services(&self) -> (usize, usize) {
        (lock(&self.entries).len(), lock(&self.retired).len())
    }
}

/// `req` encoded as requests of at most about `max_bytes` each (a process's metrics are
/// never split), each with the number of resources it carries (for `acknowledge`).
pub fn encode_requests(
    req: ExportMetricsServiceRequest,
    max_bytes: usize,
) -> Vec<(usize, Vec<u8>)> {
    let mut out = Vec::new();
    let mut chunk: Vec<ResourceMetrics> = Vec::new();
    let mut size = 0;
    let mut flush = |chunk: &mut Vec<ResourceMetrics>| {
        let n = chunk.len();
        let body = ExportMetricsServiceRequest {
            resource_metrics: std::mem::take(chunk),
        }
        .encode_to_vec();
        out.push((n, body));
    };
    for rm in req.resource_metrics {
        // The field's tag and length prefix: at most 1 + 10 bytes.
        let n = rm.encoded_len() + 11;
        if !chunk.is_empty() && size + n > max_bytes {
            flush(&mut chunk);
            size = 0;
        }
        size += n;
        chunk.push(rm);
    }
    if !chunk.is_empty() {
        flush(&mut chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{http::ExchangeRole, otel::span::tests::exchange};

    use crate::test_alloc::allocations;

    fn registry_with(max: usize, t: Temporality) -> Registry {
        Registry::new(
            max,
            true,
            "h".into(),
            None,
            Arc::new(Stats::default()),
            Arc::new(OtelStats::default()),
            Arc::new(|| 0),
            t,
        )
    }

    fn registry(max: usize) -> Registry {
        registry_with(max, Temporality::Cumulative)
    }

    fn with_pid(mut ex: CapturedExchange, pid: u32) -> CapturedExchange {
        Arc::make_mut(&mut ex.process).pid = pid;
        ex
    }

    fn metrics<'a>(
        req: &'a ExportMetricsServiceRequest,
        name: &'a str,
    ) -> impl Iterator<Item = (&'a ResourceMetrics, &'a Metric)> + 'a {
        req.resource_metrics.iter().flat_map(move |rm| {
            rm.scope_metrics
                .iter()
                .flat_map(|s| s.metrics.iter())
                .filter(move |m| m.name == name)
                .map(move |m| (rm, m))
        })
    }

    fn hist_points<'a>(
        req: &'a ExportMetricsServiceRequest,
        name: &'a str,
    ) -> Vec<&'a HistogramDataPoint> {
        metrics(req, name)
            .flat_map(|(_, m)| match &m.data {
                Some(metric::Data::Histogram(h)) => h.data_points.iter().collect(),
                _ => Vec::new(),
            })
            .collect()
    }

    fn histogram_count(req: &ExportMetricsServiceRequest, name: &str) -> u64 {
        hist_points(req, name).iter().map(|p| p.count).sum()
    }

    fn attr<'a>(a: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        a.iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    fn resource_attr(rm: &ResourceMetrics, key: &str) -> Option<any_value::Value> {
        attr(&rm.resource.as_ref()?.attributes, key).cloned()
    }

    fn string(s: &str) -> Option<any_value::Value> {
        Some(any_value::Value::StringValue(s.into()))
    }

    fn counter_value(
        req: &ExportMetricsServiceRequest,
        name: &str,
        a: Option<(&str, &str)>,
    ) -> i64 {
        metrics(req, name)
            .flat_map(|(_, m)| match &m.data {
                Some(metric::Data::Sum(s)) => s.data_points.clone(),
                _ => Vec::new(),
            })
            .find(|p| match a {
                None => p.attributes.is_empty(),
                Some((k, v)) => attr(&p.attributes, k) == string(v).as_ref(),
            })
            .and_then(|p| match p.value {
                Some(number_data_point::Value::AsInt(i)) => Some(i),
                _ => None,
            })
            .unwrap_or(-1)
    }

    #[test]
    fn bucket_bounds_are_upper_inclusive() {
        let mut h = Hist::EMPTY;
        for v in [0.005, 0.0050001, 0.0, 10.0, 10.5, 0.1] {
            h.record(&DURATION_BUCKETS, v);
        }
        // (-inf, 0.005] holds 0 and 0.005; (0.005, 0.01] the next; 0.1 in (0.075, 0.1];
        // 10.0 in (7.5, 10]; 10.5 above every bound.
        assert_eq!(h.counts[0], 2);
        assert_eq!(h.counts[1], 1);
        assert_eq!(h.counts[5], 1);
        assert_eq!(h.counts[13], 1);
        assert_eq!(h.counts[14], 1);
        assert_eq!(h.count, 6);
        assert_eq!(h.counts.iter().sum::<u64>(), h.count);
        assert_eq!((h.min, h.max), (0.0, 10.5));
        assert!((h.sum - 20.6100001).abs() < 1e-9, "{}", h.sum);
        let mut s = Hist::EMPTY;
        s.record(&SIZE_BUCKETS, 0.0);
        s.record(&SIZE_BUCKETS, 32.0);
        s.record(&SIZE_BUCKETS, 33.0);
        assert_eq!(&s.counts[..3], &[1, 1, 1]);
        let mut m = h;
        m.merge(&s);
        assert_eq!(m.count, 9);
        assert_eq!(m.counts[0], 3);
        assert_eq!(m.max, 33.0);
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
        let req = r.collect().unwrap();
        assert_eq!(histogram_count(&req, "http.server.request.duration"), 2);
        assert_eq!(histogram_count(&req, "http.server.request.body.size"), 2);
        assert_eq!(histogram_count(&req, "http.server.response.body.size"), 2);
        assert_eq!(histogram_count(&req, "http.client.request.duration"), 1);
        assert_eq!(histogram_count(&req, "http.client.response.body.size"), 1);
        let server = hist_points(&req, "http.server.request.duration");
        assert_eq!(server.len(), 1);
        let keys: Vec<&str> = server[0]
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
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
        let a = &server[0].attributes;
        assert_eq!(attr(a, "http.request.method"), string("GET").as_ref());
        assert_eq!(
            attr(a, "http.response.status_code"),
            Some(&any_value::Value::IntValue(500))
        );
        assert_eq!(attr(a, "http.route"), string("/users/*").as_ref());
        assert_eq!(attr(a, "url.scheme"), string("http").as_ref());
        assert_eq!(attr(a, "network.protocol.version"), string("1.1").as_ref());
        assert_eq!(attr(a, "error.type"), string("500").as_ref());
        let client = hist_points(&req, "http.client.request.duration");
        let a = &client[0].attributes;
        assert_eq!(
            attr(a, "server.address"),
            string("api.example.com").as_ref()
        );
        assert_eq!(
            attr(a, "server.port"),
            Some(&any_value::Value::IntValue(8080))
        );
        assert_eq!(attr(a, "error.type"), string("404").as_ref());
        // Cumulative: collecting again reports the same counts.
        r.acknowledge(usize::MAX);
        assert_eq!(
            histogram_count(&r.collect().unwrap(), "http.server.request.duration"),
            2
        );
    }

    #[test]
    fn unknown_methods_and_paths_stay_bounded() {
        let r = registry(4);
        let e = r.entry(&exchange(ExchangeRole::Server, "GET", "/", 200).process);
        for m in ["BREW", "PURGE", "get"] {
            let ex = exchange(ExchangeRole::Server, m, "/a", 200);
            r.record(&e, &ex, None);
        }
        let req = r.collect().unwrap();
        let p = hist_points(&req, "http.server.request.duration");
        assert_eq!(p.len(), 1, "every unknown method is _OTHER");
        assert_eq!(
            attr(&p[0].attributes, "http.request.method"),
            string("_OTHER").as_ref()
        );
        assert_eq!(p[0].count, 3);
        assert!(attr(&p[0].attributes, "http.route").is_none());
        assert!(attr(&p[0].attributes, "url.path").is_none());
    }

    #[test]
    fn the_proto_output_is_complete() {
        let r = registry(4);
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let e = r.entry(&ex.process);
        let before = unix_now_ns();
        r.record(&e, &ex, Some("/"));
        let req = r.collect().unwrap();
        let after = unix_now_ns();
        assert_eq!(req.resource_metrics.len(), 2, "the agent and one process");
        let rm = &req.resource_metrics[1];
        assert_eq!(resource_attr(rm, "service.name"), string("python3"));
        assert_eq!(resource_attr(rm, "service.instance.id"), string("h:77"));
        assert_eq!(
            resource_attr(rm, "process.pid"),
            Some(any_value::Value::IntValue(77))
        );
        assert_eq!(resource_attr(rm, "telemetry.distro.name"), string("tapir"));
        assert_eq!(resource_attr(rm, "telemetry.sdk.language"), string("rust"));
        let sm = &rm.scope_metrics[0];
        let scope = sm.scope.as_ref().unwrap();
        assert_eq!(scope.name, "tapir");
        assert_eq!(scope.version, env!("CARGO_PKG_VERSION"));
        let names: Vec<(&str, &str, &str)> = sm
            .metrics
            .iter()
            .map(|m| (m.name.as_str(), m.unit.as_str(), m.description.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                (
                    "http.server.request.duration",
                    "s",
                    "Duration of HTTP server requests."
                ),
                (
                    "http.server.request.body.size",
                    "By",
                    "Size of HTTP server request bodies."
                ),
                (
                    "http.server.response.body.size",
                    "By",
                    "Size of HTTP server response bodies."
                ),
            ]
        );
        for m in &sm.metrics {
            let Some(metric::Data::Histogram(h)) = &m.data else {
                panic!("{} is not a histogram", m.name);
            };
            assert_eq!(
                h.aggregation_temporality,
                AggregationTemporality::Cumulative as i32
            );
            let p = &h.data_points[0];
            let bounds = if m.unit == "s" {
                &DURATION_BUCKETS
            } else {
                &SIZE_BUCKETS
            };
            assert_eq!(p.explicit_bounds, bounds.to_vec());
            assert_eq!(p.bucket_counts.len(), bounds.len() + 1);
            assert_eq!(p.bucket_counts.iter().sum::<u64>(), p.count);
            assert!(before <= p.start_time_unix_nano && p.start_time_unix_nano <= p.time_unix_nano);
            assert!(p.time_unix_nano <= after);
        }
        let dur = hist_points(&req, "http.server.request.duration")[0];
        assert_eq!(dur.count, 1);
        assert_eq!(dur.sum, Some(0.25));
        assert_eq!((dur.min, dur.max), (Some(0.25), Some(0.25)));
        assert_eq!(dur.bucket_counts[6], 1, "0.25 s is in (0.1, 0.25]");
        let req_size = hist_points(&req, "http.server.request.body.size")[0];
        assert_eq!(req_size.sum, Some(10.0));
        assert_eq!(req_size.bucket_counts[1], 1, "10 bytes is in (0, 32]");
        // The start time stays; the time moves.
        r.acknowledge(usize::MAX);
        let again = r.collect().unwrap();
        let dur2 = hist_points(&again, "http.server.request.duration")[0];
        assert_eq!(dur2.start_time_unix_nano, dur.start_time_unix_nano);
        assert!(dur2.time_unix_nano >= dur.time_unix_nano);
        // The encoding round-trips.
        let bytes = again.encode_to_vec();
        assert_eq!(
            ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap(),
            again
        );
    }

    #[test]
    fn delta_reports_each_exchange_once_and_merges_unacknowledged_exports() {
        let r = registry_with(4, Temporality::Delta);
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, Some("/"));
        r.record(&e, &ex, Some("/"));
        let first = r.collect().unwrap();
        let p = hist_points(&first, "http.server.request.duration")[0].clone();
        assert_eq!(p.count, 2);
        assert_eq!(
            metrics(&first, "http.server.request.duration")
                .map(|(_, m)| match &m.data {
                    Some(metric::Data::Histogram(h)) => h.aggregation_temporality,
                    _ => 0,
                })
                .collect::<Vec<_>>(),
            [AggregationTemporality::Delta as i32]
        );
        r.acknowledge(usize::MAX);
        // Nothing new: no point at all.
        assert!(hist_points(&r.collect().unwrap(), "http.server.request.duration").is_empty());
        r.acknowledge(usize::MAX);
        r.record(&e, &ex, Some("/"));
        let second = r.collect().unwrap();
        let p2 = hist_points(&second, "http.server.request.duration")[0].clone();
        assert_eq!(p2.count, 1);
        assert!(
            p2.start_time_unix_nano >= p.time_unix_nano,
            "windows do not overlap"
        );
        // That export failed (no acknowledge): the next one carries it, merged.
        r.acknowledge(0);
        r.record(&e, &ex, Some("/"));
        let third = r.collect().unwrap();
        let p3 = hist_points(&third, "http.server.request.duration")[0].clone();
        assert_eq!(p3.count, 2);
        assert_eq!(p3.bucket_counts.iter().sum::<u64>(), 2);
        assert_eq!(p3.start_time_unix_nano, p2.start_time_unix_nano);
        r.acknowledge(usize::MAX);
        assert!(hist_points(&r.collect().unwrap(), "http.server.request.duration").is_empty());
        // Prometheus still sees the cumulative totals.
        assert_eq!(
            histogram_count(&r.peek(), "http.server.request.duration"),
            4
        );
    }

    #[test]
    fn agent_counters_follow_the_temporality() {
        let capture = Arc::new(Stats::default());
        let make = |t| {
            Registry::new(
                2,
                true,
                "h".into(),
                None,
                capture.clone(),
                Arc::new(OtelStats::default()),
                Arc::new(|| 0),
                t,
            )
        };
        let (delta, low) = (make(Temporality::Delta), make(Temporality::LowMemory));
        Stats::inc(&capture.exchanges);
        Stats::inc(&capture.exchanges);
        for r in [&delta, &low] {
            assert_eq!(
                counter_value(&r.collect().unwrap(), "tapir.exchanges", None),
                2
            );
            r.acknowledge(usize::MAX);
        }
        Stats::inc(&capture.exchanges);
        assert_eq!(
            counter_value(&delta.collect().unwrap(), "tapir.exchanges", None),
            1
        );
        assert_eq!(
            counter_value(&low.collect().unwrap(), "tapir.exchanges", None),
            3
        );
        // A failed export: the next delta covers both intervals.
        delta.acknowledge(0);
        Stats::inc(&capture.exchanges);
        let req = delta.collect().unwrap();
        assert_eq!(counter_value(&req, "tapir.exchanges", None), 2);
        let temporality: Vec<i32> = metrics(&req, "tapir.exchanges")
            .map(|(_, m)| match &m.data {
                Some(metric::Data::Sum(s)) => s.aggregation_temporality,
                _ => 0,
            })
            .collect();
        assert_eq!(temporality, [AggregationTemporality::Delta as i32]);
    }

    #[test]
    fn series_are_capped_with_an_overflow_series() {
        let r = registry(4).with_max_series(3);
        let e = r.entry(&exchange(ExchangeRole::Server, "GET", "/", 200).process);
        for i in 0..10 {
            let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
            r.record(&e, &ex, Some(&format!("/r{i}")));
        }
        assert_eq!(OtelStats::get(&r.stats.metric_series_overflow), 7);
        assert_eq!(r.series_count(), 4, "3 series and the overflow one");
        let req = r.collect().unwrap();
        let points = hist_points(&req, "http.server.request.duration");
        assert_eq!(points.len(), 4);
        let over: Vec<_> = points
            .iter()
            .filter(|p| {
                attr(&p.attributes, OVERFLOW_ATTRIBUTE) == Some(&any_value::Value::BoolValue(true))
            })
            .collect();
        assert_eq!(over.len(), 1);
        assert_eq!(over[0].count, 7);
        assert_eq!(over[0].attributes.len(), 1);
        assert_eq!(histogram_count(&req, "http.server.request.duration"), 10);
        assert_eq!(
            counter_value(&req, "tapir.metrics.series_overflow", None),
            7
        );
    }

    #[test]
    fn the_table_is_bounded_and_evicted_metrics_are_collected_once_more() {
        let r = registry(2);
        for pid in 1..=3 {
            let ex = with_pid(exchange(ExchangeRole::Server, "GET", "/", 200), pid);
            let e = r.entry(&ex.process);
            r.record(&e, &ex, Some("/"));
        }
        assert_eq!(OtelStats::get(&r.stats.services_evicted), 1);
        // 3 processes: two live, one retired (collected a last time).
        assert_eq!(
            histogram_count(&r.collect().unwrap(), "http.server.request.duration"),
            3
        );
        r.acknowledge(usize::MAX);
        assert_eq!(
            histogram_count(&r.collect().unwrap(), "http.server.request.duration"),
            2
        );
        assert_eq!(r.series_count(), 2);
    }

    #[test]
    fn a_failed_export_keeps_retired_processes_for_the_next() {
        let r = registry(2);
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, Some("/"));
        assert_eq!(r.process_exited(77), 1);
        assert_eq!(r.services(), (0, 1));
        let n = |req: &ExportMetricsServiceRequest| {
            histogram_count(req, "http.server.request.duration")
        };
        assert_eq!(n(&r.collect().unwrap()), 1);
        r.acknowledge(1); // only the agent's resource got through
        assert_eq!(n(&r.collect().unwrap()), 1);
        r.acknowledge(usize::MAX);
        assert_eq!(n(&r.collect().unwrap()), 0);
        assert_eq!(r.services(), (0, 0));
        assert_eq!(r.series_count(), 0);
    }

    #[test]
    fn retired_processes_waiting_for_the_collector_are_bounded() {
        let r = registry(2);
        for pid in 1..=5 {
            let ex = with_pid(exchange(ExchangeRole::Server, "GET", "/", 200), pid);
            let e = r.entry(&ex.process);
            r.record(&e, &ex, Some("/"));
            r.process_exited(pid);
        }
        assert_eq!(r.services(), (0, 2));
        assert_eq!(OtelStats::get(&r.stats.metric_services_lost), 3);
        assert_eq!(r.series_count(), 2);
    }

    #[test]
    fn retiring_frees_everything() {
        for t in [Temporality::Cumulative, Temporality::Delta] {
            let mut r = registry_with(16, t);
            let mut held = Vec::new();
            for pid in 1..=1000u32 {
                let server = with_pid(exchange(ExchangeRole::Server, "GET", "/", 200), pid);
                let e = r.entry(&server.process);
                r.record(&e, &server, Some("/"));
                let client = with_pid(exchange(ExchangeRole::Client, "POST", "/", 201), pid);
                r.record(&e, &client, None);
                // Queued spans keep entries alive: their series must go anyway.
                held.push(e);
                if pid % 3 == 0 {
                    r.process_exited(pid);
                }
                if pid % 10 == 0 {
                    assert!(r.collect().is_some());
                    r.acknowledge(usize::MAX);
                }
            }
            assert!(r.series_count() > 0);
            // The rest go idle.
            let aged = Instant::now().checked_sub(IDLE_RETIRE + Duration::from_secs(1));
            r.epoch = aged.unwrap_or(r.epoch);
            let req = r.collect().unwrap();
            if t == Temporality::Cumulative {
                assert!(req.resource_metrics.len() > 1, "their last export");
            }
            r.acknowledge(usize::MAX);
            if aged.is_some() {
                assert_eq!(r.services().0, 0, "idle processes retire");
            } else {
                // No idle clock on this host (uptime < IDLE_RETIRE): exit them instead.
                for pid in 1..=1000 {
                    r.process_exited(pid);
                }
                r.collect();
                r.acknowledge(usize::MAX);
            }
            assert_eq!(r.services(), (0, 0), "{t:?}");
            assert_eq!(r.series_count(), 0, "{t:?}");
            assert!(held.iter().all(|e| e.series_count() == 0));
            assert_eq!(OtelStats::get(&r.stats.metric_services_lost), 0);
            assert_eq!(
                r.collect().unwrap().resource_metrics.len(),
                1,
                "only the agent"
            );
        }
    }

    #[test]
    fn records_into_an_existing_series_do_not_allocate() {
        for t in [Temporality::Cumulative, Temporality::Delta] {
            let r = registry_with(4, t);
            let server = exchange(ExchangeRole::Server, "GET", "/users/1", 200);
            let mut client = exchange(ExchangeRole::Client, "GET", "/x", 200);
            let e = r.entry(&server.process);
            r.record(&e, &server, Some("/users/*"));
            r.record(&e, &client, None);
            client.http.host = None; // the peer address, formatted on the stack
            r.record(&e, &client, None);
            let before = allocations();
            for _ in 0..100 {
                r.record(&e, &server, Some("/users/*"));
                r.record(&e, &client, None);
            }
            assert_eq!(allocations() - before, 0, "{t:?}");
            let before = allocations();
            for _ in 0..100 {
                let _ = r.entry(&server.process);
            }
            assert_eq!(allocations() - before, 0, "entry() of a known process");
        }
    }

    #[test]
    fn metric_server_address_matches_the_span() {
        let mut ex = exchange(ExchangeRole::Client, "GET", "/", 200);
        for host in [
            Some("api.example.com:8080"),
            Some("[::1]:9"),
            Some("bad host"),
            None,
        ] {
            ex.http.host = host.map(String::from);
            let mut buf = IpBuf::default();
            let (a, p) = server_address_in(&ex, &mut buf);
            assert_eq!((a.to_string(), p), crate::otel::span::server_address(&ex));
        }
    }

    #[test]
    fn agent_metrics_are_under_the_tapir_resource() {
        let capture = Arc::new(Stats::default());
        Stats::inc(&capture.exchanges);
        let stats = Arc::new(OtelStats::default());
        stats.dropped(SpanDrop::QueueFull, 3);
        OtelStats::add(&stats.connections_tracked, 5);
        let r = Registry::new(
            2,
            true,
            "h".into(),
            None,
            capture,
            stats,
            Arc::new(|| 7),
            Temporality::Cumulative,
        );
        let req = r.collect().unwrap();
        let agent = &req.resource_metrics[0];
        assert_eq!(resource_attr(agent, "service.name"), string("tapir"));
        let names: Vec<&str> = agent.scope_metrics[0]
            .metrics
            .iter()
            .map(|m| m.name.as_str())
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
            "tapir.metrics.series_overflow",
            "tapir.metrics.services_lost",
        ] {
            assert!(names.contains(&want), "{want} missing: {names:?}");
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "each metric once");
        assert_eq!(counter_value(&req, "tapir.exchanges", None), 1);
        assert_eq!(
            counter_value(&req, "tapir.spans.dropped", Some(("reason", "queue_full"))),
            3
        );
        assert_eq!(
            counter_value(&req, "tapir.export.failures", Some(("signal", "metrics"))),
            0
        );
        let sum = metrics(&req, "tapir.exchanges").next().unwrap().1;
        match &sum.data {
            Some(metric::Data::Sum(s)) => {
                assert!(s.is_monotonic);
                assert_eq!(
                    s.aggregation_temporality,
                    AggregationTemporality::Cumulative as i32
                );
            }
            other => panic!("{other:?}"),
        }
        let gauge = |name| match &metrics(&req, name).next().unwrap().1.data {
            Some(metric::Data::Gauge(g)) => g.data_points[0].value,
            _ => None,
        };
        assert_eq!(
            gauge("tapir.spans.queued"),
            Some(number_data_point::Value::AsInt(7))
        );
        assert_eq!(
            gauge("tapir.connections.tracked"),
            Some(number_data_point::Value::AsInt(5))
        );
        // Nothing under the agent's resource is an HTTP metric.
        assert!(!names.iter().any(|n| n.starts_with("http.")));
    }

    #[test]
    fn no_metrics_no_series() {
        let r = Registry::new(
            2,
            false,
            "h".into(),
            None,
            Arc::new(Stats::default()),
            Arc::new(OtelStats::default()),
            Arc::new(|| 0),
            Temporality::Cumulative,
        );
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, None);
        assert_eq!(e.service_name, "python3");
        assert!(r.collect().is_none());
        assert_eq!(r.series_count(), 0);
    }

    #[test]
    fn large_requests_are_split_between_resources() {
        let r = registry(64);
        for pid in 1..=20 {
            let ex = with_pid(exchange(ExchangeRole::Server, "GET", "/", 200), pid);
            let e = r.entry(&ex.process);
            r.record(&e, &ex, Some("/"));
        }
        let req = r.collect().unwrap();
        let total = req.resource_metrics.len();
        let one = req.encoded_len();
        let whole = encode_requests(req.clone(), usize::MAX);
        assert_eq!(whole.len(), 1);
        assert_eq!(whole[0], (total, req.encode_to_vec()));
        let parts = encode_requests(req, one / 4);
        assert!(parts.len() >= 4, "{}", parts.len());
        assert_eq!(parts.iter().map(|(n, _)| n).sum::<usize>(), total);
        let mut rms = 0;
        for (n, body) in &parts {
            let d = ExportMetricsServiceRequest::decode(body.as_slice()).unwrap();
            assert_eq!(d.resource_metrics.len(), *n);
            rms += n;
        }
        assert_eq!(rms, total);
    }

    #[test]
    fn temporality_names() {
        assert_eq!("Delta".parse(), Ok(Temporality::Delta));
        assert_eq!("lowmemory".parse(), Ok(Temporality::LowMemory));
        assert_eq!(" cumulative ".parse(), Ok(Temporality::Cumulative));
        assert!("sometimes".parse::<Temporality>().is_err());
    }

    /// `cargo test --release -p tapir --lib otel::metrics -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn bench_record() {
        let n = 2_000_000u32;
        for t in [Temporality::Cumulative, Temporality::Delta] {
            let r = registry_with(256, t);
            let server = exchange(ExchangeRole::Server, "GET", "/users/42", 200);
            let client = exchange(ExchangeRole::Client, "POST", "/x", 201);
            let e = r.entry(&server.process);
            // 50 series in the table, like a small service.
            for i in 0..50 {
                r.record(&e, &server, Some(&format!("/r{i}")));
            }
            r.record(&e, &server, Some("/users/*"));
            r.record(&e, &client, None);
            for (what, ex, route) in [
                ("server", &server, Some("/users/*")),
                ("client", &client, None),
            ] {
                let t0 = Instant::now();
                for _ in 0..n {
                    r.record(&e, std::hint::black_box(ex), std::hint::black_box(route));
                }
                let rec = t0.elapsed().as_nanos() as f64 / f64::from(n);
                let t0 = Instant::now();
                for _ in 0..n {
                    let e = r.entry(std::hint::black_box(&ex.process));
                    r.record(&e, std::hint::black_box(ex), std::hint::black_box(route));
                }
                let both = t0.elapsed().as_nanos() as f64 / f64::from(n);
                println!(
                    "{t:?} {what}: record() {rec:.1} ns, entry() + record() {both:.1} ns per exchange"
                );
            }
        }
    }
}
