//! Trace ids born in the kernel. A thread that reads a request gets a SERVER span context
//! (the incoming `traceparent`'s trace id, or a new one); a request the same thread writes
//! while that context is open becomes its CLIENT child. The ids travel to userspace in the
//! data event and (see `inject.rs`) onto the wire, so both always agree.
use agent_common::{
    counter, ConnKey, ConnState, TraceIds, COMPAT_SCAN_BYTES, CONN_BORN, CONN_LAST_INJECTED,
    CONN_WAKE_ON_REPLY, INJECTED_REARMED, MAX_CAPTURE, ORIGIN_HEADER, ORIGIN_NEW, ORIGIN_THREAD,
    TRACE_CLIENT, TRACE_SERVER, TRACE_SERVER_PARENT,
};
use aya_ebpf::{helpers::bpf_get_prandom_u32, macros::map, maps::LruHashMap};

use crate::{
    looping::repeat,
    maps::{count, DataScratch, CONNS, CPU_STATE, SCRATCH, SCRATCH_BYTES},
};

/// pid_tgid → the SERVER span the thread is handling (between request read and response
/// written).
#[map(name = "TAPIR_THREAD_CTX")]
pub static THREAD_CTX: LruHashMap<u64, TraceIds> = LruHashMap::with_max_entries(65536, 0);

/// [`birth_key`] of a client connection → the SERVER span its thread was handling when it
/// connected: the parent of the connection's first request. An event loop opens the
/// connection in the turn that read the incoming request (Node.js: `agent: false`, a pool
/// that grows) but writes the request turns later, when the thread may have read another.
#[map(name = "TAPIR_BIRTH_CTX")]
pub static BIRTH_CTX: LruHashMap<u64, Opener> = LruHashMap::with_max_entries(16384, 0);

/// The SERVER span a thread was handling when it opened a connection, and that thread.
#[repr(C)]
pub struct Opener {
    ids: TraceIds,
    tid: u32,
    _pad: u32,
}

/// A process's client connection by its host-order ports (what both the tracepoints'
/// connection state and sk_msg's context carry). Two live connections of one process that
/// differ only in their remote address share it; the later one's entry wins.
#[inline(always)]
pub fn birth_key(pid_tgid: u64, local_port: u16, remote_port: u16) -> u64 {
    ((pid_tgid >> 32) << 32) | ((local_port as u64) << 16) | remote_port as u64
}

/// The span the connection `key` was opened in, if this thread opened it: a connection
/// another thread writes first (a shared pool) takes that thread's context.
#[inline(always)]
fn opener(pid_tgid: u64, key: u64) -> Option<&'static TraceIds> {
    let p = BIRTH_CTX.get_ptr(&key)?;
    // SAFETY: pointer from a successful lookup.
    let o = unsafe { &*p };
    (o.tid == pid_tgid as u32).then_some(&o.ids)
}

/// pid_tgid → ids the sk_msg program just put on the wire for the request being written;
/// consumed by the write's exit tracepoint.
#[map(name = "TAPIR_OUT_CTX")]
pub static OUT_CTX: LruHashMap<u64, TraceIds> = LruHashMap::with_max_entries(16384, 0);

const SAMPLED: u8 = 1;

#[inline(always)]
fn prandom_u64() -> u64 {
    // SAFETY: helper without preconditions.
    let (a, b) = unsafe { (bpf_get_prandom_u32(), bpf_get_prandom_u32()) };
    ((a as u64) << 32) | (b as u64)
}

/// A non-zero 64-bit id (all-zero ids are invalid per W3C). SplitMix64 over a per-CPU
/// state seeded from the kernel's generator: a few ALU instructions instead of two helper
/// calls per 64 bits (six per new trace); distinct states give distinct outputs.
#[inline(always)]
fn random_u64() -> u64 {
    let Some(state) = CPU_STATE.get_ptr_mut(0) else {
        return prandom_u64() | 1;
    };
    // SAFETY: this CPU's slot.
    let state = unsafe { &mut *state };
    if state.rng == 0 {
        state.rng = prandom_u64();
    }
    state.rng = state.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = state.rng;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    if z == 0 {
        1
    } else {
        z
    }
}

