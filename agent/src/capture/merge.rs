//! Puts the records of several event rings (one per CPU) back into one order.
//!
//! A record is stamped (`EventHeader::ts_ns`, CLOCK_MONOTONIC) just before it is written
//! into its ring. If one record follows another in real time (the same thread's next
//! syscall, or the next step of a connection handed to another thread), the first was
//! committed before the second was stamped. So a drain that begins at `T` and then looks
//! at every ring may pass on, oldest first, every record stamped before `T`: whatever
//! preceded them in real time was committed before `T` and is in view. Records stamped
//! later stay in their rings for the next drain (nothing is copied). [`SLACK_NS`] more is
//! left for clock skew between CPUs, and so that records of concurrent calls (no order
//! between them to keep) still being written at `T` rarely come out after newer ones.
use agent_common::EVENT_TS_OFFSET;

/// How far before the drain's start records are passed on.
pub const SLACK_NS: u64 = 100_000;

/// A ring read in place: its oldest unconsumed record, and consuming it.
pub trait Source {
    fn peek(&mut self) -> Option<&[u8]>;
    fn consume(&mut self);
}

/// What a merge passed on.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Merged {
    pub records: u32,
    /// Records stamped before one passed on by an earlier merge (see [`Merger`]).
    pub out_of_order: u64,
    /// Some ring still holds a record stamped after `upto`.
    pub held: bool,
}

/// Merges rings drain after drain; remembers the newest stamp passed on.
#[derive(Default)]
pub struct Merger {
    last: u64,
}

impl Merger {
    /// Passes every record stamped at or before `upto` to `sink`, oldest first across
    /// rings (each ring's own order kept); ties go to the lower ring.
    pub fn drain<R: Source>(
        &mut self,
        rings: &mut [R],
        upto: u64,
        mut sink: impl FnMut(&[u8]),
    ) -> Merged {
        let mut heads: Vec<Option<u64>> = rings.iter_mut().map(head).collect();
        let mut merged = Merged::default();
        loop {
            let mut oldest: Option<(usize, u64)> = None;
            for (i, ts) in heads.iter().enumerate() {
                if let Some(ts) = *ts {
                    if oldest.is_none_or(|(_, o)| ts < o) {
                        oldest = Some((i, ts));
                    }
                }
            }
            let Some((i, ts)) = oldest else { break };
            if ts > upto {
                merged.held = true;
                break;
            }
            if ts < self.last {
                merged.out_of_order += 1;
            }
            self.last = self.last.max(ts);
            let ring = &mut rings[i];
            if let Some(record) = ring.peek() {
                sink(record);
            }
            ring.consume();
            merged.records = merged.records.saturating_add(1);
            heads[i] = head(ring);
        }
        merged
    }
}

