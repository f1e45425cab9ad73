//! One span per captured exchange, built after the fact as `SpanData` (the SDK's span
//! builder cannot set ids or an end time), with the stable HTTP semantic conventions.
use std::{
    borrow::Cow,
    net::IpAddr,
    sync::OnceLock,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use opentelemetry::{
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
    InstrumentationScope, KeyValue,
};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};
use opentelemetry_semantic_conventions::attribute as sc;

use super::{rpc, text::StackText, tracecontext::parse_traceparent};
use crate::exchange::CapturedExchange;
use crate::http::{Failure, GrpcCall};
use crate::redis::{ErrorPrefix, RedisCall};

/// Methods the semantic conventions know by default; others are reported as `_OTHER`.
const DEFAULT_KNOWN_METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// `OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS`, when set: the whole list of known methods
/// (the conventions make it a full override, not an addition). Set once at start-up.
static KNOWN_METHODS: OnceLock<Box<[&'static str]>> = OnceLock::new();

/// Makes `methods` the known ones for the rest of the process (first call wins). The
/// names are leaked: one short list per process.
pub fn set_known_methods(methods: &[String]) {
    let list: Box<[&'static str]> = methods
        .iter()
        .map(|m| &*Box::leak(m.clone().into_boxed_str()))
        .collect();
    let _ = KNOWN_METHODS.set(list);
}

/// `http.request.method`: the method if known, else `_OTHER` (`None` = it was known,
/// `Some(original)` = it was not).
pub fn normalize_method(method: &str) -> (&'static str, Option<&str>) {
    match KNOWN_METHODS.get() {
        Some(known) => normalize_method_in(known, method),
        None => normalize_method_in(&DEFAULT_KNOWN_METHODS, method),
    }
}

/// Method names are case-sensitive (`get` is not `GET`).
fn normalize_method_in<'m>(
    known: &[&'static str],
    method: &'m str,
) -> (&'static str, Option<&'m str>) {
    match known.iter().find(|m| **m == method) {
        Some(m) => (m, None),
        None => ("_OTHER", Some(method)),
    }
}

/// Parses `OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS`: comma-separated, case-sensitive
/// method names (HTTP tokens). Invalid entries are left out with a warning; a list with
/// no valid entry keeps the default.
pub fn parse_known_methods(value: &str) -> (Option<Vec<String>>, Vec<String>) {
    let var = "OTEL_INSTRUMENTATION_HTTP_KNOWN_METHODS";
    let mut methods: Vec<String> = Vec::new();
    let mut warnings = Vec::new();
    for m in value.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let token = m
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"\"(),/:;<=>?@[\\]{}".contains(&b));
        if !token || m.len() > 32 {
            warnings.push(format!("{var}: {m:?} is not an HTTP method name; left out"));
        } else if !methods.iter().any(|k| k == m) {
            methods.push(m.to_string());
        }
    }
    if methods.is_empty() {
        warnings.push(format!(
            "{var}={value:?} names no method; using the default list"
        ));
        return (None, warnings);
    }
    (Some(methods), warnings)
}

/// Whether the status makes the exchange an error: 5xx for a server, 4xx and 5xx for a
/// client (the semantic conventions' rule).
fn is_error(server: bool, status: u16) -> bool {
    if server {
        status >= 500
    } else {
        status >= 400
    }
}

/// `db.system.name` of Redis calls.
pub const REDIS: &str = "redis";

/// What `error.type` says of a failed exchange.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorType {
    /// An error status (the conventions' value: the code as text).
    Status(u16),
    /// The connection ended before the response did.
    Failure(Failure),
    /// A gRPC status that is an error at this end (its name as text).
    Grpc(u8),
    /// A database's error code (Redis: the error's prefix, `ERR`, `WRONGTYPE`).
    Db(ErrorPrefix),
}

/// The exchange's `error.type`, if it failed: the connection ended before the response
/// did, or its status is an error for its end.
pub fn error_type(server: bool, status: u16, failure: Option<Failure>) -> Option<ErrorType> {
    match failure {
        Some(f) => Some(ErrorType::Failure(f)),
        None => is_error(server, status).then_some(ErrorType::Status(status)),
    }
}

/// The `error.type` of a gRPC call, if it failed: the connection or the stream ended
/// before the response did, its `grpc-status` is an error for its end, or (no
/// `grpc-status`: a proxy answered) its HTTP status is.
pub fn grpc_error_type(
    server: bool,
    status: u16,
    failure: Option<Failure>,
    call: GrpcCall,
) -> Option<ErrorType> {
    if let Some(f) = failure {
        return Some(ErrorType::Failure(f));
    }
    match call.status {
        Some(code) => rpc::is_error(server, code).then_some(ErrorType::Grpc(code)),
        None => is_error(server, status).then_some(ErrorType::Status(status)),
    }
}

