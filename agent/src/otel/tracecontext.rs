//! W3C Trace Context: the `traceparent` header (<https://www.w3.org/TR/trace-context/>).
use opentelemetry::trace::{SpanId, TraceId};

/// A valid `traceparent`: the caller's trace, the caller's span (our parent) and its
/// sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    /// Bit 0 of trace-flags: the caller recorded its span.
    pub sampled: bool,
}

/// Length of `vv-<32 hex>-<16 hex>-ff`, the whole of a version 00 header.
const LEN: usize = 55;

/// Parses a `traceparent` value; `None` when it is invalid.
///
/// - version `00`: exactly 55 characters;
/// - version `ff`: invalid;
/// - any other (future) version: the first 55 characters are parsed as version 00 when
///   they are followed by `-` (further fields) or nothing;
/// - lowercase hex only; an all-zero trace id or span id is invalid.
///
/// Surrounding optional whitespace (a header's OWS) is ignored.
pub fn parse_traceparent(value: &str) -> Option<TraceParent> {
    let v = value.trim_matches([' ', '\t']).as_bytes();
    if v.len() < LEN {
        return None;
    }
    let version = hex_u8(&v[0..2])?;
    match version {
        0xff => return None,
        0x00 if v.len() != LEN => return None,
        _ if v.len() > LEN && v[LEN] != b'-' => return None,
        _ => {}
    }
    if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = hex_u128(&v[3..35])?;
    let span_id = hex_u64(&v[36..52])?;
    let flags = hex_u8(&v[53..55])?;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(TraceParent {
        trace_id: TraceId::from(trace_id),
        span_id: SpanId::from(span_id),
        sampled: flags & 1 == 1,
    })
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None, // uppercase is invalid in traceparent
    }
}

fn hex_u128(s: &[u8]) -> Option<u128> {
    s.iter()
        .try_fold(0u128, |acc, &b| Some(acc << 4 | u128::from(hex_digit(b)?)))
}

fn hex_u64(s: &[u8]) -> Option<u64> {
    s.iter()
        .try_fold(0u64, |acc, &b| Some(acc << 4 | u64::from(hex_digit(b)?)))
}

fn hex_u8(s: &[u8]) -> Option<u8> {
    s.iter()
        .try_fold(0u8, |acc, &b| Some(acc << 4 | hex_digit(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";

    fn tp(s: &str) -> Option<TraceParent> {
        parse_traceparent(s)
    }

    #[test]
    fn valid_version_00() {
        let p = tp(&format!("00-{TRACE}-{SPAN}-01")).unwrap();
        assert_eq!(p.trace_id, TraceId::from_hex(TRACE).unwrap());
        assert_eq!(p.span_id, SpanId::from_hex(SPAN).unwrap());
        assert!(p.sampled);
        let p = tp(&format!("00-{TRACE}-{SPAN}-00")).unwrap();
        assert!(!p.sampled);
        // Only bit 0 is "sampled"; other flag bits do not make it sampled.
        assert!(!tp(&format!("00-{TRACE}-{SPAN}-02")).unwrap().sampled);
        assert!(tp(&format!("00-{TRACE}-{SPAN}-03")).unwrap().sampled);
        // Header whitespace is not part of the value.
        assert!(tp(&format!(" 00-{TRACE}-{SPAN}-01\t")).is_some());
    }

    #[test]
    fn version_ff_is_invalid() {
        assert_eq!(tp(&format!("ff-{TRACE}-{SPAN}-01")), None);
    }

    #[test]
    fn bad_lengths() {
        assert_eq!(tp(""), None);
        assert_eq!(tp(&format!("00-{TRACE}-{SPAN}-0")), None);
        assert_eq!(tp(&format!("00-{TRACE}-{SPAN}-011")), None);
        // Version 00 admits no extra fields.
        assert_eq!(tp(&format!("00-{TRACE}-{SPAN}-01-extra")), None);
        assert_eq!(tp(&format!("00-{TRACE}0-{SPAN}-01")), None);
        assert_eq!(tp(&format!("00-{TRACE}-{SPAN}0-01")), None);
        assert_eq!(tp(&format!("0-{TRACE}-{SPAN}-01")), None);
    }

    #[test]
    fn separators_are_checked() {
        assert_eq!(tp(&format!("00_{TRACE}-{SPAN}-01")), None);
        assert_eq!(tp(&format!("00-{TRACE}_{SPAN}-01")), None);
        assert_eq!(tp(&format!("00-{TRACE}-{SPAN}_01")), None);
    }

    #[test]
    fn uppercase_hex_is_invalid() {
        assert_eq!(tp(&format!("00-{}-{SPAN}-01", TRACE.to_uppercase())), None);
        assert_eq!(tp(&format!("00-{TRACE}-{}-01", SPAN.to_uppercase())), None);
        assert_eq!(tp(&format!("0A-{TRACE}-{SPAN}-01")), None);
        assert_eq!(tp(&format!("00-{TRACE}-{SPAN}-0A")), None);
        assert_eq!(tp(&format!("00-{}-{SPAN}-01", "g".repeat(32))), None);
    }

    #[test]
    fn all_zero_ids_are_invalid() {
        assert_eq!(tp(&format!("00-{}-{SPAN}-01", "0".repeat(32))), None);
        assert_eq!(tp(&format!("00-{TRACE}-{}-01", "0".repeat(16))), None);
    }

    #[test]
    fn future_versions() {
        // Extra fields after a '-' are allowed (and ignored) in versions above 00.
        let p = tp(&format!("cc-{TRACE}-{SPAN}-01-what-the-future-holds")).unwrap();
        assert_eq!(p.trace_id, TraceId::from_hex(TRACE).unwrap());
        assert!(p.sampled);
        assert!(tp(&format!("01-{TRACE}-{SPAN}-00")).is_some());
        // ...but the 56th character must be a '-'.
        assert_eq!(tp(&format!("cc-{TRACE}-{SPAN}-01x")), None);
        assert_eq!(tp(&format!("cc-{TRACE}-{SPAN}-01.what")), None);
        // Its first 55 characters still follow the version 00 rules.
        assert_eq!(tp(&format!("cc-{}-{SPAN}-01-x", "0".repeat(32))), None);
    }

    #[test]
    fn never_panics_on_multibyte_input() {
        let s = "00-".to_string() + &"é".repeat(30);
        assert_eq!(tp(&s), None);
        assert_eq!(tp(&"€".repeat(40)), None);
    }
}
