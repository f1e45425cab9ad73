//! The per-connection HTTP/1.x state machine: chunks in, [`Exchange`]s out.
//!
//! Each direction of the connection is parsed on its own (`Side`): requests on one,
//! responses on the other, decided by which side the first message comes from. Requests
//! wait in a bounded FIFO (`Pairing`) and are paired with responses in order, which also
//! covers pipelining. Whatever cannot be followed is dropped, counted, and parsing resumes
//! at the next chunk that starts like a message.

use std::mem::discriminant;

use agent_common::TAIL_BYTES;
use compact_str::CompactString;

use super::chunk::{Chunk, Direction};
use super::chunked::{ChunkedDecoder, ChunkedProgress};
use super::cursor::Cursor;
use super::exchange::{Exchange, ExchangeRole, Failure, HttpVersion};
use super::head::{
    self, ConnectionOption, HeadEndScanner, HeadError, HeadFields, MessageKind, MessageStart,
    RequestHead, ResponseHead,
};
use super::pairing::{FinishedResponse, Pairing, Pending};
use super::stats::{DropReason, StreamStats};

/// Limits of one [`Http1Stream`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Longest head accepted (and buffered while it arrives in pieces).
    pub max_head_bytes: usize,
    /// Requests that may wait for their responses (pipelining).
    pub max_pending: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_pending: 64,
        }
    }
}

/// A chunk that cannot come from the kernel side; it is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    #[error("chunk has {captured} captured bytes but only {total} were moved")]
    CapturedExceedsTotal { captured: usize, total: usize },
    #[error("chunk tail has {0} bytes, more than {TAIL_BYTES}")]
    TailTooLong(usize),
}

impl Chunk<'_> {
    /// A chunk the kernel side can produce: no more captured bytes than moved, a tail no
    /// longer than the kernel's.
    pub fn check(&self) -> Result<(), StreamError> {
        if self.data.len() > self.total {
            return Err(StreamError::CapturedExceedsTotal {
                captured: self.data.len(),
                total: self.total,
            });
        }
        if self.tail.len() > TAIL_BYTES {
            return Err(StreamError::TailTooLong(self.tail.len()));
        }
        Ok(())
    }
}

/// HTTP/1.x state of one TCP connection. See the module docs.
#[derive(Debug, Default)]
pub struct Http1Stream {
    /// Ingress, egress.
    sides: [Side; 2],
    pairing: Pairing,
}

impl Http1Stream {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_config(config: StreamConfig) -> Self {
        Self {
            sides: Default::default(),
            pairing: Pairing::new(config),
        }
    }

    /// A stream of a connection seen from its first byte (accepted or connected while the
    /// agent runs): its first bytes start a message, so bytes that cannot are counted as
    /// malformed rather than skipped as the middle of a message seen late.
    pub fn from_first_byte() -> Self {
        let mut stream = Self::new();
        for side in &mut stream.sides {
            side.phase = Phase::Idle;
        }
        stream
    }

    /// Applies one syscall's chunk; finished exchanges are appended to `out`.
    pub fn on_chunk(
        &mut self,
        chunk: &Chunk<'_>,
        out: &mut Vec<Exchange>,
    ) -> Result<(), StreamError> {
        chunk.check()?;
        if self.pairing.upgraded || chunk.total == 0 {
            return Ok(());
        }
        let mut cursor = Cursor::new(chunk.data, chunk.total, chunk.tail);
        let [ingress, egress] = &mut self.sides;
        let (side, other) = match chunk.direction {
            Direction::Ingress => (ingress, egress),
            Direction::Egress => (egress, ingress),
        };
        if chunk.data.len() < chunk.total {
            side.last_cut_ns = chunk.ts_ns;
        }
        let mut run = Run {
            side,
            other,
            pairing: &mut self.pairing,
            direction: chunk.direction,
            ts: chunk.ts_ns,
            total: chunk.total as u64,
            out,
        };
        // Steps in a row that consumed nothing (each changed the phase).
        let mut idle_steps = 0;
        while !cursor.is_empty() && !run.pairing.upgraded {
            let before = (cursor.remaining(), discriminant(&run.side.phase));
            run.step(&mut cursor);
            // Every step consumes bytes or changes phase; never spin if one does neither,
            // nor if phases go round without consuming anything.
            if cursor.remaining() == before.0 {
                idle_steps += 1;
                if before.1 == discriminant(&run.side.phase) || idle_steps > MAX_IDLE_STEPS {
                    run.side.lose_sync();
                    cursor.skip_to_end();
                }
            } else {
                idle_steps = 0;
            }
        }
        Ok(())
    }

