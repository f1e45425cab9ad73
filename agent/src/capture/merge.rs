//! Puts the records of several event rings (one per CPU) back into one order.
//!
//! A record is stamped (`EventHeader::ts_ns`, CLOCK_MONOTONIC) just before it is written,
//! and is in its ring a few hundred nanoseconds later. A record stamped more than
//! [`SLACK_NS`] before the reader started draining was therefore already in its ring, so
//! once every ring has been drained, everything stamped before that point can be released
//! in stamp order; later records wait for the next drain. Records of one thread (or of one
//! connection handed between threads) follow each other in real time, so they come out in
//! the order they happened, whichever CPUs they were written on.
use agent_common::EVENT_TS_OFFSET;

/// How long after its stamp a record may still be on its way into its ring: a program's
/// run, and an interrupt or two. Records wait this long at least before they are released.
pub const SLACK_NS: u64 = 2_000_000;

/// One held record: its stamp and where its bytes are in `Merge::bytes`.
#[derive(Clone, Copy, Debug)]
struct Held {
    ts: u64,
    start: usize,
    len: usize,
}

/// Records copied out of the rings, waiting to be released in stamp order.
#[derive(Default)]
pub struct Merge {
    bytes: Vec<u8>,
    /// The next `bytes`, while the records still held are moved to its start.
    spare: Vec<u8>,
    held: Vec<Held>,
    /// Stamp of the last record released.
    last_released: u64,
}

impl Merge {
    /// Copies a record in; returns its stamp. A record too short to have one sorts first
    /// (the decoder counts it as malformed).
    pub fn push(&mut self, record: &[u8]) -> u64 {
        let ts = stamp(record);
        self.held.push(Held {
            ts,
            start: self.bytes.len(),
            len: record.len(),
        });
        self.bytes.extend_from_slice(record);
        ts
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Hands every record stamped at or before `upto` to `sink`, oldest first (records
    /// with the same stamp in the order they were pushed). Returns how many came out older
    /// than a record released before them: written more than `SLACK_NS` before they were
    /// drained.
    pub fn release(&mut self, upto: u64, mut sink: impl FnMut(&[u8])) -> u64 {
        // Stable, and fast on what it gets: one sorted run per ring.
        self.held.sort_by_key(|h| h.ts);
        let ready = self.held.partition_point(|h| h.ts <= upto);
        let mut late = 0;
        for h in &self.held[..ready] {
            if h.ts < self.last_released {
                late += 1;
            }
            self.last_released = self.last_released.max(h.ts);
            sink(&self.bytes[h.start..h.start + h.len]);
        }
        // The rest move to the start of a fresh buffer: what is held stays small (a few
        // milliseconds of records), whatever passed through.
        self.spare.clear();
        for h in &mut self.held[ready..] {
            let start = self.spare.len();
            self.spare
                .extend_from_slice(&self.bytes[h.start..h.start + h.len]);
            h.start = start;
        }
        self.held.drain(..ready);
        std::mem::swap(&mut self.bytes, &mut self.spare);
        late
    }
}

fn stamp(record: &[u8]) -> u64 {
    record
        .get(EVENT_TS_OFFSET..EVENT_TS_OFFSET + 8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A record with stamp `ts` and a tag byte after it.
    fn record(ts: u64, tag: u8) -> Vec<u8> {
        let mut r = vec![0u8; EVENT_TS_OFFSET];
        r.extend_from_slice(&ts.to_ne_bytes());
        r.push(tag);
        r
    }

    fn released(m: &mut Merge, upto: u64) -> (Vec<(u64, u8)>, u64) {
        let mut out = Vec::new();
        let late = m.release(upto, |r| out.push((stamp(r), r[r.len() - 1])));
        (out, late)
    }

    #[test]
    fn two_rings_come_out_in_stamp_order_and_later_records_wait() {
        let mut m = Merge::default();
        // Ring 0 then ring 1, each in its own order.
        for (ts, tag) in [(10, b'a'), (30, b'c'), (50, b'e')] {
            m.push(&record(ts, tag));
        }
        for (ts, tag) in [(20, b'b'), (40, b'd'), (60, b'f')] {
            m.push(&record(ts, tag));
        }
        let (out, late) = released(&mut m, 40);
        assert_eq!(out, [(10, b'a'), (20, b'b'), (30, b'c'), (40, b'd')]);
        assert_eq!(late, 0);
        assert_eq!(m.len(), 2);
        // The held two keep their bytes through the move, and merge with new ones.
        m.push(&record(55, b'x'));
        let (out, late) = released(&mut m, u64::MAX);
        assert_eq!(out, [(50, b'e'), (55, b'x'), (60, b'f')]);
        assert_eq!(late, 0);
        assert!(m.is_empty());
    }

    #[test]
    fn equal_stamps_keep_their_push_order() {
        let mut m = Merge::default();
        for tag in [b'1', b'2', b'3'] {
            m.push(&record(7, tag));
        }
        let (out, _) = released(&mut m, 7);
        assert_eq!(out, [(7, b'1'), (7, b'2'), (7, b'3')]);
    }

    #[test]
    fn a_record_older_than_one_released_is_counted_late_and_still_delivered() {
        let mut m = Merge::default();
        m.push(&record(100, b'a'));
        released(&mut m, 100);
        m.push(&record(90, b'b'));
        let (out, late) = released(&mut m, 200);
        assert_eq!(out, [(90, b'b')]);
        assert_eq!(late, 1);
    }

    #[test]
    fn records_too_short_for_a_stamp_are_passed_on_first() {
        let mut m = Merge::default();
        m.push(&record(5, b'a'));
        m.push(&[1, 2, 3]);
        m.push(&[]);
        let mut out = Vec::new();
        m.release(5, |r| out.push(r.to_vec()));
        assert_eq!(out, [vec![1, 2, 3], vec![], record(5, b'a')]);
    }

    proptest! {
        /// Whatever the rings hold and wherever the cut-offs fall, every record comes out
        /// exactly once, bytes intact, each release in stamp order.
        #[test]
        fn every_record_comes_out_once_and_in_order(
            rings in proptest::collection::vec(
                proptest::collection::vec((0u64..1000, any::<u8>()), 0..40), 1..5),
            cuts in proptest::collection::vec(0u64..1200, 0..6),
        ) {
            let mut m = Merge::default();
            let mut pushed: Vec<(u64, u8)> = Vec::new();
            for ring in &rings {
                for &(ts, tag) in ring {
                    m.push(&record(ts, tag));
                    pushed.push((ts, tag));
                }
            }
            let mut out = Vec::new();
            let mut upto = 0;
            for c in cuts {
                upto = upto.max(c);
                let (got, late) = released(&mut m, upto);
                prop_assert_eq!(late, 0);
                prop_assert!(got.windows(2).all(|w| w[0].0 <= w[1].0));
                prop_assert!(got.iter().all(|&(ts, _)| ts <= upto));
                out.extend(got);
            }
            out.extend(released(&mut m, u64::MAX).0);
            prop_assert!(m.is_empty());
            prop_assert!(out.windows(2).all(|w| w[0].0 <= w[1].0));
            let mut a = out.clone();
            let mut b = pushed.clone();
            a.sort();
            b.sort();
            prop_assert_eq!(a, b);
        }
    }
}
