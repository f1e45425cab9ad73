use proptest::prelude::*;

use super::*;

/// A RESP command as clients send it: an array of bulk strings.
fn command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// A chunk of which only the first `capture` bytes were copied.
fn chunk(direction: Direction, bytes: &[u8], capture: usize, ts_ns: u64) -> Chunk<'_> {
    Chunk {
        direction,
        data: &bytes[..capture.min(bytes.len())],
        total: bytes.len(),
        tail: &[],
        ts_ns,
    }
}

fn send(s: &mut RespStream, out: &mut Vec<Exchange>, bytes: &[u8], ts: u64) {
    s.on_chunk(&Chunk::complete(Direction::Egress, bytes, ts), out);
}

fn recv(s: &mut RespStream, out: &mut Vec<Exchange>, bytes: &[u8], ts: u64) {
    s.on_chunk(&Chunk::complete(Direction::Ingress, bytes, ts), out);
}

/// (operation, error prefix, start, end) of each exchange.
fn calls(out: &[Exchange]) -> Vec<(String, Option<String>, u64, u64)> {
    out.iter()
        .map(|e| {
            let call = e.redis.expect("a redis exchange");
            (
                e.method.to_string(),
                call.error.map(|p| p.to_string()),
                e.start_ns,
                e.end_ns,
            )
        })
        .collect()
}

fn call(op: &str, error: Option<&str>, start: u64, end: u64) -> (String, Option<String>, u64, u64) {
    (op.to_string(), error.map(str::to_string), start, end)
}

#[test]
fn commands_pair_with_their_replies_in_order() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(&mut s, &mut out, &command(&[b"set", b"k", b"v"]), 10);
    recv(&mut s, &mut out, b"+OK\r\n", 20);
    send(&mut s, &mut out, &command(&[b"GET", b"k"]), 30);
    recv(&mut s, &mut out, b"$1\r\nv\r\n", 40);
    send(&mut s, &mut out, &command(&[b"INCR", b"k"]), 50);
    recv(
        &mut s,
        &mut out,
        b"-ERR value is not an integer or out of range\r\n",
        60,
    );
    send(&mut s, &mut out, &command(&[b"LPUSH", b"k", b"x"]), 70);
    recv(
        &mut s,
        &mut out,
        b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        80,
    );
    send(&mut s, &mut out, &command(&[b"GET", b"nope"]), 90);
    recv(&mut s, &mut out, b"$-1\r\n", 100);
    assert_eq!(
        calls(&out),
        [
            call("SET", None, 10, 20),
            call("GET", None, 30, 40),
            call("INCR", Some("ERR"), 50, 60),
            call("LPUSH", Some("WRONGTYPE"), 70, 80),
            call("GET", None, 90, 100),
        ]
    );
    assert!(out
        .iter()
        .all(|e| e.role == ExchangeRole::Client && e.failure.is_none()));
    assert_eq!(s.stats().total_drops(), 0);
}

#[test]
fn a_pipeline_pairs_whatever_the_reads_and_writes_split() {
    let mut sent = Vec::new();
    for i in 0..20 {
        let key = format!("key{i}");
        sent.extend(command(&[b"INCR", key.as_bytes()]));
    }
    sent.extend(command(&[b"MGET", b"a", b"b", b"c"]));
    sent.extend(command(&[b"HGETALL", b"h"]));
    let mut replies = Vec::new();
    for i in 0..20 {
        replies.extend(format!(":{i}\r\n").as_bytes());
    }
    replies.extend(b"*3\r\n$1\r\n1\r\n$-1\r\n$3\r\nabc\r\n");
    // RESP3: a map, with an attribute before one of its values.
    replies.extend(b"%2\r\n+f1\r\n|1\r\n+ttl\r\n:3\r\n:1\r\n+f2\r\n*0\r\n");
    for cut in [1, 2, 3, 5, 7, 11, 64, 1000] {
        let mut s = RespStream::default();
        let mut out = Vec::new();
        for (i, part) in sent.chunks(cut).enumerate() {
            send(&mut s, &mut out, part, i as u64);
        }
        for (i, part) in replies.chunks(cut).enumerate() {
            recv(&mut s, &mut out, part, 10_000 + i as u64);
        }
        let ops: Vec<_> = out.iter().map(|e| e.method.to_string()).collect();
        let mut want = vec!["INCR".to_string(); 20];
        want.extend(["MGET".to_string(), "HGETALL".to_string()]);
        assert_eq!(ops, want, "cut {cut}");
        assert!(out
            .iter()
            .all(|e| e.redis.as_ref().is_some_and(|c| c.error.is_none())));
        assert_eq!(s.stats().total_drops(), 0, "cut {cut}");
    }
}

