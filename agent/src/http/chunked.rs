//! Incremental decoder of the chunked transfer coding (RFC 9112 §7.1) that only follows the
//! framing — sizes, line ends, extensions, trailers — and counts payload bytes.
//!
//! It is fed a [`Cursor`] per syscall, split anywhere. Chunk payload may be skipped by count
//! when it was not captured. When framing itself falls in uncaptured bytes the decoder is
//! *unsynced*: from then on it only watches the end of each syscall for the last chunk
//! (`0\r\n\r\n`, without trailers), which writers emit as the final bytes of a body.

use super::cursor::Cursor;

/// See the module docs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChunkedDecoder {
    state: State,
    /// Payload bytes (plus any framing skipped while unsynced).
    body_bytes: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// In the hex chunk size.
    Size {
        value: u64,
        digits: u8,
    },
    /// After the size: whitespace and `;extensions` until the line end.
    Extension {
        value: u64,
    },
    /// Got the CR ending a size line.
    SizeLf {
        value: u64,
    },
    Data {
        remaining: u64,
    },
    /// After chunk payload: its CRLF.
    DataCr,
    DataLf,
    /// After the last chunk: at the start of a trailer line (or the final blank line).
    TrailerStart,
    TrailerLine,
    /// Got a CR at the start of a trailer line.
    TrailerEndLf,
    /// Framing lost; `recent` holds the last bytes seen (low byte = latest).
    Unsynced {
        recent: Recent,
    },
    Done,
}

