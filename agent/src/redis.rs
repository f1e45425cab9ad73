//! Redis client connections (RESP2 and RESP3): commands paired with their replies, in
//! order, one [`Exchange`] per command, named by the command.
//!
//! The kernel copies each call up to the capture; a bulk string's bytes beyond it are
//! passed over by count (a large `SET` value, a large `GET` reply). Structure beyond the
//! capture (thousands of small elements in one call) cannot be followed: the pairing is
//! then lost, what was waiting is dropped and counted, and the connection is followed
//! again from its next command, whose reply is taken to start the next read. A client that
//! subscribes (`SUBSCRIBE`, `MONITOR`) gets messages that answer no command: the
//! connection is let go of from then on.
use std::collections::VecDeque;

use agent_common::TraceIds;
use compact_str::CompactString;

use crate::http::{Chunk, Direction, DropReason, Exchange, ExchangeRole, Failure, StreamStats};

/// Commands sent and not answered yet, at most (pipelining).
const MAX_PENDING: usize = 256;
/// Nesting of aggregates followed (RESP3 maps of arrays of …); deeper is malformed.
const MAX_DEPTH: usize = 16;
/// Bytes of a line kept (its type byte included): a number, or an error's first words.
const LINE_KEEP: usize = 64;
/// Bytes of a bulk string kept, when it is a command's name.
const NAME_KEEP: usize = 32;

/// A Redis call: its reply was an error when `error` is set (the error's prefix, e.g.
/// `ERR`, `WRONGTYPE`: `db.response.status_code`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RedisCall {
    pub error: Option<ErrorPrefix>,
}

/// The error prefixes Redis itself sends (its source's `-ERR`, `-WRONGTYPE`, … replies and
/// Redis Cluster's redirections).
const KNOWN_PREFIXES: [&str; 27] = [
    "ERR",
    "WRONGTYPE",
    "NOSCRIPT",
    "BUSY",
    "BUSYKEY",
    "LOADING",
    "READONLY",
    "MOVED",
    "ASK",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "CROSSSLOT",
    "MASTERDOWN",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
    "EXECABORT",
    "NOREPLICAS",
    "MISCONF",
    "OOM",
    "NOPROTO",
    "UNBLOCKED",
    "BUSYGROUP",
    "NOGROUP",
    "NOTBUSY",
    "UNKILLABLE",
    "NOTREADY",
];

/// An error reply's prefix, one of [`KNOWN_PREFIXES`] (others, a module's own, count as
/// Redis's generic `ERR`: a server cannot make up metric series). One byte: every
/// exchange in flight carries the field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ErrorPrefix(u8);

impl ErrorPrefix {
    /// `word` if it is one of the known prefixes.
    pub fn new(word: &[u8]) -> Option<Self> {
        KNOWN_PREFIXES
            .iter()
            .position(|p| p.as_bytes() == word)
            .map(|i| Self(i as u8))
    }

    /// `ERR`, Redis's generic prefix.
    pub fn generic() -> Self {
        Self(0)
    }

    pub fn as_str(&self) -> &'static str {
        KNOWN_PREFIXES
            .get(usize::from(self.0))
            .copied()
            .unwrap_or("ERR")
    }
}

impl std::fmt::Display for ErrorPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One parsed top-level value.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Value {
    start_ns: u64,
    end_ns: u64,
    /// A command's name (the first element of the array, or an inline command's first
    /// word), as sent; empty when it was not a string.
    name: CompactString,
    /// A reply that is an error: its first word.
    error: Option<ErrorPrefix>,
    /// The error said the command is unknown (its name is then not reported).
    unknown_command: bool,
    /// A RESP3 push (`>`): out-of-band data, not a reply.
    push: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a line (a type byte and what follows up to `\n`).
    Line,
    /// Passing over a bulk string's bytes and its `\r\n`.
    Bulk { left: u64 },
}

/// Parses one direction's bytes into top-level RESP values.
#[derive(Debug)]
struct ValueParser {
    /// Requests (a client's writes): a line at the top level that is no RESP type is an
    /// inline command.
    requests: bool,
    state: State,
    /// The current line's first bytes, and how long it is so far.
    line: Vec<u8>,
    line_len: usize,
    /// Elements still to come in each open aggregate, innermost last.
    open: Vec<u64>,
    /// The value being read.
    current: Option<Value>,
    /// Where the command's name is in the value: 0 not yet, 1 the next bulk string, 2 done.
    name_at: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum ParseError {
    #[error("not RESP")]
    Malformed,
    #[error("structure beyond the captured bytes")]
    Uncaptured,
}

impl ValueParser {
    fn new(requests: bool) -> Self {
        Self {
            requests,
            state: State::Line,
            line: Vec::new(),
            line_len: 0,
            open: Vec::new(),
            current: None,
            name_at: 0,
        }
    }

