//! OTLP protobuf straight from a [`CapturedExchange`]: the bytes that `span::build_span`,
//! opentelemetry-proto's transform and prost would send, without `SpanData` or the proto
//! structs in between (there every attribute is an owned string, copied twice).
//!
//! Field numbers are those of opentelemetry/proto/{trace,common,resource}/v1 and
//! collector/trace/v1. Fields are written in tag order and proto3 defaults are left out,
//! as prost does: the output is byte-identical to prost's encoding of the transformed
//! structs (the tests check it), not only equal once decoded.
use opentelemetry::{
    trace::{SpanId, TraceFlags, TraceState},
    Array, InstrumentationScope, Value,
};
use opentelemetry_semantic_conventions::attribute as sc;
use prost::encoding::encoded_len_varint;

use super::{
    rpc,
    span::{
        self, error_type, grpc_error_type, normalize_method, redis_error_type, server_address_in,
        url_full_path, url_full_prefix, ErrorType, SpanIds,
    },
    text::StackText,
};
use crate::{exchange::CapturedExchange, http::GrpcCall, redis::RedisCall};

// Wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

// opentelemetry.proto.trace.v1.Span.
const SPAN_TRACE_ID: u32 = 1;
const SPAN_SPAN_ID: u32 = 2;
const SPAN_TRACE_STATE: u32 = 3;
const SPAN_PARENT_SPAN_ID: u32 = 4;
const SPAN_NAME: u32 = 5;
const SPAN_KIND: u32 = 6;
const SPAN_START: u32 = 7;
const SPAN_END: u32 = 8;
const SPAN_ATTRIBUTES: u32 = 9;
const SPAN_STATUS: u32 = 15;
const SPAN_FLAGS: u32 = 16;
// Span.SpanKind.
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
// SpanFlags.
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;
// Status: message = 2, code = 3; StatusCode.STATUS_CODE_ERROR.
const STATUS_CODE: u32 = 3;
const STATUS_CODE_ERROR: u64 = 2;

// opentelemetry.proto.common.v1.
const KV_KEY: u32 = 1;
const KV_VALUE: u32 = 2;
const ANY_STRING: u32 = 1;
const ANY_BOOL: u32 = 2;
const ANY_INT: u32 = 3;
const ANY_DOUBLE: u32 = 4;
const ANY_ARRAY: u32 = 5;
const ARRAY_VALUES: u32 = 1;
const SCOPE_NAME: u32 = 1;
const SCOPE_VERSION: u32 = 2;
const SCOPE_ATTRIBUTES: u32 = 3;
// Resource.attributes.
const RESOURCE_ATTRIBUTES: u32 = 1;
// ResourceSpans, ScopeSpans, ExportTraceServiceRequest.
const RS_RESOURCE: u32 = 1;
const RS_SCOPE_SPANS: u32 = 2;
const RS_SCHEMA_URL: u32 = 3;
const SS_SCOPE: u32 = 1;
const SS_SPANS: u32 = 2;
const SS_SCHEMA_URL: u32 = 3;
const REQ_RESOURCE_SPANS: u32 = 1;

/// Where the encoders write: a `Vec` that grows, or a [`SliceWriter`] sized beforehand.
trait Out {
    fn byte(&mut self, b: u8);
    fn bytes(&mut self, b: &[u8]);
}

impl Out for Vec<u8> {
    #[inline(always)]
    fn byte(&mut self, b: u8) {
        self.push(b);
    }

    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// Writes into a slice made ready beforehand: no capacity check (and no reload of a
/// `Vec`'s length and capacity) per byte, which is most of a span's encoding cost. What
/// does not fit is counted, not written, so `pos` is always the size the output needs.
struct SliceWriter<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> SliceWriter<'a> {
    fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes the output needs; it is all in the slice when this is at most its length.
    fn needed(&self) -> usize {
        self.pos
    }
}

impl Out for SliceWriter<'_> {
    #[inline(always)]
    fn byte(&mut self, b: u8) {
        if let Some(slot) = self.buf.get_mut(self.pos) {
            *slot = b;
        }
        self.pos += 1;
    }

    #[inline(always)]
    fn bytes(&mut self, b: &[u8]) {
        let end = self.pos.saturating_add(b.len());
        if let Some(dst) = self.buf.get_mut(self.pos..end) {
            dst.copy_from_slice(b);
        }
        self.pos = end;
    }
}

const fn key(tag: u32, wire_type: u32) -> u64 {
    ((tag << 3) | wire_type) as u64
}

#[inline]
fn put_varint(out: &mut impl Out, mut v: u64) {
    while v >= 0x80 {
        out.byte(v as u8 | 0x80);
        v >>= 7;
    }
    out.byte(v as u8);
}

#[inline]
fn put_key(out: &mut impl Out, tag: u32, wire_type: u32) {
    put_varint(out, key(tag, wire_type));
}

#[inline]
fn put_len_prefix(out: &mut impl Out, tag: u32, len: usize) {
    put_key(out, tag, LEN);
    put_varint(out, len as u64);
}

#[inline]
fn put_bytes(out: &mut impl Out, tag: u32, b: &[u8]) {
    put_len_prefix(out, tag, b.len());
    out.bytes(b);
}

/// A proto3 string field: absent when empty (prost leaves it out; decoders read "").
#[inline]
fn put_str(out: &mut impl Out, tag: u32, s: &str) {
    if !s.is_empty() {
        put_bytes(out, tag, s.as_bytes());
    }
}

/// Size of a length-delimited field whose body is `len` bytes.
#[inline]
fn len_field(tag: u32, len: usize) -> usize {
    encoded_len_varint(key(tag, LEN)) + encoded_len_varint(len as u64) + len
}

#[inline]
fn str_field(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        len_field(tag, s.len())
    }
}

/// One `KeyValue` with a string value as field `tag`; `v` is UTF-8 (a `str`'s bytes or our
/// own ASCII text). Inlined so that the constant keys are copied as fixed-size moves.
#[inline(always)]
fn put_attr_str(out: &mut impl Out, tag: u32, k: &str, v: &[u8]) {
    // AnyValue's `value` is a oneof: written even when empty.
    put_attr_head(out, tag, k, len_field(ANY_STRING, v.len()));
    put_bytes(out, ANY_STRING, v);
}

/// One `KeyValue` whose string value is `parts` joined, written without joining them.
fn put_attr_parts(out: &mut impl Out, tag: u32, k: &str, parts: &[&str]) {
    let len = parts.iter().map(|p| p.len()).sum();
    put_attr_head(out, tag, k, len_field(ANY_STRING, len));
    put_len_prefix(out, ANY_STRING, len);
    for p in parts {
        out.bytes(p.as_bytes());
    }
}

/// A `KeyValue`'s length prefix (as field `tag`), its key, and the prefix of its
/// `AnyValue` of `value_len` bytes, which the caller writes next.
#[inline(always)]
fn put_attr_head(out: &mut impl Out, tag: u32, k: &str, value_len: usize) {
    put_len_prefix(
        out,
        tag,
        str_field(KV_KEY, k) + len_field(KV_VALUE, value_len),
    );
    put_str(out, KV_KEY, k);
    put_len_prefix(out, KV_VALUE, value_len);
}

/// One `KeyValue` with an int64 value as field `tag`.
#[inline(always)]
fn put_attr_int(out: &mut impl Out, tag: u32, k: &str, v: i64) {
    // int64: negative values are ten-byte varints of their two's complement.
    put_attr_head(out, tag, k, 1 + encoded_len_varint(v as u64));
    put_key(out, ANY_INT, VARINT);
    put_varint(out, v as u64);
}

