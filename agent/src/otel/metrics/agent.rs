//! The agent's own `tapir.*` metrics (capture and export counters, a few gauges), under
//! the agent's resource.
use std::sync::{Arc, Mutex};

use opentelemetry_proto::tonic::{
    common::v1::any_value,
    metrics::v1::{
        metric, number_data_point, Gauge, Metric, NumberDataPoint, ResourceMetrics, Sum,
    },
};

use super::{
    encode::{aggregation, kv, OtlpResource},
    lock, unix_now_ns,
};
use crate::{
    otel::{
        counters::{OtelStats, SpanDrop},
        resource::agent_resource,
    },
    self_usage::Usage,
    stats::Stats,
};

/// Reads the current length of the span retry queue (for a gauge).
pub type QueueLen = Arc<dyn Fn() -> u64 + Send + Sync>;

/// One point of an agent counter.
struct CounterPoint {
    name: &'static str,
    description: &'static str,
    unit: &'static str,
    attr: Option<(&'static str, &'static str)>,
    value: u64,
    /// `value` is microseconds, exported as a double of seconds.
    micros_as_seconds: bool,
}

/// Delta bookkeeping of the agent's counters: values at the last acknowledged export, and
/// at the last collection.
struct CounterDelta {
    acked: Vec<u64>,
    acked_ns: u64,
    sent: Vec<u64>,
    sent_ns: u64,
}

/// What the agent's own metrics are read from at each collection.
#[derive(Clone)]
pub struct AgentSources {
    /// Capture and kernel counters.
    pub capture: Arc<Stats>,
    /// Export counters.
    pub stats: Arc<OtelStats>,
    /// Spans waiting in the export queue.
    pub queue_len: QueueLen,
}

impl Default for AgentSources {
    /// Fresh counters and an always-empty queue (no span export).
    fn default() -> Self {
        Self {
            capture: Arc::new(Stats::default()),
            stats: Arc::new(OtelStats::default()),
            queue_len: Arc::new(|| 0),
        }
    }
}

/// The agent's own metrics, read from its counters at each collection.
pub(super) struct AgentMetrics {
    resource: OtlpResource,
    capture: Arc<Stats>,
    stats: Arc<OtelStats>,
    queue_len: QueueLen,
    start_ns: u64,
    delta: Mutex<CounterDelta>,
}

impl AgentMetrics {
    /// `host` and `agent_attrs` make the agent's resource.
    pub(super) fn new(host: &str, agent_attrs: Option<&str>, sources: AgentSources) -> Self {
        let start_ns = unix_now_ns();
        let AgentSources {
            capture,
            stats,
            queue_len,
        } = sources;
        Self {
            resource: OtlpResource::new(&agent_resource(host, agent_attrs)),
            capture,
            stats,
            queue_len,
            start_ns,
            delta: Mutex::new(CounterDelta {
                acked: Vec::new(),
                acked_ns: start_ns,
                sent: Vec::new(),
                sent_ns: start_ns,
            }),
        }
    }