/// The `error.type` of a Redis call, if it failed: the connection ended before its reply
/// did, or the reply was an error (its prefix, also `db.response.status_code`).
pub fn redis_error_type(failure: Option<Failure>, call: RedisCall) -> Option<ErrorType> {
    match failure {
        Some(f) => Some(ErrorType::Failure(f)),
        None => call.error.map(ErrorType::Db),
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Status(code) => write!(f, "{code}"),
            Self::Failure(failure) => f.write_str(failure.as_str()),
            Self::Grpc(code) => f.write_str(rpc::status_text(*code).as_str()),
            Self::Db(prefix) => f.write_str(prefix.as_str()),
        }
    }
}

/// Ids the kernel chose for a span: what it saw in the request's `traceparent`, or the
/// context of the SERVER span the same thread is handling, or new ids; for CLIENT spans,
/// the ids it put on the wire. They must win so that traces link up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    /// What the sampler should take as the parent's decision (`None`: decide as a root).
    pub parent_sampled: Option<bool>,
    pub parent_is_remote: bool,
    /// The ids came from the request's own `traceparent`: its `tracestate` belongs to them.
    pub from_header: bool,
}

/// The kernel-given ids of an exchange, if it has valid ones.
///
/// Sampling: a parent from a `traceparent` header decides by its sampled flag. A parent
/// that is the thread's SERVER span (a local parent) was sampled by Tapir itself: its
/// kernel flags only say "not sampled" reliably (from its own header), so a cleared flag
/// drops the child and a set one lets the root rule decide (deterministic per trace id,
/// hence the same decision as that SERVER span when it was a root).
pub fn kernel_ids(ex: &CapturedExchange) -> Option<KernelIds> {
    use agent_common::{ORIGIN_HEADER, ORIGIN_THREAD, TRACE_NONE, TRACE_SERVER};
    let t = ex.trace.as_ref()?;
    let trace_id = TraceId::from_bytes(t.trace_id);
    let span_id = SpanId::from_bytes(t.span_id);
    if t.kind == TRACE_NONE || trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
        return None;
    }
    let parent = SpanId::from_bytes(t.parent_span_id);
    let parent_span_id = (t.has_parent != 0 && parent != SpanId::INVALID).then_some(parent);
    let sampled = t.flags & 1 == 1;
    let from_header = t.origin == ORIGIN_HEADER;
    let parent_sampled = if from_header {
        // A SERVER's remote caller, or a CLIENT whose caller chose its ids itself: the
        // caller's decision.
        Some(sampled)
    } else if t.origin == ORIGIN_THREAD && parent_span_id.is_some() {
        (!sampled).then_some(false)
    } else {
        None
    };
    Some(KernelIds {
        trace_id,
        span_id,
        parent_span_id,
        parent_sampled,
        parent_is_remote: from_header && t.kind == TRACE_SERVER,
        from_header,
    })
}

/// The ids of one span and what the sampler needs to know about its parent.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanIds {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// `SpanId::INVALID` for a root span.
    pub parent_span_id: SpanId,
    /// The parent's sampled flag as the sampler should use it; `None`: decide as a root.
    pub parent_sampled: Option<bool>,
    pub parent_is_remote: bool,
    pub trace_state: TraceState,
}

fn trace_state_of(ex: &CapturedExchange) -> TraceState {
    ex.http
        .tracestate
        .as_deref()
        .and_then(|s| s.trim().parse::<TraceState>().ok())
        .unwrap_or(TraceState::NONE)
}

/// Chooses the ids of an exchange's span: kernel-given ids when there are some (see
/// [`kernel_ids`]); else, for a SERVER, the trace of a valid incoming `traceparent` (its
/// span becomes our parent, its `tracestate` is kept), for a CLIENT the ids of the
/// `traceparent` it sent; else a new trace. The span id is new unless the kernel or the
/// CLIENT's header gave one.
pub fn span_context_for(ex: &CapturedExchange, kernel: Option<KernelIds>) -> SpanIds {
    if let Some(k) = kernel {
        return SpanIds {
            trace_id: k.trace_id,
            span_id: k.span_id,
            parent_span_id: k.parent_span_id.unwrap_or(SpanId::INVALID),
            parent_sampled: k.parent_sampled,
            parent_is_remote: k.parent_is_remote,
            trace_state: if k.from_header {
                trace_state_of(ex)
            } else {
                TraceState::NONE
            },
        };
    }
    let ids = RandomIdGenerator::default();
    let span_id = new_span_id(&ids);
    match ex.http.traceparent.as_deref().and_then(parse_traceparent) {
        // A caller that wrote its own context names its own call with it: those are the
        // CLIENT span's ids, as the kernel takes them for HTTP/1.x (the peer's SERVER
        // span becomes their child).
        Some(tp) if !ex.is_server() => SpanIds {
            trace_id: tp.trace_id,
            span_id: tp.span_id,
            parent_span_id: SpanId::INVALID,
            parent_sampled: Some(tp.sampled),
            parent_is_remote: false,
            trace_state: trace_state_of(ex),
        },
        Some(tp) => SpanIds {
            trace_id: tp.trace_id,
            span_id,
            parent_span_id: tp.span_id,
            parent_sampled: Some(tp.sampled),
            parent_is_remote: true,
            trace_state: trace_state_of(ex),
        },
        None => SpanIds {
            trace_id: new_trace_id(&ids),
            span_id,
            parent_span_id: SpanId::INVALID,
            parent_sampled: None,
            parent_is_remote: false,
            trace_state: TraceState::NONE,
        },
    }
}

