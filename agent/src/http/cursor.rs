//! A read position over the bytes one syscall moved, of which only a prefix and the last
//! few bytes were captured.
//!
//! Layout of a syscall's bytes: `[visible prefix][unseen ... [tail]]`. Parsers consume the
//! visible bytes and skip unseen ones by count. When everything left is inside the tail,
//! the tail becomes visible again, which keeps framing in sync across most large writes.

/// See the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor<'a> {
    visible: &'a [u8],
    /// Bytes after `visible` that were not captured.
    unseen: u64,
    /// The last bytes of the unseen part (never longer than `unseen`).
    tail: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// `data` is the captured prefix of `total` bytes, `tail` the last bytes moved (it may
    /// overlap `data` when little was left uncaptured; the overlap is ignored).
    pub fn new(data: &'a [u8], total: usize, tail: &'a [u8]) -> Self {
        let unseen = total.saturating_sub(data.len());
        let mut cursor = Self {
            visible: data,
            unseen: unseen as u64,
            tail: last_bytes(tail, unseen),
        };
        cursor.reveal_tail();
        cursor
    }

    /// The captured bytes at the read position (empty if the next byte was not captured).
    pub fn visible(&self) -> &'a [u8] {
        self.visible
    }

    /// Uncaptured bytes after [`Self::visible`].
    pub fn unseen(&self) -> u64 {
        self.unseen
    }

    /// The last bytes of the syscall, when they lie beyond the read position's blind spot.
    pub fn tail(&self) -> &'a [u8] {
        self.tail
    }

    /// Nothing is left of the syscall.
    pub fn is_empty(&self) -> bool {
        self.visible.is_empty() && self.unseen == 0
    }

    /// The next byte exists but was not captured: whatever structure starts there is blind.
    pub fn is_lost(&self) -> bool {
        self.visible.is_empty() && self.unseen > 0
    }

    /// Bytes left, seen or not.
    pub fn remaining(&self) -> u64 {
        self.visible.len() as u64 + self.unseen
    }

    /// Consumes `n` visible bytes (at most all of them).
    pub fn consume_visible(&mut self, n: usize) {
        let n = n.min(self.visible.len());
        self.visible = self.visible.get(n..).unwrap_or_default();
        self.reveal_tail();
    }

    /// Skips up to `n` bytes, seen or not; returns how many were skipped (fewer only when
    /// the syscall's bytes ran out).
    pub fn skip(&mut self, n: u64) -> u64 {
        let mut skipped = 0;
        // At most: the visible part, the blind part, the revealed tail.
        while skipped < n && !self.is_empty() {
            let want = n - skipped;
            if self.visible.is_empty() {
                let blind = want.min(self.unseen);
                self.unseen -= blind;
                self.tail = last_bytes(self.tail, self.unseen as usize);
                self.reveal_tail();
                skipped += blind;
            } else {
                let seen = want.min(self.visible.len() as u64);
                self.consume_visible(seen as usize);
                skipped += seen;
            }
        }
        skipped
    }

    /// Skips everything left; returns how many bytes that was.
    pub fn skip_to_end(&mut self) -> u64 {
        self.skip(u64::MAX)
    }

    /// Moves to offset `at` inside the tail: what lies before is skipped, the rest of the
    /// tail becomes visible.
    pub fn resume_in_tail(&mut self, at: usize) {
        let before_tail = self.remaining() - self.tail.len() as u64;
        self.skip(before_tail.saturating_add(at as u64));
    }

    /// When all that is left is the tail, it is visible after all.
    fn reveal_tail(&mut self) {
        if self.visible.is_empty() && self.unseen > 0 && self.unseen == self.tail.len() as u64 {
            self.visible = self.tail;
            self.unseen = 0;
            self.tail = &[];
        }
    }
}

/// The last `n` bytes of `bytes` (all of them if shorter).
fn last_bytes(bytes: &[u8], n: usize) -> &[u8] {
    bytes
        .get(bytes.len().saturating_sub(n)..)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fully_captured_syscall_is_all_visible() {
        let mut c = Cursor::new(b"hello", 5, &[]);
        assert_eq!(c.visible(), b"hello");
        assert!(!c.is_lost());
        c.consume_visible(2);
        assert_eq!(c.visible(), b"llo");
        assert_eq!(c.skip(10), 3);
        assert!(c.is_empty());
    }

    #[test]
    fn skipping_into_the_tail_reveals_it() {
        // 4 captured, 20 moved, the last 6 known.
        let mut c = Cursor::new(b"abcd", 20, b"uvwxyz");
        assert_eq!(c.remaining(), 20);
        c.consume_visible(4);
        assert!(c.is_lost());
        assert_eq!(c.tail(), b"uvwxyz");
        assert_eq!(c.skip(12), 12);
        assert_eq!(c.visible(), b"wxyz");
        assert!(!c.is_lost());
    }

    #[test]
    fn a_tail_overlapping_the_prefix_is_trimmed() {
        let c = Cursor::new(b"abcdef", 8, b"cdefgh");
        assert_eq!(c.visible(), b"abcdef");
        assert_eq!(c.unseen(), 2);
        assert_eq!(c.tail(), b"gh");
        let mut c = c;
        c.consume_visible(6);
        assert_eq!(c.visible(), b"gh");
    }

    #[test]
    fn one_skip_crosses_prefix_and_revealed_tail() {
        let mut c = Cursor::new(b"ab", 10, b"cdefghij");
        assert_eq!(c.skip(5), 5);
        assert_eq!(c.visible(), b"fghij");
        let mut c = Cursor::new(b"ab", 30, b"0123456789");
        assert_eq!(c.skip(25), 25);
        assert_eq!(c.visible(), b"56789");
        assert_eq!(c.skip(100), 5);
    }

    #[test]
    fn resume_in_tail_skips_the_blind_part() {
        let mut c = Cursor::new(b"ab", 100, b"0123456789");
        c.consume_visible(2);
        c.resume_in_tail(4);
        assert_eq!(c.visible(), b"456789");
        assert_eq!(c.remaining(), 6);
    }

    #[test]
    fn sendfile_without_tail_is_lost_until_skipped() {
        let mut c = Cursor::new(&[], 1000, &[]);
        assert!(c.is_lost());
        assert_eq!(c.skip(400), 400);
        assert_eq!(c.skip_to_end(), 600);
        assert!(c.is_empty());
    }
}
