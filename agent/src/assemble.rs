//! Adapts kernel data events to the parser of one connection: HTTP/1.x, or HTTP/2 or
//! Redis (RESP) once the kernel said the connection speaks it.
use std::collections::VecDeque;

use agent_common::{
    TraceIds, DATA_AFTER_GAP, DATA_H2_SPARSE, DIR_INGRESS, TRACE_NONE, TRACE_SERVER,
    TRACE_SERVER_PARENT,
};

use crate::{
    capture::events::DataEvent,
    http::{Chunk, Direction, Exchange, Http1Stream, Http2Stream, StreamStats, WalkStart},
    redis::RespStream,
    stats::Stats,
};

/// Request starts whose kernel ids wait for their exchange to complete (pipelining depth).
const MAX_PENDING_IDS: usize = 64;

pub struct ConnAssembler {
    stream: Http1Stream,
    /// Set once the kernel said the connection speaks HTTP/2 or is a Redis client's: that
    /// parser then reads every chunk.
    other: Option<Box<OtherProtocol>>,
    /// (timestamp of the request's first chunk, ids the kernel gave it), oldest first.
    pending_ids: VecDeque<(u64, TraceIds)>,
}

/// What reads a connection that is not HTTP/1.x.
enum OtherProtocol {
    Http2(Http2Stream),
    Resp(RespStream),
}

/// A finished exchange and the trace ids the kernel chose for it (if it saw its start).
pub type Assembled = (Exchange, Option<TraceIds>);

/// What chunks complete, in buffers the caller reuses for every connection (a fresh
/// `Vec` per chunk was two allocations per exchange). Ids sit beside their exchange
/// rather than with it, so that an exchange is not moved once more to pair them.
#[derive(Default)]
pub struct Completed {
    /// Finished by the stream; the first `ids.len()` have their ids.
    exchanges: Vec<Exchange>,
    ids: Vec<Option<TraceIds>>,
}

impl Completed {
    /// The exchanges completed since the last drain, with their kernel ids, in order.
    pub fn drain(&mut self) -> impl Iterator<Item = Assembled> + '_ {
        self.exchanges.drain(..).zip(self.ids.drain(..))
    }

    /// The last exchange completed so far.
    pub fn last(&self) -> Option<&Exchange> {
        self.exchanges.last()
    }
}

impl ConnAssembler {
    /// `from_first_byte`: the connection was accepted or connected while the agent ran,
    /// so its first captured bytes are its first (see [`Http1Stream::from_first_byte`]).
    pub fn new(from_first_byte: bool) -> Self {
        Self {
            stream: if from_first_byte {
                Http1Stream::from_first_byte()
            } else {
                Http1Stream::new()
            },
            other: None,
            pending_ids: VecDeque::new(),
        }
    }

    /// The connection speaks HTTP/2 (the kernel saw its preface, or its server's first
    /// SETTINGS): its chunks go to the HTTP/2 parser from now on.
    pub fn use_http2(&mut self) {
        if self.other.is_none() {
            self.other = Some(Box::new(OtherProtocol::Http2(Http2Stream::default())));
        }
    }

    pub fn is_http2(&self) -> bool {
        matches!(self.other.as_deref(), Some(OtherProtocol::Http2(_)))
    }

    /// The connection is a Redis client's (the kernel saw it write a RESP command first):
    /// its chunks go to the RESP parser from now on.
    pub fn use_resp(&mut self) {
        if self.other.is_none() {
            self.other = Some(Box::new(OtherProtocol::Resp(RespStream::default())));
        }
    }

    pub fn is_resp(&self) -> bool {
        matches!(self.other.as_deref(), Some(OtherProtocol::Resp(_)))
    }

    /// Why its HTTP/2 parser gave the connection up, once (see [`Http2Stream::take_loss`]).
    pub fn take_http2_loss(&mut self) -> Option<crate::http::DropReason> {
        match self.other.as_deref_mut() {
            Some(OtherProtocol::Http2(h2)) => h2.take_loss(),
            _ => None,
        }
    }

