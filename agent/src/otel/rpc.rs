//! gRPC calls as the RPC semantic conventions describe them: the span name and `rpc.*`
//! attributes, and which statuses are errors at which end.
use super::text::StackText;
use crate::http::{Exchange, GrpcCall};

/// `rpc.system.name` of a gRPC call.
pub const SYSTEM: &str = "grpc";
/// `rpc.method` of a method the server did not know.
pub const OTHER_METHOD: &str = "_OTHER";

/// gRPC's status codes by number (`rpc.response.status_code`).
const STATUS_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

const UNIMPLEMENTED: u8 = 12;

/// The name of a status code; `None` for a number gRPC does not define.
pub fn status_name(code: u8) -> Option<&'static str> {
    STATUS_NAMES.get(usize::from(code)).copied()
}

/// `rpc.response.status_code` of a status: its name, or its number for one gRPC does not
/// define. On the stack: the span encoder must not allocate.
pub fn status_text(code: u8) -> StackText {
    match status_name(code) {
        Some(name) => StackText::str(name),
        None => StackText::decimal(u16::from(code)),
    }
}

/// Whether a call that ended with `code` failed at its `server` end or its client's:
/// every status but OK for a client; for a server only those that say the server could
/// not do its part (the conventions' list), not a caller's mistake.
pub fn is_error(server: bool, code: u8) -> bool {
    if !server {
        return code != 0;
    }
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS.
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

/// `(rpc.method, rpc.method_original)`: the path's `package.Service/Method`; a method
/// the server answered UNIMPLEMENTED, or a path that names none, is `_OTHER` (keeps
/// the attribute's values to the methods that exist) with the path as sent.
pub fn method(ex: &Exchange, call: GrpcCall) -> (&str, Option<&str>) {
    let name = ex.path.strip_prefix('/').unwrap_or(&ex.path);
    let named = name
        .split_once('/')
        .is_some_and(|(s, m)| !s.is_empty() && !m.is_empty());
    if named && call.status != Some(UNIMPLEMENTED) {
        (name, None)
    } else {
        (OTHER_METHOD, Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        http::{ExchangeRole, HttpVersion},
        otel::span::tests::exchange,
    };

    fn call(path: &str) -> Exchange {
        let mut ex = exchange(ExchangeRole::Server, "POST", path, 200).http;
        ex.version = HttpVersion::Http2;
        ex.grpc = Some(GrpcCall::default());
        ex
    }

    #[test]
    fn status_names_follow_the_numbers() {
        assert_eq!(status_name(0), Some("OK"));
        assert_eq!(status_name(4), Some("DEADLINE_EXCEEDED"));
        assert_eq!(status_name(12), Some("UNIMPLEMENTED"));
        assert_eq!(status_name(16), Some("UNAUTHENTICATED"));
        assert_eq!(status_name(17), None);
        assert_eq!(status_text(14).as_str(), "UNAVAILABLE");
        assert_eq!(status_text(17).as_str(), "17");
        assert_eq!(status_text(255).as_str(), "255");
    }

    #[test]
    fn errors_depend_on_the_end() {
        assert!(!is_error(true, 0) && !is_error(false, 0));
        // A caller's mistake is the client's error only.
        assert!(!is_error(true, 3) && is_error(false, 3));
        assert!(!is_error(true, 5) && is_error(false, 5));
        for code in [2, 4, 12, 13, 14, 15] {
            assert!(is_error(true, code) && is_error(false, code), "{code}");
        }
    }

    #[test]
    fn methods_come_from_the_path_unless_the_server_did_not_know_them() {
        let ok = GrpcCall { status: Some(0) };
        let ex = call("/helloworld.Greeter/SayHello");
        assert_eq!(method(&ex, ok), ("helloworld.Greeter/SayHello", None));
        let unknown = GrpcCall {
            status: Some(UNIMPLEMENTED),
        };
        assert_eq!(
            method(&ex, unknown),
            ("_OTHER", Some("helloworld.Greeter/SayHello"))
        );
        for path in ["/", "/only", "//m", "/s/"] {
            assert_eq!(method(&call(path), ok).0, "_OTHER", "{path}");
        }
    }
}
