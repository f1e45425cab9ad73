//! `/metrics` in the Prometheus text exposition format (0.0.4), rendered from the same
//! collections that go to OTLP, and a tiny HTTP server for it.
use std::{collections::BTreeMap, fmt::Write as _, sync::Arc};

use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::{metrics::Registry, resource::resource_service_name};

/// One metric family: its type line, help and samples.
#[derive(Default)]
struct Family {
    kind: &'static str,
    help: String,
    lines: Vec<String>,
}

/// `http.server.request.duration` + `s` → `http_server_request_duration_seconds`.
pub fn metric_name(name: &str, unit: &str, counter: bool) -> String {
    let mut n = sanitize(name);
    let suffix = match unit {
        "s" => "_seconds",
        "ms" => "_milliseconds",
        "By" => "_bytes",
        _ => "",
    };
    if !suffix.is_empty() && !n.ends_with(suffix) {
        n.push_str(suffix);
    }
    if counter && !n.ends_with("_total") {
        n.push_str("_total");
    }
    n
}

fn sanitize(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with(|c: char| c.is_ascii_digit()) || out.is_empty() {
        out.insert(0, '_');
    }
    out
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn value_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.to_string(),
        other => other.to_string(),
    }
}

fn labels<'a>(
    base: &[(String, String)],
    attrs: impl Iterator<Item = &'a KeyValue>,
    extra: Option<(&str, String)>,
) -> String {
    let mut pairs: Vec<(String, String)> = base.to_vec();
    pairs.extend(attrs.map(|kv| (sanitize(kv.key.as_str()), value_str(&kv.value))));
    if let Some((k, v)) = extra {
        pairs.push((k.to_string(), v));
    }
    if pairs.is_empty() {
        return String::new();
    }
    let body: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    format!("{{{}}}", body.join(","))
}

fn num<T: ToString>(v: T) -> String {
    let s = v.to_string();
    match s.as_str() {
        "inf" => "+Inf".into(),
        "-inf" => "-Inf".into(),
        "NaN" => "NaN".into(),
        _ => s,
    }
}

macro_rules! render_data {
    ($fams:expr, $name:expr, $unit:expr, $desc:expr, $base:expr, $data:expr) => {
        match $data {
            MetricData::Sum(s) => {
                let counter = s.is_monotonic();
                let n = metric_name($name, $unit, counter);
                let f = $fams.entry(n.clone()).or_insert_with(|| Family {
                    kind: if counter { "counter" } else { "gauge" },
                    help: $desc.to_string(),
                    lines: Vec::new(),
                });
                for p in s.data_points() {
                    f.lines.push(format!(
                        "{n}{} {}",
                        labels($base, p.attributes(), None),
                        num(p.value())
                    ));
                }
            }
            MetricData::Gauge(g) => {
                let n = metric_name($name, $unit, false);
                let f = $fams.entry(n.clone()).or_insert_with(|| Family {
                    kind: "gauge",
                    help: $desc.to_string(),
                    lines: Vec::new(),
                });
                for p in g.data_points() {
                    f.lines.push(format!(
                        "{n}{} {}",
                        labels($base, p.attributes(), None),
                        num(p.value())
                    ));
                }
            }
            MetricData::Histogram(h) => {
                let n = metric_name($name, $unit, false);
                let f = $fams.entry(n.clone()).or_insert_with(|| Family {
                    kind: "histogram",
                    help: $desc.to_string(),
                    lines: Vec::new(),
                });
                for p in h.data_points() {
                    let mut cum = 0u64;
                    let counts: Vec<u64> = p.bucket_counts().collect();
                    for (i, b) in p.bounds().enumerate() {
                        cum += counts.get(i).copied().unwrap_or(0);
                        f.lines.push(format!(
                            "{n}_bucket{} {cum}",
                            labels($base, p.attributes(), Some(("le", num(b))))
                        ));
                    }
                    f.lines.push(format!(
                        "{n}_bucket{} {}",
                        labels($base, p.attributes(), Some(("le", "+Inf".to_string()))),
                        p.count()
                    ));
                    f.lines.push(format!(
                        "{n}_sum{} {}",
                        labels($base, p.attributes(), None),
                        num(p.sum())
                    ));
                    f.lines.push(format!(
                        "{n}_count{} {}",
                        labels($base, p.attributes(), None),
                        p.count()
                    ));
                }
            }
            MetricData::ExponentialHistogram(_) => {}
        }
    };
}

