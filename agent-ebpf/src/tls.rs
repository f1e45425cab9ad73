//! TLS through OpenSSL's libssl: uprobes on its internal read and write (which `SSL_read`,
//! `SSL_write` and their `_ex` forms call; the agent finds them, `tls_libs.rs`) see the
//! plaintext the process reads and writes, which then goes through the same path as a
//! socket's bytes (`data::emit_data`). Both take `(SSL *, buf, num, size_t *done)` and
//! return 1 with `*done` set (the write from OpenSSL 3.2: `(…, num, flags, done)`).
//!
//! A call's `SSL*` does not say which socket it uses, so the socket is learnt from the
//! calls themselves: while a thread is inside an SSL call, its read or write on a TLS
//! connection (`data::exit`) names the fd ([`note_tls_fd`]), which is then remembered per
//! `SSL*` for calls served from OpenSSL's buffer without touching the socket. A library
//! reading through a memory BIO (Python's asyncio, Node) reads the socket itself first,
//! outside any SSL call, then decrypts with `SSL_read`: that read names the socket of the
//! thread's next `SSL_read`, and its `SSL_write`s use the socket their `SSL*` read from.
//! Such a client's first request on a new connection is written before anything is read
//! there: its plaintext record waits in the kernel ([`TLS_PENDING`]) until the thread's
//! next write to a TLS socket that has carried no plaintext yet, the request's ciphertext,
//! names the socket ([`release_pending`]); its response's read then binds the `SSL*`.
use agent_common::{
    counter, syscall, ConnState, DataEventHeader, CONN_BODY_OUT, CONN_HTTP2, CONN_TLS,
    CONN_TLS_HTTP, CONN_TLS_OPAQUE, DIR_EGRESS, DIR_INGRESS,
};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    conn::{current_gen, lookup_tcp},
    data::emit_tls_plaintext,
    maps::{agent_tgid, count, ring_output, SCRATCH_BYTES},
};

/// No socket known yet.
pub const NO_FD: u32 = u32::MAX;

/// A thread's SSL calls: the one in progress, and the TLS socket it last read outside any.
/// Kept between calls (updated in place: cheaper than an LRU insert and delete per call).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsThread {
    ssl: u64,
    buf: u64,
    /// Where the call writes its byte count (`done`).
    out_len: u64,
    /// The socket the call touched, or [`NO_FD`].
    fd: u32,
    /// The thread is inside an SSL call (between the entry and return probes): 1, or
    /// [`IN_CALL_RETURNS_COUNT`] for a call that returns its byte count.
    in_call: u32,
    /// The TLS socket the thread last read outside an SSL call, or [`NO_FD`]: where a
    /// library reading through a memory BIO (Python's asyncio, Node) got the ciphertext
    /// that its next `SSL_read` decrypts.
    last_read_fd: u32,
    _pad: u32,
    /// A write that named no socket (a memory BIO's first request on a new connection):
    /// when it returned (0: none held), and the connection flags its plaintext set (HTTP
    /// seen, a body follows); its record waits in [`TLS_PENDING`].
    pending_ts: u64,
    pending: ConnState,
}

/// A thread between no SSL calls.
const IDLE: TlsThread = TlsThread {
    ssl: 0,
    buf: 0,
    out_len: 0,
    fd: NO_FD,
    in_call: 0,
    last_read_fd: NO_FD,
    _pad: 0,
    pending_ts: 0,
    pending: NO_CONN,
};

/// The connection state a held write is looked at with until its socket is known.
const NO_CONN: ConnState = ConnState {
    sock_id: 0,
    flags: 0,
    role: 0,
    proto: 0,
    gen: 0,
    local_port: 0,
    remote_port: 0,
    head_span: [0; 4],
};

/// pid_tgid → its SSL calls. LRU: threads come and go without telling.
#[map(name = "TAPIR_TLS_THREADS")]
pub static TLS_THREADS: LruHashMap<u64, TlsThread> = LruHashMap::with_max_entries(16384, 0);

