//! The capture thread yields the CPU to the services it observes while it keeps up.
//!
//! Each drain is a burst of pipeline work (~0.2 ms for [`DRAIN_TARGET`] records). At the
//! same priority as the service, a burst that starts while the service's CPU is idle holds
//! it when the next request arrives: the scheduler favours a thread that slept, and the
//! request waits the burst out (nginx at a fixed 49,000 requests/s, the agent capturing:
//! p99 +90 µs, finding 26 in BENCHMARKS.md). As `SCHED_IDLE` the thread runs only on a
//! CPU nothing else wants, and a thread that wakes there takes the CPU at once.
//!
//! An idle-class thread gets almost no CPU while the CPUs are busy, and a busy nginx fills
//! its ring in ~50 ms. So a rescuer thread at normal priority waits on the rings for the
//! wakeups the kernel programs force each time a CPU has written a share of its ring
//! (edge-triggered: data merely being there does not wake it), reads how full each ring
//! is, and puts the capture thread back to normal priority once one is [`RESCUE_FILL`]
//! full. The capture thread goes back to idle once its drains are small again and
//! [`KEEP_NORMAL`] has passed, so that a saturated host does not flip it every drain.
//! Scheduling classes act within a CPU cgroup: pods, and services with their own CPU
//! cgroups, compete by their cgroups' weights whatever their threads' class.
//!
//! [`DRAIN_TARGET`]: super::reader::DRAIN_TARGET
use std::{
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use super::ring::RingLevel;
use crate::sched::{can_come_back, Class, YieldingThread};

/// A ring this full (written, not yet consumed) means the capture thread is left behind.
pub const RESCUE_FILL: f64 = 0.125;
/// Least time at normal priority after a rescue.
pub const KEEP_NORMAL: Duration = Duration::from_secs(1);
/// A drain of at most this many records is "small": the thread keeps up.
pub const SMALL_DRAIN: u32 = 2 * super::reader::DRAIN_TARGET;
/// The rescuer also looks this often without a wakeup (and sees that it should stop).
const LOOK_EVERY_MS: i32 = 100;

/// What the capture thread does after a drain of `drained` records, in class `now_in`,
/// `since_rescue` after it was last put back to normal.
pub fn after_drain(now_in: Class, drained: u32, since_rescue: Duration) -> Option<Class> {
    (now_in == Class::Normal && drained <= SMALL_DRAIN && since_rescue >= KEEP_NORMAL)
        .then_some(Class::Idle)
}

/// What the rescuer does when the fullest ring is `fill` full.
pub fn rescue(now_in: Class, fill: f64) -> Option<Class> {
    (now_in == Class::Idle && fill >= RESCUE_FILL).then_some(Class::Normal)
}

/// Shared between the capture thread and its rescuer.
#[derive(Debug, Default)]
struct Shared {
    thread: YieldingThread,
    stop: AtomicBool,
}

/// The capture thread's side: [`CpuYield::start`] on the thread, then
/// [`CpuYield::drained`] after each drain.
#[derive(Debug, Clone)]
pub struct CpuYield {
    shared: Arc<Shared>,
}

/// The rescuer thread; stops when dropped.
pub struct Rescuer {
    shared: Arc<Shared>,
    handle: Option<thread::JoinHandle<()>>,
}

impl CpuYield {
    /// A yielding capture thread and its rescuer, started here, watching `rings`.
    pub fn new(rings: Vec<RingLevel>) -> std::io::Result<(Self, Rescuer)> {
        can_come_back()?;
        // SAFETY: epoll_create1 has no preconditions.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd that nothing else owns.
        let epfd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(epfd) };
        for ring in &rings {
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLET) as u32,
                u64: 0,
            };
            // SAFETY: valid fds and event struct.
            if unsafe {
                libc::epoll_ctl(
                    epfd.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    ring.as_raw_fd(),
                    &mut ev,
                )
            } != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        let handle = thread::Builder::new()
            .name("tapir-rescue".into())
            .spawn(move || {
                let mut events = [libc::epoll_event { events: 0, u64: 0 }; 16];
                while !s.stop.load(Ordering::Acquire) {
                    // SAFETY: a valid epoll fd and event buffer.
                    unsafe {
                        libc::epoll_wait(
                            epfd.as_raw_fd(),
                            events.as_mut_ptr(),
                            events.len() as libc::c_int,
                            LOOK_EVERY_MS,
                        )
                    };
                    if !s.thread.started() {
                        continue;
                    }
                    let fill = rings.iter().map(RingLevel::fill).fold(0.0, f64::max);
                    if rescue(s.thread.class(), fill) == Some(Class::Normal) && s.thread.rescue() {
                        tracing::debug!(
                            fill,
                            "capture thread back to normal priority: busy CPUs left it behind"
                        );
                    }
                }
            })?;
        Ok((
            Self {
                shared: shared.clone(),
            },
            Rescuer {
                shared,
                handle: Some(handle),
            },
        ))
    }

    /// On the capture thread: registers it and makes it idle-class. An error (a
    /// container without the right to change it) leaves it at normal priority.
    pub fn start(&self) -> std::io::Result<()> {
        self.shared.thread.start()
    }

    /// On the capture thread, after a drain of `drained` records.
    pub fn drained(&self, drained: u32) {
        let t = &self.shared.thread;
        if !t.started() || t.class() == Class::Idle {
            return;
        }
        if after_drain(Class::Normal, drained, t.since_rescue()) == Some(Class::Idle) {
            t.go_idle();
        }
    }
}

impl Rescuer {
    /// Times the capture thread was put back to normal priority.
    pub fn rescues(&self) -> u64 {
        self.shared.thread.rescues()
    }
}

impl Drop for Rescuer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn rescued_only_when_idle_and_a_ring_fills() {
        assert_eq!(rescue(Class::Idle, 0.125), Some(Class::Normal));
        assert_eq!(rescue(Class::Idle, 0.9), Some(Class::Normal));
        assert_eq!(rescue(Class::Idle, 0.1), None);
        assert_eq!(rescue(Class::Normal, 0.9), None); // already competing
        assert_eq!(rescue(Class::Idle, f64::NAN), None);
    }

    #[test]
    fn back_to_idle_once_drains_are_small_and_a_second_has_passed() {
        assert_eq!(after_drain(Class::Normal, 100, MS(1000)), Some(Class::Idle));
        assert_eq!(
            after_drain(Class::Normal, SMALL_DRAIN, MS(5000)),
            Some(Class::Idle)
        );
        // Still catching up, or just rescued: stays normal.
        assert_eq!(after_drain(Class::Normal, SMALL_DRAIN + 1, MS(5000)), None);
        assert_eq!(after_drain(Class::Normal, 10, MS(999)), None);
        assert_eq!(after_drain(Class::Idle, 10, MS(5000)), None);
    }

    #[test]
    fn the_capture_thread_goes_idle_on_start() {
        let (cy, rescuer) = CpuYield::new(Vec::new()).expect("rescuer thread");
        let worker = thread::spawn(move || {
            cy.start().expect("root may set SCHED_IDLE");
            // SAFETY: reads this thread's policy.
            let idle = unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE;
            // With no ring filling, nothing puts it back.
            thread::sleep(MS(150));
            // SAFETY: as above.
            let still = unsafe { libc::sched_getscheduler(0) } == libc::SCHED_IDLE;
            (idle, still)
        });
        let (idle, still) = worker.join().expect("worker");
        assert!(idle && still);
        assert_eq!(rescuer.rescues(), 0);
        drop(rescuer);
    }
}
