//! Byte-fixture tests of [`super::Http1Stream`]: one per behaviour.

use super::chunk::Direction::{Egress, Ingress};
use super::*;

const TAIL: usize = agent_common::TAIL_BYTES;
const CAPTURE: usize = agent_common::MAX_CAPTURE;

/// A stream plus what it emitted.
struct Conn {
    stream: Http1Stream,
    out: Vec<Exchange>,
}

impl Conn {
    fn new() -> Self {
        Self::with_config(StreamConfig::default())
    }

    fn with_config(config: StreamConfig) -> Self {
        Self {
            stream: Http1Stream::with_config(config),
            out: Vec::new(),
        }
    }

    /// A fully captured syscall.
    fn send(&mut self, direction: Direction, bytes: &[u8], ts_ns: u64) {
        let chunk = Chunk::complete(direction, bytes, ts_ns);
        assert_eq!(self.stream.on_chunk(&chunk, &mut self.out), Ok(()));
    }

    /// A syscall of which only the first `captured` bytes (and the tail) were captured.
    fn send_cut(&mut self, direction: Direction, full: &[u8], captured: usize, ts_ns: u64) {
        let chunk = cut(direction, full, captured, ts_ns);
        assert_eq!(self.stream.on_chunk(&chunk, &mut self.out), Ok(()));
    }

    /// A syscall captured like the kernel does by default.
    fn send_captured(&mut self, direction: Direction, full: &[u8], ts_ns: u64) {
        self.send_cut(direction, full, CAPTURE, ts_ns);
    }

    fn close(&mut self, ts_ns: u64) {
        self.stream.on_close(ts_ns, &mut self.out);
    }

    fn take(&mut self) -> Vec<Exchange> {
        std::mem::take(&mut self.out)
    }

    fn take_one(&mut self) -> Exchange {
        let mut out = self.take();
        assert_eq!(out.len(), 1, "expected one exchange, got {out:#?}");
        out.remove(0)
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.stream.stats().drops(reason)
    }

    fn total_drops(&self) -> u64 {
        self.stream.stats().total_drops()
    }

    /// A plain GET and its response go through (checks the stream is in sync).
    fn assert_round_trip(&mut self, path: &str, ts_ns: u64) {
        let (req, resp) = match self.stream.role() {
            Some(ExchangeRole::Client) => (Egress, Ingress),
            _ => (Ingress, Egress),
        };
        self.send(req, &get(path), ts_ns);
        self.send(resp, &ok(b"fine"), ts_ns + 1);
        let exchange = self.take_one();
        assert_eq!(exchange.path, path);
        assert_eq!(exchange.status, 200);
        assert_eq!(exchange.response_body_bytes, 4);
        assert_eq!(exchange.end_ns, ts_ns + 1);
    }
}

fn cut(direction: Direction, full: &[u8], captured: usize, ts_ns: u64) -> Chunk<'_> {
    let captured = captured.min(full.len());
    let tail = if captured < full.len() {
        &full[full.len().saturating_sub(TAIL)..]
    } else {
        &[]
    };
    Chunk {
        direction,
        data: &full[..captured],
        total: full.len(),
        tail,
        ts_ns,
    }
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: svc\r\nUser-Agent: test/1\r\nAccept: */*\r\n\r\n")
        .into_bytes()
}

fn ok(body: &[u8]) -> Vec<u8> {
    response(200, body)
}

fn response(status: u16, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 {status} Whatever\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

/// Chunked encoding of `pieces` (with the last chunk).
fn chunked(pieces: &[&[u8]]) -> Vec<u8> {
    let mut body = Vec::new();
    for piece in pieces {
        body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        body.extend_from_slice(piece);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

#[test]
fn a_request_and_its_response_make_one_exchange() {
    let mut c = Conn::new();
    let req = format!(
        "GET /users/42?expand=1 HTTP/1.1\r\nHost: api.local\r\nUser-Agent: t/1\r\n\
         traceparent: {TRACEPARENT}\r\ntracestate: k=v\r\nCookie: secret\r\n\r\n"
    );
    c.send(Ingress, req.as_bytes(), 10);
    assert!(c.take().is_empty());
    c.send(Egress, &ok(b"hello"), 20);
    assert_eq!(
        c.take_one(),
        Exchange {
            role: ExchangeRole::Server,
            method: "GET".into(),
            path: "/users/42".into(),
            query: Some("expand=1".into()),
            version: HttpVersion::Http11,
            status: 200,
            host: Some("api.local".into()),
            user_agent: Some("t/1".into()),
            traceparent: Some(TRACEPARENT.into()),
            tracestate: Some("k=v".into()),
            traceparent_duplicated: false,
            start_ns: 10,
            response_start_ns: 20,
            end_ns: 20,
            request_body_bytes: 0,
            response_body_bytes: 5,
            request_head_truncated: false,
            keep_alive: true,
            failure: None,
            grpc: None,
            redis: None,
        }
    );
    assert_eq!(c.stream.role(), Some(ExchangeRole::Server));
    assert_eq!(c.total_drops(), 0);
    assert_eq!(c.stream.pending_requests(), 0);
}

#[test]
fn request_split_at_every_byte_position() {
    let mut whole = Conn::new();
    let req = b"POST /submit?x=y HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world";
    whole.send(Ingress, req, 1);
    whole.send(Egress, &ok(b"done"), 3);
    let expected = whole.take_one();
    assert_eq!(expected.request_body_bytes, 11);

    for split in 0..=req.len() {
        let mut c = Conn::new();
        c.send(Ingress, &req[..split], 1);
        c.send(Ingress, &req[split..], 2);
        c.send(Egress, &ok(b"done"), 3);
        let got = c.take_one();
        // The head starts in the first chunk unless that one is empty.
        let start_ns = if split == 0 { 2 } else { 1 };
        assert_eq!(
            got,
            Exchange {
                start_ns,
                ..expected.clone()
            },
            "split at {split}"
        );
        assert_eq!(c.total_drops(), 0, "split at {split}");
    }
}

#[test]
fn response_split_at_every_byte_position() {
    let resp = ok(b"0123456789");
    for split in 0..=resp.len() {
        let mut c = Conn::new();
        c.send(Ingress, &get("/"), 1);
        c.send(Egress, &resp[..split], 2);
        c.send(Egress, &resp[split..], 3);
        let got = c.take_one();
        assert_eq!(
            (got.status, got.response_body_bytes),
            (200, 10),
            "split at {split}"
        );
        assert_eq!(got.response_start_ns, if split == 0 { 3 } else { 2 });
        assert_eq!(got.end_ns, if split == resp.len() { 2 } else { 3 });
        c.assert_round_trip("/next", 10);
    }
}

#[test]
fn headers_spread_over_three_chunks() {
    let mut c = Conn::new();
    c.send(Ingress, b"GET /three HTTP/1.1\r\nHo", 5);
    c.send(Ingress, b"st: example.org\r\nUser-Agent: spr", 6);
    c.send(Ingress, b"ead/2\r\nAccept: */*\r\n\r\n", 7);
    c.send(Egress, b"HTTP/1.1 204 No Content\r\n\r\n", 8);
    let e = c.take_one();
    assert_eq!(e.path, "/three");
    assert_eq!(e.host.as_deref(), Some("example.org"));
    assert_eq!(e.user_agent.as_deref(), Some("spread/2"));
    assert_eq!((e.start_ns, e.end_ns, e.status), (5, 8, 204));
}