#[inline(always)]
pub fn new_span_id() -> [u8; 8] {
    random_u64().to_be_bytes()
}

#[inline(always)]
fn new_trace_id() -> [u8; 16] {
    let mut t = [0u8; 16];
    t[..8].copy_from_slice(&random_u64().to_be_bytes());
    t[8..].copy_from_slice(&random_u64().to_be_bytes());
    t
}

/// The first four bytes of a request line: every method in IANA's HTTP method registry
/// (the standard ones, QUERY, WebDAV's, CalDAV's REPORT and MKCALENDAR, DeltaV's, …), the
/// caches' PURGE and UPnP's NOTIFY, SUBSCRIBE and UNSUBSCRIBE. A method not listed here
/// is missed when it starts a connection's traffic, and gets no kernel span ids or
/// injection (the agent still parses it on a connection that already carried HTTP).
#[inline(always)]
pub fn is_method_prefix(b: &[u8; 4]) -> bool {
    matches!(
        b,
        b"GET "
            | b"POST"
            | b"PUT "
            | b"HEAD"
            | b"DELE"
            | b"PATC"
            | b"OPTI"
            | b"CONN"
            | b"TRAC"
            | b"QUER"
            | b"PROP"
            | b"MKCO"
            | b"COPY"
            | b"MOVE"
            | b"LOCK"
            | b"UNLO"
            | b"REPO"
            | b"SEAR"
            | b"MKCA"
            | b"ACL "
            | b"BIND"
            | b"REBI"
            | b"UNBI"
            | b"LINK"
            | b"UNLI"
            | b"ORDE"
            | b"MKRE"
            | b"UPDA"
            | b"LABE"
            | b"MERG"
            | b"MKAC"
            | b"MKWO"
            | b"BASE"
            | b"CHEC"
            | b"UNCH"
            | b"VERS"
            | b"PURG"
            | b"NOTI"
            | b"SUBS"
            | b"UNSU"
    )
}

/// Does the chunk start with a request line (a method, not a status line)?
#[inline(always)]
pub fn is_request_start(data: &[u8; SCRATCH_BYTES], n: u64) -> bool {
    n >= 4 && is_method_prefix(&[data[0], data[1], data[2], data[3]])
}

#[inline(always)]
pub fn is_response_start(data: &[u8; SCRATCH_BYTES], n: u64) -> bool {
    n >= 5 && &[data[0], data[1], data[2], data[3], data[4]] == b"HTTP/"
}

#[inline(always)]
pub fn byte_at(data: &[u8; SCRATCH_BYTES], i: u64) -> u8 {
    // Masked so the verifier sees the index inside the array.
    let i = (i & (2 * MAX_CAPTURE as u64 - 1)) as usize;
    // SAFETY: i < 2×MAX_CAPTURE < SCRATCH_BYTES.
    unsafe { *data.as_ptr().add(i) }
}

#[inline(always)]
fn word_at(data: &[u8; SCRATCH_BYTES], i: u64) -> u64 {
    let i = (i & (2 * MAX_CAPTURE as u64 - 1)) as usize;
    // SAFETY: i + 8 ≤ 2×MAX_CAPTURE + 8 ≤ SCRATCH_BYTES; unaligned read of plain bytes.
    unsafe { core::ptr::read_unaligned(data.as_ptr().add(i) as *const u64) }
}