    /// The connection closed, or a process at its end exited, at `ts_ns`: emits a
    /// response that ends at close, and every request left without a whole response as
    /// a failed exchange (a crashed server or a client that gave up is what users need to
    /// see); then resets the stream (its stats are kept).
    pub fn on_close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        self.end(ts_ns, true, out);
    }

    /// The agent stops following the connection without having seen it end (evicted, or
    /// its fd reused by a connection whose close was not seen): as [`Self::on_close`],
    /// but the requests left are only counted (`no_response`), their end unknown.
    pub fn on_forget(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        self.end(ts_ns, false, out);
    }

    fn end(&mut self, ts_ns: u64, seen_closing: bool, out: &mut Vec<Exchange>) {
        // What was left unanswered failed only where every response sent was followed: a
        // response side that lost track, or followed a body blind, may have missed answers.
        let responses_followed = seen_closing
            && self.pairing.role.is_some_and(|role| {
                let side = match kind_for(role, Direction::Egress) {
                    MessageKind::Response => &self.sides[1],
                    MessageKind::Request => &self.sides[0],
                };
                let in_step = match side.phase {
                    Phase::Resync => false,
                    Phase::Body(Framing::Chunked(decoder)) => decoder.is_synced(),
                    _ => true,
                };
                in_step && !side.lost_sync && !side.blind
            });
        // And of the requests waiting, only those sent after the last bytes the capture
        // left out, either way: an earlier one's answer may be among them, or it may not be
        // what it seems.
        let last_cut_ns = self.sides[0].last_cut_ns.max(self.sides[1].last_cut_ns);
        let pairing = &mut self.pairing;
        for side in &self.sides {
            if let Phase::Head {
                kind: Some(MessageKind::Request),
                tentative: false,
                ..
            } = side.phase
            {
                // The sender stopped (or died) in the middle of a request's head: it will
                // not be answered.
                pairing.stats.record(DropReason::NoResponse);
            }
            if side.message.kind != MessageKind::Response {
                continue;
            }
            let ends_at_close = match side.phase {
                Phase::Body(Framing::UntilClose) => true,
                Phase::Body(Framing::Chunked(decoder)) => !decoder.is_synced(),
                _ => false,
            };
            let cut_short = responses_followed && matches!(side.phase, Phase::Body(_));
            if ends_at_close || cut_short {
                let before = out.len();
                pairing.finish_response(side.message.finished(ts_ns), out);
                if !ends_at_close && out.len() > before {
                    if let Some(exchange) = out.last_mut() {
                        exchange.failure = Some(Failure::ResponseCutShort);
                    }
                }
            }
        }
        if responses_followed {
            pairing.fail_all(ts_ns, last_cut_ns, out);
        } else {
            pairing.abandon_all();
        }
        let (config, stats) = (pairing.config, pairing.stats);
        *self = Self::with_config(config);
        self.pairing.stats = stats;
    }

    /// Records of the connection were lost before the next chunk (the kernel's ring was
    /// full): whatever was in flight in either direction cannot be followed or paired any
    /// more (a lost response would pair its request with the next one's, and every later
    /// one after it). The requests waiting are dropped (counted as `capture_gap`), and
    /// parsing resumes at the next chunk that starts like a message, as on a connection
    /// first seen in use. The role and the counters stay.
    pub fn on_gap(&mut self) {
        self.pairing.abandon_all_for(DropReason::CaptureGap);
        self.pairing.unreadable_request_dropped = false;
        self.sides = Default::default();
    }

    /// Frees the queue and head buffers kept from earlier messages where they are empty.
    pub fn release_idle_buffers(&mut self) {
        self.pairing.release_idle_buffers();
        for side in &mut self.sides {
            if side.head.is_empty() {
                side.head = Vec::new();
            }
        }
    }

    #[cfg(test)]
    pub(super) fn pairing_capacity(&self) -> usize {
        self.pairing.capacity()
    }

    #[cfg(test)]
    pub(super) fn head_capacity(&self) -> usize {
        self.sides.iter().map(|s| s.head.capacity()).sum()
    }

    pub fn stats(&self) -> &StreamStats {
        &self.pairing.stats
    }

    /// Returns the counters and zeroes them (for periodic export).
    pub fn take_stats(&mut self) -> StreamStats {
        std::mem::take(&mut self.pairing.stats)
    }

    /// The process's role on this connection, once a message showed it.
    pub fn role(&self) -> Option<ExchangeRole> {
        self.pairing.role
    }

    /// The connection switched protocols (101, or a CONNECT tunnel): it is no longer followed.
    pub fn is_upgraded(&self) -> bool {
        self.pairing.upgraded
    }

    /// Requests waiting for a response.
    pub fn pending_requests(&self) -> usize {
        self.pairing.pending_len()
    }
}

/// The process's role when `kind` messages travel in `direction`.
fn role_for(kind: MessageKind, direction: Direction) -> ExchangeRole {
    match (kind, direction) {
        (MessageKind::Request, Direction::Ingress) | (MessageKind::Response, Direction::Egress) => {
            ExchangeRole::Server
        }
        _ => ExchangeRole::Client,
    }
}

/// What travels in `direction` once the role is known.
fn kind_for(role: ExchangeRole, direction: Direction) -> MessageKind {
    if role_for(MessageKind::Request, direction) == role {
        MessageKind::Request
    } else {
        MessageKind::Response
    }
}

/// Parsing state of one direction.
#[derive(Debug, Default)]
struct Side {
    phase: Phase,
    /// A head that started in an earlier chunk, or the captured part of a cut head.
    head: Vec<u8>,
    /// The message whose head or body is being read.
    message: Message,
    /// Resyncing after losing track of messages (not merely joining the connection late).
    lost_sync: bool,
    /// A body's end was guessed, not seen (followed blind): messages may have hidden in
    /// what was skipped, so requests left at the close are counted, not failed.
    blind: bool,
    /// Timestamp of the latest chunk the capture cut (a message may hide in its bytes, or
    /// one seen there may not be what it seems).
    last_cut_ns: u64,
}

