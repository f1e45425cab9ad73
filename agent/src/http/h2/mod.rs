//! HTTP/2 assembly (h2c, and h2 read through the TLS probes): the frames of one
//! connection → one [`Exchange`] per stream.
//!
//! Each direction is a sequence of frames (after the client's preface), read from the
//! captured bytes. Header blocks are decoded with HPACK, whose table each direction keeps
//! for the whole connection: a header block that was not captured (a call longer than the
//! capture, a record lost) leaves every later block undecodable, so the connection is then
//! given up — its calls in flight dropped and counted, later ones unseen. Other frames'
//! payloads (DATA: bodies) are only counted, so bytes beyond the capture that fall inside
//! them lose nothing.
//!
//! A stream's request is the HEADERS that carry `:method`; its response the other
//! direction's HEADERS with a final `:status`, then DATA, then trailers (gRPC's
//! `grpc-status`). The exchange ends with the response's END_STREAM, an RST_STREAM, or
//! the connection's end.

mod frame;
#[cfg(test)]
mod tests;

use std::collections::HashMap;

use compact_str::CompactString;

use super::chunk::{Chunk, Direction};
use super::exchange::{Exchange, ExchangeRole, Failure, GrpcCall, HttpVersion};
use super::stats::{DropReason, StreamStats};
use super::stream::StreamError;
use frame::{FrameHeader, HEADER_LEN, PREFACE};

/// Longest header block kept while it arrives (HEADERS and its CONTINUATIONs).
const MAX_BLOCK: usize = 64 * 1024;
/// Streams that may be in flight at once; a new one beyond is dropped and counted.
pub const MAX_CALLS: usize = 256;
/// Largest HPACK table a peer may ask for (4 KiB is the default; a larger table only
/// costs Tapir memory).
const MAX_TABLE: usize = 64 * 1024;

/// The HTTP/2 state of one connection. See the module docs.
pub struct Http2Stream {
    /// Ingress, egress.
    halves: [Half; 2],
    /// Calls in flight by stream id (the exchange's role says which direction carries
    /// its request: a SERVER's come in).
    calls: HashMap<u32, Exchange>,
    /// Given up: nothing more is read.
    lost: bool,
    /// Why it was given up, until the caller takes it ([`Http2Stream::take_loss`]).
    loss: Option<DropReason>,
    stats: StreamStats,
}

impl std::fmt::Debug for Http2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http2Stream")
            .field("calls", &self.calls.len())
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

impl Default for Http2Stream {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the kernel's walk of a call began: payload bytes of the frame under way still to
/// come, header bytes already moved, and whether that frame is DATA (see
/// [`agent_common::DATA_H2_SPARSE`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkStart {
    pub left: u32,
    pub have: u8,
    pub data: bool,
}

impl WalkStart {
    /// From a sparse record's `tail`; `None` unless it holds the 6 bytes the kernel writes.
    pub fn from_tail(tail: &[u8]) -> Option<Self> {
        let [a, b, c, d, have, data] = *tail else {
            return None;
        };
        Some(Self {
            left: u32::from_le_bytes([a, b, c, d]),
            have,
            data: data != 0,
        })
    }

    /// The same position: the kind of frame matters only inside one (the kernel keeps the
    /// last frame's between frames).
    fn agrees(self, kernel: WalkStart) -> bool {
        self.left == kernel.left
            && self.have == kernel.have
            && (self.left == 0 || self.data == kernel.data)
    }
}

/// What a frame that completed means for the calls.
#[derive(Debug)]
enum Event {
    Headers {
        stream: u32,
        end_stream: bool,
        /// When the block's first frame started.
        start_ns: u64,
        fields: Fields,
    },
    Data {
        stream: u32,
        /// Payload bytes (padding included).
        len: usize,
        end_stream: bool,
    },
    Reset {
        stream: u32,
    },
}

/// A header block continued in CONTINUATION frames.
#[derive(Clone, Copy, Debug)]
struct OpenBlock {
    stream: u32,
    end_stream: bool,
    /// A PUSH_PROMISE's block: decoded for the table's sake, otherwise ignored.
    promise: bool,
    start_ns: u64,
}

