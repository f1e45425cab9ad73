//! Drains the kernel's ring buffer on a dedicated thread.
//!
//! The kernel submits records without waking us (a wakeup per record would cost every
//! observed syscall an IPI) and forces a wakeup only when a lot is waiting, so the reader
//! polls with a short timeout and drains whatever is there.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use aya::maps::{MapData, RingBuf};

/// How long the reader sleeps when nothing forces a wakeup: bounds capture latency.
pub const POLL_INTERVAL: Duration = Duration::from_millis(10);

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
    loop {
        let stopping = stop.load(Ordering::Acquire);
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
        if !stopping {
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    POLL_INTERVAL.as_millis() as libc::c_int,
                )
            };
        }
        while let Some(item) = ring.next() {
            sink.on_record(&item);
        }
        if let Some((l, flush)) = &mut extra {
            flush(l);
        }
        sink.on_idle();
        if stopping {
            return;
        }
    }
}
