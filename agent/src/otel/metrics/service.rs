//! What Tapir keeps per observed process: its resource, and the table of its series.
use std::sync::{
    atomic::{AtomicBool, AtomicU64, Ordering},
    Mutex,
};

use hashbrown::HashTable;
use opentelemetry_proto::tonic::metrics::v1::ResourceMetrics;
use opentelemetry_sdk::Resource;

use super::{
    encode::{http_metrics, OtlpResource},
    lock,
    series::{Read, SeriesTable, Snap},
};
use crate::otel::resource::resource_service_name;

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
    /// It left the registry's table (exited, evicted, idle, shutdown): a cached handle
    /// must ask the registry again.
    left: AtomicBool,
}

impl std::fmt::Debug for ServiceEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceEntry")
            .field("service_name", &self.service_name)
            .finish_non_exhaustive()
    }
}

impl ServiceEntry {
    /// `metrics`: whether to keep series at all; `now_secs`: seconds since the registry's
    /// epoch.
    pub(super) fn new(resource: Resource, metrics: bool, now_secs: u64) -> Self {
        let metrics = metrics.then(|| EntryMetrics {
            resource: OtlpResource::new(&resource),
            table: Mutex::new(SeriesTable::default()),
        });
        Self {
            service_name: resource_service_name(&resource),
            resource,
            metrics,
            last_used: AtomicU64::new(now_secs),
            left: AtomicBool::new(false),
        }
    }

    pub(super) fn mark_left(&self) {
        self.left.store(true, Ordering::Release);
    }

    pub(super) fn has_left(&self) -> bool {
        self.left.load(Ordering::Acquire)
    }

    pub(super) fn touch(&self, now_secs: u64) {
        self.last_used.store(now_secs, Ordering::Relaxed);
    }

    /// Seconds since the registry's epoch when it was last used.
    pub(super) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }

    /// The table of series, `None` when metrics are off.
    pub(super) fn table(&self) -> Option<&Mutex<SeriesTable>> {
        self.metrics.as_ref().map(|m| &m.table)
    }

    fn read(&self, how: Read, now_ns: u64) -> Vec<Snap> {
        let Some(m) = &self.metrics else {
            return Vec::new();
        };
        let mut t = lock(&m.table);
        let mut out = Vec::with_capacity(t.series.len());
        out.extend(t.series.iter_mut().filter_map(|s| s.read(how, now_ns)));
        out
    }

    /// The collector took the last collection: pending deltas are done.
    pub(super) fn acknowledged(&self) {
        if let Some(m) = &self.metrics {
            for s in lock(&m.table).series.iter_mut() {
                s.acknowledged();
            }
        }
    }

    /// Frees every series (the entry itself may live on in queued spans); returns how many.
    pub(super) fn close(&self) -> usize {
        let Some(m) = &self.metrics else {
            return 0;
        };
        let mut t = lock(&m.table);
        t.closed = true;
        let n = t.series.len();
        t.series = HashTable::new();
        n
    }

    pub(super) fn series_count(&self) -> usize {
        self.metrics
            .as_ref()
            .map_or(0, |m| lock(&m.table).series.len())
    }

    /// This process's metrics as OTLP, or `None` when there is nothing to report.
    pub(super) fn resource_metrics(&self, how: Read, now_ns: u64) -> Option<ResourceMetrics> {
        let m = self.metrics.as_ref()?;
        let snaps = self.read(how, now_ns);
        if snaps.is_empty() {
            return None;
        }
        let metrics = http_metrics(&snaps, matches!(how, Read::Delta), now_ns);
        Some(m.resource.with(metrics))
    }
}
