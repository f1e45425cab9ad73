//! Request and response heads: the start line and the few header fields Tapir keeps.
//!
//! Privacy: only the fields of [`HeadFields`] are read from the headers; no other header
//! value is ever copied.

use std::mem::MaybeUninit;

use httparse::{Header, ParserConfig, Status};

use super::HttpVersion;

/// Header fields parsed per head; more is [`HeadError::TooManyHeaders`].
pub const MAX_HEADERS: usize = 128;
/// Longest method token accepted when looking for the start of a request.
const MAX_METHOD_LEN: usize = 24;
const RESPONSE_PREFIX: &[u8] = b"HTTP/1.";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    Request,
    Response,
}

/// Whether some bytes start like an HTTP/1.x message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageStart {
    Is(MessageKind),
    /// Too few bytes to tell (but they could start one).
    Incomplete,
    NotHttp,
}

impl MessageStart {
    /// Rules out a kind other than `expected` (when known).
    pub fn expecting(self, expected: Option<MessageKind>) -> Self {
        match (self, expected) {
            (Self::Is(kind), Some(want)) if kind != want => Self::NotHttp,
            _ => self,
        }
    }
}

/// A request starts with a method token (uppercase) and a space; a response with `HTTP/1.`.
pub fn message_start(bytes: &[u8]) -> MessageStart {
    if bytes.iter().zip(RESPONSE_PREFIX).all(|(a, b)| a == b) {
        return if bytes.len() >= RESPONSE_PREFIX.len() {
            MessageStart::Is(MessageKind::Response)
        } else {
            MessageStart::Incomplete
        };
    }
    for (i, &b) in bytes.iter().enumerate() {
        if b == b' ' {
            return if i > 0 {
                MessageStart::Is(MessageKind::Request)
            } else {
                MessageStart::NotHttp
            };
        }
        if i >= MAX_METHOD_LEN || !(b.is_ascii_uppercase() || b == b'-' || b == b'_') {
            return MessageStart::NotHttp;
        }
    }
    MessageStart::Incomplete
}

/// The first line is a whole `METHOD target HTTP/1.x` line: the peer will most likely
/// answer it, even if the rest of the head is unusable.
pub fn has_request_line(head: &[u8]) -> bool {
    let Some(end) = head.iter().position(|&b| b == b'\n') else {
        return false;
    };
    let line = head.get(..end).unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    message_start(line) == MessageStart::Is(MessageKind::Request)
        && (line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"))
}

/// Length of `prefix` up to and including its last line feed (`None` without one): the
/// complete lines of a head whose end was not captured.
pub fn complete_lines_len(prefix: &[u8]) -> Option<usize> {
    prefix.iter().rposition(|&b| b == b'\n').map(|i| i + 1)
}

/// Finds the blank line that ends a head, fed in pieces (CRLF or bare LF line ends, as
/// `httparse` accepts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadEndScanner {
    state: ScanState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ScanState {
    #[default]
    InLine,
    AfterLf,
    AfterLfCr,
}

impl HeadEndScanner {
    /// Offset just past the blank line if it ends within `bytes`.
    pub fn scan(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            if self.state == ScanState::InLine && b != b'\n' {
                // Jump to the next line feed: most bytes are inside lines.
                let rest = bytes.get(i..).unwrap_or_default();
                match rest.iter().position(|&b| b == b'\n') {
                    Some(at) => i += at,
                    None => return None,
                }
                continue;
            }
            self.state = match (self.state, b) {
                (ScanState::AfterLf | ScanState::AfterLfCr, b'\n') => {
                    self.state = ScanState::InLine;
                    return Some(i + 1);
                }
                (_, b'\n') => ScanState::AfterLf,
                (ScanState::AfterLf, b'\r') => ScanState::AfterLfCr,
                _ => ScanState::InLine,
            };
            i += 1;
        }
        None
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("invalid or conflicting Content-Length")]
    InvalidContentLength,
    #[error("not an HTTP/1.x head: {0}")]
    Syntax(httparse::Error),
}

impl From<httparse::Error> for HeadError {
    fn from(e: httparse::Error) -> Self {
        match e {
            httparse::Error::TooManyHeaders => Self::TooManyHeaders,
            other => Self::Syntax(other),
        }
    }
}

