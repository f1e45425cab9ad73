//! The OTLP protobuf messages: resources and their scope, the HTTP histograms of a
//! process's series, and collections cut into requests of bounded size.
use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue},
    metrics::v1::{
        metric, AggregationTemporality, Histogram, HistogramDataPoint, Metric, ResourceMetrics,
        ScopeMetrics,
    },
    resource::v1::Resource as ProtoResource,
};
use opentelemetry_sdk::Resource;
use opentelemetry_semantic_conventions::{attribute as sc, metric as sm};
use prost::Message as _;

use super::series::{Hist, SeriesKey, Snap, BOUNDS};
use crate::http::GrpcCall;
use crate::otel::{
    rpc,
    span::{error_type, grpc_error_type, redis_error_type, scope, ErrorType, REDIS},
};
use crate::redis::RedisCall;

/// `otel.metric.overflow`: the one attribute of an overflow series.
pub const OVERFLOW_ATTRIBUTE: &str = "otel.metric.overflow";

pub(super) fn aggregation(delta: bool) -> i32 {
    if delta {
        AggregationTemporality::Delta as i32
    } else {
        AggregationTemporality::Cumulative as i32
    }
}

pub(super) fn kv(key: &str, v: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(v) }),
        ..Default::default()
    }
}

/// A resource as OTLP carries it.
pub(super) struct OtlpResource {
    resource: ProtoResource,
    schema_url: String,
}

