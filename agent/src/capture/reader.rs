//! Drains the kernel's ring buffer on a dedicated thread.
//!
//! The kernel submits records without waking us (a wakeup per record would cost every
//! observed syscall an IPI); each CPU forces a wakeup only after it has written a share of
//! the ring (`TAPIR_WAKEUP_BYTES`, see the loader), so the reader polls with a short
//! timeout and drains whatever is there.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};

/// How long the reader sleeps between drains when nothing forces a wakeup: short while
/// records keep coming, so that each drain is a short burst (a long one holds a CPU that
/// the observed service may be waiting for: at 10 ms the burst was its p99 latency),
/// doubling while idle up to [`POLL_MAX`], which bounds capture latency.
pub const POLL_MIN: Duration = Duration::from_millis(1);
pub const POLL_MAX: Duration = Duration::from_millis(16);

/// The next poll timeout: [`POLL_MIN`] after a drain that found records, else doubled.
fn next_poll(current: Duration, drained: usize) -> Duration {
    if drained > 0 {
        POLL_MIN
    } else {
        (current * 2).min(POLL_MAX)
    }
}

/// What the drain loop feeds.
pub trait RecordSink {
    /// One ring-buffer record.
    fn on_record(&mut self, bytes: &[u8]);
    /// Called after every drain (and at least every poll interval): time-based work.
    fn on_idle(&mut self);
}

/// A second fd to wake on (the aya-log buffer) and what to do when it is readable.
pub type ExtraFd<L> = Option<(L, Box<dyn FnMut(&mut L) + Send>)>;

/// Runs until `stop` is set; drains once more before returning so nothing already
/// submitted is lost. `extra` is another fd to wake on (the aya-log buffer) and its handler.
pub fn drain_loop<S: RecordSink, L: AsFd>(
    mut ring: RingBuf<MapData>,
    sink: &mut S,
    stop: &Arc<AtomicBool>,
    mut extra: ExtraFd<L>,
) {
    let mut fds = vec![libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }];
    if let Some((l, _)) = &extra {
        fds.push(libc::pollfd {
            fd: l.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        });
    }
    let mut timeout = POLL_MIN;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        if !stopping {
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout.as_millis() as libc::c_int,
                )
            };
        }
        let mut drained = 0;
        while let Some(item) = ring.next() {
            sink.on_record(&item);
            drained += 1;
        }
        timeout = next_poll(timeout, drained);
        if let Some((l, flush)) = &mut extra {
            flush(l);
        }
        sink.on_idle();
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_often_while_records_come_and_backs_off_when_idle() {
        assert_eq!(next_poll(POLL_MAX, 1), POLL_MIN);
        let mut t = POLL_MIN;
        let mut seen = vec![t];
        for _ in 0..10 {
            t = next_poll(t, 0);
            seen.push(t);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [1, 2, 4, 8, 16, 16, 16, 16, 16, 16, 16]);
        assert_eq!(next_poll(t, 3), POLL_MIN);
    }
}
