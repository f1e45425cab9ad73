use proptest::prelude::*;

use super::frame::*;
use super::*;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn settings() -> Vec<u8> {
    frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100])
}

/// One end's HPACK encoder and the bytes it wrote.
struct Writer {
    enc: loona_hpack::Encoder<'static>,
}

impl Writer {
    fn new() -> Self {
        Self {
            enc: loona_hpack::Encoder::new(),
        }
    }

    fn headers(&mut self, stream: u32, flags: u8, fields: &[(&str, &str)]) -> Vec<u8> {
        let block = self
            .enc
            .encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())));
        frame(HEADERS, flags | FLAG_END_HEADERS, stream, &block)
    }
}

const TP: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn grpc_request(w: &mut Writer, stream: u32) -> Vec<u8> {
    let mut b = w.headers(
        stream,
        0,
        &[
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/helloworld.Greeter/SayHello"),
            (":authority", "localhost:50051"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "grpc-python/1.70"),
            ("traceparent", TP),
        ],
    );
    b.extend(frame(
        DATA,
        FLAG_END_STREAM,
        stream,
        &[0, 0, 0, 0, 3, 1, 2, 3],
    ));
    b
}

fn grpc_response(w: &mut Writer, stream: u32, status: &str) -> Vec<u8> {
    let mut b = w.headers(
        stream,
        0,
        &[(":status", "200"), ("content-type", "application/grpc")],
    );
    b.extend(frame(DATA, 0, stream, &[0, 0, 0, 0, 2, 9, 9]));
    b.extend(w.headers(stream, FLAG_END_STREAM, &[("grpc-status", status)]));
    b
}

fn chunk(direction: Direction, data: &[u8], ts_ns: u64) -> Chunk<'_> {
    Chunk::complete(direction, data, ts_ns)
}

fn feed(s: &mut Http2Stream, direction: Direction, data: &[u8], ts_ns: u64) -> Vec<Exchange> {
    let mut out = Vec::new();
    s.on_chunk(&chunk(direction, data, ts_ns), &mut out)
        .expect("valid chunk");
    out
}

/// The exchanges of a server that read `inbound` in one call (at `in_ns`), then wrote
/// `outbound` in one (at `out_ns`).
fn read_whole(inbound: &[u8], in_ns: u64, outbound: &[u8], out_ns: u64) -> Vec<Exchange> {
    let mut whole = Http2Stream::new();
    assert!(feed(&mut whole, Direction::Ingress, inbound, in_ns).is_empty());
    feed(&mut whole, Direction::Egress, outbound, out_ns)
}

/// The server's view of one gRPC call: preface and request in, response out.
fn server_call() -> (Vec<u8>, Vec<u8>) {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut inbound = PREFACE.to_vec();
    inbound.extend(settings());
    inbound.extend(grpc_request(&mut client, 1));
    let mut outbound = settings();
    outbound.extend(grpc_response(&mut server, 1, "0"));
    (inbound, outbound)
}

#[test]
fn a_grpc_call_seen_by_its_server() {
    let (inbound, outbound) = server_call();
    let mut s = Http2Stream::new();
    assert!(feed(&mut s, Direction::Ingress, &inbound, 10).is_empty());
    let out = feed(&mut s, Direction::Egress, &outbound, 20);
    assert_eq!(out.len(), 1);
    let ex = &out[0];
    assert_eq!(ex.role, ExchangeRole::Server);
    assert_eq!(ex.method, "POST");
    assert_eq!(ex.path, "/helloworld.Greeter/SayHello");
    assert_eq!(ex.query, None);
    assert_eq!(ex.version, HttpVersion::Http2);
    assert_eq!(ex.status, 200);
    assert_eq!(ex.host.as_deref(), Some("localhost:50051"));
    assert_eq!(ex.user_agent.as_deref(), Some("grpc-python/1.70"));
    assert_eq!(ex.traceparent.as_deref(), Some(TP));
    assert_eq!(ex.grpc, Some(GrpcCall { status: Some(0) }));
    assert_eq!((ex.start_ns, ex.response_start_ns, ex.end_ns), (10, 20, 20));
    assert_eq!((ex.request_body_bytes, ex.response_body_bytes), (8, 7));
    assert_eq!(ex.failure, None);
    assert_eq!(s.stats().total_drops(), 0);
    assert_eq!(s.calls_in_flight(), 0);
}