#[test]
fn hundred_keep_alive_requests_are_hundred_exchanges() {
    let mut c = Conn::new();
    for i in 0..100u64 {
        c.send(Ingress, &get(&format!("/item/{i}")), i * 10);
        c.send(Egress, &ok(format!("body {i}").as_bytes()), i * 10 + 5);
    }
    let out = c.take();
    assert_eq!(out.len(), 100);
    for (i, e) in out.iter().enumerate() {
        assert_eq!(e.path, format!("/item/{i}"));
        assert_eq!(e.start_ns, i as u64 * 10);
        assert_eq!(e.end_ns, i as u64 * 10 + 5);
        assert_eq!(e.response_body_bytes, format!("body {i}").len() as u64);
    }
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn pipelined_requests_pair_with_responses_in_order() {
    let mut c = Conn::new();
    let mut requests = get("/a");
    requests.extend(get("/b"));
    requests.extend(b"HEAD /c HTTP/1.1\r\nHost: svc\r\n\r\n");
    c.send(Ingress, &requests, 1);
    assert_eq!(c.stream.pending_requests(), 3);
    let mut responses = ok(b"aaaa");
    responses.extend(response(404, b"nope"));
    // A HEAD response announces a length but carries no body.
    responses.extend(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n");
    c.send(Egress, &responses, 2);
    let out = c.take();
    let summary: Vec<_> = out
        .iter()
        .map(|e| {
            (
                e.method.as_str(),
                e.path.as_str(),
                e.status,
                e.response_body_bytes,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("GET", "/a", 200, 4),
            ("GET", "/b", 404, 4),
            ("HEAD", "/c", 200, 0)
        ]
    );
    assert_eq!(c.total_drops(), 0);
    c.assert_round_trip("/after", 10);
}

#[test]
fn mebibyte_body_captured_as_prefixes_is_counted_by_length() {
    const BODY: usize = 1 << 20;
    const WRITE: usize = 64 * 1024;
    let mut c = Conn::new();
    c.send(Ingress, &get("/big"), 1);
    let mut whole = format!("HTTP/1.1 200 OK\r\nContent-Length: {BODY}\r\n\r\n").into_bytes();
    let head_len = whole.len();
    whole.extend((0..BODY).map(|i| (i % 251) as u8));
    for (i, write) in whole.chunks(WRITE).enumerate() {
        c.send_captured(Egress, write, 10 + i as u64);
    }
    let writes = whole.len().div_ceil(WRITE) as u64;
    let e = c.take_one();
    assert_eq!(e.response_body_bytes, BODY as u64);
    assert_eq!((e.response_start_ns, e.end_ns), (10, 10 + writes - 1));
    assert!(head_len < CAPTURE);
    assert_eq!(c.total_drops(), 0);
    c.assert_round_trip("/after", 100);
}

#[test]
fn chunked_response_split_across_syscalls() {
    let mut resp = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    resp.extend(chunked(&[b"Hello, ", b"chunked ", b"world!", &[b'z'; 300]]));
    for a in (0..resp.len()).step_by(3) {
        for b in (a..resp.len()).step_by(7) {
            let mut c = Conn::new();
            c.send(Ingress, &get("/chunks"), 1);
            c.send(Egress, &resp[..a], 2);
            c.send(Egress, &resp[a..b], 3);
            c.send(Egress, &resp[b..], 4);
            let e = c.take_one();
            assert_eq!(e.response_body_bytes, 7 + 8 + 6 + 300, "split {a}/{b}");
            assert_eq!(e.end_ns, 4, "split {a}/{b}");
            c.assert_round_trip("/next", 10);
        }
    }
}

#[test]
fn large_chunks_stay_in_sync_through_uncaptured_payload() {
    // One write per chunk, each bigger than the capture: payload is skipped by count and the
    // CRLF after it is read back from the tail.
    let mut c = Conn::new();
    c.send(Ingress, &get("/stream"), 1);
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        2,
    );
    let piece = vec![b'p'; 20_000];
    for ts in 3..8 {
        let mut write = format!("{:x}\r\n", piece.len()).into_bytes();
        write.extend_from_slice(&piece);
        write.extend_from_slice(b"\r\n");
        c.send_captured(Egress, &write, ts);
    }
    assert!(c.take().is_empty());
    c.send(Egress, b"0\r\n\r\n", 9);
    let e = c.take_one();
    assert_eq!(e.response_body_bytes, 5 * 20_000);
    assert_eq!(e.end_ns, 9);
    c.assert_round_trip("/next", 20);
}

#[test]
fn chunked_body_with_uncaptured_framing_ends_by_the_tail() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/multi"), 1);
    // Head plus many chunks in one write: most of the framing is beyond the capture.
    let mut write = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let pieces: Vec<Vec<u8>> = (0..8).map(|i| vec![b'a' + i; 3000]).collect();
    let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    write.extend(
        chunked(&refs[..4])
            .strip_suffix(b"0\r\n\r\n")
            .unwrap_or_default(),
    );
    c.send_captured(Egress, &write, 2);
    // The rest, again more framing than the capture shows, ends with the last chunk.
    c.send_captured(Egress, &chunked(&refs[4..]), 3);
    let e = c.take_one();
    assert_eq!(e.end_ns, 3);
    // Framing lost: the count includes some framing bytes, but at least all payload.
    assert!(e.response_body_bytes >= 8 * 3000);
    assert!(e.response_body_bytes < 8 * 3000 + 100);
    assert_eq!(c.total_drops(), 0);
    c.assert_round_trip("/next", 10);
}

#[test]
fn unsynced_chunked_body_ending_in_a_small_write() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/tail"), 1);
    let mut write = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let big = vec![b'x'; 6000];
    write.extend(
        chunked(&[&big, &big])
            .strip_suffix(b"0\r\n\r\n")
            .unwrap_or_default(),
    );
    c.send_captured(Egress, &write, 2);
    c.send(Egress, b"0\r\n", 3);
    assert!(c.take().is_empty());
    c.send(Egress, b"\r\n", 4);
    assert_eq!(c.take_one().end_ns, 4);
}

