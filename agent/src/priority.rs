//! The agent's threads run at `SCHED_IDLE`: the observed services take the CPU back the
//! moment they wake, so the agent's bursts (a drain of the ring buffer, an export of 512
//! spans) do not sit in front of their requests. Idle-class threads still get CPU time
//! nobody else wants, which on most hosts is plenty.
//!
//! Where there is none, a watchdog at normal priority raises them back to `SCHED_OTHER`
//! before anything is lost: when the capture thread has not finished a drain for
//! [`STALE_DRAIN`] (the ring buffer holds ~200 ms at high rates), or the span queue is a
//! quarter full. All of them at once, so that none waits on a lock held by a starved
//! one. They go back to idle once both have been fine for [`CALM_FOR`].
use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

/// Longest gap between two finished drains before the capture thread counts as starved
/// (drains come at least every 16 ms, see `capture::reader::POLL_MAX`).
pub const STALE_DRAIN: Duration = Duration::from_millis(40);
/// Share of the span queue that raises the threads.
pub const QUEUE_RAISE_PCT: usize = 25;
/// How long everything must look fine before the threads go back to idle.
pub const CALM_FOR: Duration = Duration::from_millis(500);
/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(10);

/// What the watchdog sees at one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    pub since_last_drain: Duration,
    pub queue_len: usize,
    pub queue_cap: usize,
}

impl Backlog {
    fn pressing(&self) -> bool {
        self.since_last_drain >= STALE_DRAIN
            || (self.queue_cap > 0 && self.queue_len * 100 >= self.queue_cap * QUEUE_RAISE_PCT)
    }
}

/// Raised or not, and since when the backlog has been calm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub raised: bool,
    calm_since: Option<Instant>,
}

impl Decision {
    pub const IDLE: Self = Self {
        raised: false,
        calm_since: None,
    };

    /// The next state after looking at `b` at `now`.
    pub fn next(self, b: Backlog, now: Instant) -> Self {
        if b.pressing() {
            return Self {
                raised: true,
                calm_since: None,
            };
        }
        if !self.raised {
            return Self::IDLE;
        }
        let calm_since = self.calm_since.unwrap_or(now);
        if now.duration_since(calm_since) >= CALM_FOR {
            Self::IDLE
        } else {
            Self {
                raised: true,
                calm_since: Some(calm_since),
            }
        }
    }
}

/// The agent's worker threads and their scheduling class.
#[derive(Default)]
pub struct Yielding {
    tids: Mutex<Vec<libc::pid_t>>,
    raised: AtomicBool,
    /// Times the threads were raised to normal priority.
    pub raises: AtomicU64,
    /// Nanoseconds since `epoch` at which the capture thread last finished a drain.
    last_drain_ns: AtomicU64,
    epoch: Option<Instant>,
}

impl Yielding {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            epoch: Some(Instant::now()),
            ..Self::default()
        })
    }

    /// Puts the calling thread in the idle class (or normal, while raised) and keeps it in
    /// the set the watchdog moves.
    pub fn register_current_thread(&self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let mut tids = lock(&self.tids);
        tids.push(tid);
        set_class(tid, self.raised.load(Ordering::Acquire));
    }

    /// The capture thread finished a drain.
    pub fn drained(&self) {
        if let Some(e) = self.epoch {
            self.last_drain_ns
                .store(e.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
    }

    fn since_last_drain(&self) -> Duration {
        let Some(e) = self.epoch else {
            return Duration::ZERO;
        };
        let last = Duration::from_nanos(self.last_drain_ns.load(Ordering::Relaxed));
        e.elapsed().saturating_sub(last)
    }

    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    fn set_all(&self, raised: bool) {
        self.raised.store(raised, Ordering::Release);
        let mut tids = lock(&self.tids);
        // A thread that ended (tokio's blocking pool) is forgotten.
        tids.retain(|&tid| set_class(tid, raised) != Some(libc::ESRCH));
        if raised {
            self.raises.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Starts the watchdog; `queue` reports the span queue's length and capacity.
    pub fn watch(
        self: &Arc<Self>,
        queue: impl Fn() -> (usize, usize) + Send + 'static,
    ) -> std::io::Result<thread::JoinHandle<()>> {
        let me = self.clone();
        thread::Builder::new()
            .name("tapir-watchdog".into())
            .spawn(move || {
                let mut d = Decision::IDLE;
                loop {
                    thread::sleep(WATCH_EVERY);
                    if Arc::strong_count(&me) == 1 {
                        return; // the agent is gone
                    }
                    let (queue_len, queue_cap) = queue();
                    let b = Backlog {
                        since_last_drain: me.since_last_drain(),
                        queue_len,
                        queue_cap,
                    };
                    let next = d.next(b, Instant::now());
                    if next.raised != d.raised {
                        tracing::debug!(raised = next.raised, ?b, "agent thread priority");
                        me.set_all(next.raised);
                    }
                    d = next;
                }
            })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `SCHED_OTHER` when `normal`, else `SCHED_IDLE`; the errno when it failed.
fn set_class(tid: libc::pid_t, normal: bool) -> Option<i32> {
    let param = libc::sched_param { sched_priority: 0 };
    let policy = if normal {
        libc::SCHED_OTHER
    } else {
        libc::SCHED_IDLE
    };
    // SAFETY: a valid sched_param; the tid may have exited (ESRCH).
    let rc = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    (rc != 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backlog(stale_ms: u64, len: usize) -> Backlog {
        Backlog {
            since_last_drain: Duration::from_millis(stale_ms),
            queue_len: len,
            queue_cap: 1000,
        }
    }

    #[test]
    fn raises_on_a_stale_drain_or_a_filling_queue() {
        let t = Instant::now();
        assert!(!Decision::IDLE.next(backlog(5, 0), t).raised);
        assert!(!Decision::IDLE.next(backlog(39, 249), t).raised);
        assert!(Decision::IDLE.next(backlog(40, 0), t).raised);
        assert!(Decision::IDLE.next(backlog(0, 250), t).raised);
        // No queue (nothing exported): only the drain counts.
        let no_queue = Backlog {
            queue_cap: 0,
            ..backlog(0, 0)
        };
        assert!(!Decision::IDLE.next(no_queue, t).raised);
    }

    #[test]
    fn goes_back_to_idle_only_after_a_calm_spell() {
        let t = Instant::now();
        let raised = Decision::IDLE.next(backlog(100, 0), t);
        let calm = backlog(1, 0);
        let d = raised.next(calm, t);
        assert!(d.raised, "calm just started");
        let d = d.next(calm, t + CALM_FOR / 2);
        assert!(d.raised);
        // Pressure again restarts the calm spell.
        let d = d.next(backlog(0, 900), t + CALM_FOR / 2);
        let d = d.next(calm, t + CALM_FOR);
        assert!(d.raised);
        let d = d.next(calm, t + CALM_FOR + CALM_FOR / 2);
        assert!(d.raised);
        assert!(!d.next(calm, t + 2 * CALM_FOR).raised);
    }

    #[test]
    fn threads_move_between_classes() {
        let y = Yielding::new();
        let policy = || {
            // SAFETY: querying the calling thread.
            unsafe { libc::sched_getscheduler(0) }
        };
        y.register_current_thread();
        assert_eq!(policy(), libc::SCHED_IDLE);
        y.set_all(true);
        assert_eq!(policy(), libc::SCHED_OTHER);
        assert_eq!(y.raises.load(Ordering::Relaxed), 1);
        y.set_all(false);
        assert_eq!(policy(), libc::SCHED_IDLE);
        // Back to normal for the rest of the test thread's life.
        y.set_all(true);
    }
}
