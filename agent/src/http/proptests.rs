//! Property tests of [`super::Http1Stream`]: no input panics it, and how valid traffic is
//! split into syscalls does not change what comes out.

use proptest::prelude::*;
use proptest::sample::{select, Index};

use super::chunk::Direction::{Egress, Ingress};
use super::*;

#[derive(Clone, Debug)]
enum Body {
    None,
    Length(Vec<u8>),
    Chunked(Vec<Vec<u8>>),
}

impl Body {
    fn payload_len(&self) -> u64 {
        match self {
            Body::None => 0,
            Body::Length(bytes) => bytes.len() as u64,
            Body::Chunked(pieces) => pieces.iter().map(|p| p.len() as u64).sum(),
        }
    }

    /// Framing headers and encoded body.
    fn encode(&self) -> (String, Vec<u8>) {
        match self {
            Body::None => (String::new(), Vec::new()),
            Body::Length(bytes) => (
                format!("Content-Length: {}\r\n", bytes.len()),
                bytes.clone(),
            ),
            Body::Chunked(pieces) => {
                let mut out = Vec::new();
                for piece in pieces {
                    out.extend(format!("{:X};ext=1\r\n", piece.len()).as_bytes());
                    out.extend(piece);
                    out.extend(b"\r\n");
                }
                out.extend(b"0\r\n\r\n");
                ("Transfer-Encoding: chunked\r\n".to_owned(), out)
            }
        }
    }
}

#[derive(Clone, Debug)]
struct Plan {
    method: &'static str,
    path: String,
    query: Option<String>,
    traceparent: Option<String>,
    extra_headers: Vec<(String, String)>,
    request_body: Body,
    status: u16,
    response_body: Body,
}

impl Plan {
    fn response_has_body(&self) -> bool {
        self.method != "HEAD" && self.status != 204 && self.status != 304
    }

    fn request(&self) -> Vec<u8> {
        let mut head = format!("{} {}", self.method, self.path);
        if let Some(q) = &self.query {
            head.push('?');
            head.push_str(q);
        }
        head.push_str(" HTTP/1.1\r\nHost: svc.test\r\n");
        for (name, value) in &self.extra_headers {
            head.push_str(&format!("X-{name}: {value}\r\n"));
        }
        if let Some(tp) = &self.traceparent {
            head.push_str(&format!("traceparent: {tp}\r\n"));
        }
        let (framing, body) = self.request_body.encode();
        head.push_str(&framing);
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend(body);
        out
    }

    fn response(&self) -> Vec<u8> {
        let mut head = format!("HTTP/1.1 {} Reason\r\nServer: prop\r\n", self.status);
        for (name, value) in &self.extra_headers {
            head.push_str(&format!("X-{name}: {value}\r\n"));
        }
        let mut body = Vec::new();
        if self.response_has_body() {
            let (framing, encoded) = match &self.response_body {
                // Without a length the body would last until close.
                Body::None => ("Content-Length: 0\r\n".to_owned(), Vec::new()),
                other => other.encode(),
            };
            head.push_str(&framing);
            body = encoded;
        } else if self.method == "HEAD" {
            head.push_str("Content-Length: 4321\r\n");
        }
        head.push_str("\r\n");
        let mut out = head.into_bytes();
        out.extend(body);
        out
    }

    fn expected_response_body(&self) -> u64 {
        if self.response_has_body() {
            self.response_body.payload_len()
        } else {
            0
        }
    }
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        Just(Body::None),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Body::Length),
        prop::collection::vec(prop::collection::vec(any::<u8>(), 1..80), 0..4)
            .prop_map(Body::Chunked),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        select(vec![
            "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
        ]),
        "/[a-z0-9/._-]{0,24}",
        prop::option::of("[a-z0-9=&%]{1,16}"),
        prop::option::of("00-[0-9a-f]{32}-[0-9a-f]{16}-01"),
        prop::collection::vec(
            ("[A-Za-z][A-Za-z0-9-]{0,12}", "[!-~][ -~]{0,30}[!-~]"),
            0..5,
        ),
        body(),
        select(vec![200u16, 201, 204, 301, 304, 404, 500]),
        body(),
    )
        .prop_map(
            |(
                method,
                path,
                query,
                traceparent,
                extra_headers,
                request_body,
                status,
                response_body,
            )| {
                Plan {
                    method,
                    path,
                    query,
                    traceparent,
                    extra_headers,
                    request_body,
                    status,
                    response_body,
                }
            },
        )
}