#[test]
fn head_204_and_304_responses_have_no_body() {
    let mut c = Conn::new();
    c.send(Ingress, b"HEAD /file HTTP/1.1\r\nHost: h\r\n\r\n", 1);
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n",
        2,
    );
    let e = c.take_one();
    assert_eq!(
        (e.method.as_str(), e.status, e.response_body_bytes, e.end_ns),
        ("HEAD", 200, 0, 2)
    );

    c.send(Ingress, &get("/gone"), 3);
    c.send(Egress, b"HTTP/1.1 204 No Content\r\n\r\n", 4);
    assert_eq!(c.take_one().status, 204);

    c.send(Ingress, &get("/cached"), 5);
    c.send(
        Egress,
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 123\r\n\r\n",
        6,
    );
    let e = c.take_one();
    assert_eq!((e.status, e.response_body_bytes), (304, 0));
    c.assert_round_trip("/after", 10);
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn expect_100_continue_skips_the_interim_response() {
    let mut c = Conn::new();
    c.send(
        Ingress,
        b"PUT /upload HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\nExpect: 100-continue\r\n\r\n",
        1,
    );
    c.send(Egress, b"HTTP/1.1 100 Continue\r\n\r\n", 2);
    assert!(c.take().is_empty());
    c.send(Ingress, b"0123456789", 3);
    c.send(Egress, &response(201, b""), 4);
    let e = c.take_one();
    assert_eq!((e.method.as_str(), e.status), ("PUT", 201));
    assert_eq!(e.request_body_bytes, 10);
    assert_eq!((e.response_start_ns, e.end_ns), (4, 4));
    // Other interim responses (103 Early Hints) are skipped too.
    c.send(Ingress, &get("/hints"), 5);
    c.send(
        Egress,
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n",
        6,
    );
    c.send(Egress, &ok(b"x"), 7);
    let e = c.take_one();
    assert_eq!((e.status, e.response_start_ns), (200, 7));
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn switching_protocols_ends_http_tracking() {
    let mut c = Conn::new();
    c.send(
        Ingress,
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        1,
    );
    c.send(
        Egress,
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello",
        2,
    );
    let e = c.take_one();
    assert_eq!((e.path.as_str(), e.status, e.end_ns), ("/ws", 101, 2));
    assert!(c.stream.is_upgraded());
    // Frames, even ones that look like HTTP, are no longer parsed.
    c.send(Ingress, b"\x81\x85abcdefghi", 3);
    c.send(Ingress, &get("/not-http-anymore"), 4);
    c.send(Egress, &ok(b"no"), 5);
    assert!(c.take().is_empty());
    assert_eq!(c.total_drops(), 0);
    // A closed connection starts over.
    c.close(6);
    assert!(!c.stream.is_upgraded());
    c.assert_round_trip("/new-connection", 10);
}

#[test]
fn connect_tunnel_ends_http_tracking() {
    let mut c = Conn::new();
    c.send(
        Egress,
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n",
        1,
    );
    c.send(Ingress, b"HTTP/1.1 200 Connection established\r\n\r\n", 2);
    let e = c.take_one();
    assert_eq!(
        (e.role, e.method.as_str(), e.path.as_str()),
        (ExchangeRole::Client, "CONNECT", "db.internal:5432")
    );
    assert!(c.stream.is_upgraded());
}

#[test]
fn http10_response_without_length_ends_at_close() {
    let mut c = Conn::new();
    c.send(Ingress, b"GET /old HTTP/1.0\r\n\r\n", 1);
    c.send(
        Egress,
        b"HTTP/1.0 200 OK\r\nContent-Type: text/html\r\n\r\n<html>",
        2,
    );
    c.send(Egress, b"</html>", 3);
    assert!(c.take().is_empty());
    c.close(9);
    let e = c.take_one();
    assert_eq!(e.version, HttpVersion::Http10);
    assert_eq!((e.status, e.response_body_bytes), (200, 13));
    assert_eq!((e.response_start_ns, e.end_ns), (2, 9));
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn connection_close_response_without_length_ends_at_close() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/x"), 1);
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc",
        2,
    );
    c.close(3);
    let e = c.take_one();
    assert_eq!((e.response_body_bytes, e.end_ns), (3, 3));
}

#[test]
fn keep_alive_response_without_length_ends_at_the_next_request() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/a"), 1);
    c.send(Egress, b"HTTP/1.1 200 OK\r\n\r\nsome body", 2);
    c.send(Egress, b" more", 3);
    c.send(Ingress, &get("/b"), 4);
    let e = c.take_one();
    assert_eq!(
        (e.path.as_str(), e.response_body_bytes, e.end_ns),
        ("/a", 14, 3)
    );
    c.send(Egress, &ok(b"b"), 5);
    assert_eq!(c.take_one().path, "/b");
}

#[test]
fn response_without_request_is_dropped_and_counted() {
    let mut c = Conn::new();
    c.send(Egress, &ok(b"orphan"), 1);
    assert!(c.take().is_empty());
    assert_eq!(c.drops(DropReason::UnmatchedResponse), 1);
    // Its body was followed: the next exchange is intact.
    c.assert_round_trip("/after", 10);
    assert_eq!(c.total_drops(), 1);
}