/// AnyValue body of any attribute value (resources and scopes carry every kind).
fn value_len(v: &Value) -> usize {
    match v {
        Value::Bool(_) => 2,
        Value::I64(i) => 1 + encoded_len_varint(*i as u64),
        Value::F64(_) => 9,
        Value::String(s) => len_field(ANY_STRING, s.as_str().len()),
        Value::Array(a) => len_field(ANY_ARRAY, array_len(a)),
        // A kind newer than this code: an AnyValue without value (the transform panics).
        _ => 0,
    }
}

/// ArrayValue body: each element an AnyValue in `values`.
fn array_len(a: &Array) -> usize {
    match a {
        Array::Bool(v) => v.len() * len_field(ARRAY_VALUES, 2),
        Array::I64(v) => v
            .iter()
            .map(|i| len_field(ARRAY_VALUES, 1 + encoded_len_varint(*i as u64)))
            .sum(),
        Array::F64(v) => v.len() * len_field(ARRAY_VALUES, 9),
        Array::String(v) => v
            .iter()
            .map(|s| len_field(ARRAY_VALUES, len_field(ANY_STRING, s.as_str().len())))
            .sum(),
        _ => 0,
    }
}

fn put_value(out: &mut impl Out, v: &Value) {
    match v {
        Value::Bool(b) => {
            put_key(out, ANY_BOOL, VARINT);
            out.byte(u8::from(*b));
        }
        Value::I64(i) => {
            put_key(out, ANY_INT, VARINT);
            put_varint(out, *i as u64);
        }
        Value::F64(f) => {
            put_key(out, ANY_DOUBLE, FIXED64);
            out.bytes(&f.to_le_bytes());
        }
        Value::String(s) => put_bytes(out, ANY_STRING, s.as_str().as_bytes()),
        Value::Array(a) => {
            put_len_prefix(out, ANY_ARRAY, array_len(a));
            put_array(out, a);
        }
        _ => {}
    }
}

fn put_array(out: &mut impl Out, a: &Array) {
    // Each element goes through the same path as a scalar value.
    fn each<T: Clone>(out: &mut impl Out, items: &[T], to_value: impl Fn(T) -> Value) {
        for item in items {
            let v = to_value(item.clone());
            put_len_prefix(out, ARRAY_VALUES, value_len(&v));
            put_value(out, &v);
        }
    }
    match a {
        Array::Bool(v) => each(out, v, Value::Bool),
        Array::I64(v) => each(out, v, Value::I64),
        Array::F64(v) => each(out, v, Value::F64),
        // Strings are written in place: cloning each into a `Value` would allocate.
        Array::String(v) => {
            for s in v {
                let s = s.as_str();
                put_len_prefix(out, ARRAY_VALUES, len_field(ANY_STRING, s.len()));
                put_bytes(out, ANY_STRING, s.as_bytes());
            }
        }
        _ => {}
    }
}

/// One `KeyValue` with any value, as field `tag`.
fn put_value_attr(out: &mut impl Out, tag: u32, k: &str, v: &Value) {
    put_attr_head(out, tag, k, value_len(v));
    put_value(out, v);
}

/// Length of `TraceState::header()`: `key=value` entries joined by `,`.
fn trace_state_len(ts: &TraceState) -> usize {
    ts.into_iter()
        .enumerate()
        .map(|(i, (k, v))| usize::from(i > 0) + k.len() + 1 + v.len())
        .sum()
}

fn put_trace_state(out: &mut impl Out, ts: &TraceState) {
    let len = trace_state_len(ts);
    if len == 0 {
        return;
    }
    put_len_prefix(out, SPAN_TRACE_STATE, len);
    for (i, (k, v)) in ts.into_iter().enumerate() {
        if i > 0 {
            out.byte(b',');
        }
        out.bytes(k.as_bytes());
        out.byte(b'=');
        out.bytes(v.as_bytes());
    }
}

/// Appends the bytes of one OTLP `Span` message (opentelemetry.proto.trace.v1.Span, not
/// length-prefixed) for `ex`: what `span::build_span(ex, ids, route, _)` becomes on the
/// wire. `route` is its `http.route` (and names the span when known). For the tests: the
/// agent encodes with [`encode_span_into`] straight into its span blocks.
#[cfg(test)]
pub fn encode_span(out: &mut Vec<u8>, ex: &CapturedExchange, ids: &SpanIds, route: Option<&str>) {
    let conn = ConnAttrs::of(ex);
    let start = out.len();
    let mut room = span_size_hint(ex, ids, route, &conn);
    // At most twice: a span that did not fit says exactly how much room it needs.
    loop {
        out.resize(start + room, 0);
        let needed = encode_span_into(&mut out[start..], ex, ids, route, &conn);
        if needed <= room {
            out.truncate(start + needed);
            return;
        }
        room = needed;
    }
}

/// [`encode_span`] into `buf`, with `conn` = `ConnAttrs::of(ex)` (or a copy kept for
/// the connection). Returns the span's size: when it is larger than `buf`, the bytes
/// written are unusable and the caller retries with that much room.
pub fn encode_span_into(
    buf: &mut [u8],
    ex: &CapturedExchange,
    ids: &SpanIds,
    route: Option<&str>,
    conn: &ConnAttrs,
) -> usize {
    let mut w = SliceWriter::new(buf);
    encode_span_to(&mut w, ex, ids, route, conn);
    w.needed()
}

/// Room that fits almost any span of `ex`: a little over the fixed part (keys, ids,
/// times) plus the variable strings (the path twice: a CLIENT's url.full repeats it).
pub fn span_size_hint(
    ex: &CapturedExchange,
    ids: &SpanIds,
    route: Option<&str>,
    conn: &ConnAttrs,
) -> usize {
    let http = &ex.http;
    384 + conn.encoded.len()
        + conn.url_prefix.len()
        + 2 * http.path.len()
        + 2 * route.map_or(0, str::len)
        + http.method.len()
        + trace_state_len(&ids.trace_state)
}

/// The attributes of a span that follow from its connection and the request's `Host`,
/// `User-Agent` and version alone: the same for every exchange of a kept-alive
/// connection, so they can be encoded once and copied (see `conn_attrs`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAttrs {
    /// `http://host[:port]`, the start of a CLIENT's url.full; empty for a SERVER.
    url_prefix: String,
    /// A CLIENT's server.address (for its metrics too); empty for a SERVER.
    server_name: String,
    server_port: u16,
    client: bool,
    /// server.address, server.port, client.address (SERVER), network.peer.address,
    /// network.peer.port, network.protocol.version and user_agent.original (SERVER, when
    /// sent), as Span attributes in build_span's order.
    encoded: Vec<u8>,
}

impl ConnAttrs {
    pub fn of(ex: &CapturedExchange) -> Self {
        let mut attrs = Self::default();
        attrs.fill(ex);
        attrs
    }

    /// A CLIENT's server.address and server.port; `None` for a SERVER.
    pub fn server_address(&self) -> Option<(&str, u16)> {
        self.client
            .then_some((self.server_name.as_str(), self.server_port))
    }