/// Feeds `pieces` of one direction (empty pieces are skipped like zero-byte syscalls).
fn feed(
    stream: &mut Http1Stream,
    direction: Direction,
    pieces: &[&[u8]],
    ts_ns: u64,
) -> Vec<Exchange> {
    let mut out = Vec::new();
    for piece in pieces {
        let chunk = Chunk::complete(direction, piece, ts_ns);
        assert_eq!(stream.on_chunk(&chunk, &mut out), Ok(()));
    }
    out
}

/// Cuts `bytes` at the given positions.
fn split_at<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    let mut positions: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
    positions.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for at in positions.into_iter().chain([bytes.len()]) {
        pieces.push(&bytes[from..at]);
        from = at;
    }
    pieces
}

/// Runs a keep-alive conversation, each message cut as `cuts` says (per message).
fn converse(plans: &[Plan], cuts: &[Vec<Index>]) -> (Vec<Exchange>, StreamStats) {
    let mut stream = Http1Stream::new();
    let mut out = Vec::new();
    let no_cuts = Vec::new();
    for (i, plan) in plans.iter().enumerate() {
        let ts = i as u64 * 10;
        let request = plan.request();
        let response = plan.response();
        let request_cuts = cuts.get(2 * i).unwrap_or(&no_cuts);
        let response_cuts = cuts.get(2 * i + 1).unwrap_or(&no_cuts);
        out.extend(feed(
            &mut stream,
            Ingress,
            &split_at(&request, request_cuts),
            ts,
        ));
        out.extend(feed(
            &mut stream,
            Egress,
            &split_at(&response, response_cuts),
            ts + 1,
        ));
    }
    stream.on_close(u64::MAX, &mut out);
    (out, *stream.stats())
}