    /// Pairs finished exchanges with the ids recorded at their request's first chunk
    /// (exchanges complete in request order, so stale entries are skipped from the front).
    fn attach_ids(&mut self, out: &mut Completed) {
        for ex in &out.exchanges[out.ids.len()..] {
            while self
                .pending_ids
                .front()
                .is_some_and(|(ts, _)| *ts < ex.start_ns)
            {
                self.pending_ids.pop_front();
            }
            let mut ids = match self.pending_ids.front() {
                Some((ts, _)) if *ts == ex.start_ns => self.pending_ids.pop_front().map(|(_, i)| i),
                _ => None,
            };
            if let Some(OtherProtocol::Resp(resp)) = self.other.as_deref_mut() {
                ids = resp.command_ids(ex.start_ns, ids);
            }
            out.ids.push(ids);
        }
    }

    /// Frees buffers kept from earlier messages, if nothing is in flight (idle connection).
    pub fn release_idle_buffers(&mut self) {
        if self.pending_ids.is_empty() {
            self.pending_ids = VecDeque::new();
        }
        match self.other.as_deref_mut() {
            Some(OtherProtocol::Http2(h2)) => h2.release_idle_buffers(),
            Some(OtherProtocol::Resp(resp)) => resp.release_idle_buffers(),
            None => self.stream.release_idle_buffers(),
        }
    }

