//! Helpers shared by the metrics tests: registries, and lookups in their OTLP output.
use std::sync::Arc;

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{any_value, KeyValue},
    metrics::v1::{metric, number_data_point, HistogramDataPoint, Metric, ResourceMetrics},
};

use super::{AgentSources, Registry, RegistryConfig, Temporality};
use crate::exchange::CapturedExchange;

pub(super) fn registry_with(max: usize, t: Temporality) -> Registry {
    Registry::new(RegistryConfig::for_tests(max, t), AgentSources::default())
}

pub(super) fn registry(max: usize) -> Registry {
    registry_with(max, Temporality::Cumulative)
}

pub(super) fn with_pid(mut ex: CapturedExchange, pid: u32) -> CapturedExchange {
    Arc::make_mut(&mut ex.process).pid = pid;
    ex
}

/// Records one `GET /` server exchange for each of these processes.
pub(super) fn record_one_per_process(r: &Registry, pids: impl IntoIterator<Item = u32>) {
    for pid in pids {
        let ex = with_pid(
            crate::otel::span::tests::exchange(crate::http::ExchangeRole::Server, "GET", "/", 200),
            pid,
        );
        let e = r.entry(&ex.process);
        r.record(&e, &ex, Some("/"));
    }
}

pub(super) fn metrics<'a>(
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

pub(super) fn hist_points<'a>(
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

pub(super) fn histogram_count(req: &ExportMetricsServiceRequest, name: &str) -> u64 {
    hist_points(req, name).iter().map(|p| p.count).sum()
}

pub(super) fn attr<'a>(a: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    a.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

pub(super) fn resource_attr(rm: &ResourceMetrics, key: &str) -> Option<any_value::Value> {
    attr(&rm.resource.as_ref()?.attributes, key).cloned()
}

pub(super) fn string(s: &str) -> Option<any_value::Value> {
    Some(any_value::Value::StringValue(s.into()))
}

pub(super) fn counter_value(
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
