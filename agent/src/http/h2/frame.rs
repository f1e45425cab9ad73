//! HTTP/2 frame headers (RFC 9113 §4.1) and the parts of frame payloads Tapir reads.

/// The client connection preface, which the kernel recognises by its first four bytes.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of a frame header.
pub const HEADER_LEN: usize = 9;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const PUSH_PROMISE: u8 = 0x5;
pub const CONTINUATION: u8 = 0x9;

pub const FLAG_END_STREAM: u8 = 0x1;
pub const FLAG_END_HEADERS: u8 = 0x4;
pub const FLAG_PADDED: u8 = 0x8;
pub const FLAG_PRIORITY: u8 = 0x20;

/// A frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Payload bytes that follow the header.
    pub len: usize,
    pub kind: u8,
    pub flags: u8,
    /// The stream identifier (reserved bit cleared); 0 for connection frames.
    pub stream: u32,
}

impl FrameHeader {
    pub fn parse(b: &[u8; HEADER_LEN]) -> Self {
        Self {
            len: (usize::from(b[0]) << 16) | (usize::from(b[1]) << 8) | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }

    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }

    /// Frames whose payload Tapir needs whole: header blocks (their compression state
    /// must be followed) and stream resets. The rest is only counted.
    pub fn payload_wanted(&self) -> bool {
        matches!(
            self.kind,
            HEADERS | CONTINUATION | PUSH_PROMISE | RST_STREAM
        )
    }
}

/// The header block fragment of a HEADERS or PUSH_PROMISE payload: without padding, the
/// priority fields or the promised stream id. `None` when the lengths do not add up.
pub fn block_fragment(kind: u8, flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut body = payload;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        let (&n, rest) = body.split_first()?;
        pad = usize::from(n);
        body = rest;
    }
    let skip = match kind {
        HEADERS if flags & FLAG_PRIORITY != 0 => 5,
        PUSH_PROMISE => 4,
        _ => 0,
    };
    let end = body.len().checked_sub(pad)?;
    body.get(skip..end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_its_fields_and_clears_the_reserved_bit() {
        let h = FrameHeader::parse(&[0x01, 0x02, 0x03, HEADERS, 0x25, 0x80, 0, 0, 7]);
        assert_eq!(h.len, 0x010203);
        assert_eq!(h.kind, HEADERS);
        assert!(h.has(FLAG_END_STREAM) && h.has(FLAG_END_HEADERS) && h.has(FLAG_PRIORITY));
        assert!(!h.has(FLAG_PADDED));
        assert_eq!(h.stream, 7);
        assert!(h.payload_wanted());
        assert!(!FrameHeader { kind: DATA, ..h }.payload_wanted());
    }

    #[test]
    fn fragments_lose_padding_priority_and_promised_ids() {
        assert_eq!(block_fragment(HEADERS, 0, b"abc"), Some(&b"abc"[..]));
        let padded = [2, b'a', b'b', 0, 0];
        assert_eq!(
            block_fragment(HEADERS, FLAG_PADDED, &padded),
            Some(&b"ab"[..])
        );
        let prio = [0, 0, 0, 1, 16, b'x'];
        assert_eq!(
            block_fragment(HEADERS, FLAG_PRIORITY, &prio),
            Some(&b"x"[..])
        );
        let promise = [0, 0, 0, 2, b'y'];
        assert_eq!(block_fragment(PUSH_PROMISE, 0, &promise), Some(&b"y"[..]));
        // Padding longer than the payload, an empty padded payload, a short priority.
        assert_eq!(block_fragment(HEADERS, FLAG_PADDED, &[9, b'a']), None);
        assert_eq!(block_fragment(HEADERS, FLAG_PADDED, &[]), None);
        assert_eq!(block_fragment(HEADERS, FLAG_PRIORITY, &[0, 0]), None);
    }
}
