//! Why messages were dropped, counted per connection for the `tapir.*` drop counters.

/// Why a message (or a whole exchange) was not turned into an [`super::Exchange`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A head (or chunked framing) that is not valid HTTP/1.x, or an invalid Content-Length.
    Malformed = 0,
    /// A head with more header fields than [`super::head::MAX_HEADERS`].
    TooManyHeaders = 1,
    /// A head longer than the stream's `max_head_bytes`. Counted even when the exchange
    /// survives (its first `max_head_bytes` stand for the head); the message is dropped
    /// when its start line alone is longer.
    HeadTooLarge = 2,
    /// The capture limit cut a head. Counted even when the exchange survives (then flagged
    /// `request_head_truncated` for requests); the message is dropped when not even its
    /// start line was captured.
    HeadTruncated = 3,
    /// A response arrived with no request waiting for it (the request was missed).
    UnmatchedResponse = 4,
    /// A request whose response was never (completely) seen and that is not reported as
    /// a failed exchange: the agent let go of its connection without seeing it end
    /// (evicted, its fd reused unseen), the connection switched protocols, a later
    /// response showed it would not be answered, or its sender stopped in the middle of
    /// its head (which no span can stand for).
    NoResponse = 5,
    /// Too many pipelined requests waited for responses; the oldest was dropped.
    PipelineOverflow = 6,
    /// The kernel lost records of the connection (its ring was full): a request in flight
    /// then could not be paired with its response, which may have been lost.
    CaptureGap = 7,
}

impl DropReason {
    pub const COUNT: usize = 8;
    pub const ALL: [DropReason; Self::COUNT] = [
        Self::Malformed,
        Self::TooManyHeaders,
        Self::HeadTooLarge,
        Self::HeadTruncated,
        Self::UnmatchedResponse,
        Self::NoResponse,
        Self::PipelineOverflow,
        Self::CaptureGap,
    ];

    /// Stable snake_case name, for metric attributes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::TooManyHeaders => "too_many_headers",
            Self::HeadTooLarge => "head_too_large",
            Self::HeadTruncated => "head_truncated",
            Self::UnmatchedResponse => "unmatched_response",
            Self::NoResponse => "no_response",
            Self::PipelineOverflow => "pipeline_overflow",
            Self::CaptureGap => "capture_gap",
        }
    }
}

/// Counters kept by one [`super::Http1Stream`]; the caller reads or drains them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    drops: [u64; DropReason::COUNT],
    /// Chunks skipped whole while looking for the start of a message.
    pub skipped_chunks: u64,
}

impl StreamStats {
    pub fn record(&mut self, reason: DropReason) {
        if let Some(count) = self.drops.get_mut(reason as usize) {
            *count = count.saturating_add(1);
        }
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops.get(reason as usize).copied().unwrap_or(0)
    }

    pub fn total_drops(&self) -> u64 {
        self.drops.iter().fold(0, |sum, n| sum.saturating_add(*n))
    }

    /// Every reason with its count, in [`DropReason::ALL`] order.
    pub fn iter(&self) -> impl Iterator<Item = (DropReason, u64)> + '_ {
        DropReason::ALL.iter().map(|r| (*r, self.drops(*r)))
    }

    /// Adds `other`'s counts (aggregating connections).
    pub fn add(&mut self, other: &StreamStats) {
        for (mine, theirs) in self.drops.iter_mut().zip(other.drops.iter()) {
            *mine = mine.saturating_add(*theirs);
        }
        self.skipped_chunks = self.skipped_chunks.saturating_add(other.skipped_chunks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_index_their_own_counter() {
        let mut s = StreamStats::default();
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            s.record(*r);
        }
        s.record(DropReason::NoResponse);
        assert_eq!(s.drops(DropReason::NoResponse), 2);
        assert_eq!(s.total_drops(), DropReason::COUNT as u64 + 1);
        let mut sum = StreamStats::default();
        sum.add(&s);
        sum.add(&s);
        assert_eq!(sum.drops(DropReason::Malformed), 2);
        assert_eq!(sum.iter().count(), DropReason::COUNT);
    }
}