#[test]
fn garbage_is_skipped_until_http_starts() {
    let mut c = Conn::new();
    let noise: Vec<u8> = (0..5000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    for piece in noise.chunks(777) {
        c.send(Ingress, piece, 1);
        c.send(Egress, piece, 1);
    }
    c.send(Ingress, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 2); // TLS hello
    c.send(Ingress, b"SSH-2.0-OpenSSH_9.6\r\n", 2);
    assert!(c.take().is_empty());
    assert_eq!(c.total_drops(), 0);
    assert!(c.stream.stats().skipped_chunks > 0);
    assert_eq!(c.stream.role(), None);
    c.assert_round_trip("/finally", 10);
}

/// A connection seen from its first byte: bytes that cannot start a request are counted
/// once (malformed), and the server's refusal is not counted again as a response without
/// request. (Seen late, the same bytes could be the middle of a body: skipped, as in
/// `garbage_is_skipped_until_http_starts`.)
#[test]
fn unreadable_first_request_is_counted_once_on_a_connection_seen_from_its_start() {
    let garbage: [&[u8]; 4] = [
        b"GET /g HTTP/12.x\r\nHost: h\r\n\r\n",
        b"POST \x80\x81\xfe\xff\r\n\r\n",
        b"GET /g HTTP/1.1\r\nX-\x00: v\r\n\r\n",
        b"\x01\x02 binary\r\n\r\n",
    ];
    for bytes in garbage {
        let mut c = Conn {
            stream: Http1Stream::from_first_byte(),
            out: Vec::new(),
        };
        c.send(Ingress, bytes, 1);
        c.send(Egress, &response(400, b""), 2);
        assert!(c.take().is_empty(), "{bytes:?}");
        assert_eq!(
            (c.drops(DropReason::Malformed), c.total_drops()),
            (1, 1),
            "{bytes:?}"
        );
    }
    // Only the one answer is absorbed: a later response without request still counts.
    let mut c = Conn {
        stream: Http1Stream::from_first_byte(),
        out: Vec::new(),
    };
    c.send(Ingress, garbage[0], 1);
    c.assert_round_trip("/next", 5);
    c.send(Egress, &response(400, b""), 20);
    assert_eq!(c.drops(DropReason::UnmatchedResponse), 1);
}

#[test]
fn request_cut_short_by_a_close_is_counted_as_never_answered() {
    let mut c = Conn::new();
    c.assert_round_trip("/first", 1);
    c.send(Ingress, b"GET /half HTTP/1.1\r\nHo", 5);
    c.close(6);
    assert!(c.take().is_empty());
    assert_eq!((c.drops(DropReason::NoResponse), c.total_drops()), (1, 1));
    // A few bytes that did not even show a method are not counted.
    c.send(Ingress, b"GE", 7);
    c.close(8);
    assert_eq!(c.total_drops(), 1);
}

#[test]
fn malformed_head_in_sync_is_counted_then_resyncs() {
    let mut c = Conn::new();
    c.assert_round_trip("/first", 1);
    // Not a valid request line, where a request was due.
    c.send(Ingress, b"GET /x HTTP/9.9\r\nHost: h\r\n\r\n", 5);
    assert_eq!(c.drops(DropReason::Malformed), 1);
    c.send(Ingress, b"\x00\x01binary junk", 6);
    assert_eq!(c.drops(DropReason::Malformed), 1, "skipped while resyncing");
    c.assert_round_trip("/second", 10);
}

#[test]
fn invalid_content_length_is_malformed_and_its_answer_is_absorbed() {
    let mut c = Conn::new();
    c.send(
        Ingress,
        b"POST /p HTTP/1.1\r\nContent-Length: ten\r\n\r\n0123456789",
        1,
    );
    assert_eq!(c.drops(DropReason::Malformed), 1);
    c.send(Egress, &response(400, b"bad request"), 2);
    assert!(c.take().is_empty());
    assert_eq!(c.drops(DropReason::UnmatchedResponse), 0);
    c.assert_round_trip("/next", 10);

    c.send(
        Ingress,
        b"POST /p HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        20,
    );
    assert_eq!(c.drops(DropReason::Malformed), 2);
}

#[test]
fn too_many_headers_are_counted() {
    let mut c = Conn::new();
    let mut req = b"GET /many HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        req.extend(format!("x-{i}: v\r\n").as_bytes());
    }
    req.extend(b"\r\n");
    c.send(Ingress, &req, 1);
    assert_eq!(c.drops(DropReason::TooManyHeaders), 1);
    c.send(Egress, &response(431, b""), 2);
    assert!(c.take().is_empty());
    c.assert_round_trip("/next", 10);
    assert_eq!(c.total_drops(), 1);
}

/// A request with a 1 MiB header, as a sender may write it and a receiver may read it.
fn mebibyte_header_request() -> Vec<u8> {
    let mut req = b"GET /huge HTTP/1.1\r\nHost: h\r\nx-pad: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 1 << 20));
    req.extend(b"\r\n\r\n");
    req
}

/// However the head of a request too large for the agent arrives, the exchange is reported
/// (the server's refusal is what users need to see), counted, and the next one is intact.
#[test]
fn mebibyte_header_is_reported_with_its_first_lines_however_it_is_read() {
    let req = mebibyte_header_request();
    type Send = fn(&mut Conn, &[u8]);
    let ways: [(&str, Send, DropReason); 3] = [
        // Small reads, each captured whole: buffered up to the agent's limit.
        (
            "captured pieces",
            |c, req| req.chunks(CAPTURE).for_each(|p| c.send(Ingress, p, 1)),
            DropReason::HeadTooLarge,
        ),
        // One write, cut by the capture limit.
        (
            "one cut syscall",
            |c, req| c.send_captured(Ingress, req, 1),
            DropReason::HeadTruncated,
        ),
        // A server's 64 KiB reads, each cut: the first is no larger than the limit.
        (
            "64 KiB reads",
            |c, req| {
                req.chunks(64 << 10)
                    .for_each(|p| c.send_captured(Ingress, p, 1))
            },
            DropReason::HeadTruncated,
        ),
    ];
    for (how, send, reason) in ways {
        let mut c = Conn::new();
        send(&mut c, &req);
        c.send(Egress, &response(431, b""), 2);
        let e = c.take_one();
        assert_eq!(
            (e.path.as_str(), e.status, e.request_head_truncated),
            ("/huge", 431, true),
            "{how}"
        );
        assert_eq!(e.host.as_deref(), Some("h"), "{how}");
        assert_eq!((c.drops(reason), c.total_drops()), (1, 1), "{how}");
        c.assert_round_trip("/good", 10);
        assert_eq!(c.total_drops(), 1, "{how}");
    }
}