    fn reset(&mut self) {
        self.state = State::Line;
        self.line.clear();
        self.line_len = 0;
        self.open.clear();
        self.current = None;
        self.name_at = 0;
    }

    fn between_values(&self) -> bool {
        self.current.is_none() && self.line_len == 0
    }

    /// Reads `data`, then `missing` bytes that were not captured, at `ts_ns`; complete
    /// values go to `out`. After an error the parser is between values again (the bytes
    /// up to the end of this chunk are lost).
    fn feed(
        &mut self,
        mut data: &[u8],
        mut missing: u64,
        ts_ns: u64,
        out: &mut Vec<Value>,
    ) -> Result<(), ParseError> {
        let result = (|| {
            while !data.is_empty() || missing > 0 {
                match self.state {
                    State::Bulk { left } => {
                        let from_data = (data.len() as u64).min(left);
                        self.keep_name(&data[..from_data as usize]);
                        data = &data[from_data as usize..];
                        let mut left = left - from_data;
                        if data.is_empty() {
                            let skipped = missing.min(left);
                            missing -= skipped;
                            left -= skipped;
                        }
                        if left == 0 {
                            self.state = State::Line;
                            self.element_done(ts_ns, out);
                        } else {
                            self.state = State::Bulk { left };
                        }
                    }
                    State::Line => {
                        if data.is_empty() {
                            return Err(ParseError::Uncaptured);
                        }
                        let end = data.iter().position(|&b| b == b'\n');
                        let take = end.map_or(data.len(), |i| i + 1);
                        if self.line_len == 0 && self.current.is_none() {
                            self.current = Some(Value {
                                start_ns: ts_ns,
                                end_ns: ts_ns,
                                name: CompactString::default(),
                                error: None,
                                unknown_command: false,
                                push: false,
                            });
                        }
                        let room = LINE_KEEP.saturating_sub(self.line.len()).min(take);
                        self.line.extend_from_slice(&data[..room]);
                        self.line_len += take;
                        data = &data[take..];
                        if end.is_some() {
                            self.on_line(ts_ns, out)?;
                        }
                    }
                }
            }
            Ok(())
        })();
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// Keeps a command name's bytes (the first bulk string of a request's array).
    fn keep_name(&mut self, bytes: &[u8]) {
        if self.name_at != 1 {
            return;
        }
        let Some(v) = self.current.as_mut() else {
            return;
        };
        for &b in bytes {
            if b == b'\r' || b == b'\n' || v.name.len() >= NAME_KEEP {
                self.name_at = 2;
                return;
            }
            v.name.push(b as char);
        }
    }

    /// A whole line is in `self.line` (its first [`LINE_KEEP`] bytes).
    fn on_line(&mut self, ts_ns: u64, out: &mut Vec<Value>) -> Result<(), ParseError> {
        let line = std::mem::take(&mut self.line);
        self.line_len = 0;
        let text = trim_line_end(&line);
        let result = self.on_line_text(text, ts_ns, out);
        self.line = line;
        self.line.clear();
        result
    }

    fn on_line_text(
        &mut self,
        text: &[u8],
        ts_ns: u64,
        out: &mut Vec<Value>,
    ) -> Result<(), ParseError> {
        let top = self.open.is_empty();
        let Some((&kind, rest)) = text.split_first() else {
            // An empty line between inline commands.
            if top && self.requests {
                self.current = None;
                return Ok(());
            }
            return Err(ParseError::Malformed);
        };
        match kind {
            b'*' | b'~' | b'>' | b'%' | b'|' => {
                let n = count(rest)?;
                if top && kind == b'>' {
                    if let Some(v) = self.current.as_mut() {
                        v.push = true;
                    }
                }
                if top && self.requests && kind == b'*' && self.name_at == 0 {
                    self.name_at = 1;
                }
                match n {
                    // A null array is a value of its own.
                    None => self.element_done(ts_ns, out),
                    Some(0) => self.element_done(ts_ns, out),
                    Some(n) => {
                        if self.open.len() >= MAX_DEPTH {
                            return Err(ParseError::Malformed);
                        }
                        // Maps and attributes hold pairs; an attribute comes before the
                        // value it describes, which still counts in its aggregate.
                        let n = if matches!(kind, b'%' | b'|') {
                            n * 2
                        } else {
                            n
                        };
                        if kind == b'|' {
                            self.open.push(n + 1);
                        } else {
                            self.open.push(n);
                        }
                    }
                }
            }
            b'$' | b'=' | b'!' => {
                if kind == b'!' && top {
                    // A blob error (RESP3): its text is not kept.
                    if let Some(v) = self.current.as_mut() {
                        v.error = Some(ErrorPrefix::generic());
                    }
                }
                match count(rest)? {
                    None => self.element_done(ts_ns, out),
                    Some(n) => self.state = State::Bulk { left: n + 2 },
                }
            }
            b'-' => {
                if top {
                    if let Some(v) = self.current.as_mut() {
                        let (prefix, unknown) = error_prefix(rest);
                        v.error = Some(prefix);
                        v.unknown_command = unknown;
                    }
                }
                self.element_done(ts_ns, out);
            }
            b'+' | b':' | b'_' | b',' | b'#' | b'(' => self.element_done(ts_ns, out),
            _ if top && self.requests && kind.is_ascii_alphabetic() => {
                // An inline command (`PING`, as typed into a telnet session).
                if let Some(v) = self.current.as_mut() {
                    let word = text.split(|&b| b == b' ').next().unwrap_or_default();
                    v.name = word.iter().take(NAME_KEEP).map(|&b| b as char).collect();
                }
                self.element_done(ts_ns, out);
            }
            _ => return Err(ParseError::Malformed),
        }
        Ok(())
    }

    /// An element (or a whole value) ended at `ts_ns`.
    fn element_done(&mut self, ts_ns: u64, out: &mut Vec<Value>) {
        if self.name_at == 1 && !self.open.is_empty() {
            // The first element was not a bulk string (or was empty): no name.
            self.name_at = 2;
        }
        while let Some(left) = self.open.last_mut() {
            *left -= 1;
            if *left > 0 {
                return;
            }
            self.open.pop();
        }
        if let Some(mut v) = self.current.take() {
            v.end_ns = ts_ns;
            out.push(v);
        }
        self.name_at = 0;
    }
}

/// A line without its `\r\n` (or `\n`).
fn trim_line_end(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// An aggregate's or bulk string's length: `None` for -1 (null).
fn count(digits: &[u8]) -> Result<Option<u64>, ParseError> {
    if digits == b"-1" {
        return Ok(None);
    }
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::Malformed);
    }
    Ok(Some(
        digits
            .iter()
            .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0')),
    ))
}

/// An error's prefix (its first word when Redis knows it: `ERR`, `WRONGTYPE`; else `ERR`),
/// and whether it says the command is unknown.
fn error_prefix(message: &[u8]) -> (ErrorPrefix, bool) {
    let word = message.split(|&b| b == b' ').next().unwrap_or_default();
    let prefix = ErrorPrefix::new(word).unwrap_or_else(ErrorPrefix::generic);
    // Not "unknown subcommand": the command itself is a real one.
    let unknown = message.starts_with(b"ERR unknown command");
    (prefix, unknown)
}

/// `db.operation.name`: the command in upper case; a name that is no word (or that the
/// server did not know) is `_OTHER`, so that made-up names do not become metric series.
fn operation_name(name: &str, unknown: bool) -> CompactString {
    let word = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if unknown || !word {
        CompactString::const_new("_OTHER")
    } else {
        name.to_ascii_uppercase().into()
    }
}

/// Commands after which the server sends messages that answer no command.
fn subscribes(name: &str) -> bool {
    [
        "SUBSCRIBE",
        "PSUBSCRIBE",
        "SSUBSCRIBE",
        "MONITOR",
        "SYNC",
        "PSYNC",
    ]
    .iter()
    .any(|c| name.eq_ignore_ascii_case(c))
}

/// One Redis client connection: commands out, replies in.
#[derive(Debug)]
pub struct RespStream {
    commands: ValueParser,
    replies: ValueParser,
    pending: VecDeque<Value>,
    /// Replies are out of step (their structure went beyond the capture, or commands were
    /// lost): the next read after the next command starts that command's reply.
    replies_lost: bool,
    /// The client subscribed: nothing more is read.
    let_go: bool,
    stats: StreamStats,
    values: Vec<Value>,
    /// The last command that got the kernel's ids (one set per write), with its
    /// timestamp: the commands the same write pipelined after it are its siblings.
    last_ids: Option<(u64, TraceIds)>,
}

impl Default for RespStream {
    fn default() -> Self {
        Self {
            commands: ValueParser::new(true),
            replies: ValueParser::new(false),
            pending: VecDeque::new(),
            replies_lost: false,
            let_go: false,
            stats: StreamStats::default(),
            values: Vec::new(),
            last_ids: None,
        }
    }
}

impl RespStream {
    pub fn on_chunk(&mut self, chunk: &Chunk<'_>, out: &mut Vec<Exchange>) {
        if self.let_go {
            return;
        }
        let missing = chunk.uncaptured() as u64;
        let mut values = std::mem::take(&mut self.values);
        values.clear();
        match chunk.direction {
            Direction::Egress => {
                let fed = self
                    .commands
                    .feed(chunk.data, missing, chunk.ts_ns, &mut values);
                for v in values.drain(..) {
                    if subscribes(&v.name) {
                        self.let_go();
                        break;
                    }
                    if self.pending.len() >= MAX_PENDING {
                        self.pending.pop_front();
                        self.stats.record(DropReason::PipelineOverflow);
                    }
                    self.pending.push_back(v);
                }
                if let Err(e) = fed {
                    // Commands were lost: their replies cannot be told from the others'.
                    self.lose(e);
                }
            }
            Direction::Ingress => {
                if self.replies_lost {
                    if self.pending.is_empty() {
                        self.values = values;
                        return;
                    }
                    self.replies_lost = false;
                }
                let fed = self
                    .replies
                    .feed(chunk.data, missing, chunk.ts_ns, &mut values);
                for v in values.drain(..) {
                    if v.push {
                        continue;
                    }
                    match self.pending.pop_front() {
                        Some(command) => out.push(exchange(command, v, None)),
                        None => self.stats.record(DropReason::UnmatchedResponse),
                    }
                }
                if let Err(e) = fed {
                    self.lose(e);
                }
            }
        }
        self.values = values;
    }