/// A fresh span id, in wire order (for ids the agent derives from the kernel's).
pub fn random_span_id() -> [u8; 8] {
    new_span_id(&RandomIdGenerator::default()).to_bytes()
}

fn new_span_id(g: &RandomIdGenerator) -> SpanId {
    loop {
        let id = g.new_span_id();
        if id != SpanId::INVALID {
            return id;
        }
    }
}

fn new_trace_id(g: &RandomIdGenerator) -> TraceId {
    loop {
        let id = g.new_trace_id();
        if id != TraceId::INVALID {
            return id;
        }
    }
}

/// The instrumentation scope of every span and metric Tapir makes.
pub fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("tapir")
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

/// Host and optional port of a `Host` header value (`name`, `name:port`, `[v6]:port`);
/// `None` when it does not look like one.
pub fn parse_host(host: &str) -> Option<(String, Option<u16>)> {
    parse_host_ref(host).map(|(h, p)| (h.to_string(), p))
}

/// [`parse_host`] without allocating: the host is a slice of `host`.
pub fn parse_host_ref(host: &str) -> Option<(&str, Option<u16>)> {
    // Every exchange of a client comes here: one pass for the usual Host (visible ASCII,
    // no '/'), which has nothing to trim or reject.
    let b = host.as_bytes();
    if (1..=255).contains(&b.len()) && b.iter().all(|&c| (0x21..0x7f).contains(&c) && c != b'/') {
        return split_host_port(host);
    }
    parse_host_general(host)
}

/// [`parse_host_ref`] for any input: trims, and rejects whitespace or '/' inside.
fn parse_host_general(host: &str) -> Option<(&str, Option<u16>)> {
    let h = host.trim();
    if h.is_empty() || h.len() > 255 {
        return None;
    }
    // Byte-wise for ASCII; `char` decoding only for the rare non-ASCII Host. ASCII
    // whitespace as `char::is_whitespace` has it.
    let rejected = if h.is_ascii() {
        h.bytes()
            .any(|b| b.is_ascii_whitespace() || b == 0x0b || b == b'/')
    } else {
        h.contains(|c: char| c.is_whitespace() || c == '/')
    };
    if rejected {
        return None;
    }
    split_host_port(h)
}

/// `name`, `name:port` or `[v6]:port`, already trimmed and free of whitespace and '/'.
fn split_host_port(h: &str) -> Option<(&str, Option<u16>)> {
    if let Some(rest) = h.strip_prefix('[') {
        let (addr, after) = rest.split_once(']')?;
        addr.parse::<std::net::Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':')?.parse().ok()?),
        };
        return Some((addr, port));
    }
    let colon = h.bytes().rposition(|b| b == b':');
    match colon.map(|at| {
        (
            h.get(..at).unwrap_or_default(),
            h.get(at + 1..).unwrap_or_default(),
        )
    }) {
        Some((name, port)) if !name.bytes().any(|b| b == b':') => {
            Some((name, Some(port.parse().ok()?)))
        }
        Some(_) => None, // a bare IPv6 address is not a valid Host
        None => Some((h, None)),
    }
}

fn ip_string(ip: IpAddr) -> String {
    ip.to_string()
}

/// The (address, port) reported as `server.address`/`server.port`: for a SERVER span the
/// local socket address (what the server bound); for a CLIENT span the request's `Host`
/// (the logical server name, as an SDK reports it), else the peer's address.
pub fn server_address(ex: &CapturedExchange) -> (String, u16) {
    let mut buf = StackText::empty();
    let (a, p) = server_address_in(ex, &mut buf);
    (a.to_string(), p)
}

/// [`server_address`] without allocating: a slice of the `Host` header, or the address
/// formatted into `buf`.
pub fn server_address_in<'a>(ex: &'a CapturedExchange, buf: &'a mut StackText) -> (&'a str, u16) {
    let (server, _) = ex.server_client();
    if !ex.is_server() {
        if let Some((name, port)) = ex.http.host.as_deref().and_then(parse_host_ref) {
            return (name, port.unwrap_or(server.1));
        }
    }
    *buf = StackText::ip(server.0);
    (buf.as_str(), server.1)
}

/// Appends the start of a CLIENT span's `url.full` (required by the HTTP client
/// conventions) to `url`: `http://`, server.address (bracketed when it is an IPv6
/// literal), then `:port` unless it is 80. [`url_full_path`] follows it.
pub fn url_full_prefix(url: &mut String, scheme: &str, addr: &str, port: u16) {
    let v6 = addr.contains(':');
    url.push_str(scheme);
    url.push_str(if v6 { "://[" } else { "://" });
    url.push_str(addr);
    if v6 {
        url.push(']');
    }
    let default_port = if scheme == "https" { 443 } else { 80 };
    if port != default_port {
        url.push(':');
        url.push_str(StackText::decimal(port).as_str());
    }
}

