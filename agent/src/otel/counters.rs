//! The exporter's own counters, exported with the capture counters as `tapir.*` metrics.
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a span never reached a collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanDrop {
    /// The retry queue (`--export-queue-spans`) was full: its oldest span was dropped.
    ExportQueueFull,
    /// Still unsent when the shutdown timeout expired.
    Shutdown,
    /// The collector refused them (a non-retryable error, or an OTLP partial success).
    Rejected,
}

impl SpanDrop {
    pub const ALL: [SpanDrop; 3] = [Self::ExportQueueFull, Self::Shutdown, Self::Rejected];

    /// The `reason` attribute of `tapir.spans.dropped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ExportQueueFull => "export_queue_full",
            Self::Shutdown => "shutdown",
            Self::Rejected => "rejected",
        }
    }
}

#[derive(Debug, Default)]
pub struct OtelStats {
    pub spans_dropped: [AtomicU64; SpanDrop::ALL.len()],
    /// Spans a collector accepted.
    pub spans_exported: AtomicU64,
    /// Exchanges whose span the sampler dropped (their metrics are still recorded).
    pub spans_not_sampled: AtomicU64,
    /// Failed export calls, traces.
    pub trace_export_failures: AtomicU64,
    /// Failed export calls, metrics.
    pub metric_export_failures: AtomicU64,
    /// Trace batches sent again after a failure.
    pub trace_export_retries: AtomicU64,
    /// Exchanges whose route became the overflow route.
    pub routes_overflow: AtomicU64,
    /// Per-process resources (and their metric streams) evicted from the bounded table.
    pub services_evicted: AtomicU64,
    /// Connections in the capture pipeline's table (a gauge, set by the capture thread).
    pub connections_tracked: AtomicU64,
    /// Exchanges recorded in a service's overflow series (it had reached the series limit).
    pub metric_series_overflow: AtomicU64,
    /// Exited or evicted processes whose last metrics were dropped unexported (too many
    /// waiting while the collector was unreachable).
    pub metric_services_lost: AtomicU64,
}

impl OtelStats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn dropped(&self, why: SpanDrop, n: u64) {
        OtelStats::add(&self.spans_dropped[why as usize], n);
    }

    pub fn dropped_count(&self, why: SpanDrop) -> u64 {
        OtelStats::get(&self.spans_dropped[why as usize])
    }
}
