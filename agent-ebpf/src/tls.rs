//! TLS through OpenSSL's libssl: uprobes on its internal read and write (which `SSL_read`,
//! `SSL_write` and their `_ex` forms call; the agent finds them, `tls_libs.rs`) see the
//! plaintext the process reads and writes, which then goes through the same path as a
//! socket's bytes (`data::emit_data`). Both take `(SSL *, buf, num, size_t *done)` and
//! return 1 with `*done` set (the write from OpenSSL 3.2: `(…, num, flags, done)`).
//!
//! A call's `SSL*` does not say which socket it uses, so the socket is learnt from the
//! calls themselves: while a thread is inside an SSL call, its read or write on a TLS
//! connection (`data::exit`) names the fd ([`note_tls_fd`]), which is then remembered per
//! `SSL*` for calls served from OpenSSL's buffer without touching the socket.
use agent_common::{counter, syscall, DIR_EGRESS, DIR_INGRESS};
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

/// An SSL call in progress on a thread.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TlsCall {
    ssl: u64,
    buf: u64,
    /// Where the call writes its byte count (`done`).
    out_len: u64,
    /// The socket the call touched, or the one its `SSL*` was last seen with.
    fd: u32,
    /// `fd` was seen during this call (and is worth remembering for the `SSL*`).
    fd_seen: u32,
}

/// pid_tgid → the SSL call it is inside. LRU: a thread killed inside a call never removes
/// its entry.
#[map(name = "TAPIR_TLS_CALLS")]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

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
/// SSL call, that call uses `fd`. Returns whether it was.
#[inline(always)]
pub fn note_tls_fd(pid_tgid: u64, fd: u32) -> bool {
    match TLS_CALLS.get_ptr_mut(&pid_tgid) {
        Some(call) => {
            // SAFETY: pointer from a successful lookup.
            let call = unsafe { &mut *call };
            call.fd = fd;
            call.fd_seen = 1;
            true
        }
        None => false,
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
    let call = TlsCall {
        ssl,
        buf,
        out_len: ctx.arg::<u64>(done_arg).unwrap_or(0),
        fd: NO_FD,
        fd_seen: 0,
    };
    let _ = TLS_CALLS.insert(&pid_tgid, &call, 0);
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
    // SAFETY: a plain value copied out of the map.
    let Some(call) = (unsafe { TLS_CALLS.get(&pid_tgid) }).copied() else {
        return 0;
    };
    let _ = TLS_CALLS.remove(&pid_tgid);
    // 1 on success, with the count stored through `done`.
    let rc = ctx.ret::<u64>() as i32;
    if rc != 1 || call.out_len == 0 {
        return 0;
    }
    // SAFETY: bpf_probe_read_user tolerates any address.
    let Ok(moved) = (unsafe { bpf_probe_read_user(call.out_len as *const u64) }) else {
        return 0;
    };
    if moved == 0 {
        return 0;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let key = SslKey {
        ssl: call.ssl,
        tgid,
        _pad: 0,
    };
    let fd = if call.fd_seen != 0 {
        // SAFETY: a plain value read from the map.
        if unsafe { TLS_FDS.get(&key) }.copied() != Some(call.fd) {
            let _ = TLS_FDS.insert(&key, &call.fd, 0);
        }
        call.fd
    } else {
        // SAFETY: as above.
        match unsafe { TLS_FDS.get(&key) } {
            Some(fd) => *fd,
            None => {
                count(counter::TLS_SOCKET_UNKNOWN);
                return 0;
            }
        }
    };
    let Some(state) = lookup_tcp(tgid, fd) else {
        return 0;
    };
    let call_kind = if direction == DIR_INGRESS {
        syscall::SSL_READ
    } else {
        syscall::SSL_WRITE
    };
    emit_tls_plaintext(pid_tgid, call.buf, moved, fd, call_kind, direction, state);
    0
}