#[test]
fn bulk_strings_beyond_the_capture_are_passed_over_by_count() {
    let big = vec![b'x'; 100_000];
    let mut s = RespStream::default();
    let mut out = Vec::new();
    let set = command(&[b"SET", b"big", &big]);
    s.on_chunk(&chunk(Direction::Egress, &set, 8192, 10), &mut out);
    recv(&mut s, &mut out, b"+OK\r\n", 20);
    send(&mut s, &mut out, &command(&[b"GET", b"big"]), 30);
    let mut reply = b"$100000\r\n".to_vec();
    reply.extend(&big);
    reply.extend(b"\r\n");
    // Read in three calls, each copied up to 1 KiB.
    let (a, rest) = reply.split_at(40_000);
    let (b, c) = rest.split_at(50_000);
    for (i, part) in [a, b, c].into_iter().enumerate() {
        s.on_chunk(
            &chunk(Direction::Ingress, part, 1024, 40 + i as u64),
            &mut out,
        );
    }
    send(&mut s, &mut out, &command(&[b"DEL", b"big"]), 50);
    recv(&mut s, &mut out, b":1\r\n", 60);
    assert_eq!(
        calls(&out),
        [
            call("SET", None, 10, 20),
            call("GET", None, 30, 42),
            call("DEL", None, 50, 60)
        ]
    );
    assert_eq!(s.stats().total_drops(), 0);
}

#[test]
fn structure_beyond_the_capture_drops_what_waits_and_resumes_at_the_next_command() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(
        &mut s,
        &mut out,
        &command(&[b"LRANGE", b"l", b"0", b"-1"]),
        10,
    );
    // 5,000 small elements in one read, 1 KiB of it copied: the reply's end is not known.
    let mut reply = b"*5000\r\n".to_vec();
    for i in 0..5000 {
        let v = format!("{i}");
        reply.extend(format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    }
    s.on_chunk(&chunk(Direction::Ingress, &reply, 1024, 20), &mut out);
    assert!(out.is_empty());
    assert_eq!(s.stats().drops(DropReason::HeadTruncated), 1);
    assert_eq!(s.stats().drops(DropReason::NoResponse), 1);
    // The rest of a reply read before the next command is passed over.
    recv(&mut s, &mut out, b"$4\r\n4999\r\n", 25);
    send(&mut s, &mut out, &command(&[b"PING"]), 30);
    recv(&mut s, &mut out, b"+PONG\r\n", 40);
    assert_eq!(calls(&out), [call("PING", None, 30, 40)]);
    assert_eq!(s.stats().drops(DropReason::UnmatchedResponse), 0);
}

#[test]
fn unknown_or_odd_command_names_are_other() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(&mut s, &mut out, &command(&[b"FROBNICATE", b"x"]), 1);
    recv(
        &mut s,
        &mut out,
        b"-ERR unknown command 'FROBNICATE', with args beginning with: 'x'\r\n",
        2,
    );
    send(&mut s, &mut out, &command(&[b"G\xffT"]), 3);
    recv(&mut s, &mut out, b"+OK\r\n", 4);
    send(
        &mut s,
        &mut out,
        &command(&[b"client", b"setname", b"a"]),
        5,
    );
    recv(&mut s, &mut out, b"+OK\r\n", 6);
    // An inline command, as typed into telnet.
    send(&mut s, &mut out, b"ping\r\n", 7);
    recv(&mut s, &mut out, b"+PONG\r\n", 8);
    assert_eq!(
        calls(&out),
        [
            call("_OTHER", Some("ERR"), 1, 2),
            call("_OTHER", None, 3, 4),
            call("CLIENT", None, 5, 6),
            call("PING", None, 7, 8),
        ]
    );
}

#[test]
fn a_subscribed_connection_is_let_go_of() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 1);
    recv(&mut s, &mut out, b"$-1\r\n", 2);
    send(&mut s, &mut out, &command(&[b"SUBSCRIBE", b"news"]), 3);
    recv(
        &mut s,
        &mut out,
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n",
        4,
    );
    for i in 0..10 {
        recv(
            &mut s,
            &mut out,
            b"*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n",
            5 + i,
        );
    }
    assert_eq!(calls(&out), [call("GET", None, 1, 2)]);
    assert_eq!(s.stats().total_drops(), 0);
}

#[test]
fn resp3_pushes_answer_no_command() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 1);
    recv(
        &mut s,
        &mut out,
        b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\na\r\n_\r\n",
        2,
    );
    assert_eq!(calls(&out), [call("GET", None, 1, 2)]);
}

#[test]
fn commands_unanswered_when_the_connection_closes_failed_then() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(&mut s, &mut out, &command(&[b"BLPOP", b"q", b"0"]), 1);
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 2);
    recv(&mut s, &mut out, b"*2\r\n$1\r\nq\r\n", 3);
    s.on_close(9, &mut out);
    let failures: Vec<_> = out
        .iter()
        .map(|e| (e.method.as_str(), e.failure, e.end_ns))
        .collect();
    assert_eq!(
        failures,
        [
            ("BLPOP", Some(Failure::ResponseCutShort), 9),
            ("GET", Some(Failure::NoResponse), 9)
        ]
    );
    assert!(out
        .iter()
        .all(|e| e.redis.as_ref().is_some_and(|c| c.error.is_none())));
}