impl OtlpResource {
    pub(super) fn new(r: &Resource) -> Self {
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

    /// `metrics` under this resource and Tapir's instrumentation scope.
    pub(super) fn with(&self, metrics: Vec<Metric>) -> ResourceMetrics {
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

struct Instrument {
    name: &'static str,
    unit: &'static str,
    description: &'static str,
}

/// Server then client instruments, in [`Hists`](super::series::Hists) order.
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

/// A gRPC call's duration, server then client (the RPC conventions' only required
/// metric; body sizes stay with HTTP).
const RPC_INSTRUMENTS: [Instrument; 2] = [
    Instrument {
        name: sm::RPC_SERVER_CALL_DURATION,
        unit: "s",
        description: "Duration of RPCs served (gRPC).",
    },
    Instrument {
        name: sm::RPC_CLIENT_CALL_DURATION,
        unit: "s",
        description: "Duration of RPCs made (gRPC).",
    },
];

/// A database call's duration (the conventions' only required database metric; Redis
/// calls are always a client's).
const DB_INSTRUMENTS: [Instrument; 1] = [Instrument {
    name: sm::DB_CLIENT_OPERATION_DURATION,
    unit: "s",
    description: "Duration of database client operations (Redis).",
}];

/// Which conventions a series follows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Http,
    Rpc,
    Db,
}

impl Family {
    fn of(key: &SeriesKey) -> Self {
        match (key.grpc, key.redis) {
            (Some(_), _) => Self::Rpc,
            (None, Some(_)) => Self::Db,
            (None, None) => Self::Http,
        }
    }
}

/// The instruments of a series: HTTP's three, or an RPC's or a database call's duration.
fn instruments(server: bool, family: Family) -> &'static [Instrument] {
    let i = usize::from(!server);
    match family {
        Family::Http => &INSTRUMENTS[i],
        Family::Rpc => std::slice::from_ref(&RPC_INSTRUMENTS[i]),
        Family::Db => &DB_INSTRUMENTS,
    }
}

/// The attributes of a Redis call's series.
fn db_attributes(key: &SeriesKey, call: RedisCall) -> Vec<KeyValue> {
    let s = |v: &str| any_value::Value::StringValue(v.to_string());
    let mut a = Vec::with_capacity(6);
    a.push(kv(sc::DB_SYSTEM_NAME, s(REDIS)));
    if let Some(op) = &key.route {
        a.push(kv(sc::DB_OPERATION_NAME, s(op)));
    }
    if let Some(prefix) = call.error {
        a.push(kv(sc::DB_RESPONSE_STATUS_CODE, s(prefix.as_str())));
    }
    if let Some(e) = redis_error_type(key.failure, call) {
        a.push(kv(sc::ERROR_TYPE, s(&e.to_string())));
    }
    push_server_address(&mut a, key);
    a
}

/// A CLIENT series' `server.address` and `server.port`.
fn push_server_address(a: &mut Vec<KeyValue>, key: &SeriesKey) {
    if let Some((addr, port)) = &key.server_address {
        a.push(kv(
            sc::SERVER_ADDRESS,
            any_value::Value::StringValue(addr.to_string()),
        ));
        a.push(kv(
            sc::SERVER_PORT,
            any_value::Value::IntValue(i64::from(*port)),
        ));
    }
}

/// The attributes of a gRPC call's series.
fn rpc_attributes(key: &SeriesKey, call: GrpcCall) -> Vec<KeyValue> {
    let s = |v: &str| any_value::Value::StringValue(v.to_string());
    let mut a = Vec::with_capacity(6);
    a.push(kv(sc::RPC_SYSTEM_NAME, s(rpc::SYSTEM)));
    if let Some(m) = &key.route {
        a.push(kv(sc::RPC_METHOD, s(m)));
    }
    if let Some(code) = call.status {
        a.push(kv(
            sc::RPC_RESPONSE_STATUS_CODE,
            s(&ErrorType::Grpc(code).to_string()),
        ));
    }
    if let Some(e) = grpc_error_type(key.server, key.status, key.failure, call) {
        a.push(kv(sc::ERROR_TYPE, s(&e.to_string())));
    }
    push_server_address(&mut a, key);
    a
}

/// The attributes of a series, in the order and with the types an SDK-instrumented server
/// reports.
fn attributes(key: &SeriesKey) -> Vec<KeyValue> {
    if key.overflow {
        return vec![kv(OVERFLOW_ATTRIBUTE, any_value::Value::BoolValue(true))];
    }
    if let Some(call) = key.grpc {
        return rpc_attributes(key, call);
    }
    if let Some(call) = key.redis {
        return db_attributes(key, call);
    }
    let s = |v: &str| any_value::Value::StringValue(v.to_string());
    let mut a = Vec::with_capacity(8);
    a.push(kv(sc::HTTP_REQUEST_METHOD, s(key.method)));
    if key.status != 0 {
        a.push(kv(
            sc::HTTP_RESPONSE_STATUS_CODE,
            any_value::Value::IntValue(i64::from(key.status)),
        ));
    }
    if let Some(r) = &key.route {
        a.push(kv(sc::HTTP_ROUTE, s(r)));
    }
    a.push(kv(sc::URL_SCHEME, s(key.scheme)));
    a.push(kv(sc::NETWORK_PROTOCOL_VERSION, s(key.version)));
    if let Some(e) = error_type(key.server, key.status, key.failure) {
        a.push(kv(
            sc::ERROR_TYPE,
            any_value::Value::StringValue(e.to_string()),
        ));
    }
    push_server_address(&mut a, key);
    a
}

/// The HTTP histograms of a process's series (server ones, then client ones), `delta` or
/// cumulative.
pub(super) fn http_metrics(snaps: &[Snap], delta: bool, now_ns: u64) -> Vec<Metric> {
    let temporality = aggregation(delta);
    let mut metrics = Vec::with_capacity(6);
    for (server, family) in [
        (true, Family::Http),
        (false, Family::Http),
        (true, Family::Rpc),
        (false, Family::Rpc),
        (false, Family::Db),
    ] {
        let mine: Vec<&Snap> = snaps
            .iter()
            .filter(|s| s.key.server == server && Family::of(&s.key) == family)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let attrs: Vec<Vec<KeyValue>> = mine.iter().map(|s| attributes(&s.key)).collect();
        for (i, inst) in instruments(server, family).iter().enumerate() {
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
    metrics
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
    use crate::{
        http::ExchangeRole,
        otel::{
            metrics::{testutil::*, unix_now_ns, DURATION_BUCKETS, SIZE_BUCKETS},
            span::tests::{exchange, redis_exchange},
        },
    };

    /// gRPC calls are RPC durations by method and status, with gRPC's errors per end;
    /// nothing of them in the HTTP histograms.
    #[test]
    fn grpc_calls_are_rpc_durations_by_method_and_status() {
        let r = registry(16);
        let call = |role, path: &str, status: Option<u8>| {
            let mut ex = exchange(role, "POST", path, 200);
            ex.http.version = crate::http::HttpVersion::Http2;
            ex.http.grpc = Some(GrpcCall { status });
            ex
        };
        let s = ExchangeRole::Server;
        let c = ExchangeRole::Client;
        let all = [
            call(s, "/pkg.S/A", Some(0)),
            call(s, "/pkg.S/A", Some(0)),
            call(s, "/pkg.S/A", Some(5)),
            call(s, "/pkg.S/B", Some(14)),
            call(s, "/pkg.S/Nope", Some(12)),
            call(c, "/pkg.S/A", Some(5)),
        ];
        let e = r.entry(&all[0].process);
        for ex in &all {
            r.record(&e, ex, Some("/ignored"));
        }
        let req = r.collect().unwrap();
        assert_eq!(histogram_count(&req, "http.server.request.duration"), 0);
        assert_eq!(histogram_count(&req, "http.client.request.duration"), 0);
        let text = |p: &HistogramDataPoint, k: &str| match attr(&p.attributes, k) {
            Some(any_value::Value::StringValue(v)) => v.clone(),
            _ => String::new(),
        };
        let rows = |name: &str| {
            let mut rows: Vec<_> = hist_points(&req, name)
                .iter()
                .map(|p| {
                    assert_eq!(text(p, "rpc.system.name"), "grpc");
                    let row = [
                        text(p, "rpc.method"),
                        text(p, "rpc.response.status_code"),
                        text(p, "error.type"),
                    ];
                    (row, p.count)
                })
                .collect();
            rows.sort();
            rows
        };
        let row = |m: &str, st: &str, e: &str, n| ([m.into(), st.into(), e.into()], n);
        assert_eq!(
            rows("rpc.server.call.duration"),
            [
                row("_OTHER", "UNIMPLEMENTED", "UNIMPLEMENTED", 1),
                row("pkg.S/A", "NOT_FOUND", "", 1),
                row("pkg.S/A", "OK", "", 2),
                row("pkg.S/B", "UNAVAILABLE", "UNAVAILABLE", 1),
            ]
        );
        assert_eq!(
            rows("rpc.client.call.duration"),
            [row("pkg.S/A", "NOT_FOUND", "NOT_FOUND", 1)]
        );
    }

    /// Redis calls are database durations by command and error: nothing of them in the
    /// HTTP histograms.
    #[test]
    fn redis_calls_are_db_durations_by_command_and_error() {
        let r = registry(16);
        let call = redis_exchange;
        let all = [
            call("GET", None, None),
            call("GET", None, None),
            call("LPUSH", Some(b"WRONGTYPE"), None),
            call("BLPOP", None, Some(crate::http::Failure::NoResponse)),
        ];
        let e = r.entry(&all[0].process);
        for ex in &all {
            r.record(&e, ex, Some("/ignored"));
        }
        let req = r.collect().unwrap();
        assert_eq!(histogram_count(&req, "http.client.request.duration"), 0);
        let text = |p: &HistogramDataPoint, k: &str| match attr(&p.attributes, k) {
            Some(any_value::Value::StringValue(v)) => v.clone(),
            _ => String::new(),
        };
        let mut rows: Vec<_> = hist_points(&req, "db.client.operation.duration")
            .iter()
            .map(|p| {
                assert_eq!(text(p, "db.system.name"), "redis");
                assert_eq!(text(p, "server.address"), "10.0.0.1");
                assert!(attr(&p.attributes, "http.request.method").is_none());
                let row = [
                    text(p, "db.operation.name"),
                    text(p, "db.response.status_code"),
                    text(p, "error.type"),
                ];
                (row, p.count)
            })
            .collect();
        rows.sort();
        let row = |m: &str, st: &str, e: &str, n| ([m.into(), st.into(), e.into()], n);
        assert_eq!(
            rows,
            [
                row("BLPOP", "", "connection_closed", 1),
                row("GET", "", "", 2),
                row("LPUSH", "WRONGTYPE", "WRONGTYPE", 1),
            ]
        );
    }

    /// Exchanges whose connection ended first are their own series: no status code when
    /// none came, `error.type` saying why; an answered one is not merged into them.
    #[test]
    fn failed_exchanges_count_as_errors_of_their_own() {
        let r = registry(4);
        let ok = exchange(ExchangeRole::Server, "GET", "/", 200);
        let mut closed = exchange(ExchangeRole::Server, "GET", "/", 0);
        closed.http.failure = Some(crate::http::Failure::NoResponse);
        let mut cut = exchange(ExchangeRole::Server, "GET", "/", 200);
        cut.http.failure = Some(crate::http::Failure::ResponseCutShort);
        let e = r.entry(&ok.process);
        for ex in [&ok, &closed, &closed, &cut] {
            r.record(&e, ex, Some("/"));
        }
        let req = r.collect().unwrap();
        let mut series: Vec<_> = hist_points(&req, "http.server.request.duration")
            .iter()
            .map(|p| {
                let status = match attr(&p.attributes, "http.response.status_code") {
                    Some(any_value::Value::IntValue(code)) => *code,
                    _ => 0,
                };
                let error = match attr(&p.attributes, "error.type") {
                    Some(any_value::Value::StringValue(e)) => e.clone(),
                    _ => String::new(),
                };
                (status, error, p.count)
            })
            .collect();
        series.sort();
        assert_eq!(
            series,
            [
                (0, "connection_closed".to_string(), 2),
                (200, String::new(), 1),
                (200, "response_incomplete".to_string(), 1),
            ]
        );
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
    fn large_requests_are_split_between_resources() {
        let r = registry(64);
        record_one_per_process(&r, 1..=20);
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
}