impl Side {
    fn lose_sync(&mut self) {
        self.phase = Phase::Resync;
        self.lost_sync = true;
    }

    fn clear_head(&mut self) {
        // Don't keep a large buffer alive on an idle connection.
        if self.head.capacity() > 1024 {
            self.head = Vec::new();
        } else {
            self.head.clear();
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
enum Phase {
    /// Out of sync: a message may only start at the beginning of a chunk.
    #[default]
    Resync,
    /// Between messages: the next byte starts one.
    Idle,
    /// Reading a head; `Side::head` holds what arrived in earlier chunks.
    Head {
        start_ns: u64,
        scan: HeadEndScanner,
        /// Known once the first bytes showed it.
        kind: Option<MessageKind>,
        /// Started while out of sync: not being HTTP is no error then.
        tentative: bool,
    },
    /// The rest of a cut head whose end was not captured (a message without body).
    HeadRest {
        scan: HeadEndScanner,
    },
    Body(Framing),
}

#[derive(Clone, Copy, Debug)]
enum Framing {
    Length {
        remaining: u64,
    },
    Chunked(ChunkedDecoder),
    /// A response without length: ends when the connection closes.
    UntilClose,
}

/// Phase changes in a row without a byte consumed before a chunk's rest is given up (a
/// message start takes at most Idle → Head → Body without consuming).
const MAX_IDLE_STEPS: u32 = 4;

/// Where a head that was not kept whole ends, as far as the current chunk tells.
#[derive(Clone, Copy, Debug)]
enum HeadEnd {
    /// At `at` in the syscall's tail; `after` bytes of the syscall follow it.
    InTail { at: usize, after: u64 },
    /// At `at` in the captured bytes; `after` bytes of the syscall follow it.
    Visible { at: usize, after: u64 },
    /// Beyond this chunk: the scan goes on in the next ones.
    Later(HeadEndScanner),
}

/// Where a head whose captured part ran out ends: in the syscall's tail, or later.
fn end_in_tail(cursor: &Cursor<'_>) -> HeadEnd {
    let tail = cursor.tail();
    let mut scan = HeadEndScanner::default();
    match scan.scan(tail) {
        Some(at) => HeadEnd::InTail {
            at,
            after: (tail.len() - at) as u64,
        },
        None => HeadEnd::Later(scan),
    }
}

#[derive(Clone, Copy, Debug)]
struct Message {
    kind: MessageKind,
    /// Request: `seq` of its pending entry.
    seq: u32,
    /// Response: its status.
    status: u16,
    /// Response: the server meant to keep the connection open.
    keep_alive: bool,
    /// Timestamp of the head's first chunk.
    start_ns: u64,
    /// Timestamp of the latest chunk that carried its bytes.
    last_ns: u64,
    body_bytes: u64,
}

impl Message {
    fn finished(&self, end_ns: u64) -> FinishedResponse {
        FinishedResponse {
            status: self.status,
            start_ns: self.start_ns,
            end_ns,
            body_bytes: self.body_bytes,
            keep_alive: self.keep_alive,
        }
    }
}

impl Default for Message {
    fn default() -> Self {
        Self {
            kind: MessageKind::Request,
            seq: 0,
            status: 0,
            keep_alive: false,
            start_ns: 0,
            last_ns: 0,
            body_bytes: 0,
        }
    }
}

/// How a head delimits its body, before the request's method and the status are considered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyLength {
    None,
    Length(u64),
    Chunked,
    UntilClose,
}

/// A parsed head, owned, so that the buffer it came from can be reused.
// Built once per message and moved straight into the queue: boxing would cost an allocation.
#[allow(clippy::large_enum_variant)]
enum ParsedHead {
    Request {
        exchange: Exchange,
        body: BodyLength,
        head_request: bool,
        connect: bool,
    },
    Response {
        status: u16,
        body: BodyLength,
        keep_alive: bool,
    },
}

/// Parses a `kind` head at the start of `bytes`: `(head length, head)`, `None` if incomplete.
fn parse_head(
    kind: MessageKind,
    bytes: &[u8],
    direction: Direction,
    start_ns: u64,
    truncated: bool,
) -> Result<Option<(usize, ParsedHead)>, HeadError> {
    Ok(match kind {
        MessageKind::Request => head::parse_request(bytes)?.map(|h| {
            let role = role_for(MessageKind::Request, direction);
            (h.len, parsed_request(&h, role, start_ns, truncated))
        }),
        MessageKind::Response => head::parse_response(bytes)?.map(|h| (h.len, parsed_response(&h))),
    })
}

fn parsed_request(
    head: &RequestHead<'_>,
    role: ExchangeRole,
    start_ns: u64,
    truncated: bool,
) -> ParsedHead {
    let fields = &head.fields;
    let (authority, path, query) = head.target_parts();
    let host = fields
        .host
        .map(lossy)
        .or_else(|| authority.map(CompactString::from));
    let exchange = Exchange {
        role,
        method: head.method.into(),
        path: path.into(),
        query: query.map(CompactString::from),
        version: head.version,
        status: 0,
        host,
        user_agent: fields.user_agent.map(lossy),
        traceparent: fields.traceparent.map(lossy),
        tracestate: fields.tracestate.map(lossy),
        traceparent_duplicated: fields.traceparent_duplicated,
        start_ns,
        response_start_ns: 0,
        end_ns: 0,
        request_body_bytes: 0,
        response_body_bytes: 0,
        request_head_truncated: truncated,
        keep_alive: false,
        failure: None,
        grpc: None,
        redis: None,
    };
    // A request body is chunked or has a length; anything else means no body.
    let body = match (
        fields.transfer_encoding,
        fields.chunked,
        fields.content_length,
    ) {
        (true, true, _) => BodyLength::Chunked,
        (false, _, Some(n)) if n > 0 => BodyLength::Length(n),
        _ => BodyLength::None,
    };
    ParsedHead::Request {
        exchange,
        body,
        head_request: head.method == "HEAD",
        connect: head.method == "CONNECT",
    }
}

fn parsed_response(head: &ResponseHead<'_>) -> ParsedHead {
    let fields: &HeadFields<'_> = &head.fields;
    let body = match (
        fields.transfer_encoding,
        fields.chunked,
        fields.content_length,
    ) {
        (true, true, _) => BodyLength::Chunked,
        (true, false, _) => BodyLength::UntilClose,
        (false, _, Some(0)) => BodyLength::None,
        (false, _, Some(n)) => BodyLength::Length(n),
        (false, _, None) => BodyLength::UntilClose,
    };
    let keep_alive = match head.version {
        HttpVersion::Http11 | HttpVersion::Http2 => fields.connection != ConnectionOption::Close,
        HttpVersion::Http10 => fields.connection == ConnectionOption::KeepAlive,
    };
    ParsedHead::Response {
        status: head.status,
        body,
        keep_alive,
    }
}

/// Inline up to 24 bytes (most methods, paths, hosts and user agents): no allocation.
fn lossy(bytes: &[u8]) -> CompactString {
    CompactString::from_utf8_lossy(bytes)
}

fn head_error_reason(e: HeadError) -> DropReason {
    match e {
        HeadError::TooManyHeaders => DropReason::TooManyHeaders,
        HeadError::InvalidContentLength | HeadError::Syntax(_) => DropReason::Malformed,
    }
}

/// One chunk being applied to the side it travels on.
struct Run<'a> {
    side: &'a mut Side,
    /// The opposite direction.
    other: &'a mut Side,
    pairing: &'a mut Pairing,
    direction: Direction,
    ts: u64,
    /// Bytes of the whole chunk (to tell its start).
    total: u64,
    out: &'a mut Vec<Exchange>,
}

impl Run<'_> {
    fn step(&mut self, cursor: &mut Cursor<'_>) {
        let at_chunk_start = cursor.remaining() == self.total;
        match self.side.phase {
            Phase::Resync => self.resync(cursor, at_chunk_start),
            Phase::Idle => self.idle(cursor),
            Phase::Head { .. } => self.head(cursor),
            Phase::HeadRest { scan } => self.head_rest(cursor, scan, at_chunk_start),
            Phase::Body(framing) => self.body(cursor, framing, at_chunk_start),
        }
    }