/// What the `Connection` header asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ConnectionOption {
    #[default]
    Unspecified,
    KeepAlive,
    Close,
}

/// The only header fields Tapir reads. Values are trimmed raw bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeadFields<'a> {
    pub content_length: Option<u64>,
    /// A `Transfer-Encoding` header is present.
    pub transfer_encoding: bool,
    /// ... and its final coding is `chunked`.
    pub chunked: bool,
    pub connection: ConnectionOption,
    pub expect_continue: bool,
    pub host: Option<&'a [u8]>,
    pub user_agent: Option<&'a [u8]>,
    /// The first `traceparent`.
    pub traceparent: Option<&'a [u8]>,
    pub traceparent_duplicated: bool,
    /// The first `tracestate`.
    pub tracestate: Option<&'a [u8]>,
    pub upgrade: Option<&'a [u8]>,
}

impl<'a> HeadFields<'a> {
    fn from_headers(headers: &[Header<'a>]) -> Result<Self, HeadError> {
        let mut fields = Self::default();
        for header in headers {
            fields.add(header.name.as_bytes(), header.value)?;
        }
        Ok(fields)
    }

    /// `value` untrimmed: only the headers kept are trimmed (most are none of ours).
    fn add(&mut self, name: &[u8], value: &'a [u8]) -> Result<(), HeadError> {
        let is = |wanted: &[u8]| eq_lower(name, wanted);
        let value = || trim(value);
        // Dispatch on length first: most headers are none of ours.
        match name.len() {
            4 if is(b"host") => keep_first(&mut self.host, value()),
            6 if is(b"expect") => self.expect_continue |= eq_lower(value(), b"100-continue"),
            7 if is(b"upgrade") => keep_first(&mut self.upgrade, value()),
            10 if is(b"user-agent") => keep_first(&mut self.user_agent, value()),
            10 if is(b"tracestate") => keep_first(&mut self.tracestate, value()),
            10 if is(b"connection") => self.add_connection(value()),
            11 if is(b"traceparent") => {
                self.traceparent_duplicated |= self.traceparent.is_some();
                keep_first(&mut self.traceparent, value());
            }
            14 if is(b"content-length") => {
                let length =
                    parse_content_length(value()).ok_or(HeadError::InvalidContentLength)?;
                if self.content_length.is_some_and(|seen| seen != length) {
                    return Err(HeadError::InvalidContentLength);
                }
                self.content_length = Some(length);
            }
            17 if is(b"transfer-encoding") => {
                // Only the final coding of the last header decides the framing.
                self.transfer_encoding = true;
                let last = value().rsplit(|&b| b == b',').next().unwrap_or_default();
                self.chunked = eq_lower(trim(last), b"chunked");
            }
            _ => {}
        }
        Ok(())
    }

    fn add_connection(&mut self, value: &[u8]) {
        // Usually a single option: no list to split (memchr instead of a byte iterator).
        if !value.contains(&b',') {
            self.add_connection_option(value);
            return;
        }
        for option in value.split(|&b| b == b',').map(trim) {
            self.add_connection_option(option);
        }
    }

    fn add_connection_option(&mut self, option: &[u8]) {
        if eq_lower(option, b"close") {
            self.connection = ConnectionOption::Close;
        } else if eq_lower(option, b"keep-alive") && self.connection != ConnectionOption::Close {
            self.connection = ConnectionOption::KeepAlive;
        }
    }
}

/// `s.eq_ignore_ascii_case(lower)` for a `lower` with no uppercase letter, eight bytes at
/// a time (a response's every header is compared with a few names this way).
pub(crate) fn eq_lower(s: &[u8], lower: &[u8]) -> bool {
    if s.len() != lower.len() {
        return false;
    }
    if s.len() < 8 {
        return s.eq_ignore_ascii_case(lower);
    }
    let same = |at: usize| match (word_at(s, at), word_at(lower, at)) {
        (Some(a), Some(b)) => ascii_lowercase_word(a) == b,
        _ => false,
    };
    // Whole words, then the last eight bytes (overlapping the previous word).
    (0..s.len() / 8).all(|i| same(8 * i)) && same(s.len() - 8)
}

fn word_at(b: &[u8], at: usize) -> Option<u64> {
    let w: [u8; 8] = b.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(w))
}