#[test]
fn a_call_seen_by_its_client_and_a_server_that_spoke_first() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    // Servers send their SETTINGS as soon as they accept.
    assert!(feed(&mut s, Direction::Ingress, &settings(), 1).is_empty());
    let mut outbound = PREFACE.to_vec();
    outbound.extend(settings());
    outbound.extend(grpc_request(&mut client, 1));
    assert!(feed(&mut s, Direction::Egress, &outbound, 2).is_empty());
    let out = feed(
        &mut s,
        Direction::Ingress,
        &grpc_response(&mut server, 1, "5"),
        3,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].role, ExchangeRole::Client);
    assert_eq!(out[0].grpc, Some(GrpcCall { status: Some(5) }));
}

#[test]
fn every_byte_in_its_own_call_gives_the_same_exchange() {
    let (inbound, outbound) = server_call();
    let expected = read_whole(&inbound, 10, &outbound, 20);
    let mut s = Http2Stream::new();
    let mut out = Vec::new();
    for b in inbound.chunks(1) {
        out.extend(feed(&mut s, Direction::Ingress, b, 10));
    }
    for b in outbound.chunks(1) {
        out.extend(feed(&mut s, Direction::Egress, b, 20));
    }
    assert_eq!(out, expected);
}

#[test]
fn concurrent_streams_complete_in_their_own_order_and_share_the_table() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    // The second request's fields come from the table the first one filled.
    inbound.extend(grpc_request(&mut client, 1));
    inbound.extend(grpc_request(&mut client, 3));
    inbound.extend(client.headers(
        5,
        FLAG_END_STREAM,
        &[(":method", "GET"), (":path", "/p?q=1"), (":authority", "h")],
    ));
    feed(&mut s, Direction::Ingress, &inbound, 1);
    assert_eq!(s.calls_in_flight(), 3);
    let mut out = feed(
        &mut s,
        Direction::Egress,
        &grpc_response(&mut server, 3, "0"),
        2,
    );
    out.extend(feed(
        &mut s,
        Direction::Egress,
        &server.headers(5, FLAG_END_STREAM, &[(":status", "404")]),
        3,
    ));
    out.extend(feed(
        &mut s,
        Direction::Egress,
        &grpc_response(&mut server, 1, "2"),
        4,
    ));
    let seen: Vec<_> = out
        .iter()
        .map(|e| {
            (
                e.path.as_str(),
                e.status,
                e.grpc.and_then(|g| g.status),
                e.end_ns,
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("/helloworld.Greeter/SayHello", 200, Some(0), 2),
            ("/p", 404, None, 3),
            ("/helloworld.Greeter/SayHello", 200, Some(2), 4),
        ]
    );
    assert_eq!(out[1].query.as_deref(), Some("q=1"));
    assert_eq!(out[0].traceparent.as_deref(), Some(TP));
}