    fn counters(&self, usage: &Usage) -> Vec<CounterPoint> {
        let point = |name, description, attr, value| CounterPoint {
            name,
            description,
            unit: "",
            attr,
            value,
            micros_as_seconds: false,
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
                "Spans never exported, by reason",
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
        // The semantic conventions' process.cpu.time, by cpu.mode.
        for (mode, us) in [("user", usage.user_us), ("system", usage.system_us)] {
            v.push(CounterPoint {
                unit: "s",
                micros_as_seconds: true,
                ..point(
                    "process.cpu.time",
                    "CPU time the agent has used, by mode (its kernel programs' time is the observed processes')",
                    Some(("cpu.mode", mode)),
                    us,
                )
            });
        }
        if let Some(programs) = self.capture.programs.get() {
            let costs = programs.read();
            for c in &costs {
                v.push(CounterPoint {
                    unit: "{run}",
                    ..point(
                        "tapir.ebpf.program.runs",
                        "Runs of each of the agent's kernel programs (with --ebpf-stats)",
                        Some(("program", c.program)),
                        c.runs,
                    )
                });
            }
            for c in &costs {
                v.push(CounterPoint {
                    unit: "ns",
                    ..point(
                        "tapir.ebpf.program.run_time",
                        "Time spent in each of the agent's kernel programs, as the kernel measures it (with --ebpf-stats)",
                        Some(("program", c.program)),
                        c.run_time_ns,
                    )
                });
            }
        }
        v
    }

    /// `delta`: report counters as deltas since the last acknowledged collection (and
    /// remember these values for `acknowledged`).
    pub(super) fn resource_metrics(&self, now_ns: u64, delta: bool) -> ResourceMetrics {
        let usage = Usage::read();
        let points = self.counters(&usage);
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
        let point = |attr: Option<(&str, &str)>, start: u64, value| NumberDataPoint {
            attributes: attr
                .map(|(k, v)| vec![kv(k, any_value::Value::StringValue(v.to_string()))])
                .unwrap_or_default(),
            start_time_unix_nano: start,
            time_unix_nano: now_ns,
            value: Some(value),
            ..Default::default()
        };
        let int = |v: u64| number_data_point::Value::AsInt(i64::try_from(v).unwrap_or(i64::MAX));
        let number = |attr, start, v| point(attr, start, int(v));
        let mut metrics: Vec<Metric> = Vec::new();
        for (p, v) in points.iter().zip(values) {
            let value = if p.micros_as_seconds {
                number_data_point::Value::AsDouble(v as f64 / 1e6)
            } else {
                int(v)
            };
            let dp = point(p.attr, start_ns, value);
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
                unit: p.unit.to_string(),
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
        // The conventions' process.* up-down counters: cumulative whatever the temporality
        // (as the SDKs' delta preference leaves up-down counters), since the agent started.
        for (name, description, unit, v) in [
            (
                "process.memory.usage",
                "The agent's resident memory (its kernel ring buffers count twice: each is mapped twice, for wrap-around)",
                "By",
                usage.resident_bytes,
            ),
            (
                "process.memory.virtual",
                "The agent's virtual memory",
                "By",
                usage.virtual_bytes,
            ),
            (
                "process.thread.count",
                "The agent's threads",
                "{thread}",
                usage.threads,
            ),
        ] {
            metrics.push(Metric {
                name: name.to_string(),
                description: description.to_string(),
                unit: unit.to_string(),
                data: Some(metric::Data::Sum(Sum {
                    data_points: vec![number(None, self.start_ns, v)],
                    aggregation_temporality: aggregation(false),
                    is_monotonic: false,
                })),
                ..Default::default()
            });
        }
        self.resource.with(metrics)
    }

    pub(super) fn acknowledged(&self) {
        let mut d = lock(&self.delta);
        if !d.sent.is_empty() {
            d.acked = std::mem::take(&mut d.sent);
            d.acked_ns = d.sent_ns;
        }
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry_proto::tonic::{
        collector::metrics::v1::ExportMetricsServiceRequest, metrics::v1::AggregationTemporality,
    };

    use super::*;
    use crate::otel::metrics::{testutil::*, Registry, RegistryConfig, Temporality};

    #[test]
    fn agent_counters_follow_the_temporality() {
        let capture = Arc::new(Stats::default());
        let make = |t| {
            Registry::new(
                RegistryConfig::for_tests(2, t),
                AgentSources {
                    capture: capture.clone(),
                    ..AgentSources::default()
                },
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

    /// The `process.*` metrics of the conventions, read off the agent itself.
    #[test]
    fn the_agents_own_cpu_memory_and_threads() {
        let sum = |req: &ExportMetricsServiceRequest, name: &str| match &metrics(req, name)
            .next()
            .unwrap_or_else(|| panic!("{name} missing"))
            .1
        {
            Metric {
                unit,
                data: Some(metric::Data::Sum(s)),
                ..
            } => (unit.clone(), s.clone()),
            other => panic!("{other:?}"),
        };
        let cpu_seconds = |s: &Sum, mode: &str| {
            let p = s
                .data_points
                .iter()
                .find(|p| attr(&p.attributes, "cpu.mode") == string(mode).as_ref())
                .unwrap_or_else(|| panic!("no cpu.mode={mode}"));
            match p.value {
                Some(number_data_point::Value::AsDouble(d)) => d,
                other => panic!("{other:?}"),
            }
        };
        for t in [Temporality::Cumulative, Temporality::Delta] {
            let r = Registry::new(RegistryConfig::for_tests(2, t), AgentSources::default());
            let first = r.collect().unwrap();
            assert!(metrics(&first, "process.cpu.time")
                .all(|(rm, _)| { resource_attr(rm, "service.name") == string("tapir") }));
            let (unit, cpu) = sum(&first, "process.cpu.time");
            assert_eq!(unit, "s");
            assert!(cpu.is_monotonic);
            assert_eq!(
                cpu.aggregation_temporality,
                aggregation(t == Temporality::Delta)
            );
            assert_eq!(cpu.data_points.len(), 2);
            let usage = Usage::read();
            let total = cpu_seconds(&cpu, "user") + cpu_seconds(&cpu, "system");
            // Read a moment before `usage`, and whole-process (this test's threads too).
            assert!(total > 0.0, "{total}");
            assert!(
                total <= (usage.user_us + usage.system_us) as f64 / 1e6,
                "{total}"
            );
            for (name, unit, least) in [
                ("process.memory.usage", "By", 1 << 20),
                ("process.memory.virtual", "By", 1 << 20),
                ("process.thread.count", "{thread}", 1),
            ] {
                let (u, s) = sum(&first, name);
                assert_eq!(u, unit, "{name}");
                assert!(!s.is_monotonic, "{name}");
                assert_eq!(
                    s.aggregation_temporality,
                    AggregationTemporality::Cumulative as i32,
                    "{name}: an up-down counter stays cumulative"
                );
                assert!(counter_value(&first, name, None) >= least, "{name}");
            }
            // Delta: the next point counts only the CPU used since the acknowledged one.
            r.acknowledge(usize::MAX);
            let busy: u64 = (0..3_000_000u64).map(|i| i.wrapping_mul(i) >> 7).sum();
            assert!(busy > 0);
            let secs = |u: Usage| (u.user_us + u.system_us) as f64 / 1e6;
            let before = secs(Usage::read());
            let (_, next) = sum(&r.collect().unwrap(), "process.cpu.time");
            let after = secs(Usage::read());
            let later = cpu_seconds(&next, "user") + cpu_seconds(&next, "system");
            let since_start = match t {
                Temporality::Delta => total + later,
                _ => later,
            };
            assert!(
                before - 1e-6 <= since_start && since_start <= after + 1e-6,
                "{t:?}: {since_start} not within [{before}, {after}]"
            );
        }
    }

    #[test]
    fn agent_metrics_are_under_the_tapir_resource() {
        let capture = Arc::new(Stats::default());
        Stats::inc(&capture.exchanges);
        let stats = Arc::new(OtelStats::default());
        stats.dropped(SpanDrop::ExportQueueFull, 3);
        OtelStats::add(&stats.connections_tracked, 5);
        let r = Registry::new(
            RegistryConfig::for_tests(2, Temporality::Cumulative),
            AgentSources {
                capture,
                stats,
                queue_len: Arc::new(|| 7),
            },
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
            counter_value(
                &req,
                "tapir.spans.dropped",
                Some(("reason", "export_queue_full"))
            ),
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
}
