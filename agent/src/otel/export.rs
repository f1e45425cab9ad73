//! Where telemetry goes: OTLP endpoint/protocol resolution (standard `OTEL_EXPORTER_OTLP_*`
//! variables plus Tapir's flags), the OTLP exporters, the span sender used by the retry
//! loop, the metrics loop, and the console exporter.
use std::{
    fmt,
    str::FromStr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use opentelemetry::{trace::SpanKind, Value};
use opentelemetry_sdk::trace::SpanData;
use serde_json::{json, Map};
use tokio::{sync::watch, time::Instant};

use super::{
    client::OtlpClient,
    counters::{OtelStats, SpanDrop},
    metrics::{Registry, ServiceEntry},
    queue::BatchSender,
    wire,
};

/// OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    Grpc,
    HttpProtobuf,
}

impl FromStr for OtlpProtocol {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "grpc" => Ok(Self::Grpc),
            "http/protobuf" | "http" => Ok(Self::HttpProtobuf),
            other => Err(format!(
                "unsupported OTLP protocol {other:?}: use grpc or http/protobuf"
            )),
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Grpc => "grpc",
            Self::HttpProtobuf => "http/protobuf",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    Traces,
    Metrics,
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Traces => "span",
            Self::Metrics => "metric",
        })
    }
}

impl Signal {
    pub(crate) fn env_part(self) -> &'static str {
        match self {
            Self::Traces => "TRACES",
            Self::Metrics => "METRICS",
        }
    }

    /// The gRPC method of the signal's collector service.
    pub(crate) fn grpc_path(self) -> &'static str {
        match self {
            Self::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Self::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
        }
    }

    fn http_path(self) -> &'static str {
        match self {
            Self::Traces => "/v1/traces",
            Self::Metrics => "/v1/metrics",
        }
    }
}

/// Where and how one signal is exported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub protocol: OtlpProtocol,
    /// Set on the exporter (`with_endpoint`) only when Tapir's own option was given: it
    /// overrides the environment, which the exporter otherwise reads itself.
    pub explicit_endpoint: Option<String>,
    /// The URL data goes to, for the logs.
    pub url: String,
}

/// Resolves a signal's protocol and endpoint.
///
/// Protocol: `--otlp-protocol` > `OTEL_EXPORTER_OTLP_{SIGNAL}_PROTOCOL` >
/// `OTEL_EXPORTER_OTLP_PROTOCOL` > the effective endpoint's port (4317 → grpc, else
/// http/protobuf). Endpoint: `--otlp-endpoint` (a base URL, like
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: `/v1/traces` or `/v1/metrics` is appended for
/// http/protobuf) > `OTEL_EXPORTER_OTLP_{SIGNAL}_ENDPOINT` (used as is) >
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (+ the signal path for http/protobuf) > localhost:4317
/// (grpc) or localhost:4318 (http/protobuf). Returns warnings for values not understood.
pub fn resolve_target(
    signal: Signal,
    flag_protocol: Option<OtlpProtocol>,
    flag_endpoint: Option<&str>,
    env: &dyn Fn(&str) -> Option<String>,
) -> (Target, Vec<String>) {
    let mut warnings = Vec::new();
    let get = |k: &str| {
        env(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let sig = signal.env_part();
    let sig_endpoint_var = format!("OTEL_EXPORTER_OTLP_{sig}_ENDPOINT");
    let sig_endpoint = get(&sig_endpoint_var);
    let base_endpoint = get("OTEL_EXPORTER_OTLP_ENDPOINT");
    let flag_endpoint = flag_endpoint
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_string);
    let endpoint_for_port = flag_endpoint
        .clone()
        .or_else(|| sig_endpoint.clone())
        .or_else(|| base_endpoint.clone());

    let mut env_protocol = |var: &str| -> Option<OtlpProtocol> {
        let v = get(var)?;
        match v.parse() {
            Ok(p) => Some(p),
            Err(e) => {
                warnings.push(format!("{var}: {e}; ignored"));
                None
            }
        }
    };
    let protocol = flag_protocol
        .or_else(|| env_protocol(&format!("OTEL_EXPORTER_OTLP_{sig}_PROTOCOL")))
        .or_else(|| env_protocol("OTEL_EXPORTER_OTLP_PROTOCOL"))
        .unwrap_or_else(|| match endpoint_for_port.as_deref().and_then(port_of) {
            Some(4317) => OtlpProtocol::Grpc,
            _ => OtlpProtocol::HttpProtobuf,
        });

    let with_path = |base: &str| format!("{}{}", base.trim_end_matches('/'), signal.http_path());
    let explicit_endpoint = flag_endpoint.as_ref().map(|e| match protocol {
        OtlpProtocol::Grpc => e.clone(),
        OtlpProtocol::HttpProtobuf => with_path(e),
    });
    let url = match (&explicit_endpoint, &sig_endpoint, &base_endpoint, protocol) {
        (Some(e), _, _, _) => e.clone(),
        (None, Some(s), _, _) => s.clone(),
        (None, None, Some(b), OtlpProtocol::Grpc) => b.clone(),
        (None, None, Some(b), OtlpProtocol::HttpProtobuf) => with_path(b),
        (None, None, None, OtlpProtocol::Grpc) => "http://localhost:4317".to_string(),
        (None, None, None, OtlpProtocol::HttpProtobuf) => with_path("http://localhost:4318"),
    };
    (
        Target {
            protocol,
            explicit_endpoint,
            url,
        },
        warnings,
    )
}

/// The port of a URL-ish endpoint (`http://host:4317/x`, `host:4317`), if explicit.
fn port_of(endpoint: &str) -> Option<u16> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
    let port = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once("]:")?.1
    } else {
        authority.rsplit_once(':')?.1
    };
    port.parse().ok()
}