#[test]
fn mebibyte_response_header_is_reported_and_the_next_exchange_is_intact() {
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-pad: ".to_vec();
    resp.extend(std::iter::repeat_n(b'b', 1 << 20));
    resp.extend(b"\r\n\r\nok");
    for pieces in [CAPTURE, 64 << 10, resp.len()] {
        let mut c = Conn::new();
        c.send(Ingress, &get("/big"), 1);
        for p in resp.chunks(pieces) {
            c.send_captured(Egress, p, 2);
        }
        let e = c.take_one();
        assert_eq!(
            (e.path.as_str(), e.status),
            ("/big", 200),
            "{pieces}-byte writes"
        );
        c.assert_round_trip("/next", 10);
        assert_eq!(c.total_drops(), 1, "{pieces}-byte writes");
    }
}

#[test]
fn cut_request_head_keeps_its_fields_and_body_accounting() {
    let mut c = Conn::new();
    let mut head =
        b"POST /form?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 500\r\nCookie: ".to_vec();
    head.extend(std::iter::repeat_n(b'c', 10_000));
    head.extend(b"\r\nUser-Agent: lost-beyond-capture\r\n\r\n");
    // The head's end shows in the tail; the body comes in the next write.
    c.send_captured(Ingress, &head, 1);
    c.send(Ingress, &[b'b'; 500], 2);
    c.send(Egress, &ok(b"ok"), 3);
    let e = c.take_one();
    assert!(e.request_head_truncated);
    assert_eq!(
        (e.path.as_str(), e.query.as_deref()),
        ("/form", Some("a=1"))
    );
    assert_eq!(e.host.as_deref(), Some("h"));
    assert_eq!(e.user_agent, None);
    assert_eq!(e.request_body_bytes, 500);
    assert_eq!(c.drops(DropReason::HeadTruncated), 1);
    c.assert_round_trip("/next", 10);
}

#[test]
fn cut_request_head_with_body_in_the_tail() {
    let mut c = Conn::new();
    let mut req = b"POST /t HTTP/1.1\r\nContent-Length: 10\r\nCookie: ".to_vec();
    req.extend(std::iter::repeat_n(b'c', 10_000));
    req.extend(b"\r\n\r\n0123456789");
    c.send_captured(Ingress, &req, 1);
    c.send(Egress, &ok(b""), 2);
    let e = c.take_one();
    assert!(e.request_head_truncated);
    assert_eq!(e.request_body_bytes, 10);
    c.assert_round_trip("/next", 10);
}

#[test]
fn cut_request_head_continuing_in_the_next_write() {
    let mut c = Conn::new();
    let mut first = get("/cookies")
        .strip_suffix(b"\r\n")
        .unwrap_or_default()
        .to_vec();
    first.extend(b"Cookie: ");
    first.extend(std::iter::repeat_n(b'c', 12_000));
    let mut second = vec![b'd'; 3000];
    second.extend(b"\r\n\r\n");
    c.send_captured(Ingress, &first, 1);
    c.send(Ingress, &second, 2);
    c.send(Egress, &ok(b"ok"), 3);
    let e = c.take_one();
    assert!(e.request_head_truncated);
    assert_eq!((e.path.as_str(), e.start_ns), ("/cookies", 1));
    c.assert_round_trip("/next", 10);
    assert_eq!(c.total_drops(), 1);
}

#[test]
fn request_line_beyond_the_capture_is_dropped() {
    let mut c = Conn::new();
    c.assert_round_trip("/in-sync", 1);
    let mut req = b"GET /".to_vec();
    req.extend(std::iter::repeat_n(b'u', 20_000));
    req.extend(b" HTTP/1.1\r\nHost: h\r\n\r\n");
    c.send_captured(Ingress, &req, 1);
    assert_eq!(c.drops(DropReason::HeadTruncated), 1);
    c.send(Egress, &response(414, b""), 2);
    assert!(c.take().is_empty());
    c.assert_round_trip("/next", 10);
    assert_eq!(c.total_drops(), 1);
}

#[test]
fn first_chunk_in_the_middle_of_a_body_is_skipped() {
    let mut c = Conn::new();
    c.send(
        Ingress,
        b"ody of an upload that started before the agent\r\n",
        1,
    );
    c.send(
        Ingress,
        b"more of it: GET / HTTP/1.1 inside is not a start",
        2,
    );
    c.send(Egress, &ok(b"answer to the unseen request"), 3);
    assert!(c.take().is_empty());
    assert_eq!(c.drops(DropReason::UnmatchedResponse), 1);
    c.assert_round_trip("/seen", 10);
}