    /// The head being read (buffered part, then `more`) starts with a whole request line.
    fn has_request_line(&self, more: &[u8]) -> bool {
        let buffered = &self.side.head;
        if buffered.is_empty() {
            return head::has_request_line(more);
        }
        if buffered.contains(&b'\n') {
            return head::has_request_line(buffered);
        }
        // The line spans the buffer and `more` (a rare, dropping path: copying is fine).
        let line_end = more.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut line = buffered.clone();
        line.extend_from_slice(more.get(..line_end).unwrap_or_default());
        head::has_request_line(&line)
    }

    /// A head started while resyncing is being read.
    fn is_tentative(&self) -> bool {
        matches!(
            self.side.phase,
            Phase::Head {
                tentative: true,
                ..
            }
        )
    }

    fn expected_kind(&self) -> Option<MessageKind> {
        self.pairing.role.map(|role| kind_for(role, self.direction))
    }

    /// How `more` (after any buffered head bytes) starts.
    fn classify(&self, more: &[u8]) -> MessageStart {
        const LOOK: usize = 32;
        let held = &self.side.head;
        let mut joined = [0u8; LOOK];
        let start: &[u8] = if held.is_empty() {
            // The usual case, a message starting with this chunk: nothing to join.
            &more[..more.len().min(LOOK)]
        } else {
            // Slice copies (bounds: a ≤ held, b ≤ more, a + b ≤ LOOK), not a byte loop.
            let a = held.len().min(LOOK);
            let b = more.len().min(LOOK - a);
            joined[..a].copy_from_slice(&held[..a]);
            joined[a..a + b].copy_from_slice(&more[..b]);
            &joined[..a + b]
        };
        head::message_start(start).expecting(self.expected_kind())
    }

    fn resync(&mut self, cursor: &mut Cursor<'_>, at_chunk_start: bool) {
        let visible = cursor.visible();
        if at_chunk_start && !visible.is_empty() && self.classify(visible) != MessageStart::NotHttp
        {
            self.begin_head(true);
        } else {
            if at_chunk_start {
                self.pairing.stats.skipped_chunks += 1;
            }
            cursor.skip_to_end();
        }
    }

