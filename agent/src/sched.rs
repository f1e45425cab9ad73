//! Scheduling classes for the agent's own busy threads (capture, export): idle-class while
//! they keep up, so that the services they observe get the CPU first, and back to normal
//! priority when they fall behind. The decisions live with each thread
//! ([`crate::capture::yielding`], [`crate::otel::yielding`]); this is the mechanism.
use std::{
    sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering},
    thread,
    time::Duration,
};

use crate::clock;

/// A thread's scheduling class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// `SCHED_IDLE`: runs on CPUs nothing else wants.
    Idle,
    /// `SCHED_OTHER`, nice 0: competes like the services.
    Normal,
}

/// Sets thread `tid`'s scheduling class.
pub fn set_class(tid: i32, class: Class) -> std::io::Result<()> {
    let policy = match class {
        Class::Idle => libc::SCHED_IDLE,
        Class::Normal => libc::SCHED_OTHER,
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: a plain syscall on a thread id with a valid parameter struct.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The calling thread's id.
pub fn this_thread() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Whether a thread that went idle-class may go back to normal: without CAP_SYS_NICE (and
/// an RLIMIT_NICE of 20) it may not, and a busy thread stuck idle-class would lose data on
/// busy CPUs. Tried on a thread of its own.
pub fn can_come_back() -> std::io::Result<()> {
    thread::Builder::new()
        .name("tapir-sched-probe".into())
        .spawn(|| {
            let tid = this_thread();
            set_class(tid, Class::Idle)?;
            set_class(tid, Class::Normal).map_err(|e| {
                std::io::Error::other(format!(
                    "an idle-class thread cannot go back to normal priority \
                     (CAP_SYS_NICE missing?): {e}"
                ))
            })
        })?
        .join()
        .map_err(|_| std::io::Error::other("the scheduling probe thread panicked"))?
}

/// A busy thread that runs idle-class while it keeps up: what it and whoever rescues it
/// share. The thread calls [`YieldingThread::start`], then [`YieldingThread::go_idle`]
/// when its own rule says it keeps up again; another thread calls
/// [`YieldingThread::rescue`] when its rule says the thread is left behind.
#[derive(Debug, Default)]
pub struct YieldingThread {
    /// The thread's id (0 until `start` succeeded, and again after `finish`).
    tid: AtomicI32,
    idle: AtomicBool,
    /// Monotonic ns when it was last put back to normal.
    rescued_ns: AtomicU64,
    /// Times it was put back to normal.
    rescues: AtomicU64,
}

impl YieldingThread {
    /// On the thread: registers it and makes it idle-class. An error (a container without
    /// the right to change it) leaves it at normal priority, and the rest does nothing.
    pub fn start(&self) -> std::io::Result<()> {
        let tid = this_thread();
        set_class(tid, Class::Idle)?;
        self.idle.store(true, Ordering::Release);
        self.tid.store(tid, Ordering::Release);
        Ok(())
    }

    /// Whether `start` succeeded (and `finish` was not called).
    pub fn started(&self) -> bool {
        self.tid.load(Ordering::Acquire) != 0
    }

    pub fn class(&self) -> Class {
        if self.idle.load(Ordering::Acquire) {
            Class::Idle
        } else {
            Class::Normal
        }
    }

    /// From another thread: puts it back to normal priority, once per idle spell. Returns
    /// whether this call did.
    pub fn rescue(&self) -> bool {
        let tid = self.tid.load(Ordering::Acquire);
        if tid == 0 {
            return false;
        }
        // The time first, so that the thread never sees normal with an old one.
        self.rescued_ns
            .store(clock::monotonic_now_ns(), Ordering::Release);
        if self
            .idle
            .compare_exchange(true, false, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        if set_class(tid, Class::Normal).is_err() {
            self.idle.store(true, Ordering::Release);
            return false;
        }
        self.rescues.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Time since it was last put back to normal.
    pub fn since_rescue(&self) -> Duration {
        Duration::from_nanos(
            clock::monotonic_now_ns().saturating_sub(self.rescued_ns.load(Ordering::Acquire)),
        )
    }

    /// On the thread: idle-class again.
    pub fn go_idle(&self) {
        let tid = self.tid.load(Ordering::Acquire);
        if tid != 0 && set_class(tid, Class::Idle).is_ok() {
            self.idle.store(true, Ordering::Release);
        }
    }

    /// On the thread: normal priority from now on (nothing puts it back to idle).
    pub fn finish(&self) {
        let tid = self.tid.swap(0, Ordering::AcqRel);
        if tid != 0 && self.class() == Class::Idle {
            let _ = set_class(tid, Class::Normal);
        }
        self.idle.store(false, Ordering::Release);
    }

    /// Times it was put back to normal priority.
    pub fn rescues(&self) -> u64 {
        self.rescues.load(Ordering::Relaxed)
    }

    /// For tests: as if the last rescue were long ago.
    #[cfg(test)]
    pub(crate) fn rescued_long_ago(&self) {
        self.rescued_ns.store(0, Ordering::Release);
    }
}