/// A span waiting for export, encoded (an OTLP `Span` message), with the process it
/// belongs to (for its resource).
#[derive(Debug, Clone)]
pub struct QueuedSpan {
    pub entry: Arc<ServiceEntry>,
    /// The encoded `Span` message.
    pub span: bytes::Bytes,
}

/// Logs a signal's export failures once per outage, and the recovery.
#[derive(Debug, Default)]
pub struct OutageLog {
    down: AtomicBool,
}

impl OutageLog {
    pub fn failed(&self, what: &str, url: &str, err: &dyn fmt::Display, then: &str) {
        if !self.down.swap(true, Ordering::Relaxed) {
            tracing::warn!("exporting {what} to {url} failed: {err}; {then}");
        } else {
            tracing::debug!(error = %err, "exporting {what} to {url} failed again");
        }
    }

    pub fn ok(&self, what: &str, url: &str) {
        if self.down.swap(false, Ordering::Relaxed) {
            tracing::info!("exporting {what} to {url} works again");
        }
    }
}

/// Sends span batches as one OTLP request each: spans grouped by process, one
/// `ResourceSpans` per process (exports are serialized: the loop owns the sender).
pub struct OtlpSpanSender {
    client: OtlpClient,
    scope: Vec<u8>,
    stats: Arc<OtelStats>,
    outage: OutageLog,
    /// Partial successes are logged once, then counted only.
    rejections_logged: bool,
}

impl OtlpSpanSender {
    pub fn new(client: OtlpClient, stats: Arc<OtelStats>) -> Self {
        let mut scope = Vec::new();
        wire::encode_scope(&mut scope, &super::span::scope());
        Self {
            client,
            scope,
            stats,
            outage: OutageLog::default(),
            rejections_logged: false,
        }
    }

    /// The request body for `batch`: processes in first-seen order.
    fn encode(&self, batch: &[QueuedSpan]) -> Vec<u8> {
        let mut groups: Vec<(&Arc<ServiceEntry>, Vec<&[u8]>)> = Vec::new();
        for q in batch {
            match groups.iter_mut().find(|(e, _)| Arc::ptr_eq(e, &q.entry)) {
                Some((_, spans)) => spans.push(&q.span),
                None => groups.push((&q.entry, vec![&q.span])),
            }
        }
        let mut req = wire::TraceRequest::new(self.scope.clone());
        // Spans with their field key and length (≤ 4 bytes: spans are < 2 MiB), plus room
        // for each group's framing and resource: the body then never grows.
        let spans: usize = batch.iter().map(|q| q.span.len() + 4).sum();
        req.reserve(spans + groups.len() * (1024 + self.scope.len()));
        let mut resource = Vec::new();
        for (entry, spans) in groups {
            resource.clear();
            wire::encode_resource(&mut resource, &entry.resource);
            req.add_group(&resource, spans);
        }
        req.finish()
    }
}