#[test]
fn a_block_in_continuation_frames_with_padding_and_priority() {
    let mut client = Writer::new();
    let block = client.enc.encode([
        (&b":method"[..], &b"GET"[..]),
        (b":path", b"/split"),
        (b":authority", b"example"),
    ]);
    let (a, b) = block.split_at(block.len() / 2);
    let mut first = vec![3u8]; // pad length
    first.extend([0, 0, 0, 0, 16]); // priority
    first.extend(a);
    first.extend([0, 0, 0]);
    let mut inbound = PREFACE.to_vec();
    inbound.extend(frame(
        HEADERS,
        FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
        1,
        &first,
    ));
    inbound.extend(frame(CONTINUATION, FLAG_END_HEADERS, 1, b));
    let mut s = Http2Stream::new();
    feed(&mut s, Direction::Ingress, &inbound, 1);
    let mut server = Writer::new();
    let out = feed(
        &mut s,
        Direction::Egress,
        &server.headers(1, FLAG_END_STREAM, &[(":status", "204")]),
        2,
    );
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].path.as_str(), out[0].status), ("/split", 204));
    assert_eq!(out[0].host.as_deref(), Some("example"));
    assert_eq!(out[0].grpc, None);
}

#[test]
fn informational_responses_and_request_trailers_are_not_the_response() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    inbound.extend(client.headers(1, 0, &[(":method", "PUT"), (":path", "/u")]));
    inbound.extend(frame(DATA, 0, 1, b"abc"));
    inbound.extend(client.headers(1, FLAG_END_STREAM, &[("x-checksum", "1")]));
    feed(&mut s, Direction::Ingress, &inbound, 1);
    let mut outbound = server.headers(1, 0, &[(":status", "100")]);
    outbound.extend(server.headers(1, 0, &[(":status", "201")]));
    outbound.extend(frame(DATA, FLAG_END_STREAM, 1, b"ok"));
    let out = feed(&mut s, Direction::Egress, &outbound, 2);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].status, 201);
    assert_eq!(
        (out[0].request_body_bytes, out[0].response_body_bytes),
        (3, 2)
    );
}

#[test]
fn uncaptured_body_bytes_are_counted_and_passed_over() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    inbound.extend(client.headers(1, FLAG_END_STREAM, &[(":method", "GET"), (":path", "/big")]));
    feed(&mut s, Direction::Ingress, &inbound, 1);
    // A 20 KB DATA frame of which the first 100 bytes were captured.
    let mut out_bytes = server.headers(1, 0, &[(":status", "200")]);
    let data_frame = frame(DATA, FLAG_END_STREAM, 1, &vec![7u8; 20_000]);
    let captured = out_bytes.len() + 100;
    out_bytes.extend(&data_frame);
    let mut out = Vec::new();
    let c = Chunk {
        direction: Direction::Egress,
        data: &out_bytes[..captured],
        total: out_bytes.len(),
        tail: &[],
        ts_ns: 5,
    };
    s.on_chunk(&c, &mut out).expect("valid chunk");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].response_body_bytes, 20_000);
    assert_eq!(out[0].end_ns, 5);
    assert_eq!(s.stats().total_drops(), 0);
}

#[test]
fn an_uncaptured_header_block_gives_the_connection_up_and_counts_it() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    inbound.extend(grpc_request(&mut client, 1));
    inbound.extend(grpc_request(&mut client, 3));
    feed(&mut s, Direction::Ingress, &inbound, 1);
    // The trailers that end stream 1 lie beyond the capture.
    let response = grpc_response(&mut server, 1, "0");
    let mut out = Vec::new();
    let c = Chunk {
        direction: Direction::Egress,
        data: &response[..response.len() - 5],
        total: response.len(),
        tail: &[],
        ts_ns: 2,
    };
    s.on_chunk(&c, &mut out).expect("valid chunk");
    assert!(out.is_empty());
    // The connection and its two calls.
    assert_eq!(s.stats().drops(DropReason::HeadTruncated), 3);
    assert_eq!(s.calls_in_flight(), 0);
    // Nothing after is read.
    let more = grpc_response(&mut server, 3, "0");
    assert!(feed(&mut s, Direction::Egress, &more, 3).is_empty());
}