#[repr(C)]
#[derive(Clone, Copy)]
pub struct SslKey {
    ssl: u64,
    tgid: u32,
    _pad: u32,
}

/// (`SSL*`, process) → the fd it reads and writes.
#[map(name = "TAPIR_TLS_FDS")]
pub static TLS_FDS: LruHashMap<SslKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Payload bytes a held write keeps: a request head (a longer one is cut).
pub const PENDING_BYTES: usize = 2048;

/// A data record waiting for its socket: the first bytes of the per-CPU scratch record
/// (`DataScratch` starts with the header and the payload).
#[repr(C)]
pub struct PendingRecord {
    pub hdr: DataEventHeader,
    pub data: [u8; PENDING_BYTES],
}

const _: () = assert!(PENDING_BYTES <= SCRATCH_BYTES);

/// pid_tgid → the plaintext record of its write that named no socket yet.
#[map(name = "TAPIR_TLS_PENDING")]
pub static TLS_PENDING: LruHashMap<u64, PendingRecord> = LruHashMap::with_max_entries(256, 0);

/// A held write is sent only if its socket is named this soon after it (the library
/// writes the ciphertext in the same call chain; later, the thread's next write may be
/// another connection's).
const PENDING_TTL_NS: u64 = 10_000_000;

/// Called by the socket programs for a TLS connection's call: if the thread is inside an
/// SSL call, that call uses `fd`; a read outside one (`read`: the call is a read of a
/// connection known to be TLS) is remembered for the thread's next `SSL_read`, which
/// decrypts it from a memory BIO; a write outside one (`conn`: the connection written)
/// releases the thread's held write. Returns whether the thread was inside an SSL call.
#[inline(always)]
pub fn note_tls_fd(pid_tgid: u64, fd: u32, read: bool, conn: Option<&mut ConnState>) -> bool {
    match TLS_THREADS.get_ptr_mut(&pid_tgid) {
        Some(t) => {
            // SAFETY: pointer from a successful lookup.
            let t = unsafe { &mut *t };
            if t.in_call != 0 {
                t.fd = fd;
                return true;
            }
            if read {
                t.last_read_fd = fd;
            } else if t.pending_ts != 0 {
                if let Some(conn) = conn {
                    release_pending(pid_tgid, t, fd, conn);
                }
            }
            false
        }
        None => {
            if read {
                let t = TlsThread {
                    last_read_fd: fd,
                    ..IDLE
                };
                let _ = TLS_THREADS.insert(&pid_tgid, &t, 0);
            }
            false
        }
    }
}

/// The thread's write to TLS connection `fd` outside an SSL call, while a write that named
/// no socket is held: that write's ciphertext, if the connection has carried no plaintext
/// yet (a connection that has is known to its `SSL*`) and the write is recent. Its record
/// goes out as the connection's, stamped now (records enter the rings in stamp order). The
/// `SSL*` is not bound to `fd` here: its response's read names the socket surely, and a
/// wrong guess then costs one record, not the connection's every call.
#[inline(always)]
fn release_pending(pid_tgid: u64, t: &mut TlsThread, fd: u32, conn: &mut ConnState) {
    if conn.flags & (CONN_TLS_HTTP | CONN_TLS_OPAQUE) != 0 {
        return;
    }
    let held_at = t.pending_ts;
    t.pending_ts = 0;
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(held_at) >= PENDING_TTL_NS {
        count(counter::TLS_SOCKET_UNKNOWN);
        let _ = TLS_PENDING.remove(&pid_tgid);
        return;
    }
    // HTTP/2's preface (a Node gRPC client) hands over CONN_HTTP2: this record and the
    // connection's next are flagged DATA_HTTP2.
    conn.flags |= t.pending.flags & (CONN_TLS_HTTP | CONN_TLS_OPAQUE | CONN_HTTP2 | CONN_BODY_OUT);
    let Some(rec) = TLS_PENDING.get_ptr_mut(&pid_tgid) else {
        return;
    };
    // SAFETY: pointer from a successful lookup.
    let rec = unsafe { &mut *rec };
    rec.hdr.header.fd = fd;
    rec.hdr.header.ts_ns = now;
    rec.hdr.sock_id = conn.sock_id;
    let captured = (rec.hdr.captured as usize).min(PENDING_BYTES);
    // Masked so that the verifier sees `size` never exceed the record.
    let size = core::mem::size_of::<DataEventHeader>()
        + (core::hint::black_box(captured) & (2 * PENDING_BYTES - 1)).min(PENDING_BYTES);
    rec.hdr.flags = crate::data::data_flags(conn.flags);
    crate::data::note_output(ring_output(rec, size as u64), &mut conn.flags);
    let _ = TLS_PENDING.remove(&pid_tgid);
}