    fn idle(&mut self, cursor: &mut Cursor<'_>) {
        // Stray line ends between messages are allowed (RFC 9112 §2.2).
        let line_ends = cursor
            .visible()
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        cursor.consume_visible(line_ends);
        if cursor.is_empty() {
            return;
        }
        if cursor.is_lost() {
            // The next message starts in bytes that were not captured.
            self.side.lose_sync();
            cursor.skip_to_end();
            return;
        }
        self.begin_head(false);
    }

    fn begin_head(&mut self, tentative: bool) {
        self.side.clear_head();
        self.side.phase = Phase::Head {
            start_ns: self.ts,
            scan: HeadEndScanner::default(),
            kind: None,
            tentative,
        };
    }

    fn head(&mut self, cursor: &mut Cursor<'_>) {
        let Phase::Head {
            start_ns,
            mut scan,
            kind,
            tentative,
        } = self.side.phase
        else {
            return;
        };
        let visible = cursor.visible();
        let kind = match kind {
            Some(kind) => kind,
            None => match self.classify(visible) {
                MessageStart::Is(kind) => kind,
                MessageStart::Incomplete if !visible.is_empty() => {
                    // Too short to tell yet (a few bytes): keep them.
                    self.side.head.extend_from_slice(visible);
                    cursor.consume_visible(visible.len());
                    return;
                }
                _ if tentative => {
                    self.pairing.stats.skipped_chunks += 1;
                    self.side.clear_head();
                    self.side.phase = Phase::Resync;
                    cursor.skip_to_end();
                    return;
                }
                _ => return self.drop_head(cursor, None, DropReason::Malformed),
            },
        };
        let max = self.pairing.config.max_head_bytes;
        if self.side.head.is_empty() {
            // Fast path: the whole head is in this chunk; parse it in place.
            match parse_head(kind, visible, self.direction, start_ns, false) {
                Ok(Some((len, parsed))) => {
                    cursor.consume_visible(len);
                    return self.start_message(parsed, start_ns);
                }
                Ok(None) => {}
                Err(e) => return self.drop_head(cursor, Some(kind), head_error_reason(e)),
            }
            // The head goes on after this chunk: the scanner learns where the bytes end.
            let _ = scan.scan(visible);
        } else if let Some(end) = scan.scan(visible) {
            // The head that started earlier ends in this chunk.
            if self.side.head.len() + end > max {
                return self.oversized_head(cursor, kind, start_ns, Some(end), scan);
            }
            self.side
                .head
                .extend_from_slice(visible.get(..end).unwrap_or_default());
            cursor.consume_visible(end);
            let parsed = parse_head(kind, &self.side.head, self.direction, start_ns, false);
            return match parsed {
                Ok(Some((_, parsed))) => {
                    self.side.clear_head();
                    self.start_message(parsed, start_ns);
                }
                Ok(None) => self.drop_head(cursor, Some(kind), DropReason::Malformed),
                Err(e) => self.drop_head(cursor, Some(kind), head_error_reason(e)),
            };
        }
        if self.side.head.len() + visible.len() > max {
            return self.oversized_head(cursor, kind, start_ns, None, scan);
        }
        self.side.head.extend_from_slice(visible);
        cursor.consume_visible(visible.len());
        self.side.phase = Phase::Head {
            start_ns,
            scan,
            kind: Some(kind),
            tentative,
        };
        if cursor.is_lost() {
            self.cut_head(cursor, kind, start_ns);
        }
    }

    /// The capture limit cut the head being read (`Side::head` holds its captured part).
    /// Keep what was captured; look for the head's end in the syscall's tail.
    fn cut_head(&mut self, cursor: &mut Cursor<'_>, kind: MessageKind, start_ns: u64) {
        let end = end_in_tail(cursor);
        self.start_partial_head(cursor, kind, start_ns, end, DropReason::HeadTruncated);
    }

    /// The head being read outgrew `max_head_bytes`: its first part (in `Side::head`, up to
    /// the limit) stands for it, as for a head the capture cut. `visible` was all captured;
    /// `end`: where the head ends in it, if it does.
    fn oversized_head(
        &mut self,
        cursor: &mut Cursor<'_>,
        kind: MessageKind,
        start_ns: u64,
        end: Option<usize>,
        scan: HeadEndScanner,
    ) {
        let visible = cursor.visible();
        let room = self
            .pairing
            .config
            .max_head_bytes
            .saturating_sub(self.side.head.len());
        let kept = visible
            .get(..end.unwrap_or(visible.len()).min(room))
            .unwrap_or_default();
        if !self.side.head.contains(&b'\n') && !kept.contains(&b'\n') {
            // Not even the start line fits.
            return self.drop_head(cursor, Some(kind), DropReason::HeadTooLarge);
        }
        self.side.head.extend_from_slice(kept);
        let end = match end {
            Some(at) => HeadEnd::Visible {
                at,
                after: (visible.len() - at) as u64 + cursor.unseen(),
            },
            None => {
                // All of it is head; a cut chunk's end may be in its tail.
                cursor.consume_visible(visible.len());
                if cursor.is_lost() {
                    end_in_tail(cursor)
                } else {
                    HeadEnd::Later(scan)
                }
            }
        };
        self.start_partial_head(cursor, kind, start_ns, end, DropReason::HeadTooLarge);
    }