/// One direction of the connection.
struct Half {
    /// Nothing came this way yet: a client's first bytes are the preface.
    fresh: bool,
    /// Bytes of the preface still expected.
    preface_left: usize,
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    /// The frame whose payload is being read.
    frame: Option<FrameHeader>,
    /// Its payload bytes still to come.
    left: usize,
    /// When its header was read.
    frame_ns: u64,
    /// Its payload, when wanted.
    payload: Vec<u8>,
    open: Option<OpenBlock>,
    block: Vec<u8>,
    decoder: loona_hpack::Decoder<'static>,
}

impl Default for Half {
    fn default() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        Self {
            fresh: true,
            preface_left: 0,
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            frame: None,
            left: 0,
            frame_ns: 0,
            payload: Vec::new(),
            open: None,
            block: Vec::new(),
            decoder,
        }
    }
}

/// The header fields Tapir keeps from a block.
#[derive(Debug, Default)]
struct Fields {
    method: Option<CompactString>,
    path: Option<CompactString>,
    authority: Option<CompactString>,
    host: Option<CompactString>,
    status: Option<u16>,
    user_agent: Option<CompactString>,
    traceparent: Option<CompactString>,
    traceparent_duplicated: bool,
    tracestate: Option<CompactString>,
    grpc: bool,
    grpc_status: Option<u8>,
}

fn text(b: &[u8]) -> CompactString {
    CompactString::from_utf8_lossy(b)
}

/// A small decimal number, or `None`.
fn number(b: &[u8]) -> Option<u32> {
    if b.is_empty() || b.len() > 5 {
        return None;
    }
    b.iter().try_fold(0u32, |n, d| {
        d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0'))
    })
}

impl Fields {
    fn take(&mut self, name: &[u8], value: &[u8]) {
        match name {
            b":method" => self.method = Some(text(value)),
            b":path" => self.path = Some(text(value)),
            b":authority" => self.authority = Some(text(value)),
            b"host" => self.host = Some(text(value)),
            b":status" => self.status = number(value).and_then(|n| u16::try_from(n).ok()),
            b"user-agent" => self.user_agent = Some(text(value)),
            b"traceparent" => {
                if self.traceparent.is_some() {
                    self.traceparent_duplicated = true;
                } else {
                    self.traceparent = Some(text(value));
                }
            }
            b"tracestate" if self.tracestate.is_none() => self.tracestate = Some(text(value)),
            b"content-type" => self.grpc = value.starts_with(b"application/grpc"),
            b"grpc-status" => self.grpc_status = number(value).and_then(|n| u8::try_from(n).ok()),
            _ => {}
        }
    }
}

impl Half {
    /// Reads `data` up to the end of one frame at most (the rest is left in `data`);
    /// returns what a frame that completed means.
    fn feed(&mut self, data: &mut &[u8], ts_ns: u64) -> Result<Option<Event>, DropReason> {
        self.begin(data);
        if self.preface_left > 0 {
            let at = PREFACE.len() - self.preface_left;
            let n = self.preface_left.min(data.len());
            if data.get(..n) != PREFACE.get(at..at + n) {
                return Err(DropReason::Malformed);
            }
            self.preface_left -= n;
            *data = data.get(n..).unwrap_or_default();
            return Ok(None);
        }
        let Some(h) = self.frame else {
            let n = (HEADER_LEN - self.hdr_len).min(data.len());
            let (head, rest) = data.split_at(n);
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(head);
            self.hdr_len += n;
            *data = rest;
            if self.hdr_len < HEADER_LEN {
                return Ok(None);
            }
            self.hdr_len = 0;
            let h = FrameHeader::parse(&self.hdr);
            // A header block's CONTINUATIONs follow it directly, and only they.
            if self.open.is_some() != (h.kind == frame::CONTINUATION) {
                return Err(DropReason::Malformed);
            }
            if h.payload_wanted() && self.block.len() + h.len > MAX_BLOCK {
                return Err(DropReason::HeadTooLarge);
            }
            self.frame = Some(h);
            self.left = h.len;
            self.frame_ns = ts_ns;
            self.payload.clear();
            return if h.len == 0 {
                self.complete(h)
            } else {
                Ok(None)
            };
        };
        let n = self.left.min(data.len());
        let (part, rest) = data.split_at(n);
        if h.payload_wanted() {
            self.payload.extend_from_slice(part);
        }
        self.left -= n;
        *data = rest;
        if self.left == 0 {
            self.complete(h)
        } else {
            Ok(None)
        }
    }

