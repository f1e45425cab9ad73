//! Scheduling classes for the agent's own busy threads (capture, export): idle-class while
//! they keep up, so that the services they observe get the CPU first, and back to normal
//! priority when they fall behind. The decisions live with each thread
//! ([`crate::capture::yielding`], [`crate::otel::yielding`]); this is the mechanism.
use std::thread;

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