    /// Starts the message whose head was not kept whole from its complete lines in
    /// `Side::head` (counted as `reason`, the exchange still reported), then goes on where
    /// the head ends, if that is known; a message without even its start line is dropped.
    /// A head too large for the agent is still an exchange the peer answered (often with
    /// 431 or 400, which users need to see), and only its first part is kept in memory.
    fn start_partial_head(
        &mut self,
        cursor: &mut Cursor<'_>,
        kind: MessageKind,
        start_ns: u64,
        end: HeadEnd,
        reason: DropReason,
    ) {
        let Some(lines) = head::complete_lines_len(&self.side.head) else {
            // Not even the start line was kept. In sync, a request is still answered;
            // while resyncing this was likely never a head.
            if self.is_tentative() {
                self.pairing.stats.skipped_chunks += 1;
            } else {
                self.drop_message(kind, reason, true);
            }
            return self.resync_after_drop(cursor);
        };
        self.side.head.truncate(lines);
        self.side.head.extend_from_slice(b"\r\n");
        let parsed = match parse_head(kind, &self.side.head, self.direction, start_ns, true) {
            Ok(Some((_, parsed))) => parsed,
            Ok(None) => return self.drop_head(cursor, Some(kind), DropReason::Malformed),
            Err(e) => return self.drop_head(cursor, Some(kind), head_error_reason(e)),
        };
        self.pairing.stats.record(reason);
        self.side.clear_head();
        self.start_message(parsed, start_ns);
        match (self.side.phase, end) {
            // Where the head ends is known exactly: the body follows it.
            (Phase::Body(_), HeadEnd::Visible { at, .. }) => cursor.consume_visible(at),
            // A chunked body's last chunk ends in a blank line too: where the head ended is
            // ambiguous. Follow the body blind and watch syscall ends for the last chunk.
            (Phase::Body(Framing::Chunked(_)), _) => {
                self.side.phase = Phase::Body(Framing::Chunked(ChunkedDecoder::unsynced()));
            }
            // Ends at close anyway; the rest of the head counts as body.
            (Phase::Body(Framing::UntilClose), _) => {}
            (Phase::Body(Framing::Length { remaining }), HeadEnd::InTail { at, after })
                if after <= remaining =>
            {
                // A blank line in the tail may end a later message: the body is a guess.
                self.side.blind = true;
                cursor.resume_in_tail(at);
            }
            // A length counted from an unknown start cannot be followed.
            (Phase::Body(Framing::Length { .. }), _) => {
                self.finish_message(self.ts);
                self.side.lose_sync();
                cursor.skip_to_end();
            }
            // No body, and the head ends the syscall (or a later message in it does).
            (Phase::Idle, HeadEnd::InTail { at, after: 0 }) => {
                self.side.blind = true;
                cursor.resume_in_tail(at);
            }
            (Phase::Idle, HeadEnd::Visible { at, after: 0 }) => cursor.consume_visible(at),
            // No body, and the rest of the head is still to come (in what is left of the
            // chunk, if anything, or in later ones).
            (Phase::Idle, HeadEnd::Later(scan)) => self.side.phase = Phase::HeadRest { scan },
            // Bytes after a head without body: a framing header may have been beyond what
            // was kept.
            (Phase::Idle, _) => {
                self.side.lose_sync();
                cursor.skip_to_end();
            }
            _ => {
                cursor.skip_to_end();
            }
        }
    }

    fn head_rest(&mut self, cursor: &mut Cursor<'_>, mut scan: HeadEndScanner, at_start: bool) {
        let visible = cursor.visible();
        if at_start && self.classify(visible) == MessageStart::Is(self.side.message.kind) {
            // A new message: whatever remained of the cut head was never seen.
            return self.begin_head(false);
        }
        if cursor.is_lost() {
            // A blind gap, then the tail: only the tail is contiguous with what follows.
            scan = HeadEndScanner::default();
            match scan.scan(cursor.tail()) {
                Some(end) => {
                    cursor.resume_in_tail(end);
                    self.side.phase = Phase::Idle;
                }
                None => {
                    cursor.skip_to_end();
                    self.side.phase = Phase::HeadRest { scan };
                }
            }
            return;
        }
        match scan.scan(visible) {
            Some(end) => {
                cursor.consume_visible(end);
                self.side.phase = Phase::Idle;
            }
            None => {
                cursor.consume_visible(visible.len());
                self.side.phase = Phase::HeadRest { scan };
            }
        }
    }

