//! Drains the kernel's event rings on a dedicated thread.
//!
//! The kernel submits records without waking us (a wakeup per record would cost every
//! observed syscall an IPI); each CPU forces a wakeup only after it has written a share of
//! its ring (`TAPIR_WAKEUP_BYTES`, see the loader), so the reader polls with a short
//! timeout and drains whatever is there, the rings (one per CPU) merged into one order by
//! [`Merger`], in place.
use std::{
    os::fd::{AsFd, AsRawFd},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use super::{
    merge::{Merger, SLACK_NS},
    ring::{EventRing, RingError},
    yielding::CpuYield,
};
use crate::{clock, loader::Attached};

#[derive(Debug, thiserror::Error)]
pub enum RingsError {
    #[error("the eBPF object has no event ring {0}")]
    Missing(&'static str),
    #[error("opening event ring {name}")]
    Open {
        name: &'static str,
        #[source]
        source: RingError,
    },
}

/// The event rings CPUs write to, taken out of the loaded object.
pub fn take_rings(attached: &mut Attached) -> Result<Vec<EventRing>, RingsError> {
    agent_common::names::EVENT_RINGS
        .iter()
        .take(attached.rings_used.max(1))
        .map(|&name| {
            let map = match attached.ebpf.take_map(name) {
                Some(aya::maps::Map::RingBuf(data)) => data,
                _ => return Err(RingsError::Missing(name)),
            };
            EventRing::new(map).map_err(|source| RingsError::Open { name, source })
        })
        .collect()
}

/// How long the reader sleeps between drains when nothing forces a wakeup. Each drain
/// should be a short burst: a long one holds a CPU that the observed service may be waiting
/// for (at a fixed 10 ms, the burst became nginx's p99 latency). Each wakeup has a fixed
/// cost too (~15 µs on a VM), so the interval follows the record rate: long enough for
/// about [`DRAIN_TARGET`] records, between [`POLL_MIN`] and [`POLL_MAX`] (which bounds
/// capture latency), doubling while nothing comes.
pub const POLL_MIN: Duration = Duration::from_millis(1);
pub const POLL_MAX: Duration = Duration::from_millis(16);
/// Records per drain aimed at: ~0.2–0.5 ms of pipeline work.
pub const DRAIN_TARGET: u32 = 512;

/// The next poll timeout, after a drain that found `drained` records `since` the previous
/// one.
fn next_poll(current: Duration, since: Duration, drained: u32) -> Duration {
    if drained == 0 {
        return (current * 2).clamp(POLL_MIN, POLL_MAX);
    }
    // At the same rate, this interval brings DRAIN_TARGET records.
    since
        .mul_f64(f64::from(DRAIN_TARGET) / f64::from(drained))
        .clamp(POLL_MIN, POLL_MAX)
}

/// What the drain loop feeds.
pub trait RecordSink {
    /// One ring-buffer record.
    fn on_record(&mut self, bytes: &[u8]);
    /// Called after every drain (and at least every poll interval): time-based work.
    fn on_idle(&mut self);
    /// `n` records came out of the merge older than one already passed on (written to
    /// their ring more than `merge::SLACK_NS` after their stamp).
    fn on_out_of_order(&mut self, _n: u64) {}
}

/// A second fd to wake on (the aya-log buffer) and what to do when it is readable.
pub type ExtraFd<L> = Option<(L, Box<dyn FnMut(&mut L) + Send>)>;

/// Runs until `stop` is set; drains once more before returning so nothing already
/// submitted is lost. `extra` is another fd to wake on (the aya-log buffer) and its handler.
/// `yielding`: the thread is idle-class while it keeps up (see `yielding.rs`).
pub fn drain_loop<S: RecordSink, L: AsFd>(
    mut rings: Vec<EventRing>,
    sink: &mut S,
    stop: &Arc<AtomicBool>,
    mut extra: ExtraFd<L>,
    yielding: Option<&CpuYield>,
) {
    // The rings' fds first, then the extra one.
    let mut fds: Vec<libc::pollfd> = rings
        .iter()
        .map(|r| r.as_raw_fd())
        .chain(extra.as_ref().map(|(l, _)| l.as_fd().as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let mut merger = Merger::default();
    let mut timeout = POLL_MIN;
    let mut last_drain = Instant::now();
    let mut held = false;
    loop {
        let stopping = stop.load(Ordering::Acquire);
        let mut woken = false;
        if !stopping {
            // Records left in a ring make it readable at once: while some are held for
            // the next drain, wait on the timer (and the extra fd) only.
            let fds = &mut fds[if held { rings.len() } else { 0 }..];
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    // Whole milliseconds (poll's unit), rounded up.
                    (timeout.as_micros() as u64).div_ceil(1000).max(1) as libc::c_int,
                )
            };
            woken = !held
                && fds[..rings.len()]
                    .iter()
                    .any(|f| f.revents & libc::POLLIN != 0);
        }
        // One ring is in order as it is; several are merged up to SLACK_NS before now,
        // read before the rings are (see merge.rs).
        let upto = if stopping || rings.len() == 1 {
            u64::MAX
        } else {
            clock::monotonic_now_ns().saturating_sub(SLACK_NS)
        };
        for ring in &mut rings {
            ring.refresh();
        }
        let merged = merger.drain(&mut rings, upto, |r| sink.on_record(r));
        for ring in &mut rings {
            ring.publish();
        }
        if merged.out_of_order > 0 {
            sink.on_out_of_order(merged.out_of_order);
        }
        held = merged.held;
        let now = Instant::now();
        timeout = next_poll(timeout, now - last_drain, merged.records);
        if woken && held {
            // A forced wakeup (the reply to an injected request, whose re-arm cannot wait
            // for the next request; a ring filling) whose newest records are held back for
            // the merge: they are passed on a millisecond later, not at the record rate's
            // pace.
            timeout = POLL_MIN;
        }
        last_drain = now;
        if let Some((l, flush)) = &mut extra {
            flush(l);
        }
        sink.on_idle();
        if let Some(y) = yielding {
            y.drained(merged.records);
        }
        if stopping {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_interval_follows_the_record_rate_within_bounds() {
        let ms = Duration::from_millis;
        // 5120 records in 10 ms: 512 arrive every 1 ms.
        assert_eq!(next_poll(ms(10), ms(10), 5120), ms(1));
        // 512 records in 4 ms: keep 4 ms.
        assert_eq!(next_poll(ms(4), ms(4), 512), ms(4));
        // 64 records in 2 ms: 16 ms would bring 512.
        assert_eq!(next_poll(ms(2), ms(2), 64), ms(16));
        // A trickle never sleeps past POLL_MAX; a flood never polls below POLL_MIN.
        assert_eq!(next_poll(ms(16), ms(16), 1), POLL_MAX);
        assert_eq!(next_poll(ms(1), ms(1), 1_000_000), POLL_MIN);
    }

    #[test]
    fn idle_polls_back_off_to_the_maximum() {
        let mut t = POLL_MIN;
        let mut seen = vec![t];
        for _ in 0..6 {
            t = next_poll(t, t, 0);
            seen.push(t);
        }
        let ms: Vec<u128> = seen.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [1, 2, 4, 8, 16, 16, 16]);
    }
}
