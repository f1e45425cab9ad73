//! A finished HTTP exchange with everything exporters need: process, addresses, wall times.
use std::sync::Arc;

use serde_json::{json, Value};

use crate::{
    clock::MonoToWall,
    http::{Exchange, ExchangeRole},
    pipeline::Endpoints,
    process::ProcessInfo,
};

#[derive(Debug, Clone)]
pub struct CapturedExchange {
    pub http: Exchange,
    pub process: Arc<ProcessInfo>,
    pub endpoints: Endpoints,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    /// Ids the kernel chose when it saw the request start (and, for CLIENT spans, put on
    /// the wire): exporters must use these so that traces link up.
    pub trace: Option<agent_common::TraceIds>,
    /// Read through a TLS library's probes: the URL scheme is `https`.
    pub tls: bool,
}

impl CapturedExchange {
    pub fn new(
        http: Exchange,
        process: Arc<ProcessInfo>,
        endpoints: Endpoints,
        clock: &MonoToWall,
    ) -> Self {
        Self {
            start_unix_ns: clock.to_unix_ns(http.start_ns),
            end_unix_ns: clock.to_unix_ns(http.end_ns.max(http.start_ns)),
            http,
            process,
            endpoints,
            trace: None,
            tls: false,
        }
    }

    /// `url.scheme`.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    pub fn is_server(&self) -> bool {
        self.http.role == ExchangeRole::Server
    }

    pub fn duration_ns(&self) -> u64 {
        self.end_unix_ns.saturating_sub(self.start_unix_ns)
    }

    /// (server address, client address): a server's own side is local, a client's remote.
    pub fn server_client(&self) -> ((std::net::IpAddr, u16), (std::net::IpAddr, u16)) {
        if self.is_server() {
            (self.endpoints.local, self.endpoints.remote)
        } else {
            (self.endpoints.remote, self.endpoints.local)
        }
    }

    pub fn protocol_version(&self) -> &'static str {
        self.http.version.as_str()
    }

    /// The `tapir watch --json` record: what every exchange has, then its protocol's
    /// fields.
    pub fn to_json(&self) -> Value {
        let (server, client) = self.server_client();
        let mut record = json!({
            "kind": if self.is_server() { "server" } else { "client" },
            "process.pid": self.process.pid,
            "process.executable.name": self.process.exe_name,
            "server.address": server.0.to_string(),
            "server.port": server.1,
            "client.address": client.0.to_string(),
            "client.port": client.1,
            "start_time_unix_nano": self.start_unix_ns,
            "duration_ns": self.duration_ns(),
            "trace_id": self.trace.map(|t| hex(&t.trace_id)),
            "span_id": self.trace.map(|t| hex(&t.span_id)),
            "parent_span_id": self.trace.and_then(|t| (t.has_parent != 0).then(|| hex(&t.parent_span_id))),
        });
        let protocol = match self.http.redis {
            Some(call) => self.redis_json(call),
            None => self.http_json(),
        };
        if let (Some(fields), Value::Object(more)) = (record.as_object_mut(), protocol) {
            fields.extend(more);
        }
        record
    }

    /// A Redis call's fields: `db.*` in place of the HTTP ones.
    fn redis_json(&self, call: crate::redis::RedisCall) -> Value {
        let error = crate::otel::span::redis_error_type(self.http.failure, call);
        json!({
            "db.system.name": crate::otel::span::REDIS,
            "db.operation.name": self.http.method,
            "db.response.status_code": call.error.map(|p| p.to_string()),
            "error.type": error.map(|e| e.to_string()),
        })
    }

    /// An HTTP exchange's fields, and a gRPC call's.
    fn http_json(&self) -> Value {
        let mut fields = json!({
            "http.request.method": self.http.method,
            "url.path": self.http.path,
            "url.scheme": self.scheme(),
            "http.response.status_code": (self.http.status != 0).then_some(self.http.status),
            "error.type": self.http.failure.map(|f| f.as_str()),
            "network.protocol.version": self.protocol_version(),
            "http.request.body.size": self.http.request_body_bytes,
            "http.response.body.size": self.http.response_body_bytes,
        });
        if let (Some(call), Some(more)) = (self.http.grpc, fields.as_object_mut()) {
            let (method, _) = crate::otel::rpc::method(&self.http, call);
            more.insert("rpc.system.name".into(), crate::otel::rpc::SYSTEM.into());
            more.insert("rpc.method".into(), method.into());
            let status = call
                .status
                .map(|code| crate::otel::rpc::status_text(code).as_str().to_string());
            more.insert("rpc.response.status_code".into(), status.into());
        }
        fields
    }
}

/// Lowercase hex, as W3C trace context writes ids.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