/// Holds the data record in this CPU's scratch (`hdr`, the start of a `DataScratch`) for
/// the thread's write that names its socket ([`release_pending`]).
#[inline(always)]
pub fn hold_record(pid_tgid: u64, hdr: &mut DataEventHeader) {
    hdr.captured = hdr.captured.min(PENDING_BYTES as u32);
    // SAFETY: `hdr` heads a `DataScratch`, whose payload follows the header and is longer
    // than PENDING_BYTES (checked above): a `PendingRecord`'s bytes.
    let rec = unsafe { &*(hdr as *const DataEventHeader as *const PendingRecord) };
    let _ = TLS_PENDING.insert(&pid_tgid, rec, 0);
}

/// Entry of the internal read or write: remembers the call for its return.
#[uprobe]
pub fn tapir_ssl_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, 3);
    0
}

/// The same for a write whose `done` pointer is the fifth argument (OpenSSL ≥ 3.2).
#[uprobe]
pub fn tapir_ssl_enter_out5(ctx: ProbeContext) -> u32 {
    enter(&ctx, 4);
    0
}

/// The entry of `SSL_read` or `SSL_write`, which return the bytes moved (probed where a
/// build inlined the internal functions into them).
#[uprobe]
pub fn tapir_ssl_enter_ret(ctx: ProbeContext) -> u32 {
    enter(&ctx, COUNT_RETURNED);
    0
}

/// `enter`'s `done_arg` for functions that return their count.
const COUNT_RETURNED: usize = usize::MAX;
/// `TlsThread::in_call` of a call that returns its count (else 1).
const IN_CALL_RETURNS_COUNT: u32 = 2;

#[inline(always)]
fn enter(ctx: &ProbeContext, done_arg: usize) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == agent_tgid() || !current_gen(tgid).1 {
        return;
    }
    let (Some(ssl), Some(buf)) = (ctx.arg::<u64>(0), ctx.arg::<u64>(1)) else {
        return;
    };
    let (out_len, in_call) = if done_arg == COUNT_RETURNED {
        (0, IN_CALL_RETURNS_COUNT)
    } else {
        (ctx.arg::<u64>(done_arg).unwrap_or(0), 1)
    };
    match TLS_THREADS.get_ptr_mut(&pid_tgid) {
        Some(t) => {
            // SAFETY: pointer from a successful lookup.
            let t = unsafe { &mut *t };
            t.ssl = ssl;
            t.buf = buf;
            t.out_len = out_len;
            t.fd = NO_FD;
            t.in_call = in_call;
        }
        None => {
            let t = TlsThread {
                ssl,
                buf,
                out_len,
                in_call,
                ..IDLE
            };
            let _ = TLS_THREADS.insert(&pid_tgid, &t, 0);
        }
    }
}

#[uretprobe]
pub fn tapir_ssl_read_exit(ctx: RetProbeContext) -> u32 {
    on_return(&ctx, DIR_INGRESS)
}

#[uretprobe]
pub fn tapir_ssl_write_exit(ctx: RetProbeContext) -> u32 {
    on_return(&ctx, DIR_EGRESS)
}