/// Each byte of `x` lowercased as `u8::to_ascii_lowercase` does (only `A`..=`Z` change).
fn ascii_lowercase_word(x: u64) -> u64 {
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let h = x & LOW7;
    // Per byte, without carries (h ≤ 0x7f): the high bit is set when h ≥ 'A' (0x41),
    // resp. when h > 'Z' (0x5a).
    let at_least_a = h + 0x3f3f_3f3f_3f3f_3f3f;
    let above_z = h + 0x2525_2525_2525_2525;
    let upper = at_least_a & !above_z & !x & HIGH;
    x | (upper >> 2)
}

fn keep_first<'a>(slot: &mut Option<&'a [u8]>, value: &'a [u8]) {
    if slot.is_none() {
        *slot = Some(value);
    }
}

/// Digits only; a list of identical values (`5, 5`) is accepted as RFC 9110 allows.
fn parse_content_length(value: &[u8]) -> Option<u64> {
    // Usually a single value: no list to split.
    if !value.contains(&b',') {
        return parse_digits(trim(value));
    }
    let mut length = None;
    for item in value.split(|&b| b == b',').map(trim) {
        let n = parse_digits(item)?;
        if length.is_some_and(|seen| seen != n) {
            return None;
        }
        length = Some(n);
    }
    length
}

/// A non-empty run of decimal digits that fits in a u64.
fn parse_digits(item: &[u8]) -> Option<u64> {
    if item.is_empty() || !item.iter().all(u8::is_ascii_digit) {
        return None;
    }
    item.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn trim(bytes: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b)).unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    bytes.get(start..end).unwrap_or_default()
}

/// A parsed request head; strings borrow the input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHead<'a> {
    pub method: &'a str,
    /// The request target as sent.
    pub target: &'a str,
    pub version: HttpVersion,
    pub fields: HeadFields<'a>,
    /// Bytes of the head, final blank line included.
    pub len: usize,
}

impl<'a> RequestHead<'a> {
    /// `(authority, path, query)` in one pass: [`Self::target_authority`], [`Self::path`],
    /// [`Self::query`].
    pub fn target_parts(&self) -> (Option<&'a str>, &'a str, Option<&'a str>) {
        let (authority, path, query) = split_target(self.target);
        (authority, path, query.filter(|q| !q.is_empty()))
    }

    /// The target's path: without the query, and for absolute-form (`http://host/p`) without
    /// scheme and authority.
    pub fn path(&self) -> &'a str {
        split_target(self.target).1
    }

    /// The query without its `?`; `None` when absent or empty.
    pub fn query(&self) -> Option<&'a str> {
        split_target(self.target).2.filter(|q| !q.is_empty())
    }

    /// The authority of an absolute-form target (proxies): a stand-in for a missing `Host`.
    pub fn target_authority(&self) -> Option<&'a str> {
        split_target(self.target).0
    }
}

/// `(authority, path, query)` of a request target.
fn split_target(target: &str) -> (Option<&str>, &str, Option<&str>) {
    // Origin-form ("/path"), nearly every request, cannot be absolute-form: no search.
    let scheme_end = if target.starts_with('/') {
        None
    } else {
        target.find("://")
    };
    let (authority, rest) = match scheme_end {
        Some(at) if target.get(..at).is_some_and(is_scheme) => {
            let after = target.get(at + 3..).unwrap_or_default();
            let end = after.find(['/', '?']).unwrap_or(after.len());
            let (authority, rest) = after.split_at(end);
            (Some(authority), rest)
        }
        _ => (None, target),
    };
    // A byte search: short targets are the rule, where `split_once(char)` costs more.
    let (path, query) = match rest.bytes().position(|b| b == b'?') {
        Some(at) => (rest.get(..at).unwrap_or_default(), rest.get(at + 1..)),
        None => (rest, None),
    };
    let path = if path.is_empty() && authority.is_some() {
        "/"
    } else {
        path
    };
    (authority, path, query)
}

fn is_scheme(s: &str) -> bool {
    s.eq_ignore_ascii_case("http") || s.eq_ignore_ascii_case("https")
}

