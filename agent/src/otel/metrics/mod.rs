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
//!
//! Along the data flow: `series` (a series' key and histograms), `service` (a process's
//! table of series), the [`Registry`] here (records exchanges, collects), `agent` (the
//! `tapir.*` metrics) and `encode` (the OTLP messages and requests).
mod agent;
mod encode;
mod series;
mod service;
#[cfg(test)]
mod testutil;

use std::{
    hash::BuildHasher,
    num::NonZeroUsize,
    str::FromStr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lru::LruCache;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;

pub use agent::{AgentSources, QueueLen};
pub use encode::{encode_requests, OVERFLOW_ATTRIBUTE};
pub use series::{DURATION_BUCKETS, SIZE_BUCKETS};
pub use service::ServiceEntry;

use super::{
    counters::OtelStats,
    resource::{process_resource, Node},
    span::normalize_method,
};
use crate::{exchange::CapturedExchange, process::ProcessInfo};
use agent::AgentMetrics;
use series::{KeyView, Read, Series, SeriesKey};

/// A process with no exchange for this long is exported a last time and dropped
/// (short-lived clients would otherwise fill the table).
pub const IDLE_RETIRE: Duration = Duration::from_secs(300);
/// Series per observed process before new attribute sets go to the overflow series (the
/// SDK's default cardinality limit).
pub const MAX_SERIES_PER_SERVICE: usize = 2000;

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

fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The last few processes the capture thread recorded for (see
/// [`Registry::entry_cached`]): client and server exchanges of a host alternate between
/// processes, so one slot would not do.
#[derive(Default)]
pub struct EntryCache {
    slots: [Option<CachedEntry>; 4],
    next: usize,
    /// Lookups answered from the cache.
    #[cfg(test)]
    hits: u64,
}

struct CachedEntry {
    /// Held so that the pointer compared is never reused for another process.
    process: Arc<ProcessInfo>,
    entry: Arc<ServiceEntry>,
    /// The registry's second when the table was last asked.
    secs: u64,
}

impl EntryCache {
    fn put(&mut self, p: &Arc<ProcessInfo>, entry: &Arc<ServiceEntry>, secs: u64) {
        let c = CachedEntry {
            process: p.clone(),
            entry: entry.clone(),
            secs,
        };
        match self
            .slots
            .iter_mut()
            .find(|s| s.as_ref().is_some_and(|s| Arc::ptr_eq(&s.process, p)))
        {
            Some(slot) => *slot = Some(c),
            None => {
                self.slots[self.next] = Some(c);
                self.next = (self.next + 1) % self.slots.len();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
    node: Node,
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
    /// The registry's clock starts here ([`crate::clock::coarse_monotonic_secs`]).
    epoch_secs: u64,
    stats: Arc<OtelStats>,
}

/// How a [`Registry`] is bounded and what it reports.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// Most processes (services) kept at once.
    pub max_services: usize,
    /// Keep RED series at all (off: only the agent's own metrics).
    pub metrics: bool,
    /// `host.name` and the node's attributes of every process's resource.
    pub node: Node,
    /// `OTEL_RESOURCE_ATTRIBUTES` for the agent's own resource.
    pub agent_attrs: Option<String>,
    pub temporality: Temporality,
}

impl RegistryConfig {
    #[cfg(test)]
    pub(crate) fn for_tests(max_services: usize, temporality: Temporality) -> Self {
        Self {
            max_services,
            metrics: true,
            node: Node::named("h"),
            agent_attrs: None,
            temporality,
        }
    }
}

impl Registry {
    pub fn new(cfg: RegistryConfig, sources: AgentSources) -> Self {
        let RegistryConfig {
            max_services,
            metrics,
            node,
            agent_attrs,
            temporality,
        } = cfg;
        let stats = sources.stats.clone();
        let agent = AgentMetrics::new(&node.host_name, agent_attrs.as_deref(), sources);
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(max_services.max(1)).unwrap_or(NonZeroUsize::MIN),
            )),
            retired: Mutex::new(Vec::new()),
            in_flight: Mutex::new(Vec::new()),
            agent,
            node,
            metrics,
            collect_retired: true,
            temporality,
            max_services: max_services.max(1),
            max_series: MAX_SERIES_PER_SERVICE,
            hasher: foldhash::fast::RandomState::default(),
            series: AtomicUsize::new(0),
            epoch_secs: crate::clock::coarse_monotonic_secs(),
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

    /// Read for every exchange ([`Registry::entry_cached`]): the coarse clock, which costs
    /// no TSC read (`Instant::now()` was ~2 % of the capture thread).
    fn now_secs(&self) -> u64 {
        crate::clock::coarse_monotonic_secs().saturating_sub(self.epoch_secs)
    }

    /// The entry of an observed process, created on first use.
    pub fn entry(&self, p: &ProcessInfo) -> Arc<ServiceEntry> {
        let now = self.now_secs();
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.get(p) {
            e.touch(now);
            return e.clone();
        }
        let entry = Arc::new(ServiceEntry::new(
            process_resource(p, &self.node),
            self.metrics,
            now,
        ));
        if let Some((k, old)) = entries.push(p.clone(), entry.clone()) {
            if k != *p {
                OtelStats::add(&self.stats.services_evicted, 1);
                self.retire(old);
            }
        }
        entry
    }

    /// [`Registry::entry`] through the caller's [`EntryCache`]: a process seen in the
    /// same second is found by its `Arc` instead of hashing it under the table's lock.
    /// Asking the table once a second per process keeps its LRU order and idle clock.
    pub fn entry_cached(&self, p: &Arc<ProcessInfo>, cache: &mut EntryCache) -> Arc<ServiceEntry> {
        self.entry_cached_at(p, cache, self.now_secs())
    }

    /// [`Registry::entry_cached`] in second `now` of the registry's clock.
    fn entry_cached_at(
        &self,
        p: &Arc<ProcessInfo>,
        cache: &mut EntryCache,
        now: u64,
    ) -> Arc<ServiceEntry> {
        if let Some(c) = cache
            .slots
            .iter()
            .flatten()
            .find(|c| Arc::ptr_eq(&c.process, p))
        {
            if c.secs == now && !c.entry.has_left() {
                #[cfg(test)]
                {
                    cache.hits += 1;
                }
                return c.entry.clone();
            }
        }
        let entry = self.entry(p);
        cache.put(p, &entry, now);
        entry
    }

    /// A process left the table: its series wait for a last export, or are freed now.
    fn retire(&self, e: Arc<ServiceEntry>) {
        e.mark_left();
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
        e.mark_left();
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

    /// [`Registry::record_with`], finding a CLIENT's server.address itself (for the tests;
    /// the agent has it from the connection's attributes).
    #[cfg(test)]
    pub fn record(&self, entry: &ServiceEntry, ex: &CapturedExchange, route: Option<&str>) {
        let mut buf = super::text::StackText::empty();
        let server_address =
            (!ex.is_server()).then(|| super::span::server_address_in(ex, &mut buf));
        self.record_with(entry, ex, route, server_address);
    }

    /// Records an exchange in its process's RED metrics, given a CLIENT's server.address
    /// and server.port (`server_address_in`'s; `None` for a SERVER). Allocates only for a
    /// new series.
    pub fn record_with(
        &self,
        entry: &ServiceEntry,
        ex: &CapturedExchange,
        route: Option<&str>,
        server_address: Option<(&str, u16)>,
    ) {
        let Some(table) = entry.table() else {
            return;
        };
        let server = ex.is_server();
        let grpc = ex.http.grpc;
        let redis = ex.http.redis;
        // A gRPC call's series is its method's, a Redis call's its command's.
        let route = match (grpc, redis) {
            (Some(call), _) => Some(super::rpc::method(&ex.http, call).0),
            (None, Some(_)) => Some(ex.http.method.as_str()),
            (None, None) => route,
        };
        let http = redis.is_none();
        let view = KeyView {
            server,
            overflow: false,
            method: if http {
                normalize_method(&ex.http.method).0
            } else {
                ""
            },
            status: ex.http.status,
            failure: ex.http.failure,
            version: if http { ex.http.version.as_str() } else { "" },
            scheme: if http { ex.scheme() } else { "" },
            route,
            server_address,
            grpc,
            redis,
        };
        let values = [
            ex.duration_ns() as f64 / 1e9,
            ex.http.request_body_bytes as f64,
            ex.http.response_body_bytes as f64,
        ];
        let hash = self.hasher.hash_one(view);
        let mut t = lock(table);
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
            if now.saturating_sub(e.last_used()) < IDLE_RETIRE.as_secs() {
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

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::common::v1::any_value;

    use std::time::Instant;

    use super::{testutil::*, *};
    use crate::{
        http::ExchangeRole,
        otel::{
            span::{server_address_in, tests::exchange},
            text::StackText,
        },
        test_alloc::allocations,
    };

    #[test]
    fn cached_entries_are_the_tables_until_the_process_leaves_it() {
        let r = registry(4);
        let mut cache = EntryCache::default();
        let a = with_pid(exchange(ExchangeRole::Server, "GET", "/", 200), 1).process;
        let b = with_pid(exchange(ExchangeRole::Server, "GET", "/", 200), 2).process;
        let now = 5;
        let ea = r.entry_cached_at(&a, &mut cache, now);
        let eb = r.entry_cached_at(&b, &mut cache, now);
        assert!(!Arc::ptr_eq(&ea, &eb));
        assert_eq!(cache.hits, 0);
        // Alternating processes both stay cached within the second, and agree with the table.
        for _ in 0..3 {
            assert!(Arc::ptr_eq(&r.entry_cached_at(&a, &mut cache, now), &ea));
            assert!(Arc::ptr_eq(&r.entry_cached_at(&b, &mut cache, now), &eb));
        }
        assert_eq!(cache.hits, 6);
        assert!(Arc::ptr_eq(&r.entry(&a), &ea));
        // The next second asks the table again (same entry).
        assert!(Arc::ptr_eq(
            &r.entry_cached_at(&a, &mut cache, now + 1),
            &ea
        ));
        assert_eq!(cache.hits, 6);
        // Once the process exited, its cached entry is not handed out again, even within
        // the same second.
        assert_eq!(r.process_exited(1), 1);
        let again = r.entry_cached_at(&a, &mut cache, now + 1);
        assert!(!Arc::ptr_eq(&again, &ea));
        assert_eq!(cache.hits, 6);
        assert!(Arc::ptr_eq(&r.entry(&a), &again));
        assert!(Arc::ptr_eq(&r.entry_cached_at(&b, &mut cache, now), &eb));
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
        record_one_per_process(&r, 1..=3);
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
            record_one_per_process(&r, [pid]);
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
            let aged = r.epoch_secs.checked_sub(IDLE_RETIRE.as_secs() + 1);
            r.epoch_secs = aged.unwrap_or(r.epoch_secs);
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
        for host in crate::otel::span::tests::HOST_CASES {
            ex.http.host = host.map(Into::into);
            let mut buf = StackText::empty();
            let (a, p) = server_address_in(&ex, &mut buf);
            assert_eq!((a.to_string(), p), crate::otel::span::server_address(&ex));
        }
    }

    #[test]
    fn no_metrics_no_series() {
        let r = Registry::new(
            RegistryConfig {
                metrics: false,
                ..RegistryConfig::for_tests(2, Temporality::Cumulative)
            },
            AgentSources::default(),
        );
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, None);
        assert_eq!(e.service_name, "python3");
        assert!(r.collect().is_none());
        assert_eq!(r.series_count(), 0);
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