#[test]
fn first_chunk_in_the_middle_of_a_response_is_skipped() {
    let mut c = Conn::new();
    c.send(Egress, b"tail of some response body", 1);
    c.assert_round_trip("/seen", 10);
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn client_role_when_the_process_sends_requests() {
    let mut c = Conn::new();
    c.send(
        Egress,
        b"DELETE /v1/items/7 HTTP/1.1\r\nHost: backend:8080\r\n\r\n",
        1,
    );
    c.send(Ingress, &response(202, b"queued"), 2);
    let e = c.take_one();
    assert_eq!(e.role, ExchangeRole::Client);
    assert_eq!(
        (e.method.as_str(), e.path.as_str(), e.status),
        ("DELETE", "/v1/items/7", 202)
    );
    assert_eq!(e.host.as_deref(), Some("backend:8080"));
    assert_eq!(c.stream.role(), Some(ExchangeRole::Client));
    c.assert_round_trip("/again", 10);
    // Requests coming the other way are not requests on this connection.
    c.send(Ingress, &get("/wrong-way"), 20);
    assert_eq!(c.stream.pending_requests(), 0);
}

#[test]
fn duplicate_traceparent_keeps_the_first_and_is_flagged() {
    let mut c = Conn::new();
    let req =
        format!("GET / HTTP/1.1\r\ntraceparent: {TRACEPARENT}\r\nTraceparent: 00-other-01\r\n\r\n");
    c.send(Ingress, req.as_bytes(), 1);
    c.send(Egress, &ok(b""), 2);
    let e = c.take_one();
    assert_eq!(e.traceparent.as_deref(), Some(TRACEPARENT));
    assert!(e.traceparent_duplicated);
}

#[test]
fn absolute_form_target_gives_path_and_host() {
    let mut c = Conn::new();
    c.send(
        Egress,
        b"GET http://proxy.test:3128/a/b?q=1 HTTP/1.1\r\n\r\n",
        1,
    );
    c.send(Ingress, &ok(b""), 2);
    let e = c.take_one();
    assert_eq!((e.path.as_str(), e.query.as_deref()), ("/a/b", Some("q=1")));
    assert_eq!(e.host.as_deref(), Some("proxy.test:3128"));
}

#[test]
fn chunked_request_body_is_counted() {
    let mut c = Conn::new();
    let mut req = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend(chunked(&[b"abc", b"defgh"]));
    for piece in req.chunks(5) {
        c.send(Ingress, piece, 1);
    }
    c.send(Egress, &ok(b""), 2);
    assert_eq!(c.take_one().request_body_bytes, 8);
    c.assert_round_trip("/next", 10);
}

#[test]
fn malformed_chunked_body_is_dropped() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/bad-chunks"), 1);
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        2,
    );
    assert_eq!(c.drops(DropReason::Malformed), 1);
    c.send(Egress, b"more", 3);
    assert!(c.take().is_empty());
    c.assert_round_trip("/next", 10);
}

#[test]
fn sendfile_body_is_counted_without_bytes() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/file.iso"), 1);
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nContent-Length: 3000000\r\n\r\n",
        2,
    );
    let sendfile = Chunk {
        direction: Egress,
        data: &[],
        total: 3_000_000,
        tail: &[],
        ts_ns: 3,
    };
    assert_eq!(c.stream.on_chunk(&sendfile, &mut c.out), Ok(()));
    let e = c.take_one();
    assert_eq!((e.response_body_bytes, e.end_ns), (3_000_000, 3));
    c.assert_round_trip("/next", 10);
}

/// Three pipelined requests; the second response is cut short by the connection's end.
fn three_requests_and_a_half(c: &mut Conn) {
    c.send(Ingress, &get("/1"), 1);
    c.send(Ingress, &get("/2"), 1);
    c.send(Ingress, &get("/3"), 1);
    c.send(Egress, &ok(b"one"), 2);
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial",
        3,
    );
}

