//! `/metrics` in the Prometheus text exposition format (0.0.4), rendered from the same
//! OTLP messages the registry builds for export (its cumulative view), and a tiny HTTP
//! server for it.
use std::{collections::BTreeMap, fmt::Write as _, sync::Arc, thread};

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{any_value, AnyValue, KeyValue},
    metrics::v1::{metric, number_data_point, Metric, NumberDataPoint},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
};

use super::metrics::Registry;

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
        "ns" => "_nanoseconds",
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

fn value_str(v: Option<&AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::ArrayValue(a)) => {
            let items: Vec<String> = a.values.iter().map(|v| value_str(Some(v))).collect();
            format!("[{}]", items.join(","))
        }
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn labels(base: &[(String, String)], attrs: &[KeyValue], extra: Option<(&str, String)>) -> String {
    let mut pairs: Vec<(String, String)> = base.to_vec();
    pairs.extend(
        attrs
            .iter()
            .map(|kv| (sanitize(&kv.key), value_str(kv.value.as_ref()))),
    );
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

fn number(p: &NumberDataPoint) -> String {
    match p.value {
        Some(number_data_point::Value::AsInt(i)) => i.to_string(),
        Some(number_data_point::Value::AsDouble(d)) => num(d),
        None => "NaN".into(),
    }
}

/// The family of a metric (created on first use): its name and sample lines.
fn family<'a>(
    fams: &'a mut BTreeMap<String, Family>,
    m: &Metric,
    kind: &'static str,
    counter: bool,
) -> (String, &'a mut Vec<String>) {
    let n = metric_name(&m.name, &m.unit, counter);
    let f = fams.entry(n.clone()).or_insert_with(|| Family {
        kind,
        help: m.description.clone(),
        lines: Vec::new(),
    });
    (n, &mut f.lines)
}