    /// The first bytes this way tell whether it starts with the client preface.
    fn begin(&mut self, data: &[u8]) {
        if std::mem::take(&mut self.fresh) && data.first() == Some(&PREFACE[0]) {
            self.preface_left = PREFACE.len();
        }
    }

    /// Where this direction stands, as the kernel's walk counts it.
    fn position(&self) -> WalkStart {
        if self.preface_left > 0 {
            return WalkStart {
                left: self.preface_left as u32,
                have: 0,
                data: false,
            };
        }
        match self.frame {
            Some(h) => WalkStart {
                left: self.left as u32,
                have: 0,
                data: h.kind == frame::DATA,
            },
            None => WalkStart {
                left: 0,
                have: self.hdr_len as u8,
                data: false,
            },
        }
    }

    /// Payload bytes still to come of the DATA frame under way (0 when none is).
    fn data_left(&self) -> usize {
        match self.frame {
            Some(h) if h.kind == frame::DATA => self.left,
            _ => 0,
        }
    }

    /// `n` bytes moved that were not captured: only the inside of a frame whose payload
    /// is not wanted can be passed over.
    fn skip(&mut self, n: usize) -> Result<Option<Event>, DropReason> {
        match self.frame {
            Some(h) if !h.payload_wanted() && self.preface_left == 0 && n <= self.left => {
                self.left -= n;
                if self.left == 0 {
                    self.complete(h)
                } else {
                    Ok(None)
                }
            }
            _ => Err(DropReason::HeadTruncated),
        }
    }

    /// The frame `h` is complete (its payload in `payload` if wanted).
    fn complete(&mut self, h: FrameHeader) -> Result<Option<Event>, DropReason> {
        self.frame = None;
        match h.kind {
            frame::DATA => Ok(Some(Event::Data {
                stream: h.stream,
                len: h.len,
                end_stream: h.has(frame::FLAG_END_STREAM),
            })),
            frame::HEADERS | frame::PUSH_PROMISE => {
                let fragment = frame::block_fragment(h.kind, h.flags, &self.payload)
                    .ok_or(DropReason::Malformed)?;
                self.block.clear();
                self.block.extend_from_slice(fragment);
                let open = OpenBlock {
                    stream: h.stream,
                    end_stream: h.has(frame::FLAG_END_STREAM),
                    promise: h.kind == frame::PUSH_PROMISE,
                    start_ns: self.frame_ns,
                };
                if h.has(frame::FLAG_END_HEADERS) {
                    self.decode(open)
                } else {
                    self.open = Some(open);
                    Ok(None)
                }
            }
            frame::CONTINUATION => {
                let open = self.open.ok_or(DropReason::Malformed)?;
                if open.stream != h.stream {
                    return Err(DropReason::Malformed);
                }
                self.block.extend_from_slice(&self.payload);
                if h.has(frame::FLAG_END_HEADERS) {
                    self.open = None;
                    self.decode(open)
                } else {
                    Ok(None)
                }
            }
            frame::RST_STREAM => Ok(Some(Event::Reset { stream: h.stream })),
            _ => Ok(None),
        }
    }

    /// Decodes the finished block (always: the table must follow every block).
    fn decode(&mut self, open: OpenBlock) -> Result<Option<Event>, DropReason> {
        let mut fields = Fields::default();
        self.decoder
            .decode_with_cb(&self.block, |name, value| fields.take(&name, &value))
            .map_err(|_| DropReason::Malformed)?;
        if open.promise {
            return Ok(None);
        }
        if open.stream == 0 {
            return Err(DropReason::Malformed);
        }
        Ok(Some(Event::Headers {
            stream: open.stream,
            end_stream: open.end_stream,
            start_ns: open.start_ns,
            fields,
        }))
    }

    fn release_idle_buffers(&mut self) {
        if self.frame.is_none() && self.open.is_none() {
            self.payload = Vec::new();
            self.block = Vec::new();
        }
    }
}

/// A request target's path and its query (without `?`; `None` when absent or empty).
fn split_path(target: &str) -> (&str, Option<&str>) {
    match target.split_once('?') {
        Some((path, query)) => (path, Some(query).filter(|q| !q.is_empty())),
        None => (target, None),
    }
}

impl Http2Stream {
    pub fn new() -> Self {
        Self {
            halves: Default::default(),
            calls: HashMap::new(),
            lost: false,
            loss: None,
            stats: StreamStats::default(),
        }
    }