/// Lowercase hex digit → value; anything else → 0xf0. A table lookup instead of range
/// checks keeps the parse free of branches, which the verifier would explore per digit.
static HEX: [u8; 256] = {
    let mut t = [0xf0u8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

#[inline(always)]
fn hex_val(c: u8) -> u8 {
    HEX[c as usize]
}

/// Parses 2×N lowercase hex digits at `at` into `out` (big-endian). False when a digit is
/// not lowercase hex or (with `nonzero`) the value is all zeros.
#[inline(always)]
fn parse_hex<const N: usize>(
    data: &[u8; SCRATCH_BYTES],
    at: u64,
    out: &mut [u8; N],
    nonzero: bool,
) -> bool {
    let mut bad = 0u8;
    let mut any = 0u8;
    for (k, slot) in out.iter_mut().enumerate() {
        let hi = hex_val(byte_at(data, at + 2 * k as u64));
        let lo = hex_val(byte_at(data, at + 2 * k as u64 + 1));
        bad |= hi | lo;
        *slot = (hi << 4) | (lo & 0x0f);
        any |= *slot;
    }
    bad & 0xf0 == 0 && (!nonzero || any != 0)
}

/// "tracepar" and "ent:" as little-endian words, for case-insensitive compares (| 0x20).
const TRACEPAR: u64 = u64::from_le_bytes(*b"tracepar");
const ENT_COLON: u32 = u32::from_le_bytes(*b"ent:");
const LOWER8: u64 = 0x2020_2020_2020_2020;
const NL8: u64 = 0x0a0a_0a0a_0a0a_0a0a;
const ONES8: u64 = 0x0101_0101_0101_0101;
const HIGH8: u64 = 0x8080_8080_8080_8080;

/// Does a line starting at `i` name the `traceparent` header (any case)?
#[inline(always)]
fn traceparent_name_at(data: &[u8; SCRATCH_BYTES], i: u64) -> bool {
    word_at(data, i) | LOWER8 == TRACEPAR
        && (word_at(data, i + 8) as u32) | 0x2020_2020 == ENT_COLON
}

/// Is the line starting at `i` (of `n` captured bytes) the empty line that ends a head?
#[inline(always)]
pub fn empty_line_at(data: &[u8; SCRATCH_BYTES], i: u64, n: u64) -> bool {
    let c = byte_at(data, i);
    i < n && (c == b'\n' || (c == b'\r' && i + 1 < n && byte_at(data, i + 1) == b'\n'))
}

/// Just past the empty line that starts at `nl + 1` (`\n` or `\r\n`, as
/// [`empty_line_at`] found it): where a body starts.
#[inline(always)]
pub fn past_empty_line(data: &[u8; SCRATCH_BYTES], nl: u64) -> u64 {
    nl + if byte_at(data, nl + 1) == b'\n' { 2 } else { 3 }
}

/// The first four bytes of a span id: how a followed request head names its span.
#[inline(always)]
pub fn span_head(span_id: &[u8; 8]) -> [u8; 4] {
    [span_id[0], span_id[1], span_id[2], span_id[3]]
}

/// Bytes looked at per bpf_loop step: a callback call costs about as much as the checks of
/// a few words, so each step takes four.
pub const SCAN_STEP: u64 = 32;

/// One bpf_loop step: looks at bytes `[32w, 32w + 32)` for a line starting with
/// "traceparent:" (any case), or for the empty line that ends the head (the scan stops
/// there: a body is not headers). A callback keeps the verifier's work constant however
/// long the header block is.
extern "C" fn scan_step(w: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some((n, scratch)) = step_inputs(ctx) else {
        return 1;
    };
    let data = &scratch.data;
    // Reported through map memory, which the verifier does not track value by value: the
    // caller then continues in one state, not one per position.
    let (head_end, scan_at) = (&mut scratch.head_end, &mut scratch.scan_at);
    each_newline(data, w, n, |nl| {
        if empty_line_at(data, nl + 1, n) {
            *head_end = 1;
            return true;
        }
        // Stopping here keeps the callback's paths few (scanning on to the head's end
        // tripled verification time); a head whose `traceparent` line turns out invalid
        // is not followed further (see `HeadScan::header_seen`).
        if traceparent_name_at(data, nl + 1) {
            *scan_at = nl + 13;
            return true;
        }
        false
    })
}

/// Calls `found` with the position of each `\n` among bytes `[32w, 32w + 32)` below `n`,
/// in order, until it returns true. Returns bpf_loop's verdict: 1 (stop) when `found` did
/// or the bytes ran out, else 0. Words without a `\n` are skipped in a few instructions.
#[inline(always)]
pub fn each_newline(
    data: &[u8; SCRATCH_BYTES],
    w: u64,
    n: u64,
    mut found: impl FnMut(u64) -> bool,
) -> i64 {
    for k in 0..SCAN_STEP / 8 {
        let base = w * SCAN_STEP + 8 * k;
        if base >= n {
            return 1;
        }
        let x = word_at(data, base) ^ NL8;
        if (x.wrapping_sub(ONES8) & !x & HIGH8) == 0 {
            continue;
        }
        for j in 0..8u64 {
            let nl = base + j;
            if nl < n && byte_at(data, nl) == b'\n' && found(nl) {
                return 1;
            }
        }
    }
    0
}

/// A scan step's inputs: the byte count in its context, and this CPU's scratch record.
#[inline(always)]
pub fn step_inputs(ctx: *mut core::ffi::c_void) -> Option<(u64, &'static mut DataScratch)> {
    // SAFETY: `repeat!` passes a pointer to one u64 on its caller's stack (or, in the
    // compat build, on its loop function's): the byte count.
    let n = unsafe { *(ctx as *const u64) };
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch filled by the caller on this CPU.
    Some((n, unsafe { &mut *scratch }))
}

/// Runs `step` over the first `n` scratch bytes, SCAN_STEP bytes per loop step (the compat
/// build looks at the first COMPAT_SCAN_BYTES only).
macro_rules! run_steps {
    ($name:ident, $step:path, $n:expr) => {{
        let n: u64 = $n;
        repeat!(
            $name,
            $step,
            COMPAT_SCAN_BYTES / SCAN_STEP,
            n.div_ceil(SCAN_STEP) as u32,
            n
        );
    }};
}

/// One bpf_loop step of [`body_start`]: bytes `[32w, 32w + 32)`.
extern "C" fn body_step(w: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some((n, scratch)) = step_inputs(ctx) else {
        return 1;
    };
    let data = &scratch.data;
    let body_at = &mut scratch.body_at;
    each_newline(data, w, n, |nl| {
        if empty_line_at(data, nl + 1, n) {
            *body_at = past_empty_line(data, nl);
            return true;
        }
        false
    })
}

/// Where the body starts in the first `n` bytes of this CPU's scratch copy of a message
/// (just past the empty line that ends its head), if the head ends there.
#[inline(always)]
pub fn body_start(n: u64) -> Option<u64> {
    let n = n.min(MAX_CAPTURE as u64);
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch slot of this CPU.
    unsafe { core::ptr::write_volatile(&raw mut (*scratch).body_at, 0) };
    run_steps!(tapir_compat_body_scan, body_step, n);
    // SAFETY: as above.
    let at = unsafe { (*scratch).body_at };
    (at != 0).then_some(at)
}

/// Do the `n` bytes end with the empty line that ends a head (the call moved a whole head
/// and nothing after it)?
#[inline(always)]
pub fn ends_with_empty_line(data: &[u8; SCRATCH_BYTES], n: u64) -> bool {
    n >= 4
        && byte_at(data, n - 1) == b'\n'
        && (byte_at(data, n - 2) == b'\n'
            || (byte_at(data, n - 2) == b'\r' && byte_at(data, n - 3) == b'\n'))
}

/// What a scan of request-head bytes found.
#[derive(Clone, Copy)]
pub struct HeadScan {
    /// A valid `traceparent` (its ids were written out).
    pub found: bool,
    /// The empty line that ends the head, before any `traceparent`.
    pub ended: bool,
    /// A `traceparent` line, valid or not (the scan stops at it).
    pub header_seen: bool,
}

/// Finds a valid W3C `traceparent` header in the first `n` captured bytes of a request
/// head, up to the head's end, and writes its trace id, span id and flags (straight into
/// map memory, to keep the stack small). Invalid values are ignored, as W3C says.
/// `line_start`: the bytes continue a head whose previous read ended with a line, so a
/// header (or the head's end) may start at offset 0.
#[inline(always)]
pub fn scan_head(
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    line_start: bool,
    trace_id: &mut [u8; 16],
    span_id: &mut [u8; 8],
    flags: &mut u8,
) -> HeadScan {
    let mut scan = HeadScan {
        found: false,
        ended: false,
        header_seen: false,
    };
    let n = n.min(MAX_CAPTURE as u64);
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return scan;
    };
    // SAFETY: per-CPU scratch slot of this CPU. Volatile: LLVM would merge two plain
    // stores into a 16-byte memset, which the BPF backend turns into a call to a
    // byte-by-byte loop (on every request head scanned).
    unsafe {
        core::ptr::write_volatile(&raw mut (*scratch).scan_at, 0);
        core::ptr::write_volatile(&raw mut (*scratch).head_end, 0);
    }
    if line_start && empty_line_at(data, 0, n) {
        scan.ended = true;
        return scan;
    }
    if line_start && n >= 12 && traceparent_name_at(data, 0) {
        // SAFETY: as above.
        unsafe { (*scratch).scan_at = 12 };
    } else {
        run_steps!(tapir_compat_traceparent_scan, scan_step, n);
    }
    // SAFETY: as above.
    let (value_at, head_end) = unsafe { ((*scratch).scan_at, (*scratch).head_end) };
    scan.ended = head_end != 0;
    scan.header_seen = value_at != 0;
    scan.found = value_at != 0
        && parse_traceparent(
            data,
            n,
            value_at & (MAX_CAPTURE as u64 - 1),
            trace_id,
            span_id,
            flags,
        )
        .is_some();
    scan
}

/// Finds a valid `traceparent` in a request head that starts at offset 0.
#[inline(always)]
pub fn find_traceparent(
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    trace_id: &mut [u8; 16],
    span_id: &mut [u8; 8],
    flags: &mut u8,
) -> Option<()> {
    scan_head(data, n, false, trace_id, span_id, flags)
        .found
        .then_some(())
}

/// Parses the header value that starts at `value_at` (after the colon).
#[inline(always)]
fn parse_traceparent(
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    mut value_at: u64,
    trace_id: &mut [u8; 16],
    span_id: &mut [u8; 8],
    flags: &mut u8,
) -> Option<()> {
    // Optional whitespace after the colon.
    for _ in 0..2 {
        let c = byte_at(data, value_at);
        if c == b' ' || c == b'\t' {
            value_at += 1;
        }
    }
    // 00-<32 hex>-<16 hex>-<2 hex>: 55 bytes, all captured.
    if value_at + 55 > n {
        return None;
    }
    let mut version = [0u8; 1];
    if !parse_hex(data, value_at, &mut version, false)
        || version[0] == 0xff
        || byte_at(data, value_at + 2) != b'-'
        || byte_at(data, value_at + 35) != b'-'
        || byte_at(data, value_at + 52) != b'-'
    {
        return None;
    }
    // Version 00 ends after the flags; later versions may add fields after another '-'.
    let after = if value_at + 55 < n {
        byte_at(data, value_at + 55)
    } else {
        b'\r'
    };
    if version[0] == 0 && after != b'\r' && after != b'\n' && after != b' ' && after != b'\t' {
        return None;
    }
    let mut f = [0u8; 1];
    if !parse_hex(data, value_at + 3, trace_id, true)
        || !parse_hex(data, value_at + 36, span_id, true)
        || !parse_hex(data, value_at + 53, &mut f, false)
    {
        return None;
    }
    *flags = f[0];
    Some(())
}

/// A thread read a request: open its SERVER context and fill the span's ids.
#[inline(always)]
pub fn on_server_request(
    pid_tgid: u64,
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    ids: &mut TraceIds,
) -> HeadScan {
    ids.span_id = new_span_id();
    ids.kind = TRACE_SERVER;
    let scan = scan_head(
        data,
        n,
        false,
        &mut ids.trace_id,
        &mut ids.parent_span_id,
        &mut ids.flags,
    );
    if scan.found {
        ids.has_parent = 1;
        ids.origin = ORIGIN_HEADER;
    } else {
        ids.trace_id = new_trace_id();
        ids.flags = SAMPLED;
        ids.origin = ORIGIN_NEW;
    }
    // Overwritten in place when the thread has an entry: an LRU update + delete per
    // request was a measurable part of the per-request kernel cost.
    match THREAD_CTX.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup; a map value never overlaps `ids`
        // (a non-overlapping copy is inlined, `*slot = *ids` became a memmove call).
        Some(slot) => unsafe { core::ptr::copy_nonoverlapping(ids as *const TraceIds, slot, 1) },
        None => {
            let _ = THREAD_CTX.insert(pid_tgid, &*ids, 0);
        }
    }
    scan
}