proptest! {
    #[test]
    fn valid_traffic_gives_the_planned_exchanges_however_split(
        plans in prop::collection::vec(plan(), 1..8),
        cuts in prop::collection::vec(prop::collection::vec(any::<Index>(), 0..4), 16),
    ) {
        let (whole, stats) = converse(&plans, &[]);
        prop_assert_eq!(stats.total_drops(), 0);
        prop_assert_eq!(whole.len(), plans.len());
        for (exchange, plan) in whole.iter().zip(&plans) {
            prop_assert_eq!(&exchange.method, plan.method);
            prop_assert_eq!(&exchange.path, &plan.path);
            prop_assert_eq!(exchange.query.as_deref(), plan.query.as_deref());
            prop_assert_eq!(exchange.traceparent.as_deref(), plan.traceparent.as_deref());
            prop_assert_eq!(exchange.host.as_deref(), Some("svc.test"));
            prop_assert_eq!(exchange.status, plan.status);
            prop_assert_eq!(exchange.request_body_bytes, plan.request_body.payload_len());
            prop_assert_eq!(exchange.response_body_bytes, plan.expected_response_body());
        }
        let (split, stats) = converse(&plans, &cuts);
        prop_assert_eq!(stats.total_drops(), 0);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn pipelined_traffic_split_anywhere_matches_unsplit(
        plans in prop::collection::vec(plan(), 1..10),
        request_cuts in prop::collection::vec(any::<Index>(), 0..12),
        response_cuts in prop::collection::vec(any::<Index>(), 0..12),
    ) {
        let requests: Vec<u8> = plans.iter().flat_map(Plan::request).collect();
        let responses: Vec<u8> = plans.iter().flat_map(Plan::response).collect();
        let run = |request_pieces: &[&[u8]], response_pieces: &[&[u8]]| {
            let mut stream = Http1Stream::new();
            let mut out = feed(&mut stream, Ingress, request_pieces, 1);
            out.extend(feed(&mut stream, Egress, response_pieces, 1));
            (out, *stream.stats())
        };
        let (whole, stats) = run(&[&requests], &[&responses]);
        prop_assert_eq!(stats.total_drops(), 0);
        prop_assert_eq!(whole.len(), plans.len());
        let (split, stats) = run(
            &split_at(&requests, &request_cuts),
            &split_at(&responses, &response_cuts),
        );
        prop_assert_eq!(stats.total_drops(), 0);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn capture_limit_does_not_change_length_framed_exchanges(
        plans in prop::collection::vec(plan(), 1..6),
        capture in 0usize..600,
    ) {
        // One syscall per message, cut at `capture` bytes (but never inside the head).
        let length_framed = |b: &Body| !matches!(b, Body::Chunked(_));
        let plans: Vec<Plan> = plans
            .into_iter()
            .filter(|p| length_framed(&p.request_body) && length_framed(&p.response_body))
            .collect();
        let (whole, _) = converse(&plans, &[]);
        let mut stream = Http1Stream::new();
        let mut out = Vec::new();
        for (i, plan) in plans.iter().enumerate() {
            for (direction, message, ts) in [(Ingress, plan.request(), i as u64 * 10), (Egress, plan.response(), i as u64 * 10 + 1)] {
                let head_len = message.windows(4).position(|w| w == b"\r\n\r\n").map_or(0, |p| p + 4);
                let captured = capture.max(head_len).min(message.len());
                let tail_from = message.len().saturating_sub(agent_common::TAIL_BYTES);
                let chunk = Chunk {
                    direction,
                    data: &message[..captured],
                    total: message.len(),
                    tail: if captured < message.len() { &message[tail_from..] } else { &[] },
                    ts_ns: ts,
                };
                prop_assert_eq!(stream.on_chunk(&chunk, &mut out), Ok(()));
            }
        }
        stream.on_close(u64::MAX, &mut out);
        prop_assert_eq!(stream.stats().total_drops(), 0);
        prop_assert_eq!(out, whole);
    }

    #[test]
    fn random_chunks_never_panic(
        chunks in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300), 0usize..100_000, prop::collection::vec(any::<u8>(), 0..=16)),
            0..40,
        ),
        max_head_bytes in 1usize..2000,
    ) {
        let mut stream = Http1Stream::with_config(StreamConfig { max_head_bytes, max_pending: 4 });
        let mut out = Vec::new();
        for (i, (egress, data, extra, tail)) in chunks.iter().enumerate() {
            let direction = if *egress { Egress } else { Ingress };
            let total = data.len() + if *extra % 3 == 0 { *extra } else { 0 };
            let tail: &[u8] = if total > data.len() { tail } else { &[] };
            let chunk = Chunk { direction, data, total, tail, ts_ns: i as u64 };
            prop_assert!(stream.on_chunk(&chunk, &mut out).is_ok());
        }
        stream.on_close(1_000_000, &mut out);
        prop_assert!(stream.pending_requests() == 0);
    }

    #[test]
    fn random_bytes_mixed_into_valid_traffic_never_panic(
        plans in prop::collection::vec(plan(), 1..6),
        noise in prop::collection::vec((any::<Index>(), prop::collection::vec(any::<u8>(), 0..40), any::<bool>()), 0..6),
        cuts in prop::collection::vec(any::<Index>(), 0..10),
    ) {
        let mut requests: Vec<u8> = plans.iter().flat_map(Plan::request).collect();
        let mut responses: Vec<u8> = plans.iter().flat_map(Plan::response).collect();
        for (at, bytes, in_requests) in &noise {
            let target = if *in_requests { &mut requests } else { &mut responses };
            let at = at.index(target.len() + 1);
            target.splice(at..at, bytes.iter().copied());
        }
        let mut stream = Http1Stream::new();
        let mut out = feed(&mut stream, Ingress, &split_at(&requests, &cuts), 1);
        out.extend(feed(&mut stream, Egress, &split_at(&responses, &cuts), 2));
        stream.on_close(3, &mut out);
        prop_assert!(out.len() <= plans.len() + noise.len());
        // The connection's successor starts clean.
        let mut fresh = Vec::new();
        feed(&mut stream, Ingress, &[b"GET /ok HTTP/1.1\r\n\r\n"], 4);
        fresh.extend(feed(&mut stream, Egress, &[b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], 5));
        prop_assert_eq!(fresh.len(), 1);
    }

    #[test]
    fn random_text_that_looks_like_http_never_panics(
        lines in prop::collection::vec(
            prop_oneof![
                Just("GET / HTTP/1.1".to_owned()),
                Just("HTTP/1.1 200 OK".to_owned()),
                Just("HTTP/1.1 101 Switching".to_owned()),
                Just("HTTP/1.1 100 Continue".to_owned()),
                Just("Transfer-Encoding: chunked".to_owned()),
                Just("Content-Length: 5".to_owned()),
                Just("Content-Length: x".to_owned()),
                Just("0".to_owned()),
                Just("5".to_owned()),
                Just(String::new()),
                "[ -~]{0,20}",
            ],
            0..40,
        ),
        directions in prop::collection::vec(any::<bool>(), 40),
        line_ends in prop::collection::vec(select(vec!["\r\n", "\n", "\r", ""]), 40),
    ) {
        let mut stream = Http1Stream::new();
        let mut out = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let direction = if directions.get(i).copied().unwrap_or(false) { Egress } else { Ingress };
            let bytes = format!("{line}{}", line_ends.get(i).copied().unwrap_or("\r\n"));
            let chunk = Chunk::complete(direction, bytes.as_bytes(), i as u64);
            prop_assert!(stream.on_chunk(&chunk, &mut out).is_ok());
        }
        stream.on_close(99, &mut out);
    }
}