#[test]
fn replies_without_a_command_and_garbage_are_counted() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    recv(&mut s, &mut out, b"+OK\r\n", 1);
    assert_eq!(s.stats().drops(DropReason::UnmatchedResponse), 1);
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 2);
    recv(&mut s, &mut out, b"\x00\x01garbage\r\n", 3);
    assert_eq!(s.stats().drops(DropReason::Malformed), 1);
    assert_eq!(s.stats().drops(DropReason::NoResponse), 1);
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 4);
    recv(&mut s, &mut out, b"$1\r\nb\r\n", 5);
    assert_eq!(calls(&out), [call("GET", None, 4, 5)]);
}

#[test]
fn pipelines_deeper_than_the_limit_drop_the_oldest() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    let ping = command(&[b"PING"]);
    for i in 0..(MAX_PENDING as u64 + 3) {
        send(&mut s, &mut out, &ping, i);
    }
    assert_eq!(s.stats().drops(DropReason::PipelineOverflow), 3);
    for i in 0..MAX_PENDING as u64 {
        recv(&mut s, &mut out, b"+PONG\r\n", 1000 + i);
    }
    assert_eq!(out.len(), MAX_PENDING);
    assert_eq!(out[0].start_ns, 3, "the three oldest were dropped");
}

#[test]
fn huge_counts_and_deep_nesting_are_malformed_not_a_hang() {
    let mut s = RespStream::default();
    let mut out = Vec::new();
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 1);
    recv(&mut s, &mut out, b"*99999999999999999999\r\n", 2);
    assert_eq!(s.stats().drops(DropReason::Malformed), 1);
    send(&mut s, &mut out, &command(&[b"GET", b"a"]), 3);
    recv(
        &mut s,
        &mut out,
        "*1\r\n".repeat(MAX_DEPTH + 1).as_bytes(),
        4,
    );
    assert_eq!(s.stats().drops(DropReason::Malformed), 2);
    assert!(out.is_empty());
}

proptest! {
    #[test]
    fn random_bytes_never_panic(
        parts in prop::collection::vec(
            (any::<bool>(), prop::collection::vec(any::<u8>(), 0..64), 0usize..200),
            1..40,
        ),
    ) {
        let mut s = RespStream::default();
        let mut out = Vec::new();
        for (i, (egress, bytes, missing)) in parts.iter().enumerate() {
            let direction = if *egress { Direction::Egress } else { Direction::Ingress };
            let c = Chunk {
                direction,
                data: bytes,
                total: bytes.len() + missing,
                tail: &[],
                ts_ns: i as u64,
            };
            s.on_chunk(&c, &mut out);
        }
        s.on_close(1000, &mut out);
        prop_assert!(out.iter().all(|e| e.redis.is_some()));
    }

    #[test]
    fn any_split_of_a_conversation_gives_the_same_calls(
        cuts in prop::collection::vec(1usize..300, 1..20),
    ) {
        let mut sent = Vec::new();
        let mut replies = Vec::new();
        for i in 0..30u32 {
            let key = format!("k{i}");
            let value = "v".repeat(i as usize * 7);
            sent.extend(command(&[b"SET", key.as_bytes(), value.as_bytes()]));
            replies.extend(b"+OK\r\n");
            sent.extend(command(&[b"GET", key.as_bytes()]));
            replies.extend(format!("${}\r\n{value}\r\n", value.len()).as_bytes());
        }
        let mut s = RespStream::default();
        let mut out = Vec::new();
        let mut at = 0;
        for (i, cut) in cuts.iter().cycle().enumerate() {
            if at >= sent.len() {
                break;
            }
            let end = (at + cut).min(sent.len());
            send(&mut s, &mut out, &sent[at..end], i as u64);
            at = end;
        }
        at = 0;
        for (i, cut) in cuts.iter().rev().cycle().enumerate() {
            if at >= replies.len() {
                break;
            }
            let end = (at + cut).min(replies.len());
            recv(&mut s, &mut out, &replies[at..end], 1_000_000 + i as u64);
            at = end;
        }
        let ops: Vec<_> = out.iter().map(|e| e.method.as_str()).collect();
        prop_assert_eq!(ops.len(), 60);
        prop_assert!(ops.chunks(2).all(|p| p == ["SET", "GET"]));
        prop_assert_eq!(s.stats().total_drops(), 0);
    }
}

#[test]
fn error_prefixes_are_redis_own_else_err() {
    let prefix = |m: &[u8]| error_prefix(m).0.as_str();
    assert_eq!(prefix(b"MOVED 3999 127.0.0.1:6381"), "MOVED");
    assert_eq!(prefix(b"CLUSTERDOWN The cluster is down"), "CLUSTERDOWN");
    assert_eq!(prefix(b"MYMODULE something went wrong"), "ERR");
    assert_eq!(prefix(b"lowercase message"), "ERR");
    assert_eq!(prefix(b""), "ERR");
    // Kept in one byte: an exchange in flight carries it.
    assert_eq!(std::mem::size_of::<Option<RedisCall>>(), 2);
}