    /// Becomes `ConnAttrs::of(ex)`, reusing its buffers (no allocation once they are
    /// large enough).
    pub fn fill(&mut self, ex: &CapturedExchange) {
        let server = ex.is_server();
        let http = &ex.http;
        let peer = ex.endpoints.remote;
        let mut srv_text = StackText::empty();
        let (srv_addr, srv_port) = server_address_in(ex, &mut srv_text);
        // The remote end is a SERVER span's client (its client.address).
        let remote_ip = StackText::ip(peer.0);
        self.client = !server;
        self.url_prefix.clear();
        self.server_name.clear();
        self.server_port = 0;
        if !server {
            url_full_prefix(&mut self.url_prefix, ex.scheme(), srv_addr, srv_port);
            self.server_name.push_str(srv_addr);
            self.server_port = srv_port;
        }

        let out = &mut self.encoded;
        out.clear();
        let a = SPAN_ATTRIBUTES;
        put_attr_str(out, a, sc::SERVER_ADDRESS, srv_addr.as_bytes());
        put_attr_int(out, a, sc::SERVER_PORT, i64::from(srv_port));
        if server {
            put_attr_str(out, a, sc::CLIENT_ADDRESS, remote_ip.as_bytes());
        }
        put_attr_str(out, a, sc::NETWORK_PEER_ADDRESS, remote_ip.as_bytes());
        put_attr_int(out, a, sc::NETWORK_PEER_PORT, i64::from(peer.1));
        if http.redis.is_none() {
            let version = http.version.as_str();
            put_attr_str(out, a, sc::NETWORK_PROTOCOL_VERSION, version.as_bytes());
        }
        if let Some(ua) = http.user_agent.as_deref().filter(|_| server) {
            put_attr_str(out, a, sc::USER_AGENT_ORIGINAL, ua.as_bytes());
        }
    }
}

fn encode_span_to(
    out: &mut impl Out,
    ex: &CapturedExchange,
    ids: &SpanIds,
    route: Option<&str>,
    conn: &ConnAttrs,
) {
    let http = &ex.http;
    if let Some(call) = http.redis {
        return encode_db_span_to(out, ex, ids, conn, call);
    }
    if let Some(call) = http.grpc {
        return encode_rpc_span_to(out, ex, ids, conn, call);
    }
    let server = ex.is_server();
    let (method, original) = normalize_method(&http.method);
    // The conventions name spans of unknown methods "HTTP".
    let name_method = if original.is_some() { "HTTP" } else { method };
    match route {
        Some(r) => put_span_head(out, ex, ids, &[name_method, " ", r]),
        None => put_span_head(out, ex, ids, &[name_method]),
    }

    // Attributes in build_span's order.
    let a = SPAN_ATTRIBUTES;
    put_attr_str(out, a, sc::HTTP_REQUEST_METHOD, method.as_bytes());
    if let Some(o) = original {
        put_attr_str(out, a, sc::HTTP_REQUEST_METHOD_ORIGINAL, o.as_bytes());
    }
    // The conventions' defaults: a SERVER reports path and scheme, a CLIENT the full URL.
    if server {
        put_attr_str(out, a, sc::URL_PATH, http.path.as_bytes());
        put_attr_str(out, a, sc::URL_SCHEME, ex.scheme().as_bytes());
    } else {
        let path = url_full_path(&http.path);
        put_attr_parts(out, a, sc::URL_FULL, &[&conn.url_prefix, path]);
    }
    if http.status != 0 {
        put_attr_int(
            out,
            a,
            sc::HTTP_RESPONSE_STATUS_CODE,
            i64::from(http.status),
        );
    }
    if let Some(r) = route {
        put_attr_str(out, a, sc::HTTP_ROUTE, r.as_bytes());
    }
    put_span_tail(
        out,
        ids,
        conn,
        error_type(server, http.status, http.failure),
    );
}

/// A gRPC call's span: named by its method, `rpc.*` in place of the HTTP attributes.
fn encode_rpc_span_to(
    out: &mut impl Out,
    ex: &CapturedExchange,
    ids: &SpanIds,
    conn: &ConnAttrs,
    call: GrpcCall,
) {
    let http = &ex.http;
    let (method, original) = rpc::method(http, call);
    put_span_head(out, ex, ids, &[method]);
    let a = SPAN_ATTRIBUTES;
    put_attr_str(out, a, sc::RPC_SYSTEM_NAME, rpc::SYSTEM.as_bytes());
    put_attr_str(out, a, sc::RPC_METHOD, method.as_bytes());
    if let Some(o) = original {
        put_attr_str(out, a, sc::RPC_METHOD_ORIGINAL, o.as_bytes());
    }
    if let Some(code) = call.status {
        let text = rpc::status_text(code);
        put_attr_str(out, a, sc::RPC_RESPONSE_STATUS_CODE, text.as_bytes());
    }
    let error = grpc_error_type(ex.is_server(), http.status, http.failure, call);
    put_span_tail(out, ids, conn, error);
}

/// A Redis call's span: named by its command, `db.*` in place of the HTTP attributes.
fn encode_db_span_to(
    out: &mut impl Out,
    ex: &CapturedExchange,
    ids: &SpanIds,
    conn: &ConnAttrs,
    call: RedisCall,
) {
    let operation = ex.http.method.as_str();
    put_span_head(out, ex, ids, &[operation]);
    let a = SPAN_ATTRIBUTES;
    put_attr_str(out, a, sc::DB_SYSTEM_NAME, span::REDIS.as_bytes());
    put_attr_str(out, a, sc::DB_OPERATION_NAME, operation.as_bytes());
    if let Some(prefix) = call.error {
        put_attr_str(
            out,
            a,
            sc::DB_RESPONSE_STATUS_CODE,
            prefix.as_str().as_bytes(),
        );
    }
    put_span_tail(out, ids, conn, redis_error_type(ex.http.failure, call));
}

/// A span's ids, name (`name` concatenated), kind and times.
fn put_span_head(out: &mut impl Out, ex: &CapturedExchange, ids: &SpanIds, name: &[&str]) {
    // Ids are copied even when zero, as the transform does.
    put_bytes(out, SPAN_TRACE_ID, &ids.trace_id.to_bytes());
    put_bytes(out, SPAN_SPAN_ID, &ids.span_id.to_bytes());
    put_trace_state(out, &ids.trace_state);
    if ids.parent_span_id != SpanId::INVALID {
        put_bytes(out, SPAN_PARENT_SPAN_ID, &ids.parent_span_id.to_bytes());
    }
    put_len_prefix(out, SPAN_NAME, name.iter().map(|p| p.len()).sum());
    for part in name {
        out.bytes(part.as_bytes());
    }

    put_key(out, SPAN_KIND, VARINT);
    put_varint(
        out,
        if ex.is_server() {
            KIND_SERVER
        } else {
            KIND_CLIENT
        },
    );
    // fixed64, absent when 0 like any proto3 default; the end is never before the start.
    let start = ex.start_unix_ns;
    let end = ex.end_unix_ns.max(start);
    if start != 0 {
        put_key(out, SPAN_START, FIXED64);
        out.bytes(&start.to_le_bytes());
    }
    if end != 0 {
        put_key(out, SPAN_END, FIXED64);
        out.bytes(&end.to_le_bytes());
    }
}

/// The connection's attributes, `error.type`, the status and the flags that end a span.
fn put_span_tail(
    out: &mut impl Out,
    ids: &SpanIds,
    conn: &ConnAttrs,
    error_type: Option<ErrorType>,
) {
    let a = SPAN_ATTRIBUTES;
    out.bytes(&conn.encoded);
    let error = error_type.is_some();
    match error_type {
        Some(ErrorType::Status(code)) => {
            put_attr_str(out, a, sc::ERROR_TYPE, StackText::decimal(code).as_bytes())
        }
        Some(ErrorType::Failure(f)) => put_attr_str(out, a, sc::ERROR_TYPE, f.as_str().as_bytes()),
        Some(ErrorType::Grpc(code)) => {
            put_attr_str(out, a, sc::ERROR_TYPE, rpc::status_text(code).as_bytes())
        }
        Some(ErrorType::Db(prefix)) => {
            put_attr_str(out, a, sc::ERROR_TYPE, prefix.as_str().as_bytes())
        }
        None => {}
    }

    // The transform always sets a status, so it is present even when UNSET (empty);
    // an error has an empty message.
    if error {
        put_len_prefix(out, SPAN_STATUS, 2);
        put_key(out, STATUS_CODE, VARINT);
        put_varint(out, STATUS_CODE_ERROR);
    } else {
        put_len_prefix(out, SPAN_STATUS, 0);
    }

    // build_span's spans are sampled; the transform adds "is_remote known" and whether
    // the parent is remote.
    let mut flags = u32::from(TraceFlags::SAMPLED.to_u8()) | FLAG_CONTEXT_HAS_IS_REMOTE;
    if ids.parent_is_remote {
        flags |= FLAG_CONTEXT_IS_REMOTE;
    }
    put_key(out, SPAN_FLAGS, FIXED32);
    out.bytes(&flags.to_le_bytes());
}