/// A later read of a request head whose earlier reads had no `traceparent`: a sender's
/// pushed header (Tapir's own injection, among others) can arrive as its own segment. A
/// `traceparent` found here becomes the open SERVER span's parent, for the spans the
/// thread starts from now on and (kind [`TRACE_SERVER_PARENT`]) for userspace.
#[inline(always)]
pub fn on_server_head_continued(
    pid_tgid: u64,
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    line_start: bool,
    head_span: [u8; 4],
    ids: &mut TraceIds,
) -> HeadScan {
    let scan = scan_head(
        data,
        n,
        line_start,
        &mut ids.trace_id,
        &mut ids.parent_span_id,
        &mut ids.flags,
    );
    if !scan.found {
        return scan;
    }
    count(counter::TRACEPARENT_LATE);
    ids.kind = TRACE_SERVER_PARENT;
    let [a, b, c, d] = head_span;
    ids.span_id = [a, b, c, d, 0, 0, 0, 0];
    ids.has_parent = 1;
    ids.origin = ORIGIN_HEADER;
    if let Some(slot) = THREAD_CTX.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup.
        let server = unsafe { &mut *slot };
        // Only the span this head belongs to: the thread may have opened another since
        // (an event loop reading a second connection between the two reads).
        if server.kind == TRACE_SERVER && span_head(&server.span_id) == head_span {
            // SAFETY: distinct memory (map value vs. scratch).
            unsafe { core::ptr::copy_nonoverlapping(&ids.trace_id, &mut server.trace_id, 1) };
            server.parent_span_id = ids.parent_span_id;
            server.flags = ids.flags;
            server.has_parent = 1;
            server.origin = ORIGIN_HEADER;
        }
    }
    scan
}