/// Renders collections as one exposition: each family once, every series labelled with
/// its process's `service_name` and `service_instance_id`.
pub fn render(rms: &[ResourceMetrics]) -> String {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for rm in rms {
        let res = rm.resource();
        let mut base = vec![("service_name".to_string(), resource_service_name(res))];
        if let Some(id) = res.get(&opentelemetry::Key::from_static_str("service.instance.id")) {
            base.push(("service_instance_id".to_string(), value_str(&id)));
        }
        for sm in rm.scope_metrics() {
            for m in sm.metrics() {
                let (name, unit, desc) = (m.name(), m.unit(), m.description());
                match m.data() {
                    AggregatedMetrics::F64(d) => render_data!(fams, name, unit, desc, &base, d),
                    AggregatedMetrics::U64(d) => render_data!(fams, name, unit, desc, &base, d),
                    AggregatedMetrics::I64(d) => render_data!(fams, name, unit, desc, &base, d),
                }
            }
        }
    }
    let mut out = String::new();
    for (name, f) in fams {
        if !f.help.is_empty() {
            let _ = writeln!(
                out,
                "# HELP {name} {}",
                f.help.replace('\\', "\\\\").replace('\n', "\\n")
            );
        }
        let _ = writeln!(out, "# TYPE {name} {}", f.kind);
        for l in f.lines {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            // Read the request head (bounded); the body, if any, is ignored.
            let head_ok = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                loop {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => {
                            buf.extend_from_slice(&chunk[..n]);
                            if buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                return true;
                            }
                            if buf.len() > 16 * 1024 {
                                return false;
                            }
                        }
                    }
                }
            })
            .await
            .unwrap_or(false);
            if !head_ok {
                return;
            }
            let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
            let line = String::from_utf8_lossy(line);
            let mut parts = line.split_whitespace();
            let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let path = target.split('?').next().unwrap_or("");
            let (status, ctype, body) =
                if (method == "GET" || method == "HEAD") && path == "/metrics" {
                    let reg = registry.clone();
                    let text = tokio::task::spawn_blocking(move || render(&reg.peek()))
                        .await
                        .unwrap_or_default();
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", text)
                } else {
                    (
                        "404 Not Found",
                        "text/plain; charset=utf-8",
                        "not found: try /metrics\n".to_string(),
                    )
                };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            if method != "HEAD" {
                let _ = sock.write_all(body.as_bytes()).await;
            }
            let _ = sock.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        http::ExchangeRole,
        otel::{counters::OtelStats, metrics::Registry, span::tests::exchange},
        stats::Stats,
    };

    #[test]
    fn names_follow_the_otel_to_prometheus_rules() {
        assert_eq!(
            metric_name("http.server.request.duration", "s", false),
            "http_server_request_duration_seconds"
        );
        assert_eq!(
            metric_name("http.server.request.body.size", "By", false),
            "http_server_request_body_size_bytes"
        );
        assert_eq!(
            metric_name("tapir.exchanges", "", true),
            "tapir_exchanges_total"
        );
    }

    #[test]
    fn renders_histograms_and_counters() {
        let capture = Arc::new(Stats::default());
        Stats::inc(&capture.exchanges);
        let r = Registry::new(
            8,
            true,
            "h".into(),
            None,
            capture,
            Arc::new(OtelStats::default()),
            Arc::new(|| 0),
        );
        let ex = exchange(ExchangeRole::Server, "GET", "/users/1", 200);
        let e = r.entry(&ex.process);
        r.record(&e, &ex, Some("/users/*"));
        r.record(&e, &ex, Some("/users/*"));
        let text = render(&r.peek());
        assert!(
            text.contains("# TYPE http_server_request_duration_seconds histogram"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE tapir_exchanges_total counter"),
            "{text}"
        );
        assert!(
            text.contains("tapir_exchanges_total{service_name=\"tapir\""),
            "{text}"
        );
        let count = text
            .lines()
            .find(|l| l.starts_with("http_server_request_duration_seconds_count{"))
            .unwrap();
        assert!(count.contains("service_name=\"python3\""), "{count}");
        assert!(count.contains("http_route=\"/users/*\""), "{count}");
        assert!(count.ends_with(" 2"), "{count}");
        let buckets: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("http_server_request_duration_seconds_bucket{"))
            .collect();
        assert_eq!(buckets.len(), 15);
        assert!(buckets[0].contains("le=\"0.005\""));
        assert!(buckets[14].contains("le=\"+Inf\"") && buckets[14].ends_with(" 2"));
        // 250 ms: cumulative counts reach 2 at le=0.25.
        let at = |le: &str| {
            buckets
                .iter()
                .find(|b| b.contains(&format!("le=\"{le}\"")))
                .unwrap()
                .to_string()
        };
        assert!(at("0.1").ends_with(" 0"), "{}", at("0.1"));
        assert!(at("0.25").ends_with(" 2"), "{}", at("0.25"));
        // Every sample line parses as `name{labels} value`.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let (_, v) = l.rsplit_once(' ').unwrap();
            assert!(v == "+Inf" || v.parse::<f64>().is_ok(), "{l}");
        }
    }
}