/// Appends the bytes of one OTLP `Resource` message for these attributes (in
/// `Resource::iter`'s order, as the transform takes them). Its schema URL belongs to the
/// enclosing `ResourceSpans`: see [`TraceRequest::add_group_with_schema_url`].
pub fn encode_resource(out: &mut Vec<u8>, resource: &opentelemetry_sdk::Resource) {
    for (k, v) in resource.iter() {
        put_value_attr(out, RESOURCE_ATTRIBUTES, k.as_str(), v);
    }
}

/// Appends the bytes of one `InstrumentationScope` message (name, version, attributes).
/// Its schema URL belongs to the enclosing `ScopeSpans`: see
/// [`TraceRequest::with_scope_schema_url`].
pub fn encode_scope(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    put_str(out, SCOPE_NAME, scope.name());
    put_str(out, SCOPE_VERSION, scope.version().unwrap_or_default());
    for kv in scope.attributes() {
        put_value_attr(out, SCOPE_ATTRIBUTES, kv.key.as_str(), &kv.value);
    }
}

/// Room left for a nested message's length until its body is written: the largest varint,
/// so any length fits; the gap is closed afterwards (lengths are minimal on the wire).
const LEN_SLOT: usize = 10;

/// Writes `v` as a varint at the start of `dst`; `dst` is exactly its encoded length.
fn write_varint_at(dst: &mut [u8], mut v: u64) {
    let last = dst.len().saturating_sub(1);
    for (i, b) in dst.iter_mut().enumerate() {
        *b = if i < last { v as u8 | 0x80 } else { v as u8 };
        v >>= 7;
    }
}

/// An `ExportTraceServiceRequest` body: one `ResourceSpans` per group, each with one
/// `ScopeSpans` (the same scope) holding the group's already-encoded spans. The buffer can
/// be reused between requests with [`TraceRequest::clear`].
#[derive(Debug, Clone)]
pub struct TraceRequest {
    buf: Vec<u8>,
    scope: Vec<u8>,
    scope_schema_url: String,
}

impl TraceRequest {
    /// `scope_bytes`: an `InstrumentationScope` message, from [`encode_scope`].
    pub fn new(scope_bytes: Vec<u8>) -> Self {
        Self {
            buf: Vec::new(),
            scope: scope_bytes,
            scope_schema_url: String::new(),
        }
    }

    /// The scope's schema URL (`ScopeSpans.schema_url`); none by default, like
    /// `span::scope()`.
    pub fn with_scope_schema_url(mut self, url: impl Into<String>) -> Self {
        self.scope_schema_url = url.into();
        self
    }