/// The thread wrote a response: the request it was handling is done. The entry stays,
/// marked closed, for the thread's next request.
#[inline(always)]
pub fn on_server_response(pid_tgid: u64) {
    if let Some(slot) = THREAD_CTX.get_ptr_mut(pid_tgid) {
        // SAFETY: pointer from a successful lookup.
        unsafe { (*slot).kind = CTX_CLOSED };
    }
}

/// `kind` of a THREAD_CTX entry whose response was written.
const CTX_CLOSED: u8 = 0;

/// The thread's open SERVER span, if any.
#[inline(always)]
fn open_server(pid_tgid: u64) -> Option<&'static TraceIds> {
    let p = THREAD_CTX.get_ptr(pid_tgid)?;
    // SAFETY: pointer from a successful lookup.
    let ids = unsafe { &*p };
    (ids.kind == TRACE_SERVER).then_some(ids)
}

/// The thread just opened the client connection `conn`: if it is handling a request, that
/// SERVER span becomes the parent of the connection's first request (`CONN_BORN`). The
/// thread's context is looked at first: most threads that connect serve nothing.
#[inline(always)]
pub fn on_connect(pid_tgid: u64, conn: ConnKey) {
    let Some(server) = open_server(pid_tgid) else {
        return;
    };
    let Some(state) = CONNS.get_ptr_mut(conn) else {
        return;
    };
    // SAFETY: pointer from a successful lookup.
    let state = unsafe { &mut *state };
    let mut opener = Opener {
        ids: TraceIds::default(),
        tid: pid_tgid as u32,
        _pad: 0,
    };
    // SAFETY: a map value and a stack value never overlap (an assignment became a memmove
    // call).
    unsafe { core::ptr::copy_nonoverlapping(server, &mut opener.ids, 1) };
    let key = birth_key(pid_tgid, state.local_port, state.remote_port);
    if BIRTH_CTX.insert(&key, &opener, 0).is_ok() {
        state.flags |= CONN_BORN;
    }
}