#[test]
fn close_fails_the_requests_left_without_a_whole_response() {
    let mut c = Conn::new();
    three_requests_and_a_half(&mut c);
    c.close(4);
    let got: Vec<_> = c
        .take()
        .into_iter()
        .map(|e| {
            (
                e.path.to_string(),
                e.status,
                e.failure,
                e.response_body_bytes,
                e.end_ns,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/1".into(), 200, None, 3, 2),
            ("/2".into(), 200, Some(Failure::ResponseCutShort), 7, 4),
            ("/3".into(), 0, Some(Failure::NoResponse), 0, 4),
        ]
    );
    assert_eq!(c.total_drops(), 0);
    assert_eq!(c.stream.pending_requests(), 0);
}

/// Two pipelined responses in one write cut by the capture: the second was sent, not
/// seen. The close must not make its request a failure, only count it.
#[test]
fn close_after_responses_not_followed_counts_instead_of_failing() {
    let mut c = Conn::new();
    c.send(Ingress, &[get("/a"), get("/b")].concat(), 1);
    let both = [ok(&[b'x'; 20_000]), ok(b"bb")].concat();
    c.send_captured(Egress, &both, 2);
    c.close(3);
    let got: Vec<_> = c
        .take()
        .into_iter()
        .map(|e| (e.path.to_string(), e.failure))
        .collect();
    assert_eq!(got, [("/a".to_string(), None)]);
    assert_eq!(c.drops(DropReason::NoResponse), 1);
}

/// Heads longer than a (small) limit, in every framing, in fully captured pieces: each
/// exchange comes out with its status (and, where the head's end is in the piece that
/// outgrew the limit, its body size and the next exchange intact), and no chunk spins (a
/// response head cut at the limit used to flip Body and Head forever).
#[test]
fn oversized_heads_keep_the_body_and_what_follows() {
    // The limit keeps the framing header, not the padding after it.
    let pad = "p".repeat(300);
    let cases: [(&str, Vec<u8>, u64); 3] = [
        ("close-delimited", format!("HTTP/1.1 200 OK\r\nConnection: close\r\nX-Pad: {pad}\r\n\r\nok").into_bytes(), 2),
        ("length", format!("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: {pad}\r\n\r\nok").into_bytes(), 2),
        ("chunked", format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: {pad}\r\n\r\n2\r\nok\r\n0\r\n\r\n").into_bytes(), 2),
    ];
    for (what, resp, body) in cases {
        // 0: the first 10 bytes, then the rest in one piece (the head's end is in the
        // piece that outgrew the limit).
        for piece in [7, 64, 100, 0] {
            let mut c = Conn::with_config(StreamConfig {
                max_head_bytes: 60,
                ..StreamConfig::default()
            });
            c.send(Ingress, &get("/big"), 1);
            let pieces: Vec<&[u8]> = match piece {
                0 => vec![&resp[..10], &resp[10..]],
                n => resp.chunks(n).collect(),
            };
            for p in pieces {
                c.send(Egress, p, 2);
            }
            let mut got = c.take();
            if piece == 0 && what != "close-delimited" {
                c.assert_round_trip("/next", 10);
            }
            // A body followed from an unknown start may end only at the close.
            c.close(30);
            got.extend(c.take());
            assert_eq!(got.len(), 1, "{what} in {piece}-byte pieces: {got:?}");
            let e = &got[0];
            assert_eq!(
                (e.path.as_str(), e.status, e.failure),
                ("/big", 200, None),
                "{what} in {piece}-byte pieces"
            );
            // The body is measured exactly where the head's end is in the piece that
            // outgrew the limit (else it is followed from an unknown start).
            if piece == 0 {
                assert_eq!(e.response_body_bytes, body, "{what}");
            }
        }
    }
    // A request body and a pipelined request after a long head whose end is in the piece
    // that outgrew the limit.
    let mut c = Conn::with_config(StreamConfig {
        max_head_bytes: 60,
        ..StreamConfig::default()
    });
    let reqs = [
        format!("POST /p HTTP/1.1\r\nContent-Length: 5\r\nX-Pad: {pad}\r\n\r\nhello").into_bytes(),
        get("/next"),
    ]
    .concat();
    let (first, rest) = reqs.split_at(10);
    c.send(Ingress, first, 1);
    c.send(Ingress, rest, 1);
    c.send(Egress, &[ok(b"1"), ok(b"2")].concat(), 2);
    let got: Vec<_> = c
        .take()
        .into_iter()
        .map(|e| (e.path.to_string(), e.request_body_bytes))
        .collect();
    assert_eq!(got, [("/p".to_string(), 5), ("/next".to_string(), 0)]);
    assert_eq!(c.drops(DropReason::UnmatchedResponse), 0);
}

/// An unfinished response head longer than the limit in one piece (the review's hang).
#[test]
fn unfinished_oversized_head_in_one_piece_does_not_spin() {
    let mut c = Conn::with_config(StreamConfig {
        max_head_bytes: 60,
        ..StreamConfig::default()
    });
    c.send(Ingress, &get("/"), 1);
    let head = format!("HTTP/1.1 200 OK\r\nServer: x\r\nX-Pad: {}", "p".repeat(100));
    c.send(Egress, head.as_bytes(), 2);
    c.send(Egress, b"\r\n\r\n", 3);
    c.close(4);
    assert_eq!(c.take_one().status, 200);
}

/// The rest of a long head arrives in a write cut by the capture: its end is in the tail.
#[test]
fn oversized_head_ending_in_a_cut_write_keeps_its_body() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/big"), 1);
    let mut resp = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Pad: ".to_vec();
    resp.extend(std::iter::repeat_n(b'p', 70_000));
    resp.extend(b"\r\n\r\nok");
    let (first, rest) = resp.split_at(60_000);
    for p in first.chunks(CAPTURE) {
        c.send(Egress, p, 2);
    }
    c.send_captured(Egress, rest, 3);
    let e = c.take_one();
    assert_eq!((e.status, e.response_body_bytes, e.end_ns), (200, 2, 3));
    c.assert_round_trip("/next", 10);
}

#[test]
fn a_gap_forgets_an_unreadable_request() {
    let mut c = Conn {
        stream: Http1Stream::from_first_byte(),
        out: Vec::new(),
    };
    c.send(Ingress, b"GET /g HTTP/12.x\r\n\r\n", 1);
    c.stream.on_gap();
    c.send(Egress, &response(400, b""), 2);
    assert_eq!(c.drops(DropReason::UnmatchedResponse), 1);
}

#[test]
fn forgetting_a_connection_counts_the_requests_left() {
    let mut c = Conn::new();
    three_requests_and_a_half(&mut c);
    c.stream.on_forget(4, &mut c.out);
    assert_eq!(c.take_one().path, "/1");
    assert_eq!(c.drops(DropReason::NoResponse), 2);
    assert_eq!(c.stream.pending_requests(), 0);
}

#[test]
fn pipeline_overflow_drops_the_oldest() {
    let mut c = Conn::with_config(StreamConfig {
        max_pending: 2,
        ..StreamConfig::default()
    });
    for path in ["/1", "/2", "/3"] {
        c.send(Ingress, &get(path), 1);
    }
    assert_eq!(c.drops(DropReason::PipelineOverflow), 1);
    assert_eq!(c.stream.pending_requests(), 2);
    c.send(Egress, &ok(b""), 2);
    assert_eq!(c.take_one().path, "/2");
}

#[test]
fn small_head_limit_applies_to_buffered_heads() {
    let mut c = Conn::with_config(StreamConfig {
        max_head_bytes: 64,
        ..StreamConfig::default()
    });
    let req = get("/a-path-that-makes-this-head-longer-than-sixty-four-bytes");
    let (a, b) = req.split_at(10);
    c.send(Ingress, a, 1);
    c.send(Ingress, b, 2);
    assert_eq!(c.drops(DropReason::HeadTooLarge), 1);
}

#[test]
fn stray_line_ends_between_messages_are_ignored() {
    let mut c = Conn::new();
    c.send(
        Ingress,
        b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nab\r\n",
        1,
    );
    c.send(Egress, &ok(b""), 2);
    c.take_one();
    c.assert_round_trip("/b", 10);
    assert_eq!(c.total_drops(), 0);
}

#[test]
fn inconsistent_chunks_are_rejected() {
    let mut s = Http1Stream::new();
    let mut out = Vec::new();
    let bad = Chunk {
        direction: Ingress,
        data: b"GET / HTTP/1.1\r\n\r\n",
        total: 3,
        tail: &[],
        ts_ns: 1,
    };
    assert_eq!(
        s.on_chunk(&bad, &mut out),
        Err(StreamError::CapturedExceedsTotal {
            captured: 18,
            total: 3
        })
    );
    let long_tail = [0u8; TAIL + 1];
    let bad = Chunk {
        direction: Ingress,
        data: b"",
        total: 100,
        tail: &long_tail,
        ts_ns: 1,
    };
    assert_eq!(
        s.on_chunk(&bad, &mut out),
        Err(StreamError::TailTooLong(TAIL + 1))
    );
}

#[test]
fn stats_can_be_drained() {
    let mut c = Conn::new();
    c.send(Egress, &ok(b""), 1);
    let stats = c.stream.take_stats();
    assert_eq!(stats.drops(DropReason::UnmatchedResponse), 1);
    assert_eq!(c.total_drops(), 0);
}

/// Throughput smoke test: `cargo test --release -p tapir --lib http::tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run in release"]
fn throughput_of_keep_alive_exchanges() {
    let req = format!(
        "GET /api/v1/users/12345?include=profile HTTP/1.1\r\nHost: api.example.com\r\n\
         User-Agent: Mozilla/5.0 (X11; Linux x86_64)\r\nAccept: application/json\r\n\
         Cookie: session=abcdef0123456789\r\ntraceparent: {TRACEPARENT}\r\n\r\n"
    );
    let resp = response(200, &[b'x'; 1024]);
    let mut stream = Http1Stream::new();
    let mut out = Vec::with_capacity(16);
    let exchanges = 500_000u64;
    let started = std::time::Instant::now();
    let mut emitted = 0;
    for i in 0..exchanges {
        let request = Chunk::complete(Ingress, req.as_bytes(), i);
        assert_eq!(stream.on_chunk(&request, &mut out), Ok(()));
        assert_eq!(
            stream.on_chunk(&Chunk::complete(Egress, &resp, i), &mut out),
            Ok(())
        );
        emitted += out.len();
        out.clear();
    }
    let per_second = (2 * exchanges) as f64 / started.elapsed().as_secs_f64();
    eprintln!(
        "{per_second:.0} chunks/s, Http1Stream is {} bytes",
        std::mem::size_of::<Http1Stream>()
    );
    assert_eq!(emitted as u64, exchanges);
    if !cfg!(debug_assertions) {
        assert!(per_second > 300_000.0);
    }
}

#[test]
fn words_at_a_chunk_start_while_resyncing_are_not_errors() {
    let mut c = Conn::new();
    c.send(Ingress, b"ORDER BY name; SELECT 1\r\n\r\n", 1);
    let mut long = b"UPLOAD ".to_vec();
    long.extend(std::iter::repeat_n(b'z', 20_000));
    c.send_captured(Ingress, &long, 2);
    assert_eq!(c.total_drops(), 0);
    assert_eq!(c.stream.stats().skipped_chunks, 2);
    c.assert_round_trip("/fine", 10);
}

#[test]
fn cut_response_head_before_a_chunked_body_follows_it_blind() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/a"), 1);
    let mut resp =
        b"HTTP/1.1 200 OK\r\nX-Padding: 0123456789\r\nTransfer-Encoding: chunked\r\n".to_vec();
    let captured = resp.len();
    resp.extend(b"\r\n");
    resp.extend(chunked(&[&[b'x'; 40]]));
    // The blank line ending the head is not captured; the tail's blank line is the body's.
    c.send_cut(Egress, &resp, captured, 2);
    let e = c.take_one();
    assert_eq!((e.status, e.end_ns), (200, 2));
    assert_eq!(c.drops(DropReason::HeadTruncated), 1);
    c.assert_round_trip("/b", 10);
}

