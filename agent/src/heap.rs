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

/// Room assumed per span in an export request's body (a span of the benchmark is ~370
/// bytes encoded; long paths and user agents make more).
const BODY_BYTES_PER_SPAN: usize = 1 << 10;
/// glibc's ceiling for the mmap threshold on 64-bit (`HEAP_MAX_SIZE / 2`).
const MMAP_THRESHOLD_MAX: usize = 32 << 20;

/// The (mmap, trim) thresholds for export requests of `batch_spans` spans: a body and its
/// framed copy come from the arena and go back to it, instead of each being mapped,
/// faulted in page by page and unmapped again for every request. With 2,048-span batches
/// (~760 KB bodies) under the 512 KiB default, the export thread spent twice the CPU of
/// 512-span batches, mostly in page faults; with room for them, 10–20 % less.
pub fn thresholds_for(batch_spans: usize) -> (usize, usize) {
    let mmap = batch_spans
        .saturating_mul(BODY_BYTES_PER_SPAN)
        .clamp(MMAP_THRESHOLD as usize, MMAP_THRESHOLD_MAX);
    let trim = (TRIM_THRESHOLD as usize).max(2 * mmap);
    (mmap, trim)
}

/// Raises the thresholds set by [`configure`] to fit export requests of `batch_spans`
/// spans (the default batch already fits). Call before any other thread exists.
pub fn fit_export_batches(batch_spans: usize) {
    let (mmap, trim) = thresholds_for(batch_spans);
    if mmap == MMAP_THRESHOLD as usize {
        return;
    }
    // SAFETY: as in `configure`; the values are within glibc's limits (both fit a c_int).
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, trim as libc::c_int);
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap as libc::c_int);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_fit_the_export_batch() {
        let defaults = (MMAP_THRESHOLD as usize, TRIM_THRESHOLD as usize);
        // The default batch (512) and smaller ones keep the start-up thresholds.
        assert_eq!(thresholds_for(0), defaults);
        assert_eq!(thresholds_for(512), defaults);
        // 2,048 spans: a ~760 KB body and its framed copy stay in the arena.
        assert_eq!(thresholds_for(2048), (2 << 20, 4 << 20));
        // The largest batch Tapir sends, and absurd ones: glibc's ceiling.
        assert_eq!(thresholds_for(8192), (8 << 20, 16 << 20));
        assert_eq!(thresholds_for(usize::MAX), (32 << 20, 64 << 20));
        for spans in [1, 600, 5000, 1 << 20] {
            let (mmap, trim) = thresholds_for(spans);
            assert!(mmap >= spans.min(32 << 10) * 1024 && trim >= 2 * mmap);
            assert!(trim <= libc::c_int::MAX as usize);
        }
    }
}