/// Ids for a request the thread writes: those an sk_msg program just put on the wire (on a
/// re-armed connection the reply then wakes the agent), else
/// the request's own `traceparent`, else a child of the SERVER span the connection was
/// opened in (its first request) or of the thread's, else new.
#[inline(always)]
pub fn on_client_request(
    pid_tgid: u64,
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    ids: &mut TraceIds,
    conn: &mut ConnState,
) {
    // Only the connection's first request is its opener's; sk_msg reads the entry, this
    // (which runs after it for the same write) removes it.
    let born = conn.flags & CONN_BORN != 0;
    let key = birth_key(pid_tgid, conn.local_port, conn.remote_port);
    let birth = if born {
        conn.flags &= !CONN_BORN;
        opener(pid_tgid, key)
    } else {
        None
    };
    on_client_request_from(pid_tgid, data, n, ids, birth);
    // The agent re-arms injection when it sees the reply: woken for it on a re-armed
    // connection, and once after a miss, so that one late re-arm costs one request, not
    // every request until the agent's next drain happens to come in time.
    let missed = ids.injected == 0 && conn.flags & CONN_LAST_INJECTED != 0;
    if ids.injected == INJECTED_REARMED || missed {
        conn.flags |= CONN_WAKE_ON_REPLY;
    }
    if ids.injected != 0 {
        conn.flags |= CONN_LAST_INJECTED;
    } else {
        conn.flags &= !CONN_LAST_INJECTED;
    }
    if born {
        let _ = BIRTH_CTX.remove(&key);
    }
}