    fn body(&mut self, cursor: &mut Cursor<'_>, framing: Framing, at_start: bool) {
        let kind = self.side.message.kind;
        let end_is_blind = match framing {
            // Framing due at a chunk start where a message starts: we missed the body's end.
            Framing::Chunked(decoder) => !decoder.is_synced() || decoder.expects_framing(),
            // Only a server that meant to keep the connection would send more.
            Framing::UntilClose => self.side.message.keep_alive,
            Framing::Length { .. } => false,
        };
        if at_start && end_is_blind && self.classify(cursor.visible()) == MessageStart::Is(kind) {
            // A body whose end we cannot see gives way to the next message.
            self.side.blind = true;
            self.finish_message(self.side.message.last_ns);
            return self.begin_head(false);
        }
        self.side.message.last_ns = self.ts;
        match framing {
            Framing::Length { remaining } => {
                let skipped = cursor.skip(remaining);
                self.add_body(skipped);
                if skipped == remaining {
                    self.finish_message(self.ts);
                    self.side.phase = Phase::Idle;
                } else {
                    self.side.phase = Phase::Body(Framing::Length {
                        remaining: remaining - skipped,
                    });
                }
            }
            Framing::Chunked(mut decoder) => {
                let before = decoder.body_bytes();
                // Bytes the capture left out are followed by count where the decoder can,
                // else by a guess at the syscall's end.
                let guessing = !decoder.is_synced() || cursor.unseen() > 0;
                let progress = decoder.advance(cursor);
                self.add_body(decoder.body_bytes().saturating_sub(before));
                match progress {
                    Ok(ChunkedProgress::Done) => {
                        // An end found at a syscall's end while following blind is a guess.
                        self.side.blind |= guessing;
                        self.finish_message(self.ts);
                        self.side.phase = Phase::Idle;
                    }
                    Ok(ChunkedProgress::NeedMore) => {
                        self.side.phase = Phase::Body(Framing::Chunked(decoder));
                    }
                    Err(_) => {
                        self.drop_current(DropReason::Malformed);
                        self.resync_after_drop(cursor);
                    }
                }
            }
            Framing::UntilClose => {
                let skipped = cursor.skip_to_end();
                self.add_body(skipped);
            }
        }
    }

    fn add_body(&mut self, bytes: u64) {
        let message = &mut self.side.message;
        message.body_bytes = message.body_bytes.saturating_add(bytes);
        if message.kind == MessageKind::Request {
            self.pairing
                .set_request_body(message.seq, message.body_bytes);
        }
    }

    /// The current message is complete (a request needs nothing more: it waits in line).
    fn finish_message(&mut self, end_ns: u64) {
        if self.side.message.kind == MessageKind::Response {
            let finished = self.side.message.finished(end_ns);
            self.pairing.finish_response(finished, self.out);
        }
    }

    /// A head was parsed: queue the request, or pair the response with the oldest request.
    fn start_message(&mut self, parsed: ParsedHead, start_ns: u64) {
        let kind = match parsed {
            ParsedHead::Request { .. } => MessageKind::Request,
            ParsedHead::Response { .. } => MessageKind::Response,
        };
        let role = role_for(kind, self.direction);
        if *self.pairing.role.get_or_insert(role) != role {
            // Both directions claimed the same kind of message.
            self.pairing.stats.record(DropReason::Malformed);
            self.side.lose_sync();
            return;
        }
        self.side.message = Message {
            kind,
            start_ns,
            last_ns: self.ts,
            ..Message::default()
        };
        match parsed {
            ParsedHead::Request {
                exchange,
                body,
                head_request,
                connect,
            } => self.start_request(exchange, body, head_request, connect),
            ParsedHead::Response {
                status,
                body,
                keep_alive,
            } => self.start_response(status, body, keep_alive),
        }
    }

    fn start_request(&mut self, exchange: Exchange, body: BodyLength, head: bool, connect: bool) {
        // A server that sent a response without length yet keeps the connection is done
        // with it once the client asks again.
        let other = &mut self.other;
        if matches!(other.phase, Phase::Body(Framing::UntilClose))
            && other.message.kind == MessageKind::Response
            && other.message.keep_alive
        {
            let finished = other.message.finished(other.message.last_ns);
            self.pairing.finish_response(finished, self.out);
            other.phase = Phase::Resync;
        }
        self.side.message.seq = self.pairing.push(Pending {
            head_request: head,
            connect,
            exchange: Some(exchange),
        });
        self.side.phase = match body {
            BodyLength::Length(remaining) => Phase::Body(Framing::Length { remaining }),
            BodyLength::Chunked => Phase::Body(Framing::Chunked(ChunkedDecoder::new())),
            BodyLength::None | BodyLength::UntilClose => Phase::Idle,
        };
    }

    fn start_response(&mut self, status: u16, body: BodyLength, keep_alive: bool) {
        self.side.phase = Phase::Idle;
        if (100..200).contains(&status) && status != 101 {
            // Interim (100 Continue, 103 Early Hints): the final response follows.
            return;
        }
        self.side.message.status = status;
        self.side.message.keep_alive = keep_alive;
        if std::mem::take(&mut self.side.lost_sync) {
            // Responses were missed; they answered the older requests. Clients rarely
            // pipeline, so this response most likely answers the newest one.
            self.pairing.abandon_all_but_newest();
        }
        let Some(answered) = self.pairing.answer_oldest() else {
            // The answer to an unreadable request was counted with it.
            if !std::mem::take(&mut self.pairing.unreadable_request_dropped) {
                self.pairing.stats.record(DropReason::UnmatchedResponse);
            }
            return self.start_response_body(status, body, false, false);
        };
        self.start_response_body(status, body, answered.head_request, answered.connect);
    }