/// The rest of `url.full` after [`url_full_prefix`]: the path, never the query (privacy
/// by default, as for `url.path`). `*` (OPTIONS) is no path of this URL.
pub fn url_full_path(path: &str) -> &str {
    if path.starts_with('/') {
        path
    } else {
        ""
    }
}

fn unix_ns(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

/// The span of an exchange. `route` is its `http.route` (when known it also names the
/// span: `GET /users/*`).
pub fn build_span(
    ex: &CapturedExchange,
    ids: &SpanIds,
    route: Option<&str>,
    scope: &InstrumentationScope,
) -> SpanData {
    let server = ex.is_server();
    let http = &ex.http;
    let mut attrs = Vec::with_capacity(16);
    if let Some(call) = http.redis {
        // A database span: named by the command.
        attrs.push(KeyValue::new(sc::DB_SYSTEM_NAME, REDIS));
        attrs.push(KeyValue::new(
            sc::DB_OPERATION_NAME,
            http.method.to_string(),
        ));
        if let Some(prefix) = call.error {
            attrs.push(KeyValue::new(
                sc::DB_RESPONSE_STATUS_CODE,
                prefix.as_str().to_string(),
            ));
        }
        return finish_span(
            ex,
            ids,
            http.method.to_string(),
            attrs,
            redis_error_type(http.failure, call),
            scope,
        );
    }
    if let Some(call) = http.grpc {
        // An RPC span: `rpc.*` in place of the HTTP request's attributes.
        let (rpc_method, rpc_original) = rpc::method(http, call);
        attrs.push(KeyValue::new(sc::RPC_SYSTEM_NAME, rpc::SYSTEM));
        attrs.push(KeyValue::new(sc::RPC_METHOD, rpc_method.to_string()));
        if let Some(o) = rpc_original {
            attrs.push(KeyValue::new(sc::RPC_METHOD_ORIGINAL, o.to_string()));
        }
        if let Some(code) = call.status {
            attrs.push(KeyValue::new(
                sc::RPC_RESPONSE_STATUS_CODE,
                ErrorType::Grpc(code).to_string(),
            ));
        }
        return finish_span(
            ex,
            ids,
            rpc_method.to_string(),
            attrs,
            grpc_error_type(server, http.status, http.failure, call),
            scope,
        );
    }
    let (method, original) = normalize_method(&http.method);
    attrs.push(KeyValue::new(sc::HTTP_REQUEST_METHOD, method));
    if let Some(o) = original {
        attrs.push(KeyValue::new(
            sc::HTTP_REQUEST_METHOD_ORIGINAL,
            o.to_string(),
        ));
    }
    // The conventions' defaults (their Opt-In attributes are left out): a SERVER reports
    // path, scheme, its client and the user agent; a CLIENT the full URL.
    if server {
        attrs.push(KeyValue::new(sc::URL_PATH, http.path.to_string()));
        attrs.push(KeyValue::new(sc::URL_SCHEME, ex.scheme()));
    } else {
        let (srv_addr, srv_port) = server_address(ex);
        let mut full = String::new();
        url_full_prefix(&mut full, ex.scheme(), &srv_addr, srv_port);
        full.push_str(url_full_path(&http.path));
        attrs.push(KeyValue::new(sc::URL_FULL, full));
    }
    if http.status != 0 {
        attrs.push(KeyValue::new(
            sc::HTTP_RESPONSE_STATUS_CODE,
            i64::from(http.status),
        ));
    }
    if let Some(r) = route {
        attrs.push(KeyValue::new(sc::HTTP_ROUTE, r.to_string()));
    }
    // The conventions name spans of unknown methods "HTTP".
    let name_method = if original.is_some() { "HTTP" } else { method };
    let name = match route {
        Some(r) => format!("{name_method} {r}"),
        None => name_method.to_string(),
    };
    let error_type = error_type(server, http.status, http.failure);
    finish_span(ex, ids, name, attrs, error_type, scope)
}

/// The rest of [`build_span`]: the connection's attributes, the error, the span itself.
fn finish_span(
    ex: &CapturedExchange,
    ids: &SpanIds,
    name: String,
    mut attrs: Vec<KeyValue>,
    error_type: Option<ErrorType>,
    scope: &InstrumentationScope,
) -> SpanData {
    let server = ex.is_server();
    let http = &ex.http;
    let (srv_addr, srv_port) = server_address(ex);
    let peer = ex.endpoints.remote;
    attrs.push(KeyValue::new(sc::SERVER_ADDRESS, srv_addr));
    attrs.push(KeyValue::new(sc::SERVER_PORT, i64::from(srv_port)));
    if server {
        attrs.push(KeyValue::new(sc::CLIENT_ADDRESS, ip_string(peer.0)));
    }
    attrs.push(KeyValue::new(sc::NETWORK_PEER_ADDRESS, ip_string(peer.0)));
    attrs.push(KeyValue::new(sc::NETWORK_PEER_PORT, i64::from(peer.1)));
    if http.redis.is_none() {
        attrs.push(KeyValue::new(
            sc::NETWORK_PROTOCOL_VERSION,
            http.version.as_str(),
        ));
    }
    if let Some(ua) = http.user_agent.as_ref().filter(|_| server) {
        attrs.push(KeyValue::new(sc::USER_AGENT_ORIGINAL, ua.to_string()));
    }
    let error = error_type.is_some();
    if let Some(e) = error_type {
        attrs.push(KeyValue::new(sc::ERROR_TYPE, e.to_string()));
    }
    SpanData {
        span_context: SpanContext::new(
            ids.trace_id,
            ids.span_id,
            TraceFlags::SAMPLED,
            false,
            ids.trace_state.clone(),
        ),
        parent_span_id: ids.parent_span_id,
        parent_span_is_remote: ids.parent_is_remote,
        span_kind: if server {
            SpanKind::Server
        } else {
            SpanKind::Client
        },
        name: Cow::Owned(name),
        start_time: unix_ns(ex.start_unix_ns),
        end_time: unix_ns(ex.end_unix_ns.max(ex.start_unix_ns)),
        attributes: attrs,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: if error {
            Status::error("")
        } else {
            Status::Unset
        },
        instrumentation_scope: scope.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{
        collections::HashMap,
        net::{IpAddr, Ipv4Addr},
        sync::Arc,
    };

    use opentelemetry::Value;

    use super::*;
    use crate::{
        http::{Exchange, ExchangeRole, HttpVersion},
        pipeline::Endpoints,
        process::ProcessInfo,
    };

    /// `Host` values that exercise server.address: name and port, IPv6, unparsable, none.
    pub(crate) const HOST_CASES: [Option<&str>; 4] = [
        Some("api.example.com:8080"),
        Some("[::1]:9"),
        Some("bad host"),
        None,
    ];

    /// A Redis call of a client to 10.0.0.1:8080: `error`, a reply's prefix.
    pub(crate) fn redis_exchange(
        op: &str,
        error: Option<&[u8]>,
        failure: Option<Failure>,
    ) -> CapturedExchange {
        let mut ex = exchange(ExchangeRole::Client, op, "", 0);
        ex.http.redis = Some(RedisCall {
            error: error.and_then(ErrorPrefix::new),
        });
        ex.http.failure = failure;
        // No Host header: server.address is the peer's address.
        ex.http.host = None;
        ex.http.user_agent = None;
        ex
    }

    pub(crate) fn exchange(
        role: ExchangeRole,
        method: &str,
        path: &str,
        status: u16,
    ) -> CapturedExchange {
        let (local, remote) = match role {
            ExchangeRole::Server => (
                (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080),
                (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 51000),
            ),
            ExchangeRole::Client => (
                (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 51000),
                (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 8080),
            ),
        };
        CapturedExchange {
            http: Exchange {
                role,
                method: method.into(),
                path: path.into(),
                query: Some("secret=1".into()),
                version: HttpVersion::Http11,
                status,
                host: Some("api.example.com:8080".into()),
                user_agent: Some("curl/8.5.0".into()),
                traceparent: None,
                tracestate: None,
                traceparent_duplicated: false,
                start_ns: 1,
                response_start_ns: 2,
                end_ns: 3,
                request_body_bytes: 10,
                response_body_bytes: 20,
                request_head_truncated: false,
                keep_alive: true,
                failure: None,
                grpc: None,
                redis: None,
            },
            process: Arc::new(ProcessInfo {
                pid: 77,
                exe_name: "python3".into(),
                ..Default::default()
            }),
            endpoints: Endpoints { local, remote },
            trace: None,
            tls: false,
            start_unix_ns: 1_700_000_000_000_000_000,
            end_unix_ns: 1_700_000_000_250_000_000,
        }
    }

    fn attrs(s: &SpanData) -> HashMap<String, Value> {
        s.attributes
            .iter()
            .map(|kv| (kv.key.to_string(), kv.value.clone()))
            .collect()
    }

    /// An expected attribute set, as `attrs` returns it.
    fn attr_map<const N: usize>(pairs: [(&str, Value); N]) -> HashMap<String, Value> {
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }

    fn s(v: &str) -> Value {
        Value::String(v.to_string().into())
    }

    fn build(ex: &CapturedExchange, route: Option<&str>) -> SpanData {
        build_span(ex, &span_context_for(ex, None), route, &scope())
    }

    #[test]
    fn server_span_has_every_attribute() {
        let ex = exchange(ExchangeRole::Server, "GET", "/users/42", 200);
        let span = build(&ex, Some("/users/*"));
        assert_eq!(span.span_kind, SpanKind::Server);
        assert_eq!(span.name, "GET /users/*");
        assert_eq!(span.status, Status::Unset);
        let a = attrs(&span);
        let want = attr_map([
            ("http.request.method", s("GET")),
            ("url.path", s("/users/42")),
            ("url.scheme", s("http")),
            ("http.response.status_code", Value::I64(200)),
            ("http.route", s("/users/*")),
            ("server.address", s("10.0.0.1")),
            ("server.port", Value::I64(8080)),
            ("client.address", s("10.0.0.2")),
            ("network.peer.address", s("10.0.0.2")),
            ("network.peer.port", Value::I64(51000)),
            ("network.protocol.version", s("1.1")),
            ("user_agent.original", s("curl/8.5.0")),
        ]);
        assert_eq!(a, want);
        assert_eq!(
            span.start_time,
            UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000)
        );
        assert_eq!(
            span.end_time.duration_since(span.start_time).unwrap(),
            Duration::from_millis(250)
        );
        assert!(span.span_context.is_sampled());
        assert_eq!(span.instrumentation_scope.name(), "tapir");
    }

    #[test]
    fn client_span_has_every_attribute() {
        let ex = exchange(ExchangeRole::Client, "POST", "/orders", 201);
        let span = build(&ex, Some("/orders"));
        assert_eq!(span.span_kind, SpanKind::Client);
        assert_eq!(span.name, "POST /orders");
        // The conventions' CLIENT attributes by default: url.full instead of path and
        // scheme; no client.* and no user agent (Opt-In or not defined for a CLIENT).
        let want = attr_map([
            ("http.request.method", s("POST")),
            ("http.response.status_code", Value::I64(201)),
            ("http.route", s("/orders")),
            // The logical server name from Host; the peer is the socket's remote end.
            ("server.address", s("api.example.com")),
            ("server.port", Value::I64(8080)),
            ("network.peer.address", s("10.0.0.1")),
            ("network.peer.port", Value::I64(8080)),
            ("network.protocol.version", s("1.1")),
            // Required on CLIENT spans; never the query (`?secret=1` in the fixture).
            ("url.full", s("http://api.example.com:8080/orders")),
        ]);
        assert_eq!(attrs(&span), want);
    }

    #[test]
    fn url_full_follows_the_server_address() {
        let mut ex = exchange(ExchangeRole::Client, "GET", "/a/b", 200);
        let mut full = |host: Option<&str>, path: &str| {
            ex.http.host = host.map(Into::into);
            ex.http.path = path.into();
            attrs(&build(&ex, None))["url.full"].as_str().into_owned()
        };
        // Port 80 is the scheme's default and left out.
        assert_eq!(
            full(Some("example.com"), "/a/b"),
            "http://example.com:8080/a/b"
        );
        assert_eq!(
            full(Some("example.com:80"), "/a/b"),
            "http://example.com/a/b"
        );
        assert_eq!(full(Some("[::1]:9000"), "/"), "http://[::1]:9000/");
        // No usable Host: the peer's address; `*` is no path.
        assert_eq!(full(None, "/x"), "http://10.0.0.1:8080/x");
        assert_eq!(full(Some("h"), "*"), "http://h:8080");
        // Over TLS the scheme is https, whose default port is 443.
        ex.tls = true;
        ex.http.path = "/a/b".into();
        let mut full = |host: &str| {
            ex.http.host = Some(host.into());
            attrs(&build(&ex, None))["url.full"].as_str().into_owned()
        };
        assert_eq!(full("example.com:443"), "https://example.com/a/b");
        assert_eq!(full("example.com:80"), "https://example.com:80/a/b");
        // Servers do not carry it, but their url.scheme.
        let mut server = exchange(ExchangeRole::Server, "GET", "/a", 200);
        assert!(!attrs(&build(&server, None)).contains_key("url.full"));
        assert_eq!(attrs(&build(&server, None))["url.scheme"].as_str(), "http");
        server.tls = true;
        assert_eq!(attrs(&build(&server, None))["url.scheme"].as_str(), "https");
    }

    #[test]
    fn client_without_host_reports_the_peer() {
        let mut ex = exchange(ExchangeRole::Client, "GET", "/", 200);
        ex.http.host = None;
        let a = attrs(&build(&ex, None));
        assert_eq!(a["server.address"], s("10.0.0.1"));
        assert_eq!(a["server.port"], Value::I64(8080));
        ex.http.host = Some("[::1]".into());
        let a = attrs(&build(&ex, None));
        assert_eq!(a["server.address"], s("::1"));
        assert_eq!(a["server.port"], Value::I64(8080));
    }

    #[test]
    fn never_exports_the_query() {
        for role in [ExchangeRole::Server, ExchangeRole::Client] {
            let span = build(&exchange(role, "GET", "/q", 200), Some("/q"));
            let blob = format!("{:?} {:?}", span.name, span.attributes);
            assert!(!blob.contains("secret"), "{blob}");
        }
    }

    #[test]
    fn error_rules() {
        for (role, status, error) in [
            (ExchangeRole::Server, 200, false),
            (ExchangeRole::Server, 404, false),
            (ExchangeRole::Server, 499, false),
            (ExchangeRole::Server, 500, true),
            (ExchangeRole::Server, 503, true),
            (ExchangeRole::Client, 302, false),
            (ExchangeRole::Client, 400, true),
            (ExchangeRole::Client, 404, true),
            (ExchangeRole::Client, 500, true),
        ] {
            let span = build(&exchange(role, "GET", "/", status), Some("/"));
            let a = attrs(&span);
            if error {
                assert_eq!(a["error.type"], s(&status.to_string()), "{role:?} {status}");
                assert!(
                    matches!(span.status, Status::Error { .. }),
                    "{role:?} {status}"
                );
            } else {
                assert!(!a.contains_key("error.type"), "{role:?} {status}");
                assert_eq!(span.status, Status::Unset, "{role:?} {status}");
            }
        }
    }

    #[test]
    fn span_name_with_and_without_route() {
        let ex = exchange(ExchangeRole::Server, "DELETE", "/x/1", 204);
        assert_eq!(build(&ex, Some("/x/{id}")).name, "DELETE /x/{id}");
        let span = build(&ex, None);
        assert_eq!(span.name, "DELETE");
        assert!(!attrs(&span).contains_key("http.route"));
    }

    #[test]
    fn unknown_methods_are_other() {
        let ex = exchange(ExchangeRole::Server, "PROPFIND", "/dav", 207);
        let span = build(&ex, Some("/dav"));
        let a = attrs(&span);
        assert_eq!(a["http.request.method"], s("_OTHER"));
        assert_eq!(a["http.request.method_original"], s("PROPFIND"));
        assert_eq!(span.name, "HTTP /dav");
        // Case matters: "get" is not GET.
        assert_eq!(normalize_method("get"), ("_OTHER", Some("get")));
        assert_eq!(normalize_method("PATCH"), ("PATCH", None));
    }

    #[test]
    fn known_methods_replace_the_default_list() {
        let (known, warnings) = parse_known_methods(" GET, PROPFIND ,,GET,MKCOL");
        assert!(warnings.is_empty(), "{warnings:?}");
        let known = known.unwrap();
        assert_eq!(known, ["GET", "PROPFIND", "MKCOL"]);
        let known: Vec<&'static str> = known
            .into_iter()
            .map(|m| &*Box::leak(m.into_boxed_str()))
            .collect();
        assert_eq!(normalize_method_in(&known, "PROPFIND"), ("PROPFIND", None));
        // A full override: POST is no longer known; case still matters.
        assert_eq!(
            normalize_method_in(&known, "POST"),
            ("_OTHER", Some("POST"))
        );
        assert_eq!(normalize_method_in(&known, "get"), ("_OTHER", Some("get")));
    }

    #[test]
    fn known_methods_left_out_when_not_tokens() {
        let (known, warnings) = parse_known_methods("GET,BAD METHOD,A(B),ÄÖ");
        assert_eq!(known.unwrap(), ["GET"]);
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        let long = "X".repeat(33);
        for value in [",", "a b", long.as_str()] {
            let (known, warnings) = parse_known_methods(value);
            assert_eq!(known, None, "{value:?}");
            assert!(!warnings.is_empty());
        }
    }

    #[test]
    fn ids_without_traceparent_are_new() {
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let a = span_context_for(&ex, None);
        let b = span_context_for(&ex, None);
        assert_ne!(a.trace_id, TraceId::INVALID);
        assert_ne!(a.span_id, SpanId::INVALID);
        assert_ne!(a.trace_id, b.trace_id);
        assert_ne!(a.span_id, b.span_id);
        assert_eq!(a.parent_span_id, SpanId::INVALID);
        assert_eq!(a.parent_sampled, None);
        let span = build_span(&ex, &a, None, &scope());
        assert_eq!(span.parent_span_id, SpanId::INVALID);
        assert!(!span.parent_span_is_remote);
    }

    #[test]
    fn ids_follow_a_valid_traceparent() {
        let mut ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        ex.http.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into());
        ex.http.tracestate = Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7".into());
        let ids = span_context_for(&ex, None);
        assert_eq!(
            ids.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            ids.parent_span_id,
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert_ne!(ids.span_id, ids.parent_span_id);
        assert_eq!(ids.parent_sampled, Some(false));
        let span = build_span(&ex, &ids, None, &scope());
        assert_eq!(span.span_context.trace_id(), ids.trace_id);
        assert_eq!(span.parent_span_id, ids.parent_span_id);
        assert!(span.parent_span_is_remote);
        assert_eq!(
            span.span_context.trace_state().get("congo"),
            Some("t61rcWkgMzE")
        );

        // A CLIENT that sent its own context: its ids are the span's.
        let mut client = ex.clone();
        client.http.role = ExchangeRole::Client;
        let ids = span_context_for(&client, None);
        assert_eq!(
            (ids.trace_id, ids.span_id, ids.parent_span_id),
            (
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                SpanId::INVALID
            )
        );
        assert_eq!(ids.parent_sampled, Some(false));
        assert!(!ids.parent_is_remote);

        // An invalid traceparent starts a new trace (and its tracestate is ignored).
        ex.http.traceparent =
            Some("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".into());
        let ids = span_context_for(&ex, None);
        assert_ne!(
            ids.trace_id,
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(ids.parent_span_id, SpanId::INVALID);
        assert_eq!(ids.trace_state, TraceState::NONE);
    }

    pub(crate) fn kernel(
        kind: u8,
        origin: u8,
        parent: Option<u64>,
        flags: u8,
    ) -> agent_common::TraceIds {
        agent_common::TraceIds {
            trace_id: 5u128.to_be_bytes(),
            span_id: 6u64.to_be_bytes(),
            parent_span_id: parent.unwrap_or(0).to_be_bytes(),
            flags,
            kind,
            origin,
            has_parent: u8::from(parent.is_some()),
            ..Default::default()
        }
    }

    #[test]
    fn kernel_ids_win() {
        use agent_common::{
            ORIGIN_HEADER, ORIGIN_NEW, ORIGIN_THREAD, TRACE_CLIENT, TRACE_NONE, TRACE_SERVER,
        };
        let mut ex = exchange(ExchangeRole::Client, "GET", "/", 200);
        ex.http.traceparent =
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into());
        ex.http.tracestate = Some("a=b".into());

        // A CLIENT request sent while the thread served a request: child of that span.
        ex.trace = Some(kernel(TRACE_CLIENT, ORIGIN_THREAD, Some(7), 1));
        let k = kernel_ids(&ex).unwrap();
        let ids = span_context_for(&ex, Some(k));
        assert_eq!(ids.trace_id, TraceId::from(5u128));
        assert_eq!(ids.span_id, SpanId::from(6u64));
        assert_eq!(ids.parent_span_id, SpanId::from(7u64));
        assert!(!ids.parent_is_remote);
        assert_eq!(
            ids.parent_sampled, None,
            "the root rule decides, like for its parent"
        );
        assert_eq!(ids.trace_state, TraceState::NONE);
        ex.trace = Some(kernel(TRACE_CLIENT, ORIGIN_THREAD, Some(7), 0));
        assert_eq!(kernel_ids(&ex).unwrap().parent_sampled, Some(false));

        // A CLIENT whose caller wrote its own traceparent: those are this span's ids.
        ex.trace = Some(kernel(TRACE_CLIENT, ORIGIN_HEADER, None, 0));
        let ids = span_context_for(&ex, kernel_ids(&ex));
        assert_eq!(ids.span_id, SpanId::from(6u64));
        assert_eq!(ids.parent_span_id, SpanId::INVALID);
        assert_eq!(ids.parent_sampled, Some(false));
        assert_eq!(ids.trace_state.get("a"), Some("b"));

        // A SERVER request with a traceparent: remote parent, its flag decides.
        let mut sv = exchange(ExchangeRole::Server, "GET", "/", 200);
        sv.trace = Some(kernel(TRACE_SERVER, ORIGIN_HEADER, Some(9), 1));
        let ids = span_context_for(&sv, kernel_ids(&sv));
        assert_eq!(ids.parent_span_id, SpanId::from(9u64));
        assert!(ids.parent_is_remote);
        assert_eq!(ids.parent_sampled, Some(true));

        // New ids: a root.
        sv.trace = Some(kernel(TRACE_SERVER, ORIGIN_NEW, None, 1));
        let ids = span_context_for(&sv, kernel_ids(&sv));
        assert_eq!(ids.parent_span_id, SpanId::INVALID);
        assert_eq!(ids.parent_sampled, None);
        let span = build_span(&sv, &ids, None, &scope());
        assert_eq!(span.span_context.span_id(), SpanId::from(6u64));

        // No usable kernel ids: Tapir chooses.
        sv.trace = Some(kernel(TRACE_NONE, ORIGIN_NEW, None, 1));
        assert_eq!(kernel_ids(&sv), None);
        let mut zero = kernel(TRACE_SERVER, ORIGIN_NEW, None, 1);
        zero.trace_id = [0; 16];
        sv.trace = Some(zero);
        assert_eq!(kernel_ids(&sv), None);
        sv.trace = None;
        assert_eq!(kernel_ids(&sv), None);
    }

    proptest::proptest! {
        #[test]
        fn host_fast_path_agrees_with_the_general_one(
            host in "[a-z0-9.:\\[\\] /\t\u{0}-\u{1f}\u{7f}é\u{a0}]{0,24}"
        ) {
            proptest::prop_assert_eq!(parse_host_ref(&host), parse_host_general(&host));
        }
    }

    #[test]
    fn host_header_parsing() {
        assert_eq!(parse_host("a.b:81"), Some(("a.b".into(), Some(81))));
        assert_eq!(parse_host("a.b"), Some(("a.b".into(), None)));
        assert_eq!(parse_host("[::1]:8080"), Some(("::1".into(), Some(8080))));
        assert_eq!(parse_host("a.b:x"), None);
        assert_eq!(parse_host("::1"), None);
        assert_eq!(parse_host("a b"), None);
        assert_eq!(parse_host(""), None);
        // Inside the name, any character `char::is_whitespace` calls whitespace, or a '/',
        // rejects the Host: every ASCII one, and non-ASCII ones (the slow path).
        for c in (0u8..128)
            .map(char::from)
            .chain(['\u{a0}', '\u{2003}', 'é', '\u{3000}'])
        {
            let host = format!("a{c}b:80");
            let rejected = c.is_whitespace() || c == '/';
            assert_eq!(
                parse_host_ref(&host).is_none(),
                rejected || c == ':',
                "{c:?}"
            );
        }
    }
}
