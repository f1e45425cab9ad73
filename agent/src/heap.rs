//! Giving freed heap back to the system. glibc keeps freed pages mapped (and counted in
//! RSS) when they are not at the top of the heap; after a burst — start-up's BTF parsing,
//! thousands of connections closing, a metrics export for a thousand exited processes —
//! the agent would otherwise keep its high-water mark for good.

/// Largest free top of a thread's arena that glibc keeps; more is returned at the next
/// large free.
const TRIM_THRESHOLD: libc::c_int = 1 << 20;
/// Allocations at least this large get their own mapping, unmapped when freed. Export
/// bodies (~200 KiB for a default batch of spans) stay below it, so steady export does
/// not map and fault in fresh pages for every request.
const MMAP_THRESHOLD: libc::c_int = 512 << 10;

/// Fixes glibc's trim and mmap thresholds; call once, first thing in `main`.
///
/// By default glibc raises both thresholds whenever a large mapped block is freed (start-up
/// frees several MiB of BTF), up to a 64 MiB trim threshold. The tops of the other
/// threads' arenas are then never shrunk, and `malloc_trim` does not shrink them either (it
/// trims only the main arena's top): a burst handled on a runtime thread, such as the
/// metrics export after a thousand processes exited, stayed in RSS for good (+1–2 MiB
/// after each churn in the benchmark). Setting the thresholds turns that adjustment off.
pub fn configure() {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other
    // thread exists.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// Larger than glibc's consolidation threshold (64 KiB), below [`MMAP_THRESHOLD`].
const TOP_PROBE: usize = 256 << 10;

/// Returns free heap pages to the system (a few ms at most for a heap of tens of MiB;
/// call it after bursts, not per event, on the thread that had the burst).
///
/// `malloc_trim` releases free pages inside every arena but shrinks only the main arena's
/// top; a thread arena's top shrinks only when a large block is freed into it. So this
/// also frees a large block into the calling thread's arena.
pub fn trim() {
    // SAFETY: malloc_trim has no preconditions; it only releases free memory. The probe
    // is a plain malloc/free pair (a null pointer is fine to free) and is never touched.
    unsafe {
        libc::malloc_trim(0);
        let probe = std::hint::black_box(libc::malloc(TOP_PROBE));
        libc::free(probe);
    }
}