    /// Follows the final response of a request (`head_request`, `connect`: what it was).
    fn start_response_body(
        &mut self,
        status: u16,
        body: BodyLength,
        head_request: bool,
        connect: bool,
    ) {
        if status == 101 || (connect && (200..300).contains(&status)) {
            // The connection now carries another protocol.
            self.finish_message(self.ts);
            self.pairing.upgrade();
            return;
        }
        let body = if head_request || status == 204 || status == 304 {
            BodyLength::None
        } else {
            body
        };
        match body {
            BodyLength::None => self.finish_message(self.ts),
            BodyLength::Length(remaining) => {
                self.side.phase = Phase::Body(Framing::Length { remaining })
            }
            BodyLength::Chunked => {
                self.side.phase = Phase::Body(Framing::Chunked(ChunkedDecoder::new()))
            }
            BodyLength::UntilClose => self.side.phase = Phase::Body(Framing::UntilClose),
        }
    }

    /// Drops the message whose head is being read, and resyncs. `kind` is `None` when the
    /// bytes did not even start like HTTP.
    fn drop_head(
        &mut self,
        cursor: &mut Cursor<'_>,
        kind: Option<MessageKind>,
        reason: DropReason,
    ) {
        let answerable = kind.is_some() && self.has_request_line(cursor.visible());
        if self.is_tentative() && kind == Some(MessageKind::Request) && !answerable {
            // While resyncing, a chunk that merely starts with a word and a space is no error.
            self.pairing.stats.skipped_chunks += 1;
            return self.resync_after_drop(cursor);
        }
        // Garbage where a response was due most likely is that response.
        match kind.or(self.expected_kind()) {
            Some(kind) => self.drop_message(kind, reason, answerable),
            None => {
                self.pairing.stats.record(reason);
                // Bytes that opened a connection: a client's, as a rule.
                self.pairing.unreadable_request_dropped = true;
            }
        }
        self.resync_after_drop(cursor);
    }

    /// Counts a dropped message. A dropped request the peer will probably still answer
    /// (`answerable`) leaves a placeholder so that responses stay paired in order; a dropped
    /// response takes the request it answered with it.
    fn drop_message(&mut self, kind: MessageKind, reason: DropReason, answerable: bool) {
        self.pairing.stats.record(reason);
        match kind {
            MessageKind::Request if answerable => {
                self.pairing.push(Pending {
                    head_request: false,
                    connect: false,
                    exchange: None,
                });
            }
            MessageKind::Request => self.pairing.unreadable_request_dropped = true,
            MessageKind::Response => self.pairing.drop_oldest(),
        }
    }

    /// Drops the message whose body is being read (its head was fine).
    fn drop_current(&mut self, reason: DropReason) {
        self.pairing.stats.record(reason);
        let message = self.side.message;
        match message.kind {
            // It stays in line: its response will come.
            MessageKind::Request => self.pairing.drop_request(message.seq),
            MessageKind::Response => self.pairing.drop_answered(),
        }
    }

    fn resync_after_drop(&mut self, cursor: &mut Cursor<'_>) {
        // A tentative head was already resyncing: that is no new loss.
        if self.is_tentative() {
            self.side.phase = Phase::Resync;
        } else {
            self.side.lose_sync();
        }
        self.side.clear_head();
        cursor.skip_to_end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_kinds_agree() {
        use Direction::*;
        for role in [ExchangeRole::Server, ExchangeRole::Client] {
            for dir in [Ingress, Egress] {
                assert_eq!(role_for(kind_for(role, dir), dir), role);
            }
        }
        assert_eq!(
            role_for(MessageKind::Request, Ingress),
            ExchangeRole::Server
        );
        assert_eq!(role_for(MessageKind::Request, Egress), ExchangeRole::Client);
    }

    #[test]
    fn a_typical_request_head_is_kept_without_allocating() {
        let head = b"GET /api/v1/items/42?verbose=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
            User-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";
        let before = crate::test_alloc::allocations();
        let parsed = parse_head(MessageKind::Request, head, Direction::Ingress, 1, false);
        assert_eq!(crate::test_alloc::allocations() - before, 0);
        let Ok(Some((_, ParsedHead::Request { exchange, .. }))) = parsed else {
            panic!("not parsed as a request");
        };
        assert_eq!(exchange.method, "GET");
        assert_eq!(exchange.path, "/api/v1/items/42");
        assert_eq!(exchange.query.as_deref(), Some("verbose=1"));
        assert_eq!(exchange.host.as_deref(), Some("127.0.0.1:8080"));
        assert_eq!(exchange.user_agent.as_deref(), Some("curl/8.5.0"));
        // Longer strings still come through whole (on the heap).
        let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100));
        let Ok(Some((_, ParsedHead::Request { exchange, .. }))) = parse_head(
            MessageKind::Request,
            long.as_bytes(),
            Direction::Ingress,
            1,
            false,
        ) else {
            panic!("not parsed as a request");
        };
        assert_eq!(exchange.path.len(), 101);
    }

    #[test]
    fn per_connection_state_stays_small() {
        // Thousands of connections: keep an eye on the footprint.
        let size = std::mem::size_of::<Http1Stream>();
        assert!(size <= 512, "Http1Stream is {size} bytes");
    }
}