/// The stamp of a ring's oldest record. One too short to have one sorts first (the
/// decoder counts it as malformed).
fn head<R: Source>(ring: &mut R) -> Option<u64> {
    ring.peek().map(stamp)
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
    use std::collections::VecDeque;

    /// A ring of whole records, consumed from the front.
    #[derive(Default)]
    struct FakeRing(VecDeque<Vec<u8>>);

    impl Source for FakeRing {
        fn peek(&mut self) -> Option<&[u8]> {
            self.0.front().map(Vec::as_slice)
        }
        fn consume(&mut self) {
            self.0.pop_front();
        }
    }

    /// A record with stamp `ts` and a tag byte after it.
    fn record(ts: u64, tag: u8) -> Vec<u8> {
        let mut r = vec![0u8; EVENT_TS_OFFSET];
        r.extend_from_slice(&ts.to_ne_bytes());
        r.push(tag);
        r
    }

    fn ring(records: &[(u64, u8)]) -> FakeRing {
        FakeRing(records.iter().map(|&(ts, tag)| record(ts, tag)).collect())
    }

    fn merge(m: &mut Merger, rings: &mut [FakeRing], upto: u64) -> (Vec<(u64, u8)>, Merged) {
        let mut out = Vec::new();
        let merged = m.drain(rings, upto, |r| out.push((stamp(r), r[r.len() - 1])));
        (out, merged)
    }

    #[test]
    fn two_rings_come_out_in_stamp_order_and_newer_records_stay_in_their_rings() {
        let mut rings = [
            ring(&[(10, b'a'), (30, b'c'), (50, b'e')]),
            ring(&[(20, b'b'), (40, b'd'), (60, b'f')]),
        ];
        let mut m = Merger::default();
        let (out, merged) = merge(&mut m, &mut rings, 40);
        assert_eq!(out, [(10, b'a'), (20, b'b'), (30, b'c'), (40, b'd')]);
        assert_eq!(
            (merged.records, merged.out_of_order, merged.held),
            (4, 0, true)
        );
        assert_eq!((rings[0].0.len(), rings[1].0.len()), (1, 1));
        // Written since: merged with what stayed.
        rings[1].0.push_back(record(70, b'g'));
        rings[0].0.push_back(record(55, b'x'));
        let (out, merged) = merge(&mut m, &mut rings, u64::MAX);
        assert_eq!(out, [(50, b'e'), (55, b'x'), (60, b'f'), (70, b'g')]);
        assert!(!merged.held);
        assert!(rings.iter().all(|r| r.0.is_empty()));
    }

    #[test]
    fn equal_stamps_go_to_the_lower_ring_first_and_a_ring_keeps_its_own_order() {
        let mut rings = [ring(&[(7, b'1'), (5, b'2')]), ring(&[(7, b'3')])];
        let (out, merged) = merge(&mut Merger::default(), &mut rings, 10);
        // Ring 0's second record is older than its first: a ring is never reordered.
        assert_eq!(out, [(7, b'1'), (5, b'2'), (7, b'3')]);
        assert_eq!(merged.out_of_order, 1);
    }

    #[test]
    fn a_record_older_than_one_passed_on_is_counted_and_still_delivered() {
        let mut m = Merger::default();
        let mut rings = [ring(&[(100, b'a')]), FakeRing::default()];
        merge(&mut m, &mut rings, 100);
        rings[1].0.push_back(record(90, b'b'));
        let (out, merged) = merge(&mut m, &mut rings, 200);
        assert_eq!(out, [(90, b'b')]);
        assert_eq!(merged.out_of_order, 1);
    }

    #[test]
    fn records_too_short_for_a_stamp_are_passed_on_first() {
        let mut rings = [ring(&[(5, b'a')]), FakeRing([vec![1, 2, 3], vec![]].into())];
        let mut out = Vec::new();
        Merger::default().drain(&mut rings, 5, |r| out.push(r.to_vec()));
        assert_eq!(out, [vec![1, 2, 3], vec![], record(5, b'a')]);
    }

    proptest! {
        /// Whatever the rings hold (each in stamp order, as one CPU writes them) and
        /// wherever the drains stop, every record comes out exactly once, bytes intact, in
        /// stamp order, none out of order.
        #[test]
        fn every_record_comes_out_once_and_in_order(
            stamps in proptest::collection::vec(
                proptest::collection::vec((0u64..1000, any::<u8>()), 0..40), 1..5),
            cuts in proptest::collection::vec(0u64..1200, 0..6),
        ) {
            let mut rings: Vec<FakeRing> = stamps
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.sort_by_key(|&(ts, _)| ts);
                    ring(&r)
                })
                .collect();
            let mut pushed: Vec<(u64, u8)> = stamps.concat();
            let mut m = Merger::default();
            let mut out = Vec::new();
            let mut upto = 0;
            for c in cuts {
                upto = upto.max(c);
                let (got, merged) = merge(&mut m, &mut rings, upto);
                prop_assert_eq!(merged.out_of_order, 0);
                prop_assert_eq!(merged.records as usize, got.len());
                prop_assert!(got.iter().all(|&(ts, _)| ts <= upto));
                out.extend(got);
            }
            out.extend(merge(&mut m, &mut rings, u64::MAX).0);
            prop_assert!(rings.iter().all(|r| r.0.is_empty()));
            prop_assert!(out.windows(2).all(|w| w[0].0 <= w[1].0));
            out.sort();
            pushed.sort();
            prop_assert_eq!(out, pushed);
        }
    }
}