impl BatchSender<QueuedSpan> for OtlpSpanSender {
    async fn send(&mut self, batch: Vec<QueuedSpan>) -> Result<u64, Vec<QueuedSpan>> {
        let n = batch.len() as u64;
        let url = self.client.url().to_string();
        match self.client.export(self.encode(&batch)).await {
            Ok(accepted) => {
                self.outage.ok("spans", &url);
                let refused = accepted.rejected.min(n);
                if refused > 0 {
                    self.stats.dropped(SpanDrop::Rejected, refused);
                    if !std::mem::replace(&mut self.rejections_logged, true) {
                        tracing::warn!(
                            "the collector at {url} rejected {refused} of {n} spans: {:?} (counted in tapir.spans.dropped{{reason=rejected}}; not logged again)",
                            accepted.message
                        );
                    }
                }
                Ok(refused)
            }
            Err(e) if e.retryable() => {
                self.outage.failed(
                    "spans",
                    &url,
                    &e,
                    &format!("retrying with backoff ({n} spans in this batch)"),
                );
                Err(batch)
            }
            Err(e) => {
                // Sending the same spans again would fail the same way.
                self.stats.dropped(SpanDrop::Rejected, n);
                self.outage.failed(
                    "spans",
                    &url,
                    &e,
                    "dropping the batch (the collector will not accept it on a retry)",
                );
                Ok(n)
            }
        }
    }
}

/// Largest metrics request body sent at once (whole processes per request; the
/// collector's default gRPC limit is 4 MiB).
const MAX_METRICS_REQUEST: usize = 1 << 20;

/// Collects the registry each `interval` and exports what it got, until `stop`; then
/// collects and exports one last time (bounded by the deadline sent with `stop`). The
/// registry learns how much the collector took: the rest is sent again next time
/// (cumulative: newer totals; delta: merged into the next deltas).
pub async fn metrics_loop(
    registry: Arc<Registry>,
    client: OtlpClient,
    interval: Duration,
    stats: Arc<OtelStats>,
    mut stop: watch::Receiver<Option<Instant>>,
) {
    let outage = OutageLog::default();
    let mut next = Instant::now() + interval;
    loop {
        let deadline = *stop.borrow();
        if deadline.is_none() {
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = stop.changed() => {}
            }
        }
        next = Instant::now() + interval;
        let deadline = *stop.borrow();
        // Collected on this thread, not the blocking pool: the burst of small allocations
        // (thousands of exited processes' last points) then lands in this thread's arena,
        // which `heap::trim` below can shrink; a pool thread's arena kept it for good.
        if let Some(req) = registry.collect() {
            let mut delivered = 0;
            for (resources, body) in super::metrics::encode_requests(req, MAX_METRICS_REQUEST) {
                let fut = client.export(body);
                let r = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, fut).await {
                        Ok(r) => r.map_err(|e| (e.retryable(), e.to_string())),
                        Err(_) => Err((true, "shutdown deadline reached".to_string())),
                    },
                    None => fut.await.map_err(|e| (e.retryable(), e.to_string())),
                };
                match r {
                    Ok(_) => {
                        delivered += resources;
                        outage.ok("metrics", client.url());
                    }
                    Err((retryable, e)) => {
                        OtelStats::add(&stats.metric_export_failures, 1);
                        if !retryable {
                            // The collector refused this data: sending it again cannot help.
                            outage.failed("metrics", client.url(), &e, "dropping that data");
                            delivered += resources;
                            continue;
                        }
                        outage.failed(
                            "metrics",
                            client.url(),
                            &e,
                            "the next export carries these counts",
                        );
                        break;
                    }
                }
            }
            registry.acknowledge(delivered);
            // A collection builds every process's points at once (thousands after a burst
            // of short-lived processes): give that memory back.
            crate::heap::trim();
        }
        if deadline.is_some() || stop.has_changed().is_err() {
            registry.shutdown();
            return;
        }
    }
}