impl Default for State {
    fn default() -> Self {
        Self::Size {
            value: 0,
            digits: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkedError {
    #[error("invalid byte {0:#04x} in a chunk size line")]
    InvalidSize(u8),
    #[error("chunk size does not fit in 64 bits")]
    SizeOverflow,
    #[error("chunk payload not followed by CRLF")]
    MissingCrlf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkedProgress {
    /// The body continues in later bytes.
    NeedMore,
    /// The body ended; the cursor is just past it.
    Done,
}

impl ChunkedDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that joins a body at an unknown point: it waits for the last chunk at the
    /// end of a syscall.
    pub fn unsynced() -> Self {
        Self {
            state: State::Unsynced {
                recent: Recent::default(),
            },
            body_bytes: 0,
        }
    }

    pub fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// False once framing was lost (the end is then guessed from the syscalls' last bytes).
    pub fn is_synced(&self) -> bool {
        !matches!(self.state, State::Unsynced { .. })
    }

    /// Synced, and the next byte is framing (a size line, CRLF, trailer), not payload.
    pub fn expects_framing(&self) -> bool {
        !matches!(
            self.state,
            State::Data { .. } | State::Unsynced { .. } | State::Done
        )
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Consumes body bytes from `cursor` (positioned in one syscall's bytes) until the body
    /// ends or the syscall's bytes run out.
    pub fn advance(&mut self, cursor: &mut Cursor<'_>) -> Result<ChunkedProgress, ChunkedError> {
        loop {
            match self.state {
                State::Done => return Ok(ChunkedProgress::Done),
                State::Unsynced { recent } => return Ok(self.advance_unsynced(recent, cursor)),
                State::Data { remaining } => {
                    let skipped = cursor.skip(remaining);
                    self.body_bytes = self.body_bytes.saturating_add(skipped);
                    self.state = match remaining - skipped {
                        0 => State::DataCr,
                        remaining => State::Data { remaining },
                    };
                    if remaining > skipped {
                        return Ok(ChunkedProgress::NeedMore);
                    }
                }
                _ if cursor.is_empty() => return Ok(ChunkedProgress::NeedMore),
                // Framing in bytes we cannot see: give up on following it.
                _ if cursor.is_lost() => {
                    self.state = State::Unsynced {
                        recent: Recent::default(),
                    }
                }
                _ => self.read_framing(cursor)?,
            }
        }
    }

    /// Reads framing bytes until payload starts, the body ends or the visible bytes run out.
    fn read_framing(&mut self, cursor: &mut Cursor<'_>) -> Result<(), ChunkedError> {
        let bytes = cursor.visible();
        let mut used = 0;
        for &b in bytes {
            used += 1;
            self.state = self.framing_step(b)?;
            if matches!(self.state, State::Data { .. } | State::Done) {
                break;
            }
        }
        cursor.consume_visible(used);
        Ok(())
    }

    fn framing_step(&self, b: u8) -> Result<State, ChunkedError> {
        Ok(match (self.state, b) {
            (State::Size { value, digits }, _) if b.is_ascii_hexdigit() => {
                if digits >= 16 {
                    return Err(ChunkedError::SizeOverflow);
                }
                let digit = (b as char).to_digit(16).unwrap_or(0);
                State::Size {
                    value: (value << 4) | u64::from(digit),
                    digits: digits + 1,
                }
            }
            (State::Size { digits: 0, .. }, _) => return Err(ChunkedError::InvalidSize(b)),
            (State::Size { value, .. }, b';' | b' ' | b'\t') => State::Extension { value },
            (State::Size { value, .. } | State::Extension { value }, b'\r') => {
                State::SizeLf { value }
            }
            (
                State::Size { value, .. } | State::Extension { value } | State::SizeLf { value },
                b'\n',
            ) => match value {
                0 => State::TrailerStart,
                remaining => State::Data { remaining },
            },
            (State::Size { .. } | State::SizeLf { .. }, _) => {
                return Err(ChunkedError::InvalidSize(b))
            }
            (State::Extension { .. }, _) => self.state,
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataCr | State::DataLf, b'\n') => State::default(),
            (State::DataCr | State::DataLf, _) => return Err(ChunkedError::MissingCrlf),
            (State::TrailerStart, b'\r') => State::TrailerEndLf,
            (State::TrailerStart | State::TrailerEndLf, b'\n') => State::Done,
            (State::TrailerLine, b'\n') => State::TrailerStart,
            (State::TrailerStart | State::TrailerLine | State::TrailerEndLf, _) => {
                State::TrailerLine
            }
            // Not framing states; `advance` never asks.
            (State::Data { .. } | State::Unsynced { .. } | State::Done, _) => self.state,
        })
    }

    /// Counts the rest of the syscall as body; the body ended if the syscall ends with the
    /// last chunk.
    fn advance_unsynced(&mut self, mut recent: Recent, cursor: &mut Cursor<'_>) -> ChunkedProgress {
        while !cursor.is_empty() {
            let visible = cursor.visible();
            if visible.is_empty() {
                // A blind gap, then the tail: only the tail is contiguous with the end.
                recent = Recent::default();
                recent.push(cursor.tail());
                let skipped = cursor.skip_to_end();
                self.body_bytes = self.body_bytes.saturating_add(skipped);
            } else {
                recent.push(visible);
                self.body_bytes = self.body_bytes.saturating_add(visible.len() as u64);
                cursor.consume_visible(visible.len());
            }
        }
        if recent.ends_with_last_chunk() {
            self.state = State::Done;
            ChunkedProgress::Done
        } else {
            self.state = State::Unsynced { recent };
            ChunkedProgress::NeedMore
        }
    }
}

/// The last (up to 8) bytes seen, newest in the low byte.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Recent {
    bytes: u64,
    len: u8,
}

impl Recent {
    const LAST_CHUNK: u64 = 0x30_0D_0A_0D_0A; // "0\r\n\r\n"

    fn push(&mut self, more: &[u8]) {
        let newest = more.get(more.len().saturating_sub(8)..).unwrap_or_default();
        for &b in newest {
            self.bytes = (self.bytes << 8) | u64::from(b);
        }
        self.len = self.len.saturating_add(newest.len() as u8).min(8);
    }

    /// Ends with `0\r\n\r\n` that is a whole chunk size (not the end of `10\r\n\r\n`).
    fn ends_with_last_chunk(&self) -> bool {
        if self.len < 5 || self.bytes & 0xFF_FFFF_FFFF != Self::LAST_CHUNK {
            return false;
        }
        let before = (self.bytes >> 40) as u8;
        self.len == 5 || !before.is_ascii_hexdigit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds fully captured pieces; returns (done, bytes consumed from the last piece).
    fn feed(decoder: &mut ChunkedDecoder, pieces: &[&[u8]]) -> (ChunkedProgress, usize) {
        let mut last = (ChunkedProgress::NeedMore, 0);
        for piece in pieces {
            let mut cursor = Cursor::new(piece, piece.len(), &[]);
            let progress = decoder.advance(&mut cursor);
            let Ok(progress) = progress else {
                panic!("decode error {progress:?}")
            };
            last = (progress, piece.len() - cursor.visible().len());
        }
        last
    }

    const BODY: &[u8] =
        b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\nNEXT";

    #[test]
    fn whole_body_at_once() {
        let mut d = ChunkedDecoder::new();
        let (progress, used) = feed(&mut d, &[BODY]);
        assert_eq!(progress, ChunkedProgress::Done);
        assert_eq!(used, BODY.len() - 4);
        assert_eq!(d.body_bytes(), 4 + 5 + 14);
        assert!(d.is_done() && d.is_synced());
    }

    #[test]
    fn every_split_position() {
        for a in 0..BODY.len() {
            for b in a..BODY.len() {
                let (x, rest) = BODY.split_at(a);
                let (y, z) = rest.split_at(b - a);
                let mut d = ChunkedDecoder::new();
                let mut done_at = None;
                for (i, piece) in [x, y, z].iter().enumerate() {
                    if let (ChunkedProgress::Done, used) = feed(&mut d, &[piece]) {
                        done_at = Some((i, used));
                        break;
                    }
                }
                assert!(done_at.is_some(), "split {a}/{b}");
                assert_eq!(d.body_bytes(), 23, "split {a}/{b}");
            }
        }
    }

    #[test]
    fn trailers_are_skipped() {
        let mut d = ChunkedDecoder::new();
        let (p, used) = feed(&mut d, &[b"3\r\nabc\r\n0\r\nX-Sum: 1\r\nY: 2\r\n\r\nGET"]);
        assert_eq!(p, ChunkedProgress::Done);
        assert_eq!(used, 29);
        assert_eq!(d.body_bytes(), 3);
    }

    #[test]
    fn bare_lf_line_ends_are_tolerated() {
        let mut d = ChunkedDecoder::new();
        assert_eq!(feed(&mut d, &[b"3\nabc\n0\n\n"]).0, ChunkedProgress::Done);
    }

    #[test]
    fn framing_errors() {
        let decode = |body: &[u8]| {
            let mut cursor = Cursor::new(body, body.len(), &[]);
            ChunkedDecoder::new().advance(&mut cursor)
        };
        assert_eq!(decode(b"xyz\r\n"), Err(ChunkedError::InvalidSize(b'x')));
        assert_eq!(decode(b"\r\n"), Err(ChunkedError::InvalidSize(b'\r')));
        assert_eq!(decode(b"3\r\nabcX"), Err(ChunkedError::MissingCrlf));
        assert_eq!(decode(b"3\rX"), Err(ChunkedError::InvalidSize(b'X')));
        assert_eq!(
            decode(b"11111111111111111\r\n"),
            Err(ChunkedError::SizeOverflow)
        );
        assert_eq!(
            decode(b"ffffffffffffffff\r\n"),
            Ok(ChunkedProgress::NeedMore)
        );
    }

    #[test]
    fn uncaptured_payload_is_skipped_by_count() {
        // One syscall: size line, 20000 payload bytes, CRLF; 8192 captured, tail 16.
        let mut full = b"4e20\r\n".to_vec();
        full.extend(std::iter::repeat_n(b'x', 20_000));
        full.extend_from_slice(b"\r\n");
        let tail = &full[full.len() - 16..];
        let mut d = ChunkedDecoder::new();
        let mut cursor = Cursor::new(&full[..8192], full.len(), tail);
        assert_eq!(d.advance(&mut cursor), Ok(ChunkedProgress::NeedMore));
        assert!(d.is_synced());
        assert_eq!(feed(&mut d, &[b"0\r\n\r\n"]).0, ChunkedProgress::Done);
        assert_eq!(d.body_bytes(), 20_000);
    }

    #[test]
    fn lost_framing_ends_on_the_last_chunk_in_the_tail() {
        // Two chunks and the last chunk in one write; framing after the first chunk's
        // payload is beyond the captured prefix and the tail.
        let mut full = b"2000\r\n".to_vec();
        full.extend(std::iter::repeat_n(b'a', 0x2000));
        full.extend_from_slice(b"\r\n2000\r\n");
        full.extend(std::iter::repeat_n(b'b', 0x2000));
        full.extend_from_slice(b"\r\n0\r\n\r\n");
        let tail = &full[full.len() - 16..];
        let mut d = ChunkedDecoder::new();
        let mut cursor = Cursor::new(&full[..8192], full.len(), tail);
        assert_eq!(d.advance(&mut cursor), Ok(ChunkedProgress::Done));
        assert!(cursor.is_empty() && d.is_done());
        assert_eq!(d.body_bytes(), full.len() as u64 - 6);
    }

    #[test]
    fn unsynced_waits_for_a_syscall_ending_with_the_last_chunk() {
        let mut d = ChunkedDecoder::new();
        let mut first = b"100\r\n".to_vec();
        first.extend(std::iter::repeat_n(b'a', 0x100));
        first.extend_from_slice(b"\r\n100\r\n");
        first.extend(std::iter::repeat_n(b'b', 0x100));
        let tail = &first[first.len() - 16..];
        let mut cursor = Cursor::new(&first[..100], first.len(), tail);
        assert_eq!(d.advance(&mut cursor), Ok(ChunkedProgress::NeedMore));
        assert!(!d.is_synced());
        // "10\r\n\r\n" is a chunk size followed by payload, not the end.
        assert_eq!(
            feed(&mut d, &[b"\r\n10\r\n\r\n"]).0,
            ChunkedProgress::NeedMore
        );
        // The last chunk split over two syscalls is still seen.
        assert_eq!(
            feed(&mut d, &[b"abcdefghijklmn\r\n0\r"]).0,
            ChunkedProgress::NeedMore
        );
        assert_eq!(feed(&mut d, &[b"\n\r\n"]).0, ChunkedProgress::Done);
    }

    #[test]
    fn recent_bytes_window() {
        let mut r = Recent::default();
        r.push(b"0\r\n\r\n");
        assert!(r.ends_with_last_chunk());
        r.push(b"x");
        assert!(!r.ends_with_last_chunk());
        r.push(b"\r\na0\r\n\r\n");
        assert!(!r.ends_with_last_chunk());
        r.push(b"\n0\r\n\r\n");
        assert!(r.ends_with_last_chunk());
    }
}