#[test]
fn a_reset_stream_and_a_close_end_calls_as_failures() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    inbound.extend(grpc_request(&mut client, 1));
    inbound.extend(grpc_request(&mut client, 3));
    inbound.extend(grpc_request(&mut client, 5));
    feed(&mut s, Direction::Ingress, &inbound, 1);
    let out = feed(
        &mut s,
        Direction::Ingress,
        &frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]),
        2,
    );
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].failure, Some(Failure::StreamReset));
    assert_eq!(out[0].end_ns, 2);
    let headers_only = server.headers(3, 0, &[(":status", "200")]);
    assert!(feed(&mut s, Direction::Egress, &headers_only, 3).is_empty());
    let mut out = Vec::new();
    s.on_close(9, &mut out);
    let failures: Vec<_> = out
        .iter()
        .map(|e| (e.failure, e.status, e.end_ns))
        .collect();
    assert_eq!(
        failures,
        [
            (Some(Failure::ResponseCutShort), 200, 9),
            (Some(Failure::NoResponse), 0, 9)
        ]
    );
}

#[test]
fn trailers_only_responses_and_unknown_streams() {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    inbound.extend(grpc_request(&mut client, 1));
    feed(&mut s, Direction::Ingress, &inbound, 1);
    let unknown = server.headers(7, FLAG_END_STREAM, &[(":status", "200")]);
    assert!(feed(&mut s, Direction::Egress, &unknown, 2).is_empty());
    assert_eq!(s.stats().drops(DropReason::UnmatchedResponse), 1);
    let only = server.headers(
        1,
        FLAG_END_STREAM,
        &[
            (":status", "200"),
            ("content-type", "application/grpc"),
            ("grpc-status", "12"),
        ],
    );
    let out = feed(&mut s, Direction::Egress, &only, 3);
    assert_eq!(out[0].grpc, Some(GrpcCall { status: Some(12) }));
}

#[test]
fn streams_beyond_the_limit_are_counted() {
    let mut client = Writer::new();
    let mut s = Http2Stream::new();
    let mut inbound = PREFACE.to_vec();
    for i in 0..=MAX_CALLS as u32 {
        inbound.extend(client.headers(2 * i + 1, 0, &[(":method", "GET"), (":path", "/")]));
    }
    feed(&mut s, Direction::Ingress, &inbound, 1);
    assert_eq!(s.calls_in_flight(), MAX_CALLS);
    assert_eq!(s.stats().drops(DropReason::PipelineOverflow), 1);
    s.on_forget();
    assert_eq!(s.stats().drops(DropReason::NoResponse), MAX_CALLS as u64);
}