    /// A command's ids: the kernel's (`ids`, for the first command of a write), or, for a
    /// command pipelined in the same write as one that got them (`MULTI … EXEC`, a
    /// pipeline), a sibling's: same trace and parent, a span id of its own.
    pub fn command_ids(&mut self, start_ns: u64, ids: Option<TraceIds>) -> Option<TraceIds> {
        match (ids, self.last_ids) {
            (Some(ids), _) => {
                self.last_ids = Some((start_ns, ids));
                Some(ids)
            }
            (None, Some((ts, first))) if ts == start_ns => Some(TraceIds {
                span_id: crate::otel::span::random_span_id(),
                ..first
            }),
            (None, _) => None,
        }
    }

    /// Commands or replies could not be followed: what waits is dropped, and replies are
    /// taken up again after the next command.
    fn lose(&mut self, e: ParseError) {
        self.stats.record(match e {
            ParseError::Malformed => DropReason::Malformed,
            ParseError::Uncaptured => DropReason::HeadTruncated,
        });
        self.start_over(DropReason::NoResponse);
    }

    /// The client subscribed: nothing after this answers a command.
    fn let_go(&mut self) {
        self.start_over(DropReason::NoResponse);
        self.let_go = true;
    }

    /// Records of the connection were lost (a full ring).
    pub fn on_gap(&mut self) {
        self.start_over(DropReason::CaptureGap);
    }