#[inline(always)]
fn on_client_request_from(
    pid_tgid: u64,
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    ids: &mut TraceIds,
    birth: Option<&TraceIds>,
) {
    if let Some(out) = OUT_CTX.get_ptr(pid_tgid) {
        // SAFETY: pointer from a successful lookup, read before the entry is removed.
        unsafe { core::ptr::copy_nonoverlapping(out, ids as *mut TraceIds, 1) };
        let _ = OUT_CTX.remove(pid_tgid);
        return;
    }
    ids.kind = TRACE_CLIENT;
    let found = find_traceparent(data, n, &mut ids.trace_id, &mut ids.span_id, &mut ids.flags);
    let parent = birth.or_else(|| open_server(pid_tgid));
    if found.is_some() {
        // The caller chose this hop's ids itself: the downstream server's parent is exactly
        // this span id.
        ids.origin = ORIGIN_HEADER;
        if let Some(server) = parent {
            if server.trace_id == ids.trace_id {
                ids.parent_span_id = server.span_id;
                ids.has_parent = 1;
                if server.has_parent != 0 && server.parent_span_id == ids.span_id {
                    // The incoming `traceparent` passed on unchanged (a proxy forwarding
                    // headers): its span id is the caller's span, not this hop's, which
                    // gets its own (the downstream server stays the caller's child).
                    ids.span_id = new_span_id();
                    ids.origin = ORIGIN_THREAD;
                }
            }
        }
        return;
    }
    ids.span_id = new_span_id();
    child_of(parent, ids);
}

/// CLIENT ids for a Redis command a thread writes: a child of the SERVER span the thread
/// is handling, else the root of a new trace (nothing is injected: RESP has no headers).
#[inline(always)]
pub fn on_resp_command(pid_tgid: u64, ids: &mut TraceIds) {
    ids.kind = TRACE_CLIENT;
    ids.span_id = new_span_id();
    thread_parent(pid_tgid, ids);
}

/// Makes `ids` a child of the thread's open SERVER span, or the root of a new trace.
#[inline(always)]
pub fn thread_parent(pid_tgid: u64, ids: &mut TraceIds) {
    child_of(open_server(pid_tgid), ids);
}

/// Makes `ids` a child of the SERVER span the connection `key` was opened in, else of the
/// thread's open one, else the root of a new trace (sk_msg, for a connection's first
/// request).
#[inline(always)]
pub fn connection_parent(pid_tgid: u64, key: u64, ids: &mut TraceIds) {
    child_of(opener(pid_tgid, key).or_else(|| open_server(pid_tgid)), ids);
}

/// Makes `ids` a child of `server` (a SERVER span of this process), or the root of a new
/// trace.
#[inline(always)]
fn child_of(server: Option<&TraceIds>, ids: &mut TraceIds) {
    match server {
        Some(server) => {
            // SAFETY: distinct map values (a plain assignment became a memmove call).
            unsafe { core::ptr::copy_nonoverlapping(&server.trace_id, &mut ids.trace_id, 1) };
            ids.parent_span_id = server.span_id;
            ids.has_parent = 1;
            ids.flags = server.flags;
            ids.origin = ORIGIN_THREAD;
        }
        None => {
            ids.trace_id = new_trace_id();
            ids.flags = SAMPLED;
            ids.origin = ORIGIN_NEW;
        }
    }
}