/// A parsed response head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead<'a> {
    pub version: HttpVersion,
    pub status: u16,
    pub fields: HeadFields<'a>,
    /// Bytes of the head, final blank line included.
    pub len: usize,
}

/// Lenient like browsers and common servers: we observe traffic, we don't police it.
fn parser_config() -> ParserConfig {
    let mut config = ParserConfig::default();
    config
        .allow_multiple_spaces_in_request_line_delimiters(true)
        .allow_multiple_spaces_in_response_status_delimiters(true)
        .allow_spaces_after_header_name_in_responses(true)
        .allow_obsolete_multiline_headers_in_responses(true)
        .ignore_invalid_headers_in_requests(true)
        .ignore_invalid_headers_in_responses(true);
    config
}

fn http_version(minor: Option<u8>) -> Result<HttpVersion, HeadError> {
    match minor {
        Some(0) => Ok(HttpVersion::Http10),
        Some(1) => Ok(HttpVersion::Http11),
        _ => Err(HeadError::Syntax(httparse::Error::Version)),
    }
}

/// Parses a request head at the start of `buf`; `Ok(None)` when it is not complete yet.
pub fn parse_request(buf: &[u8]) -> Result<Option<RequestHead<'_>>, HeadError> {
    let mut headers = [const { MaybeUninit::<Header<'_>>::uninit() }; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut []);
    let Status::Complete(len) =
        parser_config().parse_request_with_uninit_headers(&mut request, buf, &mut headers)?
    else {
        return Ok(None);
    };
    let (Some(method), Some(target)) = (request.method, request.path) else {
        return Err(HeadError::Syntax(httparse::Error::Token));
    };
    Ok(Some(RequestHead {
        method,
        target,
        version: http_version(request.version)?,
        fields: HeadFields::from_headers(request.headers)?,
        len,
    }))
}

/// Parses a response head at the start of `buf`; `Ok(None)` when it is not complete yet.
pub fn parse_response(buf: &[u8]) -> Result<Option<ResponseHead<'_>>, HeadError> {
    let mut headers = [const { MaybeUninit::<Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let Status::Complete(len) =
        parser_config().parse_response_with_uninit_headers(&mut response, buf, &mut headers)?
    else {
        return Ok(None);
    };
    let Some(status) = response.code else {
        return Err(HeadError::Syntax(httparse::Error::Status));
    };
    Ok(Some(ResponseHead {
        version: http_version(response.version)?,
        status,
        fields: HeadFields::from_headers(response.headers)?,
        len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(bytes: &[u8]) -> RequestHead<'_> {
        match parse_request(bytes) {
            Ok(Some(head)) => head,
            other => panic!("not a complete request: {other:?}"),
        }
    }

    #[test]
    fn request_line_and_kept_fields() {
        let raw = b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHOST: example.com\r\nuser-agent: curl/8\r\n\
            TraceParent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n\
            tracestate: a=1\r\nCookie: secret\r\nAuthorization: Bearer x\r\n\r\nBODY";
        let head = request(raw);
        assert_eq!(head.method, "GET");
        assert_eq!(head.path(), "/a/b");
        assert_eq!(head.query(), Some("x=1&y=2"));
        assert_eq!(head.version, HttpVersion::Http11);
        assert_eq!(head.len, raw.len() - 4);
        let f = head.fields;
        assert_eq!(f.host, Some(&b"example.com"[..]));
        assert_eq!(f.user_agent, Some(&b"curl/8"[..]));
        assert_eq!(
            f.traceparent,
            Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..])
        );
        assert_eq!(f.tracestate, Some(&b"a=1"[..]));
        assert!(!f.traceparent_duplicated);
        assert_eq!(f.content_length, None);
    }

    #[test]
    fn incomplete_heads_are_partial() {
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert_eq!(parse_request(b""), Ok(None));
    }

    #[test]
    fn response_head() {
        let raw = b"HTTP/1.0 404 Not Found\r\nContent-Length: 12\r\nConnection: Keep-Alive\r\n\r\n";
        let head = parse_response(raw).ok().flatten();
        let Some(head) = head else {
            panic!("response not parsed")
        };
        assert_eq!(head.status, 404);
        assert_eq!(head.version, HttpVersion::Http10);
        assert_eq!(head.fields.content_length, Some(12));
        assert_eq!(head.fields.connection, ConnectionOption::KeepAlive);
        assert_eq!(head.len, raw.len());
    }

    #[test]
    fn duplicate_traceparent_keeps_the_first() {
        let head = request(b"GET / HTTP/1.1\r\ntraceparent: one\r\ntraceparent: two\r\n\r\n");
        assert_eq!(head.fields.traceparent, Some(&b"one"[..]));
        assert!(head.fields.traceparent_duplicated);
    }

    #[test]
    fn content_length_must_be_digits_and_agree() {
        let parse = |cl: &str| {
            let raw = format!("POST / HTTP/1.1\r\n{cl}\r\n\r\n");
            parse_request(raw.as_bytes()).map(|h| h.and_then(|h| h.fields.content_length))
        };
        assert_eq!(parse("Content-Length: 42"), Ok(Some(42)));
        assert_eq!(parse("content-length:  7 , 7"), Ok(Some(7)));
        assert_eq!(parse("Content-Length: 5\r\nContent-Length: 5"), Ok(Some(5)));
        let bad = Err(HeadError::InvalidContentLength);
        assert_eq!(parse("Content-Length: 5\r\nContent-Length: 6"), bad);
        assert_eq!(parse("Content-Length: 5, 6"), bad);
        assert_eq!(parse("Content-Length: -1"), bad);
        assert_eq!(parse("Content-Length: 0x10"), bad);
        assert_eq!(parse("Content-Length: "), bad);
        assert_eq!(parse("Content-Length: 99999999999999999999999"), bad);
    }

    #[test]
    fn transfer_encoding_chunked_only_when_final() {
        let chunked = |te: &str| {
            let raw = format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: {te}\r\n\r\n");
            let head = parse_response(raw.as_bytes()).ok().flatten();
            head.map(|h| (h.fields.transfer_encoding, h.fields.chunked))
        };
        assert_eq!(chunked("chunked"), Some((true, true)));
        assert_eq!(chunked("gzip, Chunked"), Some((true, true)));
        assert_eq!(chunked("chunked, gzip"), Some((true, false)));
    }

    #[test]
    fn connection_expect_and_upgrade() {
        let head = request(
            b"POST / HTTP/1.1\r\nConnection: keep-alive, Upgrade, close\r\n\
              Expect: 100-Continue\r\nUpgrade: websocket\r\n\r\n",
        );
        assert_eq!(head.fields.connection, ConnectionOption::Close);
        assert!(head.fields.expect_continue);
        assert_eq!(head.fields.upgrade, Some(&b"websocket"[..]));
    }

    #[test]
    fn too_many_headers_is_its_own_error() {
        let mut raw = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            raw.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&raw), Err(HeadError::TooManyHeaders));
        let ok = b"GET / HTTP/1.1\r\n".to_vec();
        let mut ok = ok;
        for i in 0..MAX_HEADERS {
            ok.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
        }
        ok.extend_from_slice(b"\r\n");
        assert!(matches!(parse_request(&ok), Ok(Some(_))));
    }

    #[test]
    fn only_http1_is_accepted() {
        assert!(parse_request(b"GET / HTTP/2.0\r\n\r\n").is_err());
        assert!(parse_request(b"GET /\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 abc\r\n\r\n").is_err());
    }

    #[test]
    fn targets_split_into_path_and_query() {
        assert_eq!(split_target("/p?q"), (None, "/p", Some("q")));
        assert_eq!(split_target("/p"), (None, "/p", None));
        assert_eq!(split_target("*"), (None, "*", None));
        assert_eq!(
            split_target("example.com:443"),
            (None, "example.com:443", None)
        );
        assert_eq!(
            split_target("http://h:8080/a?b=c"),
            (Some("h:8080"), "/a", Some("b=c"))
        );
        assert_eq!(split_target("HTTPS://h?x"), (Some("h"), "/", Some("x")));
        assert_eq!(request(b"GET /p? HTTP/1.1\r\n\r\n").query(), None);
        let parts = |t: &str| {
            let raw = format!("GET {t} HTTP/1.1\r\n\r\n");
            let h = request(raw.as_bytes());
            let (a, p, q) = h.target_parts();
            (a.map(str::to_owned), p.to_owned(), q.map(str::to_owned))
        };
        let own = |a: Option<&str>, p: &str, q: Option<&str>| {
            (a.map(str::to_owned), p.to_owned(), q.map(str::to_owned))
        };
        assert_eq!(parts("/a/b?c?d"), own(None, "/a/b", Some("c?d")));
        assert_eq!(parts("/ä?ö"), own(None, "/ä", Some("ö")));
        assert_eq!(parts("/p?"), own(None, "/p", None));
        assert_eq!(parts("http://h:1/a?b"), own(Some("h:1"), "/a", Some("b")));
        // The one-pass accessor agrees with the three single ones.
        for t in [
            "/p?q",
            "/p?",
            "/",
            "*",
            "http://h:1/a?b",
            "HTTPS://h?x",
            "/a/b?c?d",
            "/ä?ö",
        ] {
            let raw = format!("GET {t} HTTP/1.1\r\n\r\n");
            let h = request(raw.as_bytes());
            assert_eq!(
                h.target_parts(),
                (h.target_authority(), h.path(), h.query()),
                "{t}"
            );
        }
    }

    #[test]
    fn message_starts() {
        use MessageKind::*;
        assert_eq!(message_start(b"GET / HTTP/1.1"), MessageStart::Is(Request));
        assert_eq!(
            message_start(b"M-SEARCH * HTTP/1.1"),
            MessageStart::Is(Request)
        );
        assert_eq!(message_start(b"HTTP/1.1 200"), MessageStart::Is(Response));
        assert_eq!(message_start(b"HTTP/1."), MessageStart::Is(Response));
        assert_eq!(message_start(b""), MessageStart::Incomplete);
        assert_eq!(message_start(b"H"), MessageStart::Incomplete);
        assert_eq!(message_start(b"HTTP/"), MessageStart::Incomplete);
        assert_eq!(message_start(b"POS"), MessageStart::Incomplete);
        assert_eq!(message_start(b"HTTP/2 200"), MessageStart::NotHttp);
        assert_eq!(message_start(b"get / HTTP/1.1"), MessageStart::NotHttp);
        assert_eq!(message_start(b" GET"), MessageStart::NotHttp);
        assert_eq!(message_start(b"\r\nGET"), MessageStart::NotHttp);
        assert_eq!(message_start(&[b'A'; 40]), MessageStart::NotHttp);
        assert_eq!(
            MessageStart::Is(Response).expecting(Some(Request)),
            MessageStart::NotHttp
        );
        assert_eq!(
            MessageStart::Is(Response).expecting(None),
            MessageStart::Is(Response)
        );
    }

    #[test]
    fn request_line_detection() {
        assert!(has_request_line(b"GET / HTTP/1.1\r\nHost"));
        assert!(has_request_line(b"GET / HTTP/1.0\n"));
        assert!(!has_request_line(b"GET / HTTP/1.1"));
        assert!(!has_request_line(b"EHLO example.com\r\n"));
    }

    #[test]
    fn head_end_scanner_finds_blank_lines_across_pieces() {
        let raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest";
        for split in 0..raw.len() {
            let (a, b) = raw.split_at(split);
            let mut s = HeadEndScanner::default();
            let found = match s.scan(a) {
                Some(end) => end,
                None => s.scan(b).map(|end| end + a.len()).unwrap_or(0),
            };
            assert_eq!(found, raw.len() - 4, "split at {split}");
        }
        assert_eq!(HeadEndScanner::default().scan(b"a\n\nb"), Some(3));
        assert_eq!(HeadEndScanner::default().scan(b"a\r\n\nb"), Some(4));
        assert_eq!(HeadEndScanner::default().scan(b"a\r\nb\r\n"), None);
    }

    #[test]
    fn complete_lines_of_a_cut_head() {
        assert_eq!(complete_lines_len(b"GET / HTTP/1.1\r\nHost: ab"), Some(16));
        assert_eq!(complete_lines_len(b"GET /very-long"), None);
    }
}
