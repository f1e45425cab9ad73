//! The export thread yields the CPU to the services Tapir observes while it keeps up, as
//! the capture thread does (`capture/yielding.rs`). Every few milliseconds it sends a
//! batch: encoding, HTTP/2 and the loopback send (where the kernel also delivers to a local
//! collector) make a burst of ~0.1–0.3 ms that, at the services' priority, holds a CPU a
//! service wakes up to use. As `SCHED_IDLE` it runs only on CPUs nothing else wants.
//!
//! An idle-class thread gets almost no CPU while the CPUs are busy. Whoever queues spans
//! (the capture thread) knows the queue's length under the push's lock, so it puts the
//! export thread back to normal priority once [`rescue_at`] spans wait; the export thread
//! goes back to idle after [`KEEP_NORMAL`] once a send leaves less than a batch queued.
use std::time::Duration;

use crate::sched::{can_come_back, Class, YieldingThread};

/// Least time at normal priority after a rescue.
pub const KEEP_NORMAL: Duration = Duration::from_secs(1);

/// Spans queued that mean the export thread is left behind: four batches (a batch is due
/// at one), at most half the queue so that the rescue comes well before any drop.
pub fn rescue_at(max_batch: usize, queue_cap: usize) -> usize {
    max_batch
        .saturating_mul(4)
        .min(queue_cap / 2)
        .max(max_batch.min(queue_cap))
        .max(1)
}

/// What a pusher does when `queued` spans wait and the export thread is in `now_in`.
pub fn rescue(now_in: Class, queued: usize, rescue_at: usize) -> Option<Class> {
    (now_in == Class::Idle && queued >= rescue_at).then_some(Class::Normal)
}

/// What the export thread does after a send that left `queued` spans, `since_rescue`
/// after it was last put back to normal.
pub fn after_send(
    now_in: Class,
    queued: usize,
    max_batch: usize,
    since_rescue: Duration,
) -> Option<Class> {
    (now_in == Class::Normal && queued < max_batch && since_rescue >= KEEP_NORMAL)
        .then_some(Class::Idle)
}

/// Shared by the export thread and the span queue's pushers.
#[derive(Debug)]
pub struct ExportYield {
    thread: YieldingThread,
    rescue_at: usize,
    max_batch: usize,
}

impl ExportYield {
    /// For a queue of `queue_cap` spans sent `max_batch` at a time. Fails when an
    /// idle-class thread could not come back to normal priority (no CAP_SYS_NICE).
    pub fn new(max_batch: usize, queue_cap: usize) -> std::io::Result<Self> {
        can_come_back()?;
        Ok(Self {
            thread: YieldingThread::default(),
            rescue_at: rescue_at(max_batch, queue_cap),
            max_batch: max_batch.max(1),
        })
    }

    /// On the export thread: registers it and makes it idle-class.
    pub fn start(&self) -> std::io::Result<()> {
        self.thread.start()
    }

    /// By a pusher, with the queue's length after its push.
    pub fn queued(&self, queued: usize) {
        if rescue(self.thread.class(), queued, self.rescue_at).is_some() && self.thread.rescue() {
            tracing::debug!(queued, "export thread back to normal priority: spans wait");
        }
    }

    /// On the export thread, after a send that left `queued` spans.
    pub fn sent(&self, queued: usize) {
        let t = &self.thread;
        if !t.started() || t.class() == Class::Idle {
            return;
        }
        if after_send(Class::Normal, queued, self.max_batch, t.since_rescue()) == Some(Class::Idle)
        {
            t.go_idle();
        }
    }

    /// On the export thread when it flushes at shutdown: normal priority from now on, so
    /// that busy CPUs do not hold up the last spans.
    pub fn finish(&self) {
        self.thread.finish();
    }

    /// Times the export thread was put back to normal priority.
    pub fn rescues(&self) -> u64 {
        self.thread.rescues()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn rescue_threshold_is_a_few_batches_and_under_half_the_queue() {
        assert_eq!(rescue_at(512, 32768), 2048);
        assert_eq!(rescue_at(512, 2048), 1024);
        // A queue of about one batch: rescued once a batch waits (it is due anyway).
        assert_eq!(rescue_at(512, 600), 512);
        assert_eq!(rescue_at(3, 3), 3);
        assert_eq!(rescue_at(1, 1), 1);
        assert_eq!(rescue_at(0, 0), 1);
    }

    #[test]
    fn rescued_only_when_idle_and_spans_wait() {
        assert_eq!(rescue(Class::Idle, 2048, 2048), Some(Class::Normal));
        assert_eq!(rescue(Class::Idle, 2047, 2048), None);
        assert_eq!(rescue(Class::Normal, 30000, 2048), None);
    }

    #[test]
    fn back_to_idle_once_under_a_batch_and_a_second_has_passed() {
        assert_eq!(
            after_send(Class::Normal, 0, 512, MS(1000)),
            Some(Class::Idle)
        );
        assert_eq!(
            after_send(Class::Normal, 511, 512, MS(5000)),
            Some(Class::Idle)
        );
        assert_eq!(after_send(Class::Normal, 512, 512, MS(5000)), None);
        assert_eq!(after_send(Class::Normal, 0, 512, MS(999)), None);
        assert_eq!(after_send(Class::Idle, 0, 512, MS(5000)), None);
    }

    #[test]
    fn a_pusher_puts_the_export_thread_back_and_it_goes_idle_again() {
        let y = std::sync::Arc::new(ExportYield::new(4, 100).expect("root may change classes"));
        let policy = || {
            // SAFETY: reads this thread's policy.
            unsafe { libc::sched_getscheduler(0) }
        };
        let (y2, exporter) = (y.clone(), std::sync::mpsc::channel::<usize>());
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = std::thread::spawn(move || {
            y2.start().expect("root may set SCHED_IDLE");
            let mut seen = vec![policy()];
            // Each message: "a send left this many spans".
            while let Ok(left) = exporter.1.recv() {
                seen.push(policy());
                y2.sent(left);
                seen.push(policy());
                done_tx.send(()).expect("test alive");
            }
            seen
        });
        let step = |left| {
            exporter.0.send(left).expect("worker alive");
            done_rx.recv().expect("worker alive");
        };
        step(0); // idle stays idle
        y.queued(15); // under four batches: nothing
        step(0);
        y.queued(16); // four batches wait: back to normal
        assert_eq!(y.rescues(), 1);
        step(0); // sent, but less than a second after the rescue: stays normal
        y.thread.rescued_long_ago();
        step(4); // a batch still waits: stays normal
        step(3); // less than a batch left: idle again
        drop(exporter.0);
        let seen = worker.join().expect("worker");
        let (i, n) = (libc::SCHED_IDLE, libc::SCHED_OTHER);
        assert_eq!(seen, vec![i, i, i, i, i, n, n, n, n, n, i]);
    }
}