/// The return of an SSL call: its plaintext, when it moved some, on the socket its `SSL*`
/// uses.
#[inline(always)]
fn on_return(ctx: &RetProbeContext, direction: u8) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(t) = TLS_THREADS.get_ptr_mut(&pid_tgid) else {
        return 0;
    };
    // SAFETY: pointer from a successful lookup.
    let t = unsafe { &mut *t };
    if t.in_call == 0 {
        // Entered before the probes were attached.
        return 0;
    }
    let call = *t;
    t.in_call = 0;
    if direction == DIR_INGRESS {
        // One socket read outside SSL calls names the socket of one SSL_read at most.
        t.last_read_fd = NO_FD;
    }
    let rc = ctx.ret::<u64>() as i32;
    let moved = if call.in_call == IN_CALL_RETURNS_COUNT {
        if rc <= 0 {
            return 0;
        }
        rc as u64
    } else {
        // 1 on success, with the count stored through `done`.
        if rc != 1 || call.out_len == 0 {
            return 0;
        }
        // SAFETY: bpf_probe_read_user tolerates any address.
        match unsafe { bpf_probe_read_user(call.out_len as *const u64) } {
            Ok(n) if n > 0 => n,
            _ => return 0,
        }
    };
    let tgid = (pid_tgid >> 32) as u32;
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    // The socket, by what says it best: one the call touched (a socket BIO); else the one
    // this `SSL*` used last, while it is still an open TLS connection (a socket BIO's call
    // served from OpenSSL's buffer); else, for a read, the TLS socket the thread read just
    // before (a memory BIO, filled from it by the program). That last is not taken first:
    // a server thread that read another connection's handshake would mislead it.
    // SAFETY: a plain value read from the map.
    let remembered = unsafe { TLS_FDS.get(&key) }.copied();
    let mut fd = call.fd;
    if fd == NO_FD {
        if let Some(known) = remembered {
            fd = known;
        }
    }
    let mut state = if fd == NO_FD {
        None
    } else {
        tls_conn(tgid, fd)
    };
    if state.is_none() && call.fd == NO_FD && direction == DIR_INGRESS {
        fd = call.last_read_fd;
        if fd != NO_FD {
            state = tls_conn(tgid, fd);
        }
    }
    let state = match state {
        Some(state) => {
            if remembered != Some(fd) {
                let _ = TLS_FDS.insert(&key, &fd, 0);
            }
            state
        }
        // A write that touched no socket on an `SSL*` with no open connection yet: a memory
        // BIO client's first request on a new connection, which it writes before reading
        // anything there. Its record is held until the socket is named.
        None if call.fd == NO_FD && direction == DIR_EGRESS => {
            if t.pending_ts != 0 {
                // The one held before never met its socket.
                count(counter::TLS_SOCKET_UNKNOWN);
                let _ = TLS_PENDING.remove(&pid_tgid);
            }
            // SAFETY: helper without preconditions.
            t.pending_ts = unsafe { bpf_ktime_get_ns() };
            t.pending = NO_CONN;
            fd = NO_FD;
            &mut t.pending as *mut ConnState
        }
        None => {
            if fd == NO_FD {
                count(counter::TLS_SOCKET_UNKNOWN);
            }
            return 0;
        }
    };
    let call_kind = if direction == DIR_INGRESS {
        syscall::SSL_READ
    } else {
        syscall::SSL_WRITE
    };
    emit_tls_plaintext(pid_tgid, call.buf, moved, fd, call_kind, direction, state);
    0
}

/// Process `tgid`'s connection on `fd`, if it is a TLS one (not an fd closed and reused).
#[inline(always)]
fn tls_conn(tgid: u32, fd: u32) -> Option<*mut agent_common::ConnState> {
    let state = lookup_tcp(tgid, fd)?;
    // SAFETY: pointer from a successful map lookup.
    (unsafe { (*state).flags } & CONN_TLS != 0).then_some(state)
}