/// One JSON object per span (the console exporter).
pub fn span_json(s: &SpanData, entry: &ServiceEntry) -> serde_json::Value {
    let attrs = |it: &mut dyn Iterator<Item = (String, Value)>| -> Map<String, serde_json::Value> {
        it.map(|(k, v)| {
            let j = match v {
                Value::Bool(b) => json!(b),
                Value::I64(i) => json!(i),
                Value::F64(f) => json!(f),
                Value::String(s) => json!(s.as_str()),
                other => json!(other.to_string()),
            };
            (k, j)
        })
        .collect()
    };
    let parent = if s.parent_span_id == opentelemetry::trace::SpanId::INVALID {
        String::new()
    } else {
        s.parent_span_id.to_string()
    };
    let ns = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    json!({
        "name": s.name,
        "kind": match s.span_kind {
            SpanKind::Server => "SERVER",
            SpanKind::Client => "CLIENT",
            SpanKind::Producer => "PRODUCER",
            SpanKind::Consumer => "CONSUMER",
            SpanKind::Internal => "INTERNAL",
        },
        "trace_id": s.span_context.trace_id().to_string(),
        "span_id": s.span_context.span_id().to_string(),
        "parent_span_id": parent,
        "start_time_unix_nano": ns(s.start_time),
        "end_time_unix_nano": ns(s.end_time),
        "status": match &s.status {
            opentelemetry::trace::Status::Error { .. } => "ERROR",
            opentelemetry::trace::Status::Ok => "OK",
            opentelemetry::trace::Status::Unset => "UNSET",
        },
        "attributes": attrs(&mut s.attributes.iter().map(|kv| (kv.key.to_string(), kv.value.clone()))),
        "resource": attrs(&mut entry.resource.iter().map(|(k, v)| (k.to_string(), v.clone()))),
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    fn t(
        signal: Signal,
        p: Option<OtlpProtocol>,
        e: Option<&str>,
        vars: &[(&str, &str)],
    ) -> Target {
        resolve_target(signal, p, e, &env(vars)).0
    }

    #[test]
    fn defaults_to_http_protobuf_on_localhost() {
        let x = t(Signal::Traces, None, None, &[]);
        assert_eq!(x.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(x.explicit_endpoint, None);
        assert_eq!(x.url, "http://localhost:4318/v1/traces");
    }

    #[test]
    fn protocol_is_inferred_from_the_port() {
        let x = t(
            Signal::Traces,
            None,
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")],
        );
        assert_eq!(x.protocol, OtlpProtocol::Grpc);
        assert_eq!(x.url, "http://c:4317");
        let x = t(
            Signal::Metrics,
            None,
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")],
        );
        assert_eq!(x.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(x.url, "http://c:4318/v1/metrics");
        let x = t(Signal::Traces, None, Some("http://127.0.0.1:4317"), &[]);
        assert_eq!(x.protocol, OtlpProtocol::Grpc);
        assert_eq!(
            x.explicit_endpoint.as_deref(),
            Some("http://127.0.0.1:4317")
        );
        let x = t(Signal::Traces, None, Some("http://127.0.0.1:9999"), &[]);
        assert_eq!(x.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(
            x.explicit_endpoint.as_deref(),
            Some("http://127.0.0.1:9999/v1/traces")
        );
        // The signal's own endpoint decides for that signal.
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4317"),
        ];
        assert_eq!(
            t(Signal::Traces, None, None, &vars).protocol,
            OtlpProtocol::Grpc
        );
        assert_eq!(
            t(Signal::Metrics, None, None, &vars).protocol,
            OtlpProtocol::HttpProtobuf
        );
    }

    #[test]
    fn explicit_protocols_win() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "grpc"),
        ];
        assert_eq!(
            t(Signal::Traces, None, None, &vars).protocol,
            OtlpProtocol::HttpProtobuf
        );
        assert_eq!(
            t(Signal::Metrics, None, None, &vars).protocol,
            OtlpProtocol::Grpc
        );
        assert_eq!(
            t(
                Signal::Metrics,
                Some(OtlpProtocol::HttpProtobuf),
                None,
                &vars
            )
            .protocol,
            OtlpProtocol::HttpProtobuf
        );
        let (x, w) = resolve_target(
            Signal::Traces,
            None,
            None,
            &env(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
        );
        assert_eq!(x.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn signal_endpoints_are_used_as_is() {
        let vars = [
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:9/custom"),
        ];
        let x = t(Signal::Traces, None, None, &vars);
        assert_eq!(x.url, "http://t:9/custom");
        assert_eq!(
            x.explicit_endpoint, None,
            "the exporter reads the env itself"
        );
        assert_eq!(
            t(Signal::Metrics, None, None, &vars).url,
            "http://c:4318/v1/metrics"
        );
        // Tapir's flag overrides everything.
        let x = t(Signal::Traces, None, Some("http://f:4318/"), &vars);
        assert_eq!(x.url, "http://f:4318/v1/traces");
    }

    #[test]
    fn ports() {
        assert_eq!(port_of("http://a:4317"), Some(4317));
        assert_eq!(port_of("http://a:4317/v1/traces"), Some(4317));
        assert_eq!(port_of("a:4317"), Some(4317));
        assert_eq!(port_of("https://u:p@a:99"), Some(99));
        assert_eq!(port_of("http://[::1]:4317"), Some(4317));
        assert_eq!(port_of("http://a"), None);
        assert_eq!(port_of("http://[::1]"), None);
    }

    #[test]
    fn protocol_names() {
        assert_eq!("grpc".parse(), Ok(OtlpProtocol::Grpc));
        assert_eq!("http/protobuf".parse(), Ok(OtlpProtocol::HttpProtobuf));
        assert!("http/json".parse::<OtlpProtocol>().is_err());
        assert_eq!(OtlpProtocol::HttpProtobuf.to_string(), "http/protobuf");
    }
}
