//! Giving freed heap back to the system. glibc keeps freed pages mapped (and counted in
//! RSS) when they are not at the top of the heap; after a burst — start-up's BTF parsing,
//! thousands of connections closing, a metrics export for a thousand exited processes —
//! the agent would otherwise keep its high-water mark for good.

/// Returns free heap pages of every arena to the system (a few ms at most for a heap of
/// tens of MiB; call it after bursts, not per event).
pub fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only releases free memory.
    unsafe { libc::malloc_trim(0) };
}