    /// Feeds one data event; drop counts go to `stats`.
    pub fn on_data(&mut self, d: &DataEvent<'_>, out: &mut Completed, stats: &Stats) {
        let gap = d.header.flags & DATA_AFTER_GAP != 0;
        match self.other.as_deref_mut() {
            Some(OtherProtocol::Http2(h2)) => {
                // No kernel ids: the kernel follows trace context in HTTP/1.x only.
                if gap {
                    h2.on_gap();
                }
                let chunk = chunk_of(d);
                let result = if d.header.flags & DATA_H2_SPARSE == 0 {
                    h2.on_chunk(&chunk, &mut out.exchanges)
                } else {
                    match WalkStart::from_tail(d.tail()) {
                        Some(start) => h2.on_sparse_chunk(&chunk, start, &mut out.exchanges),
                        None => {
                            h2.on_gap();
                            Ok(())
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::trace!(error = %e, "http/2 chunk ignored");
                }
            }
            Some(OtherProtocol::Resp(resp)) => {
                if gap {
                    // The ids of commands that will not be paired go with them.
                    self.pending_ids.clear();
                    resp.on_gap();
                }
                note_ids(&mut self.pending_ids, d);
                resp.on_chunk(&chunk_of(d), &mut out.exchanges);
            }
            None => {
                if gap {
                    // The ids of requests that will not be paired go with them.
                    self.pending_ids.clear();
                    self.stream.on_gap();
                }
                note_ids(&mut self.pending_ids, d);
                if let Err(e) = self.stream.on_chunk(&chunk_of(d), &mut out.exchanges) {
                    tracing::trace!(error = %e, "http stream reset");
                }
            }
        }
        self.attach_ids(out);
        self.flush_stats(stats);
    }

    /// The connection ended at `ts_ns`: `seen_closing` when its close (or its process's
    /// exit) was seen, so that requests left without response failed then; else the agent
    /// only lets go of it (see [`Http1Stream::on_forget`]).
    pub fn on_close(&mut self, ts_ns: u64, seen_closing: bool, out: &mut Completed, stats: &Stats) {
        match (self.other.as_deref_mut(), seen_closing) {
            (Some(OtherProtocol::Http2(h2)), true) => h2.on_close(ts_ns, &mut out.exchanges),
            (Some(OtherProtocol::Http2(h2)), false) => h2.on_forget(),
            (Some(OtherProtocol::Resp(resp)), true) => resp.on_close(ts_ns, &mut out.exchanges),
            (Some(OtherProtocol::Resp(resp)), false) => resp.on_forget(),
            (None, true) => self.stream.on_close(ts_ns, &mut out.exchanges),
            (None, false) => self.stream.on_forget(ts_ns, &mut out.exchanges),
        }
        self.attach_ids(out);
        self.flush_stats(stats);
    }

    fn flush_stats(&mut self, stats: &Stats) {
        let taken: Option<StreamStats> = match self.other.as_deref_mut() {
            Some(OtherProtocol::Http2(h2)) => {
                (h2.stats().total_drops() > 0).then(|| h2.take_stats())
            }
            Some(OtherProtocol::Resp(resp)) => {
                (resp.stats().total_drops() > 0).then(|| resp.take_stats())
            }
            None => (self.stream.stats().total_drops() > 0).then(|| self.stream.take_stats()),
        };
        if let Some(taken) = taken {
            stats.add_stream(&taken);
        }
    }

    pub fn stream(&self) -> &Http1Stream {
        &self.stream
    }
}

/// Keeps the ids the kernel gave a request start (or a late `traceparent`).
fn note_ids(pending: &mut VecDeque<(u64, TraceIds)>, d: &DataEvent<'_>) {
    let trace = &d.header.trace;
    if trace.kind == TRACE_SERVER_PARENT {
        adopt_late_parent(pending, trace);
    } else if trace.kind != TRACE_NONE {
        if pending.len() >= MAX_PENDING_IDS {
            pending.pop_front();
        }
        pending.push_back((d.header.header.ts_ns, d.header.trace));
    }
}

/// The `traceparent` of the request whose head is being read (the newest request start)
/// arrived in a later read: that SERVER span continues the caller's trace.
fn adopt_late_parent(pending: &mut VecDeque<(u64, TraceIds)>, late: &TraceIds) {
    let Some((_, ids)) = pending.back_mut() else {
        return;
    };
    // The kernel names the span whose head it followed by its first four bytes.
    if ids.kind != TRACE_SERVER || late.span_id[..4] != ids.span_id[..4] {
        return;
    }
    ids.trace_id = late.trace_id;
    ids.parent_span_id = late.parent_span_id;
    ids.flags = late.flags;
    ids.has_parent = 1;
    ids.origin = late.origin;
}

/// The chunk a data event carries.
fn chunk_of<'a>(d: &'a DataEvent<'_>) -> Chunk<'a> {
    Chunk {
        direction: if d.header.direction == DIR_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        },
        data: d.payload,
        total: d.header.total as usize,
        tail: d.tail(),
        ts_ns: d.header.header.ts_ns,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::{DataEventHeader, EventHeader, EventKind, DIR_EGRESS, ORIGIN_HEADER};

    /// The header of a fully captured chunk.
    fn chunk_header(dir: u8, ts: u64, payload: &[u8]) -> DataEventHeader {
        DataEventHeader {
            header: EventHeader {
                kind: EventKind::Data as u8,
                ts_ns: ts,
                ..Default::default()
            },
            total: payload.len() as u32,
            captured: payload.len() as u32,
            direction: dir,
            ..Default::default()
        }
    }

    /// Feeds one fully captured chunk; `ids`: the kernel gave it span id `[b; 8]`.
    fn feed(
        a: &mut ConnAssembler,
        out: &mut Completed,
        dir: u8,
        ts: u64,
        payload: &[u8],
        ids: Option<u8>,
    ) {
        let mut header = chunk_header(dir, ts, payload);
        if let Some(b) = ids {
            header.trace.kind = TRACE_SERVER;
            header.trace.span_id = [b; 8];
        }
        a.on_data(&DataEvent { header, payload }, out, &Stats::default());
    }

    /// `GET /a` read in two parts: the request line (span id `[1; 8]`), then `rest`, whose
    /// read carries a late `traceparent` naming span `[late_span; 8]`; then the response.
    /// Returns the exchange's ids.
    fn split_head_exchange(rest: &[u8], late_span: u8) -> (String, TraceIds) {
        let mut a = ConnAssembler::new(false);
        let mut out = Completed::default();
        feed(
            &mut a,
            &mut out,
            DIR_INGRESS,
            10,
            b"GET /a HTTP/1.1\r\n",
            Some(1),
        );
        let mut header = chunk_header(DIR_INGRESS, 11, rest);
        header.trace = TraceIds {
            trace_id: [0xab; 16],
            span_id: [late_span, late_span, late_span, late_span, 0, 0, 0, 0],
            parent_span_id: [0xcd; 8],
            flags: 1,
            kind: TRACE_SERVER_PARENT,
            origin: ORIGIN_HEADER,
            has_parent: 1,
            ..Default::default()
        };
        let late = DataEvent {
            header,
            payload: rest,
        };
        a.on_data(&late, &mut out, &Stats::default());
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        feed(&mut a, &mut out, DIR_EGRESS, 12, resp, None);
        let (ex, ids) = out.drain().last().expect("one exchange");
        (ex.path.to_string(), ids.expect("kernel ids"))
    }

    #[test]
    fn a_traceparent_from_a_later_read_becomes_the_server_spans_parent() {
        let (path, ids) = split_head_exchange(b"traceparent: x\r\nHost: x\r\n\r\n", 1);
        assert_eq!(path, "/a");
        assert_eq!(ids.span_id, [1; 8], "the span keeps its own id");
        assert_eq!(ids.kind, TRACE_SERVER);
        assert_eq!((ids.trace_id, ids.parent_span_id), ([0xab; 16], [0xcd; 8]));
        assert_eq!((ids.has_parent, ids.origin), (1, ORIGIN_HEADER));
    }

    #[test]
    fn a_late_parent_naming_another_span_is_ignored() {
        let (_, ids) = split_head_exchange(b"Host: x\r\n\r\n", 9);
        assert_eq!(ids.span_id, [1; 8]);
        assert_eq!((ids.trace_id, ids.has_parent), ([0; 16], 0));
    }

    #[test]
    fn kernel_ids_follow_their_exchange_through_pipelining() {
        let mut a = ConnAssembler::new(false);
        let mut out = Completed::default();
        for (i, path) in ["/a", "/b"].iter().enumerate() {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
            let ts = 10 + i as u64;
            feed(
                &mut a,
                &mut out,
                DIR_INGRESS,
                ts,
                req.as_bytes(),
                Some(i as u8 + 1),
            );
        }
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        for ts in [20, 21] {
            feed(&mut a, &mut out, DIR_EGRESS, ts, resp, None);
        }
        let got: Vec<_> = out
            .drain()
            .map(|(e, ids)| (e.path.clone(), ids.map(|i| i.span_id[0])))
            .collect();
        assert_eq!(got, vec![("/a".into(), Some(1)), ("/b".into(), Some(2))]);
    }

    /// A client connection's records: per exchange `i`, the request `GET /i` (egress),
    /// then the response (ingress) with status `200 + i`, its head and its 40-byte body
    /// in two records. `keep[r]`: record `r` reaches the agent; the next one that does
    /// carries the kernel's gap flag. Returns (path, status) of every exchange made, and
    /// the exchanges dropped for the gap.
    fn client_records_with_losses(n: usize, keep: &[bool]) -> (Vec<(String, u16)>, u64) {
        let mut a = ConnAssembler::new(false);
        let mut out = Completed::default();
        let stats = Stats::default();
        let mut records = Vec::new();
        for i in 0..n {
            records.push((DIR_EGRESS, format!("GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n")));
            let status = 200 + i;
            records.push((
                DIR_INGRESS,
                format!("HTTP/1.1 {status} X\r\nContent-Length: 40\r\n\r\n"),
            ));
            records.push((DIR_INGRESS, "b".repeat(40)));
        }
        let mut gap = false;
        for (r, (dir, payload)) in records.iter().enumerate() {
            if !keep.get(r).copied().unwrap_or(true) {
                gap = true;
                continue;
            }
            let mut header = chunk_header(*dir, 10 + r as u64, payload.as_bytes());
            if std::mem::take(&mut gap) {
                header.flags = DATA_AFTER_GAP;
            }
            let payload = payload.as_bytes();
            a.on_data(&DataEvent { header, payload }, &mut out, &stats);
        }
        let made = out
            .drain()
            .map(|(e, _)| (e.path.to_string(), e.status))
            .collect();
        let gaps = stats
            .http_drops()
            .iter()
            .find(|(r, _)| *r == "capture_gap")
            .map_or(0, |(_, n)| *n);
        (made, gaps)
    }

    #[test]
    fn a_lost_record_drops_what_was_in_flight_and_nothing_else() {
        // (exchanges, the record lost, the exchanges made): exchange 1's response head
        // lost (without the gap flag /1 would take /2's response, /2 /3's, and so on for
        // the connection's life); exchange 0's body lost (/0 must not be finished by the
        // next response's bytes). Either way one request in flight is dropped for the gap.
        type Made<'a> = &'a [(&'a str, u16)];
        let cases: [(usize, usize, Made); 2] = [
            (4, 4, &[("/0", 200), ("/2", 202), ("/3", 203)]),
            (3, 2, &[("/1", 201), ("/2", 202)]),
        ];
        for (n, lost, want) in cases {
            let mut keep = vec![true; 3 * n];
            keep[lost] = false;
            let (made, gaps) = client_records_with_losses(n, &keep);
            let want: Vec<_> = want.iter().map(|(p, s)| (p.to_string(), *s)).collect();
            assert_eq!(made, want, "record {lost} lost");
            assert_eq!(gaps, 1, "record {lost} lost");
        }
    }

    proptest::proptest! {
        /// Whatever records are lost, every exchange made pairs a request with its own
        /// response, and exchanges whose records all arrived are all made.
        #[test]
        fn losses_never_pair_a_request_with_another_response(
            keep in proptest::collection::vec(proptest::bool::weighted(0.8), 60)
        ) {
            let (made, _) = client_records_with_losses(20, &keep);
            for (path, status) in &made {
                proptest::prop_assert_eq!(format!("/{}", status - 200), path.clone());
            }
            // ... and every exchange whose own records all arrived is made (a loss just
            // before its request flags the request, which starts afresh).
            for i in 0..20 {
                let r = 3 * i;
                if keep[r..r + 3].iter().all(|k| *k) {
                    proptest::prop_assert!(made.iter().any(|(p, _)| *p == format!("/{i}")), "/{} missing", i);
                }
            }
        }
    }

    #[test]
    fn exchange_without_kernel_ids_gets_none() {
        let mut a = ConnAssembler::new(false);
        let mut out = Completed::default();
        feed(
            &mut a,
            &mut out,
            DIR_INGRESS,
            5,
            b"GET / HTTP/1.1\r\n\r\n",
            None,
        );
        let resp = b"HTTP/1.1 204 No Content\r\n\r\n";
        feed(&mut a, &mut out, DIR_EGRESS, 6, resp, None);
        let done: Vec<_> = out.drain().collect();
        assert_eq!(done.len(), 1);
        assert!(done[0].1.is_none());
    }

    /// A Redis pipeline in one write: the kernel gives the write one set of ids; the
    /// commands after the first are its siblings (same trace and parent, span ids of
    /// their own). A later write's command gets that write's ids.
    #[test]
    fn pipelined_redis_commands_are_siblings_of_the_first() {
        let mut a = ConnAssembler::new(true);
        let mut out = Completed::default();
        let send = |a: &mut ConnAssembler, out: &mut Completed, dir, ts, payload: &[u8], span| {
            let mut header = chunk_header(dir, ts, payload);
            header.flags = agent_common::DATA_RESP;
            if let Some(b) = span {
                header.trace.kind = agent_common::TRACE_CLIENT;
                header.trace.trace_id = [7; 16];
                header.trace.span_id = [b; 8];
                header.trace.parent_span_id = [9; 8];
                header.trace.has_parent = 1;
            }
            a.use_resp();
            a.on_data(&DataEvent { header, payload }, out, &Stats::default());
        };
        let multi = b"*1\r\n$5\r\nMULTI\r\n*2\r\n$4\r\nINCR\r\n$1\r\nn\r\n*1\r\n$4\r\nEXEC\r\n";
        send(&mut a, &mut out, DIR_EGRESS, 10, multi, Some(1));
        send(
            &mut a,
            &mut out,
            DIR_INGRESS,
            11,
            b"+OK\r\n+QUEUED\r\n*1\r\n:1\r\n",
            None,
        );
        send(
            &mut a,
            &mut out,
            DIR_EGRESS,
            12,
            b"*1\r\n$4\r\nPING\r\n",
            Some(2),
        );
        send(&mut a, &mut out, DIR_INGRESS, 13, b"+PONG\r\n", None);
        let done: Vec<_> = out.drain().collect();
        let names: Vec<_> = done.iter().map(|(e, _)| e.method.as_str()).collect();
        assert_eq!(names, ["MULTI", "INCR", "EXEC", "PING"]);
        let ids: Vec<TraceIds> = done.iter().map(|(_, i)| i.expect("ids")).collect();
        assert_eq!(ids[0].span_id, [1; 8]);
        assert_eq!(ids[3].span_id, [2; 8]);
        for i in &ids[..3] {
            assert_eq!(
                (i.trace_id, i.parent_span_id, i.has_parent),
                ([7; 16], [9; 8], 1)
            );
        }
        let spans: std::collections::HashSet<_> = ids.iter().map(|i| i.span_id).collect();
        assert_eq!(spans.len(), 4, "every command its own span id");
    }
}