    /// Applies one syscall's chunk; finished exchanges are appended to `out`.
    pub fn on_chunk(
        &mut self,
        chunk: &Chunk<'_>,
        out: &mut Vec<Exchange>,
    ) -> Result<(), StreamError> {
        chunk.check()?;
        let dir = chunk.direction;
        let mut data = chunk.data;
        while !data.is_empty() && !self.lost {
            let step = self.half(dir).feed(&mut data, chunk.ts_ns);
            self.apply(dir, step, chunk.ts_ns, out);
        }
        let missing = chunk.uncaptured();
        tracing::trace!(
            ?dir,
            total = chunk.total,
            captured = chunk.data.len(),
            first = ?&chunk.data[..chunk.data.len().min(12)],
            "http/2 chunk"
        );
        if missing > 0 && !self.lost {
            let step = self.half(dir).skip(missing);
            self.apply(dir, step, chunk.ts_ns, out);
        }
        Ok(())
    }

    /// Applies a call the kernel walked ([`agent_common::DATA_H2_SPARSE`]): `chunk.data`
    /// holds its bytes without DATA payloads, and `start` is where the kernel's walk began,
    /// which must be where this side stands (else the kernel guessed a frame boundary
    /// wrong, and the record cannot be read).
    pub fn on_sparse_chunk(
        &mut self,
        chunk: &Chunk<'_>,
        start: WalkStart,
        out: &mut Vec<Exchange>,
    ) -> Result<(), StreamError> {
        chunk.check()?;
        if self.lost {
            return Ok(());
        }
        let dir = chunk.direction;
        let half = self.half(dir);
        half.begin(chunk.data);
        if !half.position().agrees(start) {
            tracing::debug!(kernel = ?start, here = ?half.position(), "http/2 framing differs");
            self.lose(DropReason::HeadTruncated);
            return Ok(());
        }
        let mut data = chunk.data;
        let mut moved = 0;
        while moved < chunk.total && !self.lost {
            let body = self.half(dir).data_left();
            let step = if body > 0 {
                // Not in the record: passed over.
                let n = body.min(chunk.total - moved);
                moved += n;
                self.half(dir).skip(n)
            } else if data.is_empty() {
                // The walk stopped short of the call's end (too many frames or buffers, or
                // a header block larger than the capture).
                Err(DropReason::HeadTruncated)
            } else {
                let before = data.len();
                let step = self.half(dir).feed(&mut data, chunk.ts_ns);
                moved += before - data.len();
                step
            };
            self.apply(dir, step, chunk.ts_ns, out);
        }
        if !data.is_empty() && !self.lost {
            // More kept bytes than the call moved outside DATA payloads.
            self.lose(DropReason::Malformed);
        }
        Ok(())
    }

    fn half(&mut self, dir: Direction) -> &mut Half {
        match dir {
            Direction::Ingress => &mut self.halves[0],
            Direction::Egress => &mut self.halves[1],
        }
    }

