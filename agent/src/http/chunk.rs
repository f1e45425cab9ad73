//! One syscall's worth of payload, as reported by the kernel.

use agent_common::{DIR_EGRESS, DIR_INGRESS};

/// Which way the bytes moved, from the observed process's point of view.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The process read them.
    Ingress,
    /// The process wrote them.
    Egress,
}

impl Direction {
    /// Decodes the kernel's `DataEventHeader::direction`.
    pub fn from_raw(raw: u8) -> Option<Self> {
        match raw {
            DIR_INGRESS => Some(Self::Ingress),
            DIR_EGRESS => Some(Self::Egress),
            _ => None,
        }
    }

    pub fn opposite(self) -> Self {
        match self {
            Self::Ingress => Self::Egress,
            Self::Egress => Self::Ingress,
        }
    }
}

/// The bytes one syscall moved on a connection.
///
/// Only a prefix (`data`) is captured; beyond it only the count (`total`) and the last few
/// bytes (`tail`) are known. Sendfile reports `data` empty and `total > 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk<'a> {
    pub direction: Direction,
    /// Captured prefix of the bytes moved.
    pub data: &'a [u8],
    /// Bytes the syscall actually moved (`data.len() <= total`).
    pub total: usize,
    /// Up to the last [`agent_common::TAIL_BYTES`] bytes moved, only when `data.len() < total`.
    pub tail: &'a [u8],
    /// `CLOCK_MONOTONIC` nanoseconds.
    pub ts_ns: u64,
}

impl<'a> Chunk<'a> {
    /// A chunk whose payload was captured in full.
    pub fn complete(direction: Direction, data: &'a [u8], ts_ns: u64) -> Self {
        Self {
            direction,
            data,
            total: data.len(),
            tail: &[],
            ts_ns,
        }
    }

    /// Bytes moved but not captured.
    pub fn uncaptured(&self) -> usize {
        self.total.saturating_sub(self.data.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directions_decode_from_the_kernel_values() {
        assert_eq!(Direction::from_raw(DIR_INGRESS), Some(Direction::Ingress));
        assert_eq!(Direction::from_raw(DIR_EGRESS), Some(Direction::Egress));
        assert_eq!(Direction::from_raw(7), None);
        assert_eq!(Direction::Ingress.opposite(), Direction::Egress);
    }

    #[test]
    fn uncaptured_counts_the_bytes_beyond_the_prefix() {
        let c = Chunk {
            direction: Direction::Egress,
            data: b"abc",
            total: 10,
            tail: b"j",
            ts_ns: 1,
        };
        assert_eq!(c.uncaptured(), 7);
        assert_eq!(
            Chunk::complete(Direction::Egress, b"abc", 1).uncaptured(),
            0
        );
    }
}
