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
use agent_common::{counter, syscall, CONN_TLS, DIR_EGRESS, DIR_INGRESS};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};

use crate::{
    conn::{current_gen, lookup_tcp},
    data::emit_tls_plaintext,
    maps::{agent_tgid, count},
};

/// No socket known yet.
const NO_FD: u32 = u32::MAX;

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
}

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

/// Called by the socket programs for a TLS connection's call: if the thread is inside an
/// SSL call, that call uses `fd`; a read outside one (`read`: the call is a read of a
/// connection known to be TLS) is remembered for the thread's next `SSL_read`, which
/// decrypts it from a memory BIO. Returns whether the thread was inside an SSL call.
#[inline(always)]
pub fn note_tls_fd(pid_tgid: u64, fd: u32, read: bool) -> bool {
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
            }
            false
        }
        None => {
            if read {
                let t = TlsThread {
                    ssl: 0,
                    buf: 0,
                    out_len: 0,
                    fd: NO_FD,
                    in_call: 0,
                    last_read_fd: fd,
                    _pad: 0,
                };
                let _ = TLS_THREADS.insert(&pid_tgid, &t, 0);
            }
            false
        }
    }
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
                fd: NO_FD,
                in_call,
                last_read_fd: NO_FD,
                _pad: 0,
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
    let Some(state) = state else {
        if fd == NO_FD {
            count(counter::TLS_SOCKET_UNKNOWN);
        }
        return 0;
    };
    if remembered != Some(fd) {
        let _ = TLS_FDS.insert(&key, &fd, 0);
    }
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