/// Renders the registry's cumulative view as one exposition: each family once, every
/// series labelled with its process's `service_name` and `service_instance_id`.
pub fn render(req: &ExportMetricsServiceRequest) -> String {
    let mut fams: BTreeMap<String, Family> = BTreeMap::new();
    for rm in &req.resource_metrics {
        let res: &[KeyValue] = rm.resource.as_ref().map_or(&[], |r| &r.attributes);
        let get = |k: &str| {
            res.iter()
                .find(|kv| kv.key == k)
                .map(|kv| value_str(kv.value.as_ref()))
        };
        let mut base = vec![(
            "service_name".to_string(),
            get("service.name").unwrap_or_default(),
        )];
        if let Some(id) = get("service.instance.id") {
            base.push(("service_instance_id".to_string(), id));
        }
        for m in rm.scope_metrics.iter().flat_map(|s| &s.metrics) {
            match &m.data {
                Some(metric::Data::Sum(s)) => {
                    let counter = s.is_monotonic;
                    let (n, lines) = family(
                        &mut fams,
                        m,
                        if counter { "counter" } else { "gauge" },
                        counter,
                    );
                    for p in &s.data_points {
                        lines.push(format!(
                            "{n}{} {}",
                            labels(&base, &p.attributes, None),
                            number(p)
                        ));
                    }
                }
                Some(metric::Data::Gauge(g)) => {
                    let (n, lines) = family(&mut fams, m, "gauge", false);
                    for p in &g.data_points {
                        lines.push(format!(
                            "{n}{} {}",
                            labels(&base, &p.attributes, None),
                            number(p)
                        ));
                    }
                }
                Some(metric::Data::Histogram(h)) => {
                    let (n, lines) = family(&mut fams, m, "histogram", false);
                    for p in &h.data_points {
                        let mut cum = 0u64;
                        for (i, b) in p.explicit_bounds.iter().enumerate() {
                            cum += p.bucket_counts.get(i).copied().unwrap_or(0);
                            lines.push(format!(
                                "{n}_bucket{} {cum}",
                                labels(&base, &p.attributes, Some(("le", num(b))))
                            ));
                        }
                        lines.push(format!(
                            "{n}_bucket{} {}",
                            labels(&base, &p.attributes, Some(("le", "+Inf".to_string()))),
                            p.count
                        ));
                        lines.push(format!(
                            "{n}_sum{} {}",
                            labels(&base, &p.attributes, None),
                            num(p.sum.unwrap_or(0.0))
                        ));
                        lines.push(format!(
                            "{n}_count{} {}",
                            labels(&base, &p.attributes, None),
                            p.count
                        ));
                    }
                }
                _ => {}
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

/// The `/metrics` endpoint, served from a thread of its own at normal priority. The export
/// runtime's worker runs idle-class while it keeps up ([`super::yielding`]); scrapes served
/// there waited behind the services for the CPU, 1–17 ms at saturation instead of 1–9.
/// This thread sleeps between scrapes and costs nothing then.
pub struct Server {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Server {
    /// Listens on `port` of every address (IPv6 and IPv4, or IPv4 alone where IPv6 is off).
    pub fn bind(port: u16) -> std::io::Result<std::net::TcpListener> {
        std::net::TcpListener::bind(("::", port))
            .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", port)))
    }

    /// Serves `GET /metrics` on `listener` until [`Server::stop`].
    pub fn start(
        listener: std::net::TcpListener,
        registry: Arc<Registry>,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let thread = thread::Builder::new()
            .name("tapir-metrics".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::warn!("the Prometheus endpoint stopped: {e}");
                            return;
                        }
                    };
                    tokio::select! {
                        _ = serve(listener, registry) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Stops serving; a scrape in progress is cut.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Serves `GET /metrics` on `listener`, each connection a task of the calling runtime.
async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        match listener.accept().await {
            Ok((sock, _)) => {
                tokio::spawn(answer(sock, registry.clone()));
            }
            // Out of file descriptors, most likely: wait for some to close rather than
            // spin on a normal-priority thread.
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
}

/// Reads one request head (bounded in size and time) and answers it; the body, if any, is
/// ignored.
async fn answer(mut sock: tokio::net::TcpStream, registry: Arc<Registry>) {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
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
    let (status, ctype, body) = if (method == "GET" || method == "HEAD") && path == "/metrics" {
        // Rendered on this thread: scrapes are rare, and one at a time is plenty.
        let text = render(&registry.peek());
        // The snapshot (thousands of small blocks after a burst of processes) was freed
        // into this thread's arena.
        crate::heap::trim();
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        http::ExchangeRole,
        otel::{
            metrics::{AgentSources, Registry, RegistryConfig, Temporality},
            span::tests::exchange,
        },
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
        assert_eq!(
            metric_name("tapir.ebpf.program.run_time", "ns", true),
            "tapir_ebpf_program_run_time_nanoseconds_total"
        );
        // Annotations ({run}) are not units: no suffix.
        assert_eq!(
            metric_name("tapir.ebpf.program.runs", "{run}", true),
            "tapir_ebpf_program_runs_total"
        );
    }

    /// Sends `request` to the server on `port` and reads the whole answer.
    fn ask(port: u16, request: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn the_server_answers_on_its_own_thread_until_stopped() {
        let capture = Arc::new(Stats::default());
        let r = Arc::new(Registry::new(
            RegistryConfig::for_tests(8, Temporality::Cumulative),
            AgentSources {
                capture,
                ..AgentSources::default()
            },
        ));
        let ex = exchange(ExchangeRole::Server, "GET", "/users/1", 200);
        r.record(&r.entry(&ex.process), &ex, Some("/users/*"));
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        // No tokio runtime around: the server brings its own.
        let server = Server::start(listener, r).unwrap();
        let ok = ask(port, "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(
            ok.contains("http_server_request_duration_seconds_count{"),
            "{ok}"
        );
        let head = ask(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n") && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        let missing = ask(port, "GET /other HTTP/1.1\r\n\r\n");
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        // A client that never finishes its head does not hold up the others.
        let mut idle = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        std::io::Write::write_all(&mut idle, b"GET /metrics HTTP/1.1\r\n").unwrap();
        assert!(ask(port, "GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200"));
        server.stop();
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "still listening after stop"
        );
    }

    #[test]
    fn renders_histograms_and_counters() {
        let capture = Arc::new(Stats::default());
        Stats::inc(&capture.exchanges);
        let r = Registry::new(
            RegistryConfig::for_tests(8, Temporality::Cumulative),
            AgentSources {
                capture,
                ..AgentSources::default()
            },
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

    fn registry(t: Temporality) -> Registry {
        Registry::new(
            RegistryConfig::for_tests(8, t),
            AgentSources {
                queue_len: Arc::new(|| 3),
                ..AgentSources::default()
            },
        )
    }

    fn sample<'a>(text: &'a str, prefix: &str, has: &[&str]) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.starts_with(prefix) && has.iter().all(|h| l.contains(h)))
            .collect()
    }

    #[test]
    fn renders_every_family_once_with_help_and_labels() {
        let r = registry(Temporality::Cumulative);
        for pid in [1, 2] {
            let mut ex = exchange(ExchangeRole::Server, "GET", "/a", 200);
            Arc::make_mut(&mut ex.process).pid = pid;
            let e = r.entry(&ex.process);
            r.record(&e, &ex, Some("/a"));
            r.record(&e, &ex, Some("/a"));
            let cl = exchange(ExchangeRole::Client, "PUT", "/b", 503);
            r.record(&e, &cl, None);
        }
        let text = render(&r.peek());
        for (family, kind) in [
            ("http_server_request_duration_seconds", "histogram"),
            ("http_server_request_body_size_bytes", "histogram"),
            ("http_server_response_body_size_bytes", "histogram"),
            ("http_client_request_duration_seconds", "histogram"),
            ("http_client_request_body_size_bytes", "histogram"),
            ("http_client_response_body_size_bytes", "histogram"),
            ("tapir_exchanges_total", "counter"),
            ("tapir_spans_dropped_total", "counter"),
            ("tapir_spans_queued", "gauge"),
            ("tapir_connections_tracked", "gauge"),
        ] {
            let t = format!("# TYPE {family} {kind}");
            assert_eq!(text.matches(&format!("{t}\n")).count(), 1, "{t}\n{text}");
        }
        assert!(text.contains(
            "# HELP http_server_request_duration_seconds Duration of HTTP server requests.\n"
        ));
        let sums = sample(
            &text,
            "http_server_response_body_size_bytes_sum{",
            &["http_route=\"/a\""],
        );
        assert_eq!(sums.len(), 2, "one per process");
        assert!(sums.iter().all(|l| l.ends_with(" 40")), "{sums:?}");
        assert!(sums
            .iter()
            .any(|l| l.contains("service_instance_id=\"h:1\"")));
        let dur = sample(&text, "http_server_request_duration_seconds_sum{", &[]);
        assert!(dur.iter().all(|l| l.ends_with(" 0.5")), "{dur:?}");
        let client = sample(
            &text,
            "http_client_request_duration_seconds_count{",
            &[
                "http_request_method=\"PUT\"",
                "http_response_status_code=\"503\"",
                "error_type=\"503\"",
                "server_address=\"api.example.com\"",
                "server_port=\"8080\"",
            ],
        );
        assert_eq!(client.len(), 2, "{text}");
        assert!(client.iter().all(|l| l.ends_with(" 1")));
        let dropped = sample(
            &text,
            "tapir_spans_dropped_total{",
            &["reason=\"export_queue_full\""],
        );
        assert_eq!(dropped.len(), 1);
        assert!(dropped[0].starts_with(
            "tapir_spans_dropped_total{service_name=\"tapir\",service_instance_id=\"h:"
        ));
        assert!(sample(&text, "tapir_spans_queued{", &[])[0].ends_with(" 3"));
        // Size buckets: 20-byte responses are in (0, 32]: le="0" 0, le="32" all.
        let b = |le: &str| {
            sample(
                &text,
                "http_server_response_body_size_bytes_bucket{",
                &["service_instance_id=\"h:1\"", &format!("le=\"{le}\"")],
            )[0]
            .to_string()
        };
        assert!(b("0").ends_with(" 0"), "{}", b("0"));
        assert!(b("32").ends_with(" 2"), "{}", b("32"));
        assert!(b("1048576").ends_with(" 2"));
    }

    #[test]
    fn delta_export_leaves_the_exposition_cumulative() {
        let r = registry(Temporality::Delta);
        let ex = exchange(ExchangeRole::Server, "GET", "/a", 200);
        let e = r.entry(&ex.process);
        let count = |r: &Registry| {
            sample(
                &render(&r.peek()),
                "http_server_request_duration_seconds_count{",
                &[],
            )[0]
            .to_string()
        };
        r.record(&e, &ex, Some("/a"));
        assert!(r.collect().is_some());
        r.acknowledge(usize::MAX);
        r.record(&e, &ex, Some("/a"));
        assert!(count(&r).ends_with(" 2"), "{}", count(&r));
        assert!(r.collect().is_some());
        r.acknowledge(usize::MAX);
        assert!(count(&r).ends_with(" 2"), "{}", count(&r));
    }
}