#[test]
fn bad_bytes_give_the_connection_up() {
    // Not the preface after its first byte.
    let mut s = Http2Stream::new();
    feed(&mut s, Direction::Ingress, b"PRI * HTTP/1.1\r\n", 1);
    assert_eq!(s.stats().drops(DropReason::Malformed), 1);
    // A CONTINUATION without a block, an undecodable block, a block too large.
    for bytes in [
        frame(CONTINUATION, FLAG_END_HEADERS, 1, b"x"),
        frame(
            HEADERS,
            FLAG_END_HEADERS,
            1,
            &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        frame(HEADERS, 0, 1, &vec![0u8; MAX_BLOCK + 1]),
        frame(HEADERS, FLAG_END_HEADERS, 0, &[0x82]),
    ] {
        let mut s = Http2Stream::new();
        feed(&mut s, Direction::Ingress, &bytes, 1);
        assert_eq!(s.stats().total_drops(), 1, "{bytes:?}");
    }
    // A huge table asked for.
    let mut s = Http2Stream::new();
    feed(
        &mut s,
        Direction::Ingress,
        &frame(HEADERS, FLAG_END_HEADERS, 1, &[0x3f, 0xe1, 0xff, 0x7f]),
        1,
    );
    assert_eq!(s.stats().drops(DropReason::Malformed), 1);
}

#[test]
fn idle_connections_give_their_buffers_back() {
    let (inbound, outbound) = server_call();
    let mut s = Http2Stream::new();
    feed(&mut s, Direction::Ingress, &inbound, 1);
    feed(&mut s, Direction::Egress, &outbound, 2);
    s.release_idle_buffers();
    assert!(s
        .halves
        .iter()
        .all(|h| h.block.capacity() == 0 && h.payload.capacity() == 0));
}

/// A model of the kernel's walk (agent-ebpf/src/h2.rs) over one direction: calls up to
/// the capture are sent whole; a larger one without its DATA payloads, with where the
/// walk started.
struct KernelWalk {
    /// The walk could not follow a call: calls are then only copied up to the capture.
    lost: bool,
    left: usize,
    have: usize,
    head: [u8; 4],
    data: bool,
}

impl KernelWalk {
    fn new(preface: bool) -> Self {
        Self {
            lost: false,
            left: if preface { PREFACE.len() } else { 0 },
            have: 0,
            head: [0; 4],
            data: false,
        }
    }

    /// The record the kernel sends for `call`: its payload, and `Some(start)` if sparse.
    fn call(&mut self, call: &[u8], capture: usize) -> (Vec<u8>, Option<WalkStart>) {
        if self.lost {
            return (call[..call.len().min(capture)].to_vec(), None);
        }
        let sparse = call.len() > capture;
        let start = WalkStart {
            left: self.left as u32,
            have: self.have as u8,
            data: self.data,
        };
        let mut kept = Vec::new();
        let mut pos = 0;
        while pos < call.len() {
            if self.left > 0 {
                let n = self.left.min(call.len() - pos);
                if !(sparse && self.data) {
                    if sparse && kept.len() + n > capture {
                        self.lost = true;
                        break;
                    }
                    kept.extend_from_slice(&call[pos..pos + n]);
                }
                pos += n;
                self.left -= n;
                continue;
            }
            let n = (HEADER_LEN - self.have).min(call.len() - pos);
            if sparse && kept.len() + n > capture {
                self.lost = true;
                break;
            }
            for k in self.have..(self.have + n).min(4) {
                self.head[k] = call[pos + k - self.have];
            }
            kept.extend_from_slice(&call[pos..pos + n]);
            pos += n;
            self.have += n;
            if self.have == HEADER_LEN {
                let h = self.head;
                self.left = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
                self.data = h[3] == DATA;
                self.have = 0;
            }
        }
        (kept, sparse.then_some(start))
    }
}

/// Applies what the kernel sends for `call`.
fn feed_walked(
    s: &mut Http2Stream,
    walk: &mut KernelWalk,
    direction: Direction,
    call: &[u8],
    capture: usize,
    out: &mut Vec<Exchange>,
) {
    let (kept, start) = walk.call(call, capture);
    let c = Chunk {
        direction,
        data: &kept,
        total: call.len(),
        tail: &[],
        ts_ns: 1,
    };
    match start {
        Some(start) => s.on_sparse_chunk(&c, start, out),
        None => s.on_chunk(&c, out),
    }
    .expect("valid chunk");
}

/// A conversation with large responses: a 40 KB message in three DATA frames, then its
/// trailers, for each of three calls.
fn large_conversation() -> (Vec<u8>, Vec<u8>) {
    let (mut client, mut server) = (Writer::new(), Writer::new());
    let mut inbound = PREFACE.to_vec();
    inbound.extend(settings());
    let mut outbound = settings();
    for (i, id) in [1u32, 3, 5].into_iter().enumerate() {
        inbound.extend(grpc_request(&mut client, id));
        outbound.extend(server.headers(
            id,
            0,
            &[(":status", "200"), ("content-type", "application/grpc")],
        ));
        for part in [16_384, 16_384, 7_232] {
            outbound.extend(frame(DATA, 0, id, &vec![i as u8; part]));
        }
        outbound.extend(server.headers(id, FLAG_END_STREAM, &[("grpc-status", "0")]));
    }
    (inbound, outbound)
}

#[test]
fn a_large_response_walked_by_the_kernel_is_read_whole() {
    let (inbound, outbound) = large_conversation();
    let expected = read_whole(&inbound, 1, &outbound, 1);
    assert_eq!(expected.len(), 3);
    assert_eq!(expected[2].response_body_bytes, 40_000);
    // Written at once: one sparse record of every frame header and both header blocks.
    let mut s = Http2Stream::new();
    let mut out = Vec::new();
    let mut walk_in = KernelWalk::new(true);
    let mut walk_out = KernelWalk::new(false);
    feed_walked(
        &mut s,
        &mut walk_in,
        Direction::Ingress,
        &inbound,
        8192,
        &mut out,
    );
    let (kept, start) = KernelWalk::new(false).call(&outbound, 8192);
    assert!(kept.len() < 1024, "{} bytes kept", kept.len());
    assert_eq!(
        start,
        Some(WalkStart {
            left: 0,
            have: 0,
            data: false
        })
    );
    feed_walked(
        &mut s,
        &mut walk_out,
        Direction::Egress,
        &outbound,
        8192,
        &mut out,
    );
    assert_eq!(out, expected);
    assert_eq!(s.stats().total_drops(), 0);
}

#[test]
fn a_walk_that_starts_elsewhere_than_the_parser_gives_the_connection_up() {
    let (inbound, outbound) = large_conversation();
    let mut s = Http2Stream::new();
    feed(&mut s, Direction::Ingress, &inbound, 1);
    let mut out = Vec::new();
    // The kernel guessed a frame boundary (an entry made mid-stream) inside a DATA frame.
    let cut = outbound.len() - 30_000;
    feed(&mut s, Direction::Egress, &outbound[..cut], 1);
    let (kept, _) = KernelWalk::new(false).call(&outbound[cut..], 8192);
    let c = Chunk {
        direction: Direction::Egress,
        data: &kept,
        total: outbound.len() - cut,
        tail: &[],
        ts_ns: 2,
    };
    let start = WalkStart {
        left: 0,
        have: 0,
        data: false,
    };
    s.on_sparse_chunk(&c, start, &mut out).expect("valid chunk");
    assert!(out.is_empty());
    assert_eq!(s.take_loss(), Some(DropReason::HeadTruncated));
}

#[test]
fn a_walk_cut_short_or_overlong_gives_the_connection_up() {
    let (inbound, outbound) = large_conversation();
    // Cut short, the last trailers are missing; overlong, every call is read first.
    for (trim, extra, reason, read) in [
        (5, 0, DropReason::HeadTruncated, 2),
        (0, 3, DropReason::Malformed, 3),
    ] {
        let mut s = Http2Stream::new();
        feed(&mut s, Direction::Ingress, &inbound, 1);
        let (mut kept, start) = KernelWalk::new(false).call(&outbound, 8192);
        kept.truncate(kept.len() - trim);
        kept.extend(std::iter::repeat_n(0u8, extra));
        let c = Chunk {
            direction: Direction::Egress,
            data: &kept,
            total: outbound.len(),
            tail: &[],
            ts_ns: 2,
        };
        let mut out = Vec::new();
        s.on_sparse_chunk(&c, start.expect("sparse"), &mut out)
            .expect("valid chunk");
        assert_eq!(s.take_loss(), Some(reason), "trim {trim} extra {extra}");
        assert_eq!(out.len(), read);
    }
}

#[test]
fn a_sparse_tail_is_read_back() {
    assert_eq!(
        WalkStart::from_tail(&[0x10, 0x27, 0, 0, 3, 1]),
        Some(WalkStart {
            left: 10_000,
            have: 3,
            data: true
        })
    );
    assert_eq!(WalkStart::from_tail(&[1, 2, 3]), None);
    assert_eq!(WalkStart::from_tail(&[]), None);
}

/// The `i`th chunk of a random test: `data` captured, `extra` bytes more moved.
fn partial_chunk(ingress: bool, data: &[u8], extra: usize, i: usize) -> Chunk<'_> {
    Chunk {
        direction: if ingress {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        data,
        total: data.len() + extra,
        tail: &[],
        ts_ns: i as u64,
    }
}

proptest! {
    #[test]
    fn any_split_walked_by_the_kernel_gives_the_same_exchanges(
        cuts in prop::collection::vec(1usize..40_000, 1..12),
        capture in prop::sample::select(vec![1024usize, 8192]),
    ) {
        let (inbound, outbound) = large_conversation();
        let expected = read_whole(&inbound, 1, &outbound, 1);
        let mut s = Http2Stream::new();
        let mut out = Vec::new();
        let mut i = 0;
        for (dir, bytes, preface) in [
            (Direction::Ingress, &inbound, true),
            (Direction::Egress, &outbound, false),
        ] {
            let mut walk = KernelWalk::new(preface);
            let mut at = 0;
            while at < bytes.len() {
                let n = cuts[i % cuts.len()].min(bytes.len() - at);
                feed_walked(&mut s, &mut walk, dir, &bytes[at..at + n], capture, &mut out);
                at += n;
                i += 1;
            }
        }
        prop_assert_eq!(s.stats().total_drops(), 0);
        prop_assert_eq!(out, expected);
    }

    #[test]
    fn random_sparse_records_never_panic(
        chunks in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..200), 0usize..30_000, any::<u32>(), 0u8..12, any::<bool>()), 0..20),
    ) {
        let mut s = Http2Stream::new();
        let mut out = Vec::new();
        for (i, (ingress, data, extra, left, have, is_data)) in chunks.iter().enumerate() {
            let c = partial_chunk(*ingress, data, *extra, i);
            let start = WalkStart { left: *left % 100, have: *have, data: *is_data };
            s.on_sparse_chunk(&c, start, &mut out).expect("valid chunk");
        }
        s.on_close(99, &mut out);
        prop_assert!(out.len() <= MAX_CALLS * 2);
    }

    #[test]
    fn random_bytes_never_panic(
        chunks in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..200), 0usize..300), 0..20),
        preface in any::<bool>(),
    ) {
        let mut s = Http2Stream::new();
        if preface {
            feed(&mut s, Direction::Ingress, PREFACE, 0);
        }
        let mut out = Vec::new();
        for (i, (ingress, data, extra)) in chunks.iter().enumerate() {
            let c = partial_chunk(*ingress, data, *extra, i);
            s.on_chunk(&c, &mut out).expect("valid chunk");
        }
        s.on_close(99, &mut out);
        prop_assert!(out.len() <= MAX_CALLS * 2);
    }

    #[test]
    fn any_split_of_a_conversation_gives_the_same_exchanges(
        cuts in prop::collection::vec(1usize..40, 1..30),
    ) {
        let (mut client, mut server) = (Writer::new(), Writer::new());
        let mut inbound = PREFACE.to_vec();
        let mut outbound = settings();
        for id in [1u32, 3, 5] {
            inbound.extend(grpc_request(&mut client, id));
            outbound.extend(grpc_response(&mut server, id, "0"));
        }
        let expected = read_whole(&inbound, 1, &outbound, 1);
        prop_assert_eq!(expected.len(), 3);
        let mut s = Http2Stream::new();
        let mut out = Vec::new();
        for (dir, bytes) in [(Direction::Ingress, &inbound), (Direction::Egress, &outbound)] {
            let mut at = 0;
            let mut i = 0;
            while at < bytes.len() {
                let n = cuts[i % cuts.len()].min(bytes.len() - at);
                out.extend(feed(&mut s, dir, &bytes[at..at + n], 1));
                at += n;
                i += 1;
            }
        }
        prop_assert_eq!(out, expected);
    }
}