    /// One `ResourceSpans`: `resource_bytes` from [`encode_resource`], `spans` from
    /// [`encode_span`], in order. Without spans it has no `ScopeSpans` (as the transform).
    pub fn add_group<'a>(
        &mut self,
        resource_bytes: &[u8],
        spans: impl IntoIterator<Item = &'a [u8]>,
    ) {
        self.add_group_with_schema_url(resource_bytes, "", spans);
    }

    /// [`TraceRequest::add_group`] for a resource with a schema URL
    /// (`Resource::schema_url`, which goes in `ResourceSpans.schema_url`).
    pub fn add_group_with_schema_url<'a>(
        &mut self,
        resource_bytes: &[u8],
        schema_url: &str,
        spans: impl IntoIterator<Item = &'a [u8]>,
    ) {
        let buf = &mut self.buf;
        // The spans are only known once copied: both lengths get a slot, closed below.
        put_key(buf, REQ_RESOURCE_SPANS, LEN);
        let rs_len_at = buf.len();
        buf.extend_from_slice(&[0; LEN_SLOT]);
        let rs_body = buf.len();
        put_bytes(buf, RS_RESOURCE, resource_bytes);
        let ss_key_at = buf.len();
        put_key(buf, RS_SCOPE_SPANS, LEN);
        let ss_len_at = buf.len();
        buf.extend_from_slice(&[0; LEN_SLOT]);
        let ss_body = buf.len();
        put_bytes(buf, SS_SCOPE, &self.scope);
        let mut any = false;
        for s in spans {
            any = true;
            put_bytes(buf, SS_SPANS, s);
        }
        put_str(buf, SS_SCHEMA_URL, &self.scope_schema_url);
        if !any {
            buf.truncate(ss_key_at);
        }
        let ss_end = buf.len();
        put_str(buf, RS_SCHEMA_URL, schema_url);
        let end = buf.len();

        if !any {
            let rs_len = end - rs_body;
            let n = encoded_len_varint(rs_len as u64);
            buf.copy_within(rs_body..end, rs_len_at + n);
            write_varint_at(&mut buf[rs_len_at..rs_len_at + n], rs_len as u64);
            buf.truncate(rs_len_at + n + rs_len);
            return;
        }
        let ss_len = ss_end - ss_body;
        let ss_n = encoded_len_varint(ss_len as u64);
        let rs_len = end - rs_body - (LEN_SLOT - ss_n);
        let rs_n = encoded_len_varint(rs_len as u64);
        // Close both gaps: the resource part moves by one, the scope spans (the bulk) by
        // both, in a single move.
        buf.copy_within(rs_body..ss_len_at, rs_len_at + rs_n);
        let new_ss_len_at = rs_len_at + rs_n + (ss_len_at - rs_body);
        buf.copy_within(ss_body..end, new_ss_len_at + ss_n);
        write_varint_at(&mut buf[rs_len_at..rs_len_at + rs_n], rs_len as u64);
        write_varint_at(&mut buf[new_ss_len_at..new_ss_len_at + ss_n], ss_len as u64);
        buf.truncate(new_ss_len_at + ss_n + (end - ss_body));
    }

    /// The request body so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Makes room for `bytes` more, so that a request whose size is known up front is
    /// written without the buffer growing (and copying itself) on the way.
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    /// Forgets the groups, keeping the buffer's capacity and the scope.
    pub fn clear(&mut self) {
        self.buf.clear();
    }

    /// The request body.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr, Ipv6Addr},
        sync::Arc,
        time::Instant,
    };

    use opentelemetry::{
        trace::{TraceId, TraceState},
        KeyValue, StringValue,
    };
    use opentelemetry_proto::{
        tonic::{
            collector::trace::v1::ExportTraceServiceRequest, common::v1 as pc, resource::v1 as pr,
            trace::v1 as pt,
        },
        transform::{
            common::tonic::ResourceAttributesWithSchema,
            trace::tonic::group_spans_by_resource_and_scope,
        },
    };
    use opentelemetry_sdk::Resource;
    use proptest::prelude::*;
    use prost::Message;

    use super::*;
    use crate::{
        http::{ExchangeRole, Failure, HttpVersion},
        otel::{
            resource,
            span::{
                build_span, kernel_ids, scope, span_context_for,
                tests::{exchange, kernel},
            },
        },
        process::ProcessInfo,
    };

    use crate::test_alloc::allocations;

    /// What the SDK path sends for this span.
    fn oracle(ex: &CapturedExchange, ids: &SpanIds, route: Option<&str>) -> pt::Span {
        pt::Span::from(build_span(ex, ids, route, &scope()))
    }

    fn encoded(ex: &CapturedExchange, ids: &SpanIds, route: Option<&str>) -> Vec<u8> {
        let mut out = Vec::new();
        encode_span(&mut out, ex, ids, route);
        out
    }

    /// Decodes to the oracle, and is byte for byte what prost makes of it.
    fn check(ex: &CapturedExchange, route: Option<&str>) {
        let ids = span_context_for(ex, kernel_ids(ex));
        let want = oracle(ex, &ids, route);
        let bytes = encoded(ex, &ids, route);
        let got = pt::Span::decode(bytes.as_slice()).expect("our span decodes");
        assert_eq!(got, want, "{ex:?} {route:?}");
        assert_eq!(bytes, want.encode_to_vec(), "{ex:?} {route:?}");
    }

    fn with_endpoints(
        mut ex: CapturedExchange,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
    ) -> CapturedExchange {
        ex.endpoints.local = local;
        ex.endpoints.remote = remote;
        ex
    }

    /// Exchanges covering every branch of build_span.
    fn fixtures() -> Vec<CapturedExchange> {
        use agent_common::{ORIGIN_HEADER, ORIGIN_NEW, ORIGIN_THREAD, TRACE_CLIENT, TRACE_SERVER};
        let mut all = Vec::new();
        let v6 = |s: &str| IpAddr::V6(s.parse::<Ipv6Addr>().expect("test address"));
        for role in [ExchangeRole::Server, ExchangeRole::Client] {
            for status in [
                0, 101, 200, 204, 302, 400, 404, 499, 500, 503, 599, 999, 65535,
            ] {
                all.push(exchange(role, "GET", "/users/42", status));
            }
            for method in [
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                "PROPFIND", "get", "", "M-SEARCH",
            ] {
                all.push(exchange(role, method, "/m", 200));
            }
            for path in [
                "",
                "/",
                "/ü/😀?x",
                &"/long".repeat(100),
                &"x".repeat(20_000),
            ] {
                all.push(exchange(role, "POST", path, 201));
            }
            for host in [
                None,
                Some("api.example.com"),
                Some("api.example.com:9443"),
                Some("[::1]"),
                Some("[::1]:8443"),
                Some("[2001:db8::7]:1"),
                Some("[nonsense]:80"),
                Some("::1"),
                Some("a.b:x"),
                Some("a.b:70000"),
                Some("a b"),
                Some(" padded:81 "),
                Some(""),
                Some("h:0"),
                Some(&"h".repeat(300)),
            ] {
                let mut ex = exchange(role, "GET", "/h", 200);
                ex.http.host = host.map(Into::into);
                all.push(ex);
            }
            for ua in [None, Some(""), Some("Mozilla/5.0 (X11; Linux) ü")] {
                let mut ex = exchange(role, "GET", "/ua", 200);
                ex.http.user_agent = ua.map(Into::into);
                all.push(ex);
            }
            let mut ex = exchange(role, "GET", "/v", 200);
            ex.http.version = HttpVersion::Http10;
            all.push(ex);
            for (local, remote) in [
                ((v6("::1"), 8080), (v6("::1"), 40000)),
                ((v6("2001:db8::1"), 443), (v6("2001:db8:0:0:1:0:0:1"), 1)),
                ((v6("::ffff:10.0.0.1"), 80), (v6("fe80::1:2:3:4"), 65535)),
                ((v6("::"), 0), (IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
                (
                    (IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)), 65535),
                    (IpAddr::V4(Ipv4Addr::new(1, 20, 100, 0)), 9),
                ),
            ] {
                let ex = exchange(role, "GET", "/ip", 200);
                all.push(with_endpoints(ex, local, remote));
            }
            // Over TLS: https, and 443 is the default port left out of url.full.
            for port in [443, 8443] {
                let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
                let mut ex = exchange(role, "GET", "/tls", 200);
                ex.tls = true;
                ex.http.host = None;
                let (local, remote) = match role {
                    ExchangeRole::Server => ((ip, port), (ip, 40000)),
                    ExchangeRole::Client => ((ip, 40000), (ip, port)),
                };
                all.push(with_endpoints(ex, local, remote));
            }
            for (start, end) in [
                (0, 0),
                (0, 5),
                (10, 5),
                (1_700_000_000_000_000_000, 1_700_000_000_000_000_000),
                (u64::MAX, u64::MAX),
                (u64::MAX - 1, 3),
            ] {
                let mut ex = exchange(role, "GET", "/t", 200);
                ex.start_unix_ns = start;
                ex.end_unix_ns = end;
                all.push(ex);
            }
            // Incoming trace context: valid, with and without tracestate, and invalid.
            for (tp, ts) in [
                (
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
                ),
                (
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
                    None,
                ),
                (
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some(" a=1 , ,b=2"),
                ),
                (
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    Some("bad"),
                ),
                (
                    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                    Some("a=b"),
                ),
                ("garbage", Some("a=b")),
            ] {
                let mut ex = exchange(role, "GET", "/tp", 200);
                ex.http.traceparent = Some(tp.into());
                ex.http.tracestate = ts.map(Into::into);
                all.push(ex);
            }
            // Kernel ids of every origin.
            for t in [
                kernel(TRACE_SERVER, ORIGIN_HEADER, Some(9), 1),
                kernel(TRACE_SERVER, ORIGIN_NEW, None, 1),
                kernel(TRACE_CLIENT, ORIGIN_THREAD, Some(7), 0),
                kernel(TRACE_CLIENT, ORIGIN_HEADER, None, 1),
                kernel(TRACE_CLIENT, ORIGIN_HEADER, Some(0), 1),
            ] {
                let mut ex = exchange(role, "GET", "/k", 200);
                ex.http.tracestate = Some("k=v".into());
                ex.trace = Some(t);
                all.push(ex);
            }
            // HTTP/2, and gRPC calls: every status, unknown ones, none; failures; paths
            // that name no method.
            let mut ex = exchange(role, "GET", "/h2", 200);
            ex.http.version = HttpVersion::Http2;
            all.push(ex);
            let grpc = |path: &str, status: Option<u8>, http_status: u16| {
                let mut ex = exchange(role, "POST", path, http_status);
                ex.http.version = HttpVersion::Http2;
                ex.http.grpc = Some(GrpcCall { status });
                ex
            };
            for code in (0..=17).chain([255]) {
                all.push(grpc("/helloworld.Greeter/SayHello", Some(code), 200));
            }
            for http_status in [0, 200, 404, 503] {
                all.push(grpc("/pkg.S/M", None, http_status));
            }
            for failure in [
                Failure::NoResponse,
                Failure::ResponseCutShort,
                Failure::StreamReset,
            ] {
                let mut ex = grpc("/pkg.S/M", Some(0), 200);
                ex.http.failure = Some(failure);
                all.push(ex);
            }
            for path in ["", "/", "/only", "//m", "/ü/😀"] {
                all.push(grpc(path, Some(0), 200));
            }
        }
        // Redis calls (always a client's): answered, errors, failures.
        let redis = crate::otel::span::tests::redis_exchange;
        all.push(redis("GET", None, None));
        all.push(redis("_OTHER", Some(b"ERR"), None));
        all.push(redis("LPUSH", Some(b"WRONGTYPE"), None));
        all.push(redis("BLPOP", None, Some(Failure::NoResponse)));
        all.push(redis("GET", None, Some(Failure::ResponseCutShort)));
        all
    }

    #[test]
    fn spans_match_the_sdk_path() {
        let routes = [
            None,
            Some("/users/*"),
            Some(""),
            Some("/ü/{id}"),
            Some(&*"/r".repeat(200)),
        ];
        for ex in fixtures() {
            for route in routes {
                check(&ex, route);
            }
        }
    }

    #[test]
    fn ids_are_copied_as_given() {
        let ex = exchange(ExchangeRole::Server, "GET", "/", 500);
        for (trace_id, span_id, parent, remote) in [
            (
                TraceId::from(1u128),
                SpanId::from(2u64),
                SpanId::INVALID,
                false,
            ),
            (TraceId::INVALID, SpanId::INVALID, SpanId::from(3u64), true),
            (
                TraceId::from(u128::MAX),
                SpanId::from(u64::MAX),
                SpanId::from(1u64),
                false,
            ),
        ] {
            let ids = SpanIds {
                trace_id,
                span_id,
                parent_span_id: parent,
                parent_sampled: None,
                parent_is_remote: remote,
                trace_state: TraceState::from_key_value([("x", "1"), ("y", "")])
                    .expect("valid trace state"),
            };
            let bytes = encoded(&ex, &ids, Some("/"));
            let want = oracle(&ex, &ids, Some("/"));
            assert_eq!(pt::Span::decode(bytes.as_slice()).expect("decodes"), want);
            assert_eq!(bytes, want.encode_to_vec());
        }
    }

    #[test]
    fn status_and_flags_on_the_wire() {
        let ex = exchange(ExchangeRole::Client, "GET", "/", 404);
        let mut ids = span_context_for(&ex, None);
        let span = pt::Span::decode(encoded(&ex, &ids, None).as_slice()).expect("decodes");
        let status = span.status.expect("status is always set");
        assert_eq!(status.code, pt::status::StatusCode::Error as i32);
        assert_eq!(status.message, "");
        assert_eq!(span.flags, 0x101);
        assert_eq!(span.kind, pt::span::SpanKind::Client as i32);
        ids.parent_is_remote = true;
        let span = pt::Span::decode(encoded(&ex, &ids, None).as_slice()).expect("decodes");
        assert_eq!(span.flags, 0x301);
        let ok = exchange(ExchangeRole::Server, "GET", "/", 404);
        let span = pt::Span::decode(encoded(&ok, &ids, None).as_slice()).expect("decodes");
        assert_eq!(span.status, Some(pt::Status::default()));
        assert_eq!(span.kind, pt::span::SpanKind::Server as i32);
    }

    /// An exchange whose connection ended before its response did: no status code when
    /// none was seen, `error.type` saying what happened, an error status; the same as
    /// the SDK path's span.
    #[test]
    fn failed_exchanges_on_the_wire() {
        use crate::http::Failure;
        for (role, status, failure, error_type) in [
            (
                ExchangeRole::Client,
                0,
                Failure::NoResponse,
                "connection_closed",
            ),
            (
                ExchangeRole::Server,
                0,
                Failure::NoResponse,
                "connection_closed",
            ),
            (
                ExchangeRole::Client,
                200,
                Failure::ResponseCutShort,
                "response_incomplete",
            ),
        ] {
            let mut ex = exchange(role, "GET", "/", status);
            ex.http.failure = Some(failure);
            let ids = span_context_for(&ex, None);
            let bytes = encoded(&ex, &ids, Some("/"));
            let span = pt::Span::decode(bytes.as_slice()).expect("decodes");
            assert_eq!(span, oracle(&ex, &ids, Some("/")), "{role:?} {failure:?}");
            let attr = |key: &str| {
                span.attributes
                    .iter()
                    .find(|kv| kv.key == key)
                    .and_then(|kv| kv.value.clone())
            };
            let text = |v: &str| {
                Some(pc::AnyValue {
                    value: Some(pc::any_value::Value::StringValue(v.into())),
                })
            };
            assert_eq!(attr("error.type"), text(error_type), "{role:?}");
            let code = attr("http.response.status_code");
            assert_eq!(code.is_some(), status != 0, "{role:?} {failure:?}");
            let status = span.status.expect("status is always set");
            assert_eq!(status.code, pt::status::StatusCode::Error as i32);
        }
    }

    #[test]
    fn encode_span_appends() {
        let ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        let ids = span_context_for(&ex, None);
        let one = encoded(&ex, &ids, None);
        let mut out = b"prefix".to_vec();
        encode_span(&mut out, &ex, &ids, None);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(&out[6..], one.as_slice());
    }

    #[test]
    fn no_allocation_once_the_connection_is_known() {
        let mut buf = vec![0u8; 1 << 16];
        let mut prepared = Vec::new();
        for ex in fixtures() {
            let ids = span_context_for(&ex, kernel_ids(&ex));
            let conn = ConnAttrs::of(&ex);
            prepared.push((ex, ids, conn));
        }
        let before = allocations();
        for (ex, ids, conn) in &prepared {
            encode_span_into(&mut buf, ex, ids, Some("/users/{id}"), conn);
            encode_span_into(&mut buf, ex, ids, None, conn);
        }
        assert_eq!(allocations() - before, 0);
    }

    #[test]
    fn too_little_room_says_how_much_is_needed() {
        for ex in fixtures() {
            let ids = span_context_for(&ex, kernel_ids(&ex));
            let whole = encoded(&ex, &ids, Some("/r"));
            let conn = ConnAttrs::of(&ex);
            for room in [0, 1, 17, whole.len() - 1] {
                let mut buf = vec![0u8; room];
                assert_eq!(
                    encode_span_into(&mut buf, &ex, &ids, Some("/r"), &conn),
                    whole.len()
                );
            }
            let mut buf = vec![0u8; whole.len()];
            assert_eq!(
                encode_span_into(&mut buf, &ex, &ids, Some("/r"), &conn),
                whole.len()
            );
            assert_eq!(buf, whole);
        }
    }

    fn resource_proto(r: &Resource) -> pr::Resource {
        pr::Resource {
            attributes: ResourceAttributesWithSchema::from(r).attributes.0,
            dropped_attributes_count: 0,
            entity_refs: vec![],
        }
    }

    fn every_kind_of_value() -> Resource {
        use opentelemetry::Array;
        let strings = |v: &[&'static str]| v.iter().map(|s| StringValue::from(*s)).collect();
        Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "svc"),
                KeyValue::new("empty", ""),
                KeyValue::new("", "empty key"),
                KeyValue::new("unicode", "ü😀"),
                KeyValue::new("long", "l".repeat(1000)),
                KeyValue::new("t", true),
                KeyValue::new("f", false),
                KeyValue::new("zero", 0i64),
                KeyValue::new("pid", 4242i64),
                KeyValue::new("neg", -1i64),
                KeyValue::new("min", i64::MIN),
                KeyValue::new("max", i64::MAX),
                KeyValue::new("pi", 3.25f64),
                KeyValue::new("negzero", -0.0f64),
                KeyValue::new("inf", f64::INFINITY),
                KeyValue::new("ab", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("ai", Value::Array(Array::I64(vec![0, -5, 1 << 40]))),
                KeyValue::new("af", Value::Array(Array::F64(vec![0.0, 1.5]))),
                KeyValue::new("as", Value::Array(Array::String(strings(&["", "x", "ü"])))),
                KeyValue::new("a_empty", Value::Array(Array::I64(vec![]))),
            ])
            .build()
    }

    fn resources() -> Vec<Resource> {
        let p = ProcessInfo {
            pid: 4242,
            exe_name: "python3.12".into(),
            exe_path: Some("/usr/bin/python3.12".into()),
            otel_service_name: Some("checkout".into()),
            otel_resource_attributes: Some("deployment.environment=prod,team=ü".into()),
            container: crate::container::ContainerIds {
                container_id: Some("ab".repeat(32)),
                pod_uid: Some("0b7e54f2-2f1c-4c5e-9a5d-0e1f2a3b4c5d".into()),
            },
        };
        vec![
            Resource::builder_empty().build(),
            resource::process_resource(&p, &resource::Node::named("node-1")),
            resource::process_resource(&ProcessInfo::default(), &resource::Node::named("h")),
            resource::agent_resource("node-1", Some("a=1")),
            every_kind_of_value(),
            Resource::builder_empty()
                .with_schema_url(
                    [KeyValue::new("k", "v")],
                    "https://opentelemetry.io/schemas/1.26.0",
                )
                .build(),
        ]
    }

    #[test]
    fn resources_match_the_transform() {
        for r in resources() {
            let mut out = Vec::new();
            encode_resource(&mut out, &r);
            let want = resource_proto(&r);
            let got = pr::Resource::decode(out.as_slice()).expect("resource decodes");
            assert_eq!(got, want);
            assert_eq!(out, want.encode_to_vec());
        }
        // NaN is not equal to itself: the bytes show it is carried as is.
        let r = Resource::builder_empty()
            .with_attributes([KeyValue::new("nan", f64::NAN)])
            .build();
        let mut out = Vec::new();
        encode_resource(&mut out, &r);
        assert_eq!(out, resource_proto(&r).encode_to_vec());
    }

    fn scope_proto(s: &InstrumentationScope) -> pc::InstrumentationScope {
        (s, None).into()
    }

    #[test]
    fn scopes_match_the_transform() {
        let scopes = [
            scope(),
            InstrumentationScope::builder("").build(),
            InstrumentationScope::builder("x")
                .with_version("")
                .with_schema_url("https://s")
                .with_attributes([KeyValue::new("a", 1i64), KeyValue::new("b", "c")])
                .build(),
        ];
        for s in scopes {
            let mut out = Vec::new();
            encode_scope(&mut out, &s);
            let want = scope_proto(&s);
            assert_eq!(
                pc::InstrumentationScope::decode(out.as_slice()).expect("scope decodes"),
                want
            );
            assert_eq!(out, want.encode_to_vec());
        }
    }

    /// A resource and its spans (exchange, ids, route).
    type Group = (Resource, Vec<(CapturedExchange, SpanIds, Option<String>)>);

    /// What the exporter sends for these groups, one export per group, merged.
    fn request_oracle(groups: &[Group], scope: &InstrumentationScope) -> ExportTraceServiceRequest {
        let mut resource_spans = Vec::new();
        for (r, spans) in groups {
            let data = spans
                .iter()
                .map(|(ex, ids, route)| build_span(ex, ids, route.as_deref(), scope))
                .collect();
            resource_spans.extend(group_spans_by_resource_and_scope(data, &r.into()));
        }
        ExportTraceServiceRequest { resource_spans }
    }

    fn request_bytes(groups: &[Group], req: &mut TraceRequest) {
        for (r, spans) in groups {
            let mut resource = Vec::new();
            encode_resource(&mut resource, r);
            let encoded: Vec<Vec<u8>> = spans
                .iter()
                .map(|(ex, ids, route)| encoded(ex, ids, route.as_deref()))
                .collect();
            req.add_group_with_schema_url(
                &resource,
                r.schema_url().unwrap_or_default(),
                encoded.iter().map(Vec::as_slice),
            );
        }
    }

    fn groups_of(sizes: &[usize]) -> Vec<Group> {
        let fixtures = fixtures();
        let resources = resources();
        let mut next = 0;
        sizes
            .iter()
            .enumerate()
            .map(|(g, &n)| {
                let spans = (0..n)
                    .map(|i| {
                        let ex = fixtures[next % fixtures.len()].clone();
                        next += 1;
                        let ids = span_context_for(&ex, kernel_ids(&ex));
                        let route = (i % 3 != 0).then(|| format!("/route/{i}"));
                        (ex, ids, route)
                    })
                    .collect();
                (resources[g % resources.len()].clone(), spans)
            })
            .collect()
    }

    #[test]
    fn requests_match_the_exporter() {
        let scopes = [
            scope(),
            InstrumentationScope::builder("s")
                .with_schema_url("https://scope.schema")
                .build(),
        ];
        // Sizes cross the one- and two-byte length varints of both nested messages.
        for sizes in [
            &[][..],
            &[1],
            &[0],
            &[3, 0, 2],
            &[1, 1, 1, 1, 1, 1, 1],
            &[40, 7],
            &[400],
        ] {
            for s in &scopes {
                let groups = groups_of(sizes);
                let mut scope_bytes = Vec::new();
                encode_scope(&mut scope_bytes, s);
                let mut req = TraceRequest::new(scope_bytes)
                    .with_scope_schema_url(s.schema_url().unwrap_or_default());
                request_bytes(&groups, &mut req);
                let want = request_oracle(&groups, s);
                let body = req.clone().finish();
                let got =
                    ExportTraceServiceRequest::decode(body.as_slice()).expect("request decodes");
                assert_eq!(got, want, "{sizes:?}");
                assert_eq!(body, want.encode_to_vec(), "{sizes:?}");

                // The buffer is reusable.
                req.clear();
                assert!(req.is_empty());
                request_bytes(&groups, &mut req);
                assert_eq!(req.as_bytes(), body.as_slice());
            }
        }
    }

    #[test]
    fn large_groups_need_long_lengths() {
        // Spans of ~20 KB each: ScopeSpans and ResourceSpans lengths of three varint bytes.
        let ex = exchange(ExchangeRole::Server, "GET", &"p".repeat(20_000), 200);
        let ids = span_context_for(&ex, None);
        let span = encoded(&ex, &ids, None);
        let mut req = TraceRequest::new(Vec::new());
        req.add_group(b"", std::iter::repeat_n(span.as_slice(), 10));
        let got = ExportTraceServiceRequest::decode(req.as_bytes()).expect("decodes");
        assert_eq!(got.resource_spans.len(), 1);
        assert_eq!(got.resource_spans[0].scope_spans[0].spans.len(), 10);
        assert_eq!(
            got.resource_spans[0].scope_spans[0].spans[9],
            oracle(&ex, &ids, None)
        );
        assert_eq!(
            got.resource_spans[0].scope_spans[0].scope,
            Some(Default::default())
        );
    }

    fn ip_strategy() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| IpAddr::V4(Ipv4Addr::from(o))),
            any::<[u16; 8]>().prop_map(|s| IpAddr::V6(Ipv6Addr::from(s))),
            // Zero runs and mapped forms are where IPv6 text gets subtle.
            (any::<u16>(), any::<u8>(), any::<[u8; 4]>()).prop_map(|(a, z, o)| {
                let mut s = [0u16; 8];
                s[usize::from(z % 8)] = a;
                s[6] = u16::from_be_bytes([o[0], o[1]]);
                s[7] = u16::from_be_bytes([o[2], o[3]]);
                if z % 2 == 0 {
                    s[5] = 0xffff;
                }
                IpAddr::V6(Ipv6Addr::from(s))
            }),
        ]
    }

    fn host_strategy() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            "[a-z0-9.-]{0,20}(:[0-9]{0,6})?",
            "\\[[0-9a-f:]{0,12}\\](:[0-9+]{0,6})?",
            any::<String>(),
        ])
    }

    fn method_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            prop::sample::select(vec![
                "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                "get", "PROPFIND", "",
            ])
            .prop_map(String::from),
            "[A-Z-]{0,12}",
        ]
    }

    fn tracestate_strategy() -> impl Strategy<Value = Option<String>> {
        proptest::option::of(prop_oneof![
            "([a-z][a-z0-9_]{0,8}=[a-zA-Z0-9]{1,8},?){0,5}",
            any::<String>(),
        ])
    }

    #[derive(Debug, Clone)]
    struct Case {
        server: bool,
        method: String,
        path: String,
        status: u16,
        http10: bool,
        host: Option<String>,
        user_agent: Option<String>,
        local: (IpAddr, u16),
        remote: (IpAddr, u16),
        start: u64,
        duration: u64,
        trace_id: u128,
        span_id: u64,
        parent: u64,
        remote_parent: bool,
        tracestate: Option<String>,
        route: Option<String>,
    }

    fn case_strategy() -> impl Strategy<Value = Case> {
        let http = (
            any::<bool>(),
            method_strategy(),
            any::<String>(),
            prop_oneof![any::<u16>(), 100u16..600],
            any::<bool>(),
            host_strategy(),
            proptest::option::of(any::<String>()),
        );
        let net = (
            (ip_strategy(), any::<u16>()),
            (ip_strategy(), any::<u16>()),
            any::<u64>(),
            prop_oneof![any::<u64>(), 0u64..1_000_000_000],
        );
        let trace = (
            any::<u128>(),
            any::<u64>(),
            prop_oneof![Just(0u64), any::<u64>()],
            any::<bool>(),
            tracestate_strategy(),
            proptest::option::of(any::<String>()),
        );
        (http, net, trace).prop_map(
            |(
                (server, method, path, status, http10, host, user_agent),
                (local, remote, start, duration),
                (trace_id, span_id, parent, remote_parent, tracestate, route),
            )| Case {
                server,
                method,
                path,
                status,
                http10,
                host,
                user_agent,
                local,
                remote,
                start,
                duration,
                trace_id,
                span_id,
                parent,
                remote_parent,
                tracestate,
                route,
            },
        )
    }

    fn case_exchange(c: &Case) -> (CapturedExchange, SpanIds) {
        let role = if c.server {
            ExchangeRole::Server
        } else {
            ExchangeRole::Client
        };
        let mut ex = with_endpoints(
            exchange(role, &c.method, &c.path, c.status),
            c.local,
            c.remote,
        );
        ex.http.version = if c.http10 {
            HttpVersion::Http10
        } else {
            HttpVersion::Http11
        };
        ex.http.host = c.host.as_deref().map(Into::into);
        ex.http.user_agent = c.user_agent.as_deref().map(Into::into);
        ex.start_unix_ns = c.start;
        // Sometimes before the start: the span then ends where it starts.
        ex.end_unix_ns = c.start.wrapping_add(c.duration);
        ex.process = Arc::new(ProcessInfo::default());
        let ids = SpanIds {
            trace_id: TraceId::from(c.trace_id),
            span_id: SpanId::from(c.span_id),
            parent_span_id: SpanId::from(c.parent),
            parent_sampled: None,
            parent_is_remote: c.remote_parent,
            trace_state: c
                .tracestate
                .as_deref()
                .and_then(|s| s.parse().ok())
                .unwrap_or_default(),
        };
        (ex, ids)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_spans_match_the_sdk_path(c in case_strategy()) {
            let (ex, ids) = case_exchange(&c);
            let route = c.route.as_deref();
            let want = oracle(&ex, &ids, route);
            let bytes = encoded(&ex, &ids, route);
            let got = pt::Span::decode(bytes.as_slice());
            prop_assert_eq!(got.as_ref().ok(), Some(&want));
            prop_assert_eq!(bytes, want.encode_to_vec());
        }

        #[test]
        fn random_requests_match_the_exporter(
            groups in proptest::collection::vec(
                proptest::collection::vec(case_strategy(), 0..6),
                0..4,
            ),
        ) {
            let resources = resources();
            let groups: Vec<_> = groups
                .iter()
                .enumerate()
                .map(|(i, cases)| {
                    let spans = cases
                        .iter()
                        .map(|c| {
                            let (ex, ids) = case_exchange(c);
                            (ex, ids, c.route.clone())
                        })
                        .collect();
                    (resources[i % resources.len()].clone(), spans)
                })
                .collect();
            let mut scope_bytes = Vec::new();
            encode_scope(&mut scope_bytes, &scope());
            let mut req = TraceRequest::new(scope_bytes);
            request_bytes(&groups, &mut req);
            let want = request_oracle(&groups, &scope());
            let body = req.finish();
            let got = ExportTraceServiceRequest::decode(body.as_slice());
            prop_assert_eq!(got.as_ref().ok(), Some(&want));
            prop_assert_eq!(body, want.encode_to_vec());
        }
    }

    /// ns and allocations per span, old path vs new. Run with
    /// `cargo test --release -p tapir --lib otel::wire -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn bench_span_encoding() {
        use std::hint::black_box;
        let mut cases = Vec::new();
        for (role, host, tp) in [
            (ExchangeRole::Server, None, None),
            (ExchangeRole::Client, Some("api.example.com:8080"), None),
            (
                ExchangeRole::Server,
                None,
                Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ),
            (ExchangeRole::Client, None, None),
        ] {
            let mut ex = exchange(role, "GET", "/api/v1/users/12345/orders", 200);
            ex.http.host = host.map(Into::into);
            ex.http.traceparent = tp.map(Into::into);
            ex.http.tracestate = tp.map(|_| "congo=t61rcWkgMzE".into());
            let ids = span_context_for(&ex, None);
            cases.push((ex, ids, Some("/api/v1/users/{id}/orders")));
        }
        let sc = scope();
        let n = 200_000usize;
        let per = |what: &str, f: &mut dyn FnMut(usize)| {
            for i in 0..1000 {
                f(i);
            }
            let a0 = allocations();
            let t0 = Instant::now();
            for i in 0..n {
                f(i);
            }
            let ns = t0.elapsed().as_nanos() as f64 / n as f64;
            let allocs = (allocations() - a0) as f64 / n as f64;
            println!("{what:<58} {ns:>8.1} ns/span {allocs:>6.2} allocs/span");
        };
        let mut buf = Vec::with_capacity(4096);
        per(
            "old: build_span + From<SpanData> + prost encode",
            &mut |i| {
                let (ex, ids, route) = &cases[i % cases.len()];
                let span = pt::Span::from(build_span(ex, ids, *route, &sc));
                buf.clear();
                span.encode(&mut buf).expect("buffer grows");
                black_box(&buf);
            },
        );
        per("old: build_span only", &mut |i| {
            let (ex, ids, route) = &cases[i % cases.len()];
            black_box(build_span(ex, ids, *route, &sc));
        });
        per("new: encode_span", &mut |i| {
            let (ex, ids, route) = &cases[i % cases.len()];
            buf.clear();
            encode_span(&mut buf, ex, ids, *route);
            black_box(&buf);
        });

        // A whole request of 512 spans in one group, per span.
        let r = resource::agent_resource("node-1", None);
        let mut resource_bytes = Vec::new();
        encode_resource(&mut resource_bytes, &r);
        let mut scope_bytes = Vec::new();
        encode_scope(&mut scope_bytes, &sc);
        let batch = 512;
        let spans: Vec<Vec<u8>> = (0..batch)
            .map(|i| {
                let (ex, ids, route) = &cases[i % cases.len()];
                encoded(ex, ids, *route)
            })
            .collect();
        let mut req = TraceRequest::new(scope_bytes);
        let mut t = 0;
        per(
            "new: TraceRequest::add_group (per span, 512/group)",
            &mut |i| {
                if i % batch == 0 {
                    req.clear();
                    req.add_group(&resource_bytes, spans.iter().map(Vec::as_slice));
                    t += req.as_bytes().len();
                }
            },
        );
        black_box(t);
        let data: Vec<_> = (0..batch)
            .map(|i| {
                let (ex, ids, route) = &cases[i % cases.len()];
                build_span(ex, ids, *route, &sc)
            })
            .collect();
        let res: ResourceAttributesWithSchema = (&r).into();
        per(
            "old: clone + group_spans_by_resource_and_scope + encode",
            &mut |i| {
                if i % batch == 0 {
                    let rs = group_spans_by_resource_and_scope(data.clone(), &res);
                    buf.clear();
                    ExportTraceServiceRequest { resource_spans: rs }
                        .encode(&mut buf)
                        .expect("buffer grows");
                    black_box(&buf);
                }
            },
        );
        println!(
            "span size: {} bytes; request of {batch}: {} bytes",
            spans[0].len(),
            req.as_bytes().len()
        );
    }
}