    fn apply(
        &mut self,
        dir: Direction,
        step: Result<Option<Event>, DropReason>,
        ts_ns: u64,
        out: &mut Vec<Exchange>,
    ) {
        match step {
            Ok(None) => {}
            Ok(Some(Event::Headers {
                stream,
                end_stream,
                start_ns,
                fields,
            })) => self.on_headers(dir, stream, end_stream, start_ns, fields, ts_ns, out),
            Ok(Some(Event::Data {
                stream,
                len,
                end_stream,
            })) => {
                let Some(call) = self.calls.get_mut(&stream) else {
                    return;
                };
                let len = len as u64;
                if is_request_side(call.role, dir) {
                    call.request_body_bytes += len;
                } else {
                    call.response_body_bytes += len;
                    if end_stream {
                        self.finish(stream, ts_ns, None, out);
                    }
                }
            }
            Ok(Some(Event::Reset { stream })) => {
                self.finish(stream, ts_ns, Some(Failure::StreamReset), out)
            }
            Err(reason) => self.lose(reason),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_headers(
        &mut self,
        dir: Direction,
        stream: u32,
        end_stream: bool,
        start_ns: u64,
        fields: Fields,
        ts_ns: u64,
        out: &mut Vec<Exchange>,
    ) {
        if let Some(method) = fields.method {
            if self.calls.contains_key(&stream) {
                return;
            }
            if self.calls.len() >= MAX_CALLS {
                self.stats.record(DropReason::PipelineOverflow);
                return;
            }
            let target = fields.path.unwrap_or_default();
            let (path, query) = split_path(&target);
            let call = Exchange {
                role: match dir {
                    Direction::Ingress => ExchangeRole::Server,
                    Direction::Egress => ExchangeRole::Client,
                },
                method,
                path: path.into(),
                query: query.map(CompactString::from),
                version: HttpVersion::Http2,
                status: 0,
                host: fields.authority.or(fields.host),
                user_agent: fields.user_agent,
                traceparent: fields.traceparent,
                tracestate: fields.tracestate,
                traceparent_duplicated: fields.traceparent_duplicated,
                start_ns,
                response_start_ns: 0,
                end_ns: 0,
                request_body_bytes: 0,
                response_body_bytes: 0,
                request_head_truncated: false,
                keep_alive: true,
                failure: None,
                grpc: fields.grpc.then(GrpcCall::default),
                redis: None,
            };
            self.calls.insert(stream, call);
            return;
        }
        let Some(call) = self.calls.get_mut(&stream) else {
            if fields.status.is_some() {
                self.stats.record(DropReason::UnmatchedResponse);
            }
            return;
        };
        if is_request_side(call.role, dir) {
            // The request's trailers.
            return;
        }
        if let Some(status) = fields.status.filter(|s| *s >= 200) {
            if call.status == 0 {
                call.status = status;
                call.response_start_ns = start_ns;
            }
        }
        if let (Some(grpc), Some(status)) = (&mut call.grpc, fields.grpc_status) {
            grpc.status = Some(status);
        }
        if end_stream {
            self.finish(stream, ts_ns, None, out);
        }
    }

    /// The call on `stream` ended at `ts_ns`.
    fn finish(
        &mut self,
        stream: u32,
        ts_ns: u64,
        failure: Option<Failure>,
        out: &mut Vec<Exchange>,
    ) {
        if let Some(mut call) = self.calls.remove(&stream) {
            call.end_ns = ts_ns;
            call.failure = failure;
            out.push(call);
        }
    }

    /// The connection can no longer be followed: its calls in flight are dropped, and
    /// nothing after is read.
    fn lose(&mut self, reason: DropReason) {
        tracing::debug!(
            reason = reason.as_str(),
            calls = self.calls.len(),
            "http/2 connection no longer followed"
        );
        self.lost = true;
        self.loss = Some(reason);
        self.stats.record(reason);
        for _ in self.calls.drain() {
            self.stats.record(reason);
        }
        self.halves = Default::default();
    }

    /// The kernel lost records of the connection: the header tables cannot be followed.
    pub fn on_gap(&mut self) {
        if !self.lost {
            self.lose(DropReason::CaptureGap);
        }
    }

    /// The connection closed, or a process at its end exited, at `ts_ns`: calls left
    /// without a whole response failed then.
    pub fn on_close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        let mut left: Vec<(u32, Exchange)> = self.calls.drain().collect();
        // In the order they began (streams are numbered in that order too).
        left.sort_by_key(|(stream, call)| (call.start_ns, *stream));
        for (_, mut call) in left {
            call.end_ns = ts_ns.max(call.start_ns);
            call.failure = Some(if call.status == 0 {
                Failure::NoResponse
            } else {
                Failure::ResponseCutShort
            });
            out.push(call);
        }
    }

    /// The agent lets go of the connection without seeing it end: calls in flight are
    /// dropped and counted.
    pub fn on_forget(&mut self) {
        for _ in self.calls.drain() {
            self.stats.record(DropReason::NoResponse);
        }
    }

    pub fn release_idle_buffers(&mut self) {
        for half in &mut self.halves {
            half.release_idle_buffers();
        }
        if self.calls.is_empty() {
            self.calls = HashMap::new();
        }
    }

    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    /// Why the connection was given up, once: `Some` the first time it is asked after.
    pub fn take_loss(&mut self) -> Option<DropReason> {
        self.loss.take()
    }

    pub fn take_stats(&mut self) -> StreamStats {
        std::mem::take(&mut self.stats)
    }

    /// Calls waiting for their response.
    pub fn calls_in_flight(&self) -> usize {
        self.calls.len()
    }
}

/// Whether `dir` carries the requests for an exchange of `role`.
fn is_request_side(role: ExchangeRole, dir: Direction) -> bool {
    (role == ExchangeRole::Server) == (dir == Direction::Ingress)
}
