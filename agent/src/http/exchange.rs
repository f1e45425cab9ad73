//! A finished request/response pair: what the agent turns into a span.

use compact_str::CompactString;

/// Which end of the exchange the observed process was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExchangeRole {
    /// The process received the request and sent the response.
    Server,
    /// The process sent the request and received the response.
    Client,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HttpVersion {
    Http10,
    Http11,
    /// HTTP/2 (h2c, or h2 read through the TLS probes).
    Http2,
}

impl HttpVersion {
    /// The `network.protocol.version` attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http10 => "1.0",
            Self::Http11 => "1.1",
            Self::Http2 => "2",
        }
    }
}

/// How an exchange whose connection ended before its response did failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// The connection closed (or a process at one of its ends exited) before any
    /// response: the server crashed or gave up, or the client did.
    NoResponse,
    /// The connection closed in the middle of the response.
    ResponseCutShort,
    /// HTTP/2: an end reset the stream (`RST_STREAM`) before the response ended.
    StreamReset,
}

impl Failure {
    /// The `error.type` attribute value (low-cardinality identifiers, as the HTTP
    /// conventions ask for failures without a status code to tell them).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoResponse => "connection_closed",
            Self::ResponseCutShort => "response_incomplete",
            Self::StreamReset => "stream_reset",
        }
    }
}

/// A gRPC call (an HTTP/2 request whose `content-type` is `application/grpc…`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct GrpcCall {
    /// The `grpc-status` the server sent (in trailers, or in a trailers-only response);
    /// `None` when none was seen.
    pub status: Option<u8>,
}

/// One HTTP request and its final response (HTTP/1.x, or one HTTP/2 stream).
///
/// Only the fields below are kept from the traffic; every other header is never copied.
#[derive(Clone, Debug, PartialEq)]
pub struct Exchange {
    pub role: ExchangeRole,
    pub method: CompactString,
    /// Request target without its query (for absolute-form targets, only the path part).
    pub path: CompactString,
    /// Query string without the `?`; `None` when absent or empty.
    pub query: Option<CompactString>,
    /// Version of the request.
    pub version: HttpVersion,
    /// Status of the final response (or 101 for an upgrade); 0 when none was seen
    /// (`failure` says why).
    pub status: u16,
    pub host: Option<CompactString>,
    pub user_agent: Option<CompactString>,
    /// The first `traceparent` header.
    pub traceparent: Option<CompactString>,
    pub tracestate: Option<CompactString>,
    /// The request carried more than one `traceparent` header.
    pub traceparent_duplicated: bool,
    /// Timestamp of the first chunk of the request head.
    pub start_ns: u64,
    /// Timestamp of the first chunk of the final response head.
    pub response_start_ns: u64,
    /// Timestamp of the chunk that completed the response (or of the close that ended it).
    pub end_ns: u64,
    /// Body bytes of the request (chunked: payload only, unless framing was lost).
    pub request_body_bytes: u64,
    /// Body bytes of the final response (chunked: payload only, unless framing was lost).
    pub response_body_bytes: u64,
    /// The capture limit cut the request head: fields past the captured prefix are missing.
    pub request_head_truncated: bool,
    /// The response left the connection open for another request (HTTP/1.1 without
    /// `Connection: close`, or HTTP/1.0 with `keep-alive`).
    pub keep_alive: bool,
    /// The connection ended before the response did.
    pub failure: Option<Failure>,
    /// Set for gRPC calls: they become RPC spans and metrics.
    pub grpc: Option<GrpcCall>,
    /// Set for Redis commands (`method` is the command): they become database spans and
    /// metrics.
    pub redis: Option<crate::redis::RedisCall>,
}

impl Exchange {
    /// An exchange with nothing known but its role (the fields a parser fills start so).
    pub fn empty(role: ExchangeRole) -> Self {
        Self {
            role,
            method: CompactString::default(),
            path: CompactString::default(),
            query: None,
            version: HttpVersion::Http11,
            status: 0,
            host: None,
            user_agent: None,
            traceparent: None,
            tracestate: None,
            traceparent_duplicated: false,
            start_ns: 0,
            response_start_ns: 0,
            end_ns: 0,
            request_body_bytes: 0,
            response_body_bytes: 0,
            request_head_truncated: false,
            keep_alive: false,
            failure: None,
            grpc: None,
            redis: None,
        }
    }
}