    /// Drops (and counts) the commands waiting, and reads replies again only after the
    /// next command.
    fn start_over(&mut self, reason: DropReason) {
        self.drop_pending(reason);
        self.commands.reset();
        self.replies.reset();
        self.replies_lost = true;
    }

    fn drop_pending(&mut self, reason: DropReason) {
        for _ in self.pending.drain(..) {
            self.stats.record(reason);
        }
    }

    /// The connection closed at `ts_ns`: commands without a reply failed then.
    pub fn on_close(&mut self, ts_ns: u64, out: &mut Vec<Exchange>) {
        if self.replies_lost || self.let_go {
            return self.on_forget();
        }
        // The first command's reply may have begun.
        let mut cut = !self.replies.between_values();
        for command in self.pending.drain(..) {
            let failure = if std::mem::take(&mut cut) {
                Failure::ResponseCutShort
            } else {
                Failure::NoResponse
            };
            let end = Value {
                end_ns: ts_ns,
                ..command.clone()
            };
            out.push(exchange(command, end, Some(failure)));
        }
    }

    /// The agent lets go of the connection without seeing it end.
    pub fn on_forget(&mut self) {
        self.drop_pending(DropReason::NoResponse);
    }

    pub fn release_idle_buffers(&mut self) {
        if self.pending.is_empty() {
            self.pending = VecDeque::new();
        }
        self.values = Vec::new();
    }

    pub fn stats(&self) -> &StreamStats {
        &self.stats
    }

    pub fn take_stats(&mut self) -> StreamStats {
        std::mem::take(&mut self.stats)
    }
}

/// The exchange of `command` answered by `reply` (or failed: `failure`).
fn exchange(command: Value, reply: Value, failure: Option<Failure>) -> Exchange {
    let error = if failure.is_some() { None } else { reply.error };
    Exchange {
        method: operation_name(&command.name, reply.unknown_command),
        start_ns: command.start_ns,
        response_start_ns: reply.start_ns,
        end_ns: reply.end_ns,
        keep_alive: true,
        failure,
        redis: Some(RedisCall { error }),
        ..Exchange::empty(ExchangeRole::Client)
    }
}

#[cfg(test)]
mod tests;