proptest! {
    #[test]
    fn cut_captures_never_pair_a_request_with_a_wrong_response(
        plans in prop::collection::vec(plan(), 1..8),
        capture in 1usize..400,
        merge_writes in any::<bool>(),
    ) {
        // Every message is one syscall (or, when merged, each direction's stream is one
        // syscall per exchange pair), cut at `capture` bytes wherever that falls.
        let mut stream = Http1Stream::new();
        let mut out = Vec::new();
        let send = |stream: &mut Http1Stream, out: &mut Vec<Exchange>, direction, message: &[u8], ts| {
            let captured = capture.min(message.len());
            let tail_from = message.len().saturating_sub(agent_common::TAIL_BYTES);
            let chunk = Chunk {
                direction,
                data: &message[..captured],
                total: message.len(),
                tail: if captured < message.len() { &message[tail_from..] } else { &[] },
                ts_ns: ts,
            };
            stream.on_chunk(&chunk, out)
        };
        if merge_writes {
            let requests: Vec<u8> = plans.iter().flat_map(Plan::request).collect();
            let responses: Vec<u8> = plans.iter().flat_map(Plan::response).collect();
            prop_assert!(send(&mut stream, &mut out, Ingress, &requests, 1).is_ok());
            prop_assert!(send(&mut stream, &mut out, Egress, &responses, 2).is_ok());
        } else {
            for (i, plan) in plans.iter().enumerate() {
                let ts = i as u64 * 10;
                prop_assert!(send(&mut stream, &mut out, Ingress, &plan.request(), ts).is_ok());
                prop_assert!(send(&mut stream, &mut out, Egress, &plan.response(), ts + 1).is_ok());
            }
        }
        stream.on_close(u64::MAX, &mut out);
        // What comes out is a subsequence of what went in, each request with its own status;
        // every response was sent, so none failed (one not followed is counted, not failed).
        let mut remaining = plans.iter();
        for exchange in &out {
            prop_assert_eq!(exchange.failure, None, "{:?} of {:?}", exchange, out);
            let found = remaining.any(|p| {
                p.path == exchange.path && p.method == exchange.method && p.status == exchange.status
            });
            prop_assert!(found, "unexpected {:?}", exchange);
        }
    }
}

proptest! {
    /// The word-at-a-time comparison agrees with std's on any bytes, including the
    /// lowercased input itself and near misses of the names compared in practice.
    #[test]
    fn eq_lower_is_eq_ignore_ascii_case(
        s in proptest::collection::vec(any::<u8>(), 0..40),
        name in select(vec![
            &b"content-length"[..], b"transfer-encoding", b"connection", b"keep-alive",
            b"traceparent", b"100-continue", b"user-agent", b"chunked",
        ]),
        flip in any::<Index>(),
    ) {
        let lower = s.to_ascii_lowercase();
        prop_assert_eq!(head::eq_lower(&s, &lower), s.eq_ignore_ascii_case(&lower));
        prop_assert_eq!(head::eq_lower(&s, name), s.eq_ignore_ascii_case(name));
        // The name with one byte's case flipped, and with one byte changed.
        let mut upper = name.to_vec();
        let i = flip.index(upper.len());
        upper[i] = upper[i].to_ascii_uppercase();
        prop_assert!(head::eq_lower(&upper, name));
        let mut near = name.to_vec();
        near[i] ^= 0x01;
        prop_assert_eq!(head::eq_lower(&near, name), near.eq_ignore_ascii_case(name));
        near[i] = near[i].wrapping_add(0x80);
        prop_assert!(!head::eq_lower(&near, name));
    }
}