#[test]
fn chunked_body_missing_its_end_gives_way_to_the_next_response() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/a"), 1);
    c.send(Ingress, &get("/b"), 1);
    // The first response's last chunk never shows (say, it was in a lost event).
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        2,
    );
    c.send(Egress, &response(404, b""), 3);
    let out = c.take();
    let summary: Vec<_> = out
        .iter()
        .map(|e| (e.path.as_str(), e.status, e.end_ns))
        .collect();
    assert_eq!(summary, [("/a", 200, 2), ("/b", 404, 3)]);
}

#[test]
fn cut_request_head_hiding_its_content_length_resyncs() {
    let mut c = Conn::new();
    c.assert_round_trip("/in-sync", 1);
    let mut req = b"POST /p HTTP/1.1\r\nX-Pad: ".to_vec();
    req.extend(std::iter::repeat_n(b'p', 100));
    req.extend(b"\r\nContent-Length: 4\r\n\r\nbody");
    // The capture ends before Content-Length; the tail shows the head's end and the body.
    c.send_cut(Ingress, &req, 30, 5);
    c.send(Egress, &ok(b""), 6);
    let e = c.take_one();
    assert!(e.request_head_truncated);
    assert_eq!(e.path, "/p");
    c.assert_round_trip("/next", 10);
}

#[test]
fn after_missing_response_bytes_pairing_recovers_on_the_newest_request() {
    let mut c = Conn::new();
    c.send(Ingress, &get("/1"), 1);
    // Most of this body was in events that never arrived.
    c.send(
        Egress,
        b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n0123456789",
        2,
    );
    // The next responses are taken for the rest of that body, until parsing fails.
    for i in 2..=6u64 {
        c.send(Ingress, &get(&format!("/{i}")), i * 10);
        c.send(Egress, &ok(b"fine"), i * 10 + 1);
    }
    c.take();
    assert!(c.drops(DropReason::Malformed) >= 1);
    // Once resynced, a response pairs with the request it answers.
    c.assert_round_trip("/recovered", 100);
    c.assert_round_trip("/and-again", 110);
}

#[test]
fn idle_connection_releases_its_buffers_and_still_pairs_the_next_exchange() {
    let mut c = Conn::new();
    // Pipelined requests grow the pending queue; a head split over two chunks grows the
    // head buffer.
    c.send(Ingress, &[get("/a"), get("/b"), get("/c")].concat(), 1);
    let head = get("/split");
    c.send(Ingress, &head[..5], 2);
    assert!(c.stream.pairing_capacity() > 0);
    c.send(Egress, &[ok(b"a"), ok(b"b"), ok(b"c")].concat(), 3);
    c.send(Ingress, &head[5..], 4);
    c.send(Egress, &ok(b"s"), 5);
    assert_eq!(c.take().len(), 4);

    c.stream.release_idle_buffers();
    assert_eq!(c.stream.pairing_capacity(), 0);
    assert_eq!(c.stream.head_capacity(), 0);
    c.assert_round_trip("/after", 10);
}

#[test]
fn exchanges_say_whether_the_response_kept_the_connection() {
    let cases: [(&[u8], bool); 5] = [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", true),
        (
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, close\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", false),
        (
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n",
            true,
        ),
    ];
    for (resp, keep_alive) in cases {
        let mut c = Conn::new();
        c.send(Egress, b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 1);
        c.send(Ingress, resp, 2);
        let ex = c.take_one();
        assert_eq!(ex.role, ExchangeRole::Client);
        assert_eq!(
            ex.keep_alive,
            keep_alive,
            "{}",
            String::from_utf8_lossy(resp)
        );
    }
}
