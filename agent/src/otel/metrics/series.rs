//! One series: its key (the metric attributes of an exchange) and its three fixed-bucket
//! histograms, cumulative and, with delta temporality, since the last collection.
use std::sync::Arc;

use hashbrown::HashTable;

use crate::http::{Failure, GrpcCall};
use crate::redis::RedisCall;

/// Duration buckets (seconds) of the stable HTTP semantic conventions.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];
/// Body size buckets (bytes).
pub const SIZE_BUCKETS: [f64; 14] = [
    0.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 65536.0,
    262144.0, 1048576.0,
];

const BUCKETS: usize = DURATION_BUCKETS.len() + 1;

/// One explicit-bucket histogram: `counts[i]` holds the values in `(bounds[i-1], bounds[i]]`,
/// the last count those above every bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Hist {
    pub(super) counts: [u64; BUCKETS],
    pub(super) count: u64,
    pub(super) sum: f64,
    pub(super) min: f64,
    pub(super) max: f64,
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

/// The bucket bounds of each of [`Hists`].
pub(super) const BOUNDS: [&[f64; BUCKETS - 1]; 3] =
    [&DURATION_BUCKETS, &SIZE_BUCKETS, &SIZE_BUCKETS];

/// A series key borrowed from an exchange: what is hashed and compared per exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct KeyView<'a> {
    pub(super) server: bool,
    pub(super) overflow: bool,
    pub(super) method: &'static str,
    pub(super) status: u16,
    /// The connection ended before the response did (`status` is 0 when none began).
    pub(super) failure: Option<Failure>,
    pub(super) version: &'static str,
    pub(super) scheme: &'static str,
    /// For a gRPC call's series, its `rpc.method`.
    pub(super) route: Option<&'a str>,
    pub(super) server_address: Option<(&'a str, u16)>,
    /// A gRPC call's series: an RPC metric, not an HTTP one.
    pub(super) grpc: Option<GrpcCall>,
    /// A Redis call's series (its command in `route`): a database metric.
    pub(super) redis: Option<RedisCall>,
}

impl KeyView<'static> {
    pub(super) fn overflow(server: bool) -> Self {
        Self {
            server,
            overflow: true,
            method: "",
            status: 0,
            failure: None,
            version: "",
            scheme: "",
            route: None,
            server_address: None,
            grpc: None,
            redis: None,
        }
    }
}

/// The metric attributes of a series, owned by it. Strings are shared with snapshots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SeriesKey {
    pub(super) server: bool,
    /// Where exchanges go once the service has its maximum of series.
    pub(super) overflow: bool,
    pub(super) method: &'static str,
    pub(super) status: u16,
    /// The connection ended before the response did (`status` is 0 when none began).
    pub(super) failure: Option<Failure>,
    pub(super) version: &'static str,
    pub(super) scheme: &'static str,
    pub(super) route: Option<Arc<str>>,
    pub(super) server_address: Option<(Arc<str>, u16)>,
    pub(super) grpc: Option<GrpcCall>,
    pub(super) redis: Option<RedisCall>,
}

impl SeriesKey {
    pub(super) fn view(&self) -> KeyView<'_> {
        KeyView {
            server: self.server,
            overflow: self.overflow,
            method: self.method,
            status: self.status,
            failure: self.failure,
            version: self.version,
            scheme: self.scheme,
            route: self.route.as_deref(),
            server_address: self.server_address.as_ref().map(|(a, p)| (&**a, *p)),
            grpc: self.grpc,
            redis: self.redis,
        }
    }

    pub(super) fn from_view(v: KeyView<'_>) -> Self {
        Self {
            server: v.server,
            overflow: v.overflow,
            method: v.method,
            status: v.status,
            failure: v.failure,
            version: v.version,
            scheme: v.scheme,
            route: v.route.map(Arc::from),
            server_address: v.server_address.map(|(a, p)| (Arc::from(a), p)),
            grpc: v.grpc,
            redis: v.redis,
        }
    }
}

/// Delta bookkeeping of a series: what was recorded since the last collection, and what
/// was collected but not yet acknowledged (sent again, merged, until it is).
struct DeltaState {
    current: Hists,
    current_start_ns: u64,
    pending: Option<(Hists, u64)>,
}

pub(super) struct Series {
    pub(super) hash: u64,
    pub(super) key: SeriesKey,
    /// When the series began: the start of its cumulative points.
    start_ns: u64,
    /// Everything recorded (cumulative points, Prometheus).
    total: Hists,
    /// Only with delta temporality.
    delta: Option<Box<DeltaState>>,
}

impl Series {
    pub(super) fn new(hash: u64, key: SeriesKey, now_ns: u64, delta: bool) -> Self {
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

    pub(super) fn record(&mut self, values: &[f64; 3]) {
        for ((h, b), v) in self.total.iter_mut().zip(BOUNDS).zip(values) {
            h.record(b, *v);
        }
        if let Some(d) = self.delta.as_deref_mut() {
            for ((h, b), v) in d.current.iter_mut().zip(BOUNDS).zip(values) {
                h.record(b, *v);
            }
        }
    }

    /// The series as `how` reads it, or `None` when a delta read has nothing to report.
    pub(super) fn read(&mut self, how: Read, now_ns: u64) -> Option<Snap> {
        match how {
            Read::Totals => Some(Snap {
                key: self.key.clone(),
                start_ns: self.start_ns,
                hists: self.total,
            }),
            Read::Delta => {
                let d = self.delta.as_deref_mut()?;
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
                d.pending.as_ref().map(|(p, start)| Snap {
                    key: self.key.clone(),
                    start_ns: *start,
                    hists: *p,
                })
            }
        }
    }

    /// The collector took the last collection: the pending delta is done.
    pub(super) fn acknowledged(&mut self) {
        if let Some(d) = self.delta.as_deref_mut() {
            d.pending = None;
        }
    }
}

#[derive(Default)]
pub(super) struct SeriesTable {
    pub(super) series: HashTable<Series>,
    /// Exported for the last time and freed: late records are ignored.
    pub(super) closed: bool,
}

/// A series copied out of its table (the lock is held only for the copy).
pub(super) struct Snap {
    pub(super) key: SeriesKey,
    pub(super) start_ns: u64,
    pub(super) hists: Hists,
}

#[derive(Clone, Copy)]
pub(super) enum Read {
    /// Cumulative values; nothing changes.
    Totals,
    /// Moves what was recorded since the last collection to the pending delta and reads
    /// the pending delta.
    Delta,
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::metrics::v1::{metric, AggregationTemporality};

    use super::*;
    use crate::{
        http::ExchangeRole,
        otel::{
            metrics::{testutil::*, Temporality},
            span::tests::exchange,
        },
    };

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
}
