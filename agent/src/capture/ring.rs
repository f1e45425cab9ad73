//! One BPF ring buffer, read in place. aya's `RingBuf` hands out one record at a time and
//! consumes it on drop; merging rings needs to look at every ring's oldest record before
//! choosing which goes first, and to leave records for the next drain without copying
//! them out. The consumer position is published every [`PUBLISH_BYTES`] and at the end of
//! a drain, not per record: a producer reads it on every reserve, and a store per record
//! kept that cache line bouncing between the reader's CPU and the producers'.
//!
//! Layout (kernel/bpf/ringbuf.c): page 0 is the consumer position (read-write); page 1 the
//! producer position; then the data pages, mapped twice in a row so that a record that
//! wraps around is contiguous. Each record is an 8-byte header (length, busy and discard
//! bits) followed by its bytes, padded to 8.
use std::{
    os::fd::{AsFd, AsRawFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, AtomicU64, Ordering},
};

use aya::maps::{MapData, MapError};

use super::merge::Source;

const BUSY_BIT: u32 = 1 << 31;
const DISCARD_BIT: u32 = 1 << 30;
const HEADER_BYTES: u64 = 8;
/// Consumed bytes after which the consumer position is published mid-drain, so that
/// producers see the room freed while a long drain goes on.
const PUBLISH_BYTES: u64 = 256 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("reading the ring buffer's size")]
    Info(#[source] MapError),
    #[error("the ring buffer's size ({0} bytes) is not a power of two of at least a page")]
    Size(u64),
    #[error("mapping the ring buffer into memory")]
    Map(#[source] std::io::Error),
}

/// A shared mapping of part of the ring's fd.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(fd: RawFd, len: usize, prot: libc::c_int, offset: usize) -> Result<Self, RingError> {
        // SAFETY: a fresh shared mapping of `len` bytes of the fd; nothing else aliases it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd,
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(RingError::Map(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast())
            .ok_or_else(|| RingError::Map(std::io::Error::other("mmap returned a null pointer")))?;
        Ok(Self { ptr, len })
    }

    /// The position the kernel keeps in the first 8 bytes of a position page.
    fn position(&self) -> &AtomicU64 {
        // SAFETY: the first 8 bytes of a page-aligned mapping, which lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().cast::<AtomicU64>() }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; no reference into it outlives `self`
        // (slices handed out borrow the ring that owns this mapping).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// SAFETY: the mappings are plain shared memory, accessed through atomics where the kernel
// writes concurrently; the ring is used by one thread at a time.
unsafe impl Send for Mapping {}

pub struct EventRing {
    /// Owns the fd the mappings were made from.
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: u64,
    /// Records before this position are consumed (published or not).
    pos: u64,
    /// The last position published to the kernel.
    published: u64,
    /// The producer's position at the last [`EventRing::refresh`].
    end: u64,
    /// Where the record [`EventRing::peek`] returned ends.
    next: u64,
}

impl EventRing {
    pub fn new(map: MapData) -> Result<Self, RingError> {
        let size = u64::from(map.info().map_err(RingError::Info)?.max_entries());
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        if !size.is_power_of_two() || size < page as u64 {
            return Err(RingError::Size(size));
        }
        let fd = map.fd().as_fd().as_raw_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * size as usize, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: size - 1,
            pos: 0,
            published: 0,
            end: 0,
            next: 0,
        };
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.published = ring.pos;
        ring.end = ring.pos;
        ring.next = ring.pos;
        Ok(ring)
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        self.consumer.position()
    }

    fn producer_pos(&self) -> &AtomicU64 {
        self.producer.position()
    }

    /// Takes in the records producers have committed so far.
    pub fn refresh(&mut self) {
        self.end = self.producer_pos().load(Ordering::Acquire);
    }

    /// Tells the kernel how far this ring has been read: the room before it is free again.
    pub fn publish(&mut self) {
        if self.published != self.pos {
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.published = self.pos;
        }
    }
}

impl EventRing {
    /// A view of how full this ring is, for another thread: its own copy of the fd (to
    /// wait on) and its own read-only mappings of the two position pages.
    pub fn level(&self) -> Result<RingLevel, RingError> {
        let fd = self
            .map
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(RingError::Map)?;
        let raw = fd.as_raw_fd();
        Ok(RingLevel {
            consumer: Mapping::new(raw, self.page, libc::PROT_READ, 0)?,
            producer: Mapping::new(raw, self.page, libc::PROT_READ, self.page)?,
            size: self.mask + 1,
            fd,
        })
    }
}

/// How full an event ring is (see [`EventRing::level`]).
pub struct RingLevel {
    consumer: Mapping,
    producer: Mapping,
    size: u64,
    fd: std::os::fd::OwnedFd,
}

impl RingLevel {
    /// The share of the ring written and not yet consumed (published), 0 to 1.
    pub fn fill(&self) -> f64 {
        let consumer = self.consumer.position().load(Ordering::Acquire);
        let producer = self.producer.position().load(Ordering::Acquire);
        producer.saturating_sub(consumer) as f64 / self.size as f64
    }
}

impl AsRawFd for RingLevel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Source for EventRing {
    /// The oldest record not yet consumed, among those committed before the last
    /// [`refresh`](EventRing::refresh); `None` when there is none, or when the oldest is
    /// still being written.
    fn peek(&mut self) -> Option<&[u8]> {
        // Positions only grow (a u64 does not wrap); the data offset is masked.
        while self.pos < self.end {
            let offset = (self.pos & self.mask) as usize;
            // SAFETY: `offset` < size, and the data pages (2 × size bytes, from one page
            // into the mapping) hold the 8-byte header there; the kernel commits a record
            // by clearing its busy bit with a full barrier, paired with this acquire.
            let header = unsafe {
                let at = self.producer.ptr.as_ptr().add(self.page + offset);
                (*at.cast::<AtomicU32>()).load(Ordering::Acquire)
            };
            if header & BUSY_BIT != 0 {
                return None;
            }
            let len = u64::from(header & !(BUSY_BIT | DISCARD_BIT));
            if len > self.mask {
                // Not a record the kernel could have written: stop reading this ring
                // rather than read past the mapping.
                return None;
            }
            let next = self.pos + (HEADER_BYTES + len).next_multiple_of(8);
            if header & DISCARD_BIT != 0 {
                self.pos = next;
                continue;
            }
            self.next = next;
            // SAFETY: offset + 8 + len ≤ 2 × size: the record lies within the doubled data
            // pages; the kernel does not rewrite it before the consumer position passes it.
            return Some(unsafe {
                let at = self.producer.ptr.as_ptr().add(self.page + offset + 8);
                std::slice::from_raw_parts(at, len as usize)
            });
        }
        None
    }

    /// Consumes the record `peek` just returned.
    fn consume(&mut self) {
        self.pos = self.pos.max(self.next);
        if self.pos - self.published >= PUBLISH_BYTES {
            self.publish();
        }
    }
}

impl AsRawFd for EventRing {
    fn as_raw_fd(&self) -> RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
