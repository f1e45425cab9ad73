//! read/write-family syscalls on tracked TCP connections: at exit, when the bytes are or
//! follow HTTP/1.x, copy a call's head (or, of a body, a few bytes) and its last bytes; on
//! an HTTP/2 connection, copy every call up to the capture.
use agent_common::{
    counter, syscall, EventKind, Role, TraceIds, CONN_BODY_IN, CONN_BODY_OUT, CONN_GAP,
    CONN_HEAD_AT_LINE, CONN_HEAD_OPEN, CONN_HTTP, CONN_HTTP2, CONN_OPAQUE, CONN_PORT_LEARNED,
    CONN_TLS, CONN_TLS_HTTP, CONN_TLS_OPAQUE, CONN_WAKE_ON_REPLY, DATA_AFTER_GAP, DATA_H2_SPARSE,
    DATA_HTTP2, DATA_RESP, DIR_EGRESS, DIR_INGRESS, MAX_CAPTURE, MAX_IOVECS, OPAQUE_HTTP2,
    OPAQUE_TLS, PROTO_RESP, TAIL_BYTES,
};
#[cfg(not(feature = "compat"))]
use aya_ebpf::helpers::generated::{bpf_get_current_task_btf, bpf_task_pt_regs};
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user},
    macros::tracepoint,
    programs::TracePointContext,
    EbpfContext,
};

use crate::{
    conn::{current_gen, emit_conn, header_of, lookup_tcp},
    h2,
    inject::learn_http_port,
    looping::repeat,
    maps::{
        agent_tgid, capture_bytes, count, ring_output_waking, tls_on, DataScratch, Gather,
        PendingIo, SCRATCH, SCRATCH_BYTES, SHAPE_BUF, SHAPE_IOVEC, SHAPE_NONE,
    },
    tls::{hold_record, note_tls_fd, NO_FD},
    trace::{
        body_start, byte_at, ends_with_empty_line, is_method_prefix, is_request_start,
        is_response_start, on_client_request, on_resp_command, on_server_head_continued,
        on_server_request, on_server_response, span_head, HeadScan,
    },
};

/// Syscall tracepoint arguments start at offset 16, 8 bytes each; `ret` of sys_exit_* is at 16.
/// A direct load from the context (the verifier allows reads of a tracepoint's record),
/// not `read_at`'s `bpf_probe_read_kernel` call: this runs on every hooked syscall.
#[inline(always)]
pub fn arg(ctx: &TracePointContext, n: usize) -> u64 {
    // SAFETY: the tracepoint record has at least 6 argument slots; `n` is a constant.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(16 + 8 * n) as *const u64) }
}

/// The syscall's first three arguments, read back from the registers saved at syscall
/// entry (x86_64 `struct pt_regs`: dx at 96, si at 104, di at 112). Reading them at exit,
/// instead of saving them at entry, halves the hooks on the hottest syscalls and also
/// catches calls that were already blocked (a server waiting in recv) when Tapir started.
#[cfg(not(feature = "compat"))]
#[inline(always)]
fn syscall_args(_ctx: &TracePointContext) -> Option<(u64, u64, u64)> {
    // SAFETY: bpf_get_current_task_btf has no preconditions; bpf_task_pt_regs accepts it.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as *const u64;
    if regs.is_null() {
        return None;
    }
    // The helper returns a BTF-typed pointer to `struct pt_regs`: the verifier lets us load
    // its fields directly (cheaper than a bpf_probe_read_kernel call per syscall).
    // SAFETY: dx, si and di are the 13th to 15th u64 fields of x86_64 `struct pt_regs`.
    let (dx, si, di) = unsafe {
        (
            core::ptr::read_volatile(regs.add(12)),
            core::ptr::read_volatile(regs.add(13)),
            core::ptr::read_volatile(regs.add(14)),
        )
    };
    Some((di, si, dx))
}

/// `__syscall_nr` of a syscall tracepoint's record (an int at offset 8).
#[inline(always)]
fn syscall_nr(ctx: &TracePointContext) -> u64 {
    // SAFETY: every syscall tracepoint record has the field.
    unsafe { core::ptr::read_volatile((ctx.as_ptr() as *const u8).add(8) as *const i32) as u64 }
}

/// The same for kernels without bpf_task_pt_regs (before 5.15): x86_64 saves a syscall's
/// registers at the top of the task's kernel stack (THREAD_SIZE = 16 KiB without KASAN),
/// in a `struct pt_regs` of 21 words, below 16 bytes of padding on kernels with FRED
/// (6.9+, where only `TAPIR_EBPF_COMPAT=1` brings this build). `orig_ax` (word 15) must be
/// the syscall's number, which tells the two layouts apart and refuses any other.
#[cfg(feature = "compat")]
#[inline(always)]
fn syscall_args(ctx: &TracePointContext) -> Option<(u64, u64, u64)> {
    const THREAD_SIZE: u64 = 16 << 10;
    const PT_REGS: u64 = 21 * 8;
    // SAFETY: no preconditions.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    // SAFETY: bpf_probe_read_kernel tolerates any address.
    let stack: u64 = unsafe {
        aya_ebpf::helpers::bpf_probe_read_kernel(
            (task + crate::maps::kernel_offset!(task_stack) as u64) as *const u64,
        )
    }
    .ok()?;
    let nr = syscall_nr(ctx);
    for padding in [0u64, 16] {
        let regs = stack + THREAD_SIZE - padding - PT_REGS;
        // dx, si, di, orig_ax: words 12 to 15.
        // SAFETY: as above.
        let [dx, si, di, orig_ax] =
            unsafe { aya_ebpf::helpers::bpf_probe_read_kernel((regs + 12 * 8) as *const [u64; 4]) }
                .ok()?;
        if orig_ax == nr {
            return Some((di, si, dx));
        }
    }
    count(counter::REGS_NOT_FOUND);
    None
}

/// x86_64 numbers of the syscalls whose exits share a program with another's.
const NR_RECVFROM: u64 = 45;
const NR_SENDTO: u64 = 44;
const NR_RECVMSG: u64 = 47;
const NR_SENDMSG: u64 = 46;

/// The exit of a data syscall. `msghdr`: the second argument is a `struct user_msghdr`
/// (recvmsg/sendmsg), whose iovec array is then handled as readv's/writev's (`SHAPE` is
/// [`SHAPE_IOVEC`]).
#[inline(always)]
fn exit<const SHAPE: u8>(ctx: &TracePointContext, call: u8, direction: u8, msghdr: bool) -> u32 {
    let ret = arg(ctx, 0) as i64;
    if ret <= 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == agent_tgid() {
        return 0;
    }
    // A process left out by --pid/--exe stops here, before the helper calls that read the
    // arguments back (lookup_tcp asks again: a per-CPU cached answer).
    if !current_gen(tgid).1 {
        return 0;
    }
    let Some((fd, buf, third)) = syscall_args(ctx) else {
        return 0;
    };
    let fd = fd as u32;
    let Some(state) = lookup_tcp(tgid, fd) else {
        return 0;
    };
    // SAFETY: pointer from a successful map lookup.
    let state = unsafe { &mut *state };
    if state.flags & CONN_TLS != 0 {
        // Its bytes are ciphertext; the plaintext comes from the SSL call around this one.
        if tls_on() {
            note_tls_fd(pid_tgid, fd, direction == DIR_INGRESS, Some(state));
        }
        return 0;
    }
    let (buf, vlen) = match SHAPE {
        SHAPE_IOVEC if msghdr => match msghdr_iov(buf) {
            Some(iov) => iov,
            None => return 0,
        },
        SHAPE_IOVEC => (buf, third),
        _ => (buf, 0),
    };
    let p = PendingIo {
        pid_tgid,
        buf,
        vlen,
        sock_id: state.sock_id,
        fd,
        syscall: call,
        direction,
    };
    let _ = emit_data::<SHAPE>(&p, ret as u64, state, false);
    0
}

/// Tells the agent, once, that the connection carries `protocol`, which Tapir cannot read.
#[inline(always)]
fn report_opaque(p: &PendingIo, state: &agent_common::ConnState, protocol: u8) {
    let role = Role::from_u8(state.role);
    emit_conn(
        EventKind::ConnOpaque,
        p.fd,
        state.sock_id,
        role,
        false,
        protocol,
    );
}

/// Plaintext that a TLS library read from or wrote to connection `fd` (`tls.rs`), reported
/// as that connection's bytes.
#[inline(always)]
pub fn emit_tls_plaintext(
    pid_tgid: u64,
    buf: u64,
    moved: u64,
    fd: u32,
    call: u8,
    direction: u8,
    state: *mut agent_common::ConnState,
) {
    // SAFETY: pointer from a successful map lookup.
    let state = unsafe { &mut *state };
    let p = PendingIo {
        pid_tgid,
        buf,
        vlen: 0,
        sock_id: state.sock_id,
        fd,
        syscall: call,
        direction,
    };
    let _ = emit_data::<SHAPE_BUF>(&p, moved, state, true);
}

/// The first buffer of the call: (address, length).
#[inline(always)]
fn first_segment<const SHAPE: u8>(p: &PendingIo, total: u64) -> Option<(u64, u64)> {
    match SHAPE {
        SHAPE_BUF => Some((p.buf, total)),
        SHAPE_IOVEC => read_iovec(p.buf, 0),
        _ => None,
    }
}

#[inline(always)]
fn read_iovec(base: u64, i: u64) -> Option<(u64, u64)> {
    // SAFETY: bpf_probe_read_user tolerates any address.
    unsafe { bpf_probe_read_user((base + i * 16) as *const [u64; 2]) }
        .ok()
        .map(|v| (v[0], v[1]))
}

const _: () = assert!(MAX_IOVECS.is_power_of_two()); // read_iovecs masks with it

/// Reads the first `vlen` (at most MAX_IOVECS) entries of an iovec array with one helper
/// call (a call per entry cost ~100 ns each); returns how many were read.
#[inline(always)]
fn read_iovecs(dst: &mut [[u64; 2]; MAX_IOVECS], iov: u64, vlen: u64) -> u64 {
    if vlen == 0 {
        return 0;
    }
    let n = vlen.min(MAX_IOVECS as u64);
    // 16..=16×MAX_IOVECS bytes, in a form the verifier bounds.
    let bytes = ((n - 1) & (MAX_IOVECS as u64 - 1)) * 16 + 16;
    // SAFETY: `bytes` ≤ size_of_val(dst); bpf_probe_read_user tolerates any source address.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            dst.as_mut_ptr() as *mut _,
            bytes as u32,
            iov as *const _,
        )
    };
    if rc == 0 {
        n
    } else {
        count(counter::READ_USER_FAILED);
        0
    }
}

/// struct user_msghdr: msg_iov at 16, msg_iovlen at 24.
#[inline(always)]
fn msghdr_iov(msg: u64) -> Option<(u64, u64)> {
    // SAFETY: bpf_probe_read_user tolerates any address.
    let v = unsafe { bpf_probe_read_user((msg + 16) as *const [u64; 2]) }.ok()?;
    Some((v[0], v[1]))
}

/// What the first bytes of a connection's call say it carries.
enum FirstBytes {
    /// The start of an HTTP/1.x request or response.
    Http,
    /// A protocol Tapir cannot read ([`OPAQUE_TLS`], [`OPAQUE_HTTP2`]).
    Opaque(u8),
    /// Bytes no HTTP/1.x message starts with: not an uppercase letter (a method or
    /// `HTTP/`), not a line end (an empty line may precede a request).
    NotHttp,
    /// Too few bytes to tell, unreadable, or what may be a method Tapir does not know (or
    /// a PROXY protocol line before a request).
    Undecided,
    /// A RESP array (`*` and a digit): a Redis command when a client writes it.
    Resp,
}

#[inline(always)]
fn first_bytes(addr: u64, len: u64) -> FirstBytes {
    if len < 4 {
        return FirstBytes::Undecided;
    }
    // SAFETY: bpf_probe_read_user tolerates any address.
    let Ok(b) = (unsafe { bpf_probe_read_user(addr as *const [u8; 4]) }) else {
        return FirstBytes::Undecided;
    };
    if is_method_prefix(&b) || &b == b"HTTP" {
        FirstBytes::Http
    } else if b[0] == 0x16 && b[1] == 3 && b[2] <= 4 {
        // A TLS handshake record (ClientHello or ServerHello): content type 22, version 3.x.
        FirstBytes::Opaque(OPAQUE_TLS)
    } else if b[0] == b'*' && b[1].is_ascii_digit() {
        FirstBytes::Resp
    } else if &b == b"PRI " {
        // The HTTP/2 preface, "PRI * HTTP/2.0": h2c, gRPC without TLS.
        FirstBytes::Opaque(OPAQUE_HTTP2)
    } else if b[0].is_ascii_uppercase() || b[0] == b'\r' || b[0] == b'\n' {
        FirstBytes::Undecided
    } else {
        FirstBytes::NotHttp
    }
}

/// Whether a connection's first telling bytes start HTTP/2: the client preface, or, from
/// the server of an accepted connection, a first write that is a SETTINGS frame (servers
/// speak first, before they read the preface).
#[inline(always)]
fn starts_http2(first: &FirstBytes, p: &PendingIo, role: u8, addr: u64, len: u64) -> bool {
    match first {
        FirstBytes::Opaque(protocol) => *protocol == OPAQUE_HTTP2,
        FirstBytes::NotHttp => {
            role == Role::Server as u8 && p.direction == DIR_EGRESS && is_settings_frame(addr, len)
        }
        FirstBytes::Http | FirstBytes::Undecided | FirstBytes::Resp => false,
    }
}

/// Of a call that starts HTTP/2: the direction whose bytes start with the client preface
/// (this call's, or, when it is the server's first SETTINGS, the server's ingress).
#[inline(always)]
fn preface_direction(first: &FirstBytes, p: &PendingIo) -> u8 {
    match first {
        FirstBytes::Opaque(_) => p.direction,
        _ => DIR_INGRESS,
    }
}

/// Whether the call's first bytes are an HTTP/2 SETTINGS frame on stream 0 (a server's
/// first frame): length < 64 KiB, type 4, flags 0 (not an ACK), stream 0.
#[inline(always)]
fn is_settings_frame(addr: u64, len: u64) -> bool {
    if len < 9 {
        return false;
    }
    // SAFETY: bpf_probe_read_user tolerates any address.
    let Ok(b) = (unsafe { bpf_probe_read_user(addr as *const [u8; 9]) }) else {
        return false;
    };
    b[0] == 0 && b[3] == 4 && b[4] == 0 && b[5] == 0 && b[6] == 0 && b[7] == 0 && b[8] == 0
}

#[inline(always)]
fn emit_data<const SHAPE: u8>(
    p: &PendingIo,
    total: u64,
    state: &mut agent_common::ConnState,
    tls_plaintext: bool,
) -> Option<()> {
    if tls_plaintext {
        // What a TLS library decrypted: looked at until it starts like HTTP/1.x or HTTP/2.
        if state.flags & CONN_TLS_HTTP == 0 {
            if state.flags & CONN_TLS_OPAQUE != 0 {
                return None;
            }
            match first_bytes(p.buf, total) {
                FirstBytes::Http => state.flags |= CONN_TLS_HTTP,
                // HTTP/2 inside TLS (h2): read like h2c, its records flagged.
                first if starts_http2(&first, p, state.role, p.buf, total) => {
                    state.flags |= CONN_TLS_HTTP | CONN_HTTP2;
                    // A held write's state is the thread's, not a socket's: its socket's
                    // framing is made at that socket's next call (h2::framing).
                    if p.fd != NO_FD {
                        h2::start(state.sock_id, preface_direction(&first, p));
                    }
                }
                // What looks like a TLS record inside TLS: nothing Tapir reads.
                FirstBytes::Opaque(_) => {
                    state.flags |= CONN_TLS_OPAQUE;
                    return None;
                }
                FirstBytes::NotHttp | FirstBytes::Undecided | FirstBytes::Resp => return None,
            }
        }
    } else if state.flags & CONN_HTTP == 0 && state.proto != PROTO_RESP {
        // Only connections that have carried HTTP/1.x or speak HTTP/2 are reported;
        // everything else costs one lookup and this check, and a look at its first bytes
        // until they tell: TLS is reported once (so that users learn what is not seen),
        // then it and other protocols are skipped.
        if state.flags & CONN_OPAQUE != 0 {
            return None;
        }
        let (addr, len) = first_segment::<SHAPE>(p, total)?;
        match first_bytes(addr, len.min(total)) {
            FirstBytes::Http => state.flags |= CONN_HTTP,
            // h2c: read as it is (the agent parses its frames), its records flagged.
            first if starts_http2(&first, p, state.role, addr, len.min(total)) => {
                state.flags |= CONN_HTTP | CONN_HTTP2;
                h2::start(state.sock_id, preface_direction(&first, p));
            }
            FirstBytes::Opaque(protocol) => {
                state.flags |= CONN_OPAQUE;
                if protocol == OPAQUE_TLS {
                    state.flags |= CONN_TLS;
                    if tls_on() {
                        note_tls_fd(p.pid_tgid, p.fd, p.direction == DIR_INGRESS, None);
                    }
                }
                report_opaque(p, state, protocol);
                return None;
            }
            // A client that connected while Tapir runs writes a Redis command first.
            FirstBytes::Resp if state.role == Role::Client as u8 && p.direction == DIR_EGRESS => {
                state.proto = PROTO_RESP;
            }
            // Seen from its start (accepted or connected while Tapir runs), the connection
            // speaks another protocol; first seen in use, it may be in the middle of a body.
            FirstBytes::NotHttp | FirstBytes::Resp if state.role != Role::Unknown as u8 => {
                state.flags |= CONN_OPAQUE;
                count(counter::OTHER_PROTOCOL);
                return None;
            }
            FirstBytes::NotHttp | FirstBytes::Undecided | FirstBytes::Resp => {
                // A TLS connection first seen in use (no handshake): its bytes say nothing
                // Tapir can read, but a thread inside an SSL call moved them.
                if tls_on() && note_tls_fd(p.pid_tgid, p.fd, false, None) {
                    state.flags |= CONN_OPAQUE | CONN_TLS;
                }
                return None;
            }
        }
    }
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: per-CPU scratch slot; nothing else on this CPU uses it during this program.
    let scratch = unsafe { &mut *scratch };
    if SHAPE == SHAPE_NONE {
        // The bytes are in a file, not in user memory: only their count is reported. The
        // scratch still holds the last vectored call's iovecs (of any process on this
        // CPU), which a copy would read again.
        emit_count_only(scratch, p, total, &mut state.flags);
        return Some(());
    }
    let want = (capture_bytes() as u64).min(total);
    let body_flag = if p.direction == DIR_INGRESS {
        CONN_BODY_IN
    } else {
        CONN_BODY_OUT
    };
    let in_body = state.flags & body_flag != 0;
    if SHAPE == SHAPE_IOVEC {
        let read = read_iovecs(&mut scratch.iovecs, p.buf, p.vlen);
        Gather::store(
            &mut scratch.gather,
            Gather {
                total,
                read,
                ..Gather::default()
            },
        );
    }
    let resp = state.proto == PROTO_RESP;
    if state.flags & CONN_HTTP2 != 0 || resp {
        // Frames are read by the agent: header blocks anywhere in the call matter. TLS
        // plaintext whose socket is not known yet waits for it (tls.rs), unwalked. RESP
        // (Redis) is copied the same way, up to the capture, without framing.
        let hold = tls_plaintext && p.fd == NO_FD;
        let conn = if hold || resp {
            None
        } else {
            h2::framing(state.sock_id)
        };
        let buf = (SHAPE == SHAPE_BUF).then_some(p.buf);
        let (copied, sparse) =
            h2::copy_call(scratch, conn, p.direction, buf, total, want, |scratch| {
                copy_upto::<SHAPE>(scratch, p, 0, want)
            });
        let hdr = &mut scratch.hdr;
        if !sparse {
            hdr.tail_len = 0;
        }
        hdr.captured = copied as u32;
        // SAFETY: a field of this CPU's scratch record (read back as below).
        let captured = unsafe { core::ptr::read_volatile(&hdr.captured) } as u64;
        clear_ids(&mut hdr.trace);
        let extra = if resp {
            if p.direction == DIR_EGRESS {
                on_resp_command(p.pid_tgid, &mut hdr.trace);
            }
            DATA_RESP
        } else if sparse {
            DATA_H2_SPARSE
        } else {
            0
        };
        submit(scratch, p, total, captured, &mut state.flags, hold, extra);
        return Some(());
    }
    // Bodies are not wanted, only their size and a chunked body's framing, which their
    // first and last bytes mostly show. The first HEAD_PROBE bytes are copied (one helper
    // call for most calls), the rest only when it may hold head bytes.
    let mut copied = copy_upto::<SHAPE>(scratch, p, 0, want.min(HEAD_PROBE));
    let starts =
        is_request_start(&scratch.data, copied) || is_response_start(&scratch.data, copied);
    let mut body_next = in_body;
    if starts {
        if copied == total {
            // A whole head alone (the body, if any, follows in later calls), or a small
            // message whose end is not known here.
            body_next = ends_with_empty_line(&scratch.data, copied);
        } else if let Some(at) =
            head_segment_end::<SHAPE>(scratch, copied).or_else(|| body_start(copied))
        {
            if message_at(&scratch.data, at, copied) {
                // Pipelined: another message follows this head in the same call.
                copied = copy_upto::<SHAPE>(scratch, p, copied, want);
                body_next = false;
            } else {
                copied = copied.min(at + BODY_SLACK);
                body_next = true;
            }
        } else {
            copied = copy_upto::<SHAPE>(scratch, p, copied, want);
            body_next = false;
        }
    } else if in_body {
        // A short call is already copied whole, and keeps a pipelined message that may
        // follow the end of a short body.
        if total > HEAD_PROBE {
            copied = copied.min(BODY_PREFIX);
        }
    } else {
        copied = copy_upto::<SHAPE>(scratch, p, copied, want);
    }
    if body_next != in_body {
        state.flags ^= body_flag;
    }
    let captured = copied;
    let mut tail_addr: u64 = 0;
    if total > captured {
        if SHAPE == SHAPE_BUF {
            if total >= TAIL_BYTES as u64 {
                tail_addr = p.buf + total - TAIL_BYTES as u64;
            }
        } else {
            let g = &scratch.gather;
            if g.consumed >= total && g.last_len >= TAIL_BYTES as u64 {
                tail_addr = g.last_base + g.last_len - TAIL_BYTES as u64;
            }
        }
    }
    let DataScratch { hdr, data, .. } = scratch;
    hdr.tail_len = 0;
    if tail_addr != 0 && total > captured {
        // SAFETY: bpf_probe_read_user tolerates any address.
        if let Ok(t) = unsafe { bpf_probe_read_user(tail_addr as *const [u8; TAIL_BYTES]) } {
            hdr.tail = t;
            hdr.tail_len = TAIL_BYTES as u8;
        }
    }
    // Both counts read back from map memory, whose values the verifier does not track: the
    // copy above ends in several states (its outcomes, and the comparisons that chose them
    // narrowed `total` each its own way), and the trace logic below is then verified once
    // instead of once per state. `total` too: 1.85 M → 0.65 M instructions walked over the
    // data programs, start-up CPU 2.4 → 1.0 s (session 28).
    hdr.captured = captured as u32;
    hdr.total = total.min(u32::MAX as u64) as u32;
    // SAFETY: a field of this CPU's scratch record.
    let captured = unsafe { core::ptr::read_volatile(&hdr.captured) } as u64;
    // SAFETY: as above.
    let total = unsafe { core::ptr::read_volatile(&hdr.total) } as u64;
    clear_ids(&mut hdr.trace);
    trace_ids(
        p.pid_tgid,
        p.direction,
        data,
        captured,
        captured == total,
        &mut hdr.trace,
        state,
        !tls_plaintext,
    );
    // TLS plaintext whose socket is not known yet waits for it (tls.rs).
    submit(
        scratch,
        p,
        total,
        captured,
        &mut state.flags,
        tls_plaintext && p.fd == NO_FD,
        0,
    );
    Some(())
}

/// A data record without payload: `total` bytes moved, none of them copied, no trace ids,
/// and the connection's head/body state left as it is (a file's bytes are always body).
#[inline(always)]
fn emit_count_only(scratch: &mut DataScratch, p: &PendingIo, total: u64, conn_flags: &mut u16) {
    let hdr = &mut scratch.hdr;
    hdr.captured = 0;
    hdr.tail_len = 0;
    clear_ids(&mut hdr.trace);
    submit(scratch, p, total, 0, conn_flags, false, 0);
}

/// Stamps this CPU's data record with the call (`total` bytes moved), sends its header and
/// the first `captured` bytes of its payload (with `extra` flags), and counts the outcome;
/// or, `hold`, keeps it for the thread's write that names its socket.
#[inline(always)]
fn submit(
    scratch: &mut DataScratch,
    p: &PendingIo,
    total: u64,
    captured: u64,
    conn_flags: &mut u16,
    hold: bool,
    extra: u8,
) {
    let hdr = &mut scratch.hdr;
    hdr.header = header_of(p.pid_tgid, EventKind::Data, p.fd);
    hdr.sock_id = p.sock_id;
    hdr.total = total.min(u32::MAX as u64) as u32;
    hdr.direction = p.direction;
    hdr.syscall = p.syscall;
    if hold {
        hold_record(p.pid_tgid, hdr);
        return;
    }
    hdr.flags = data_flags(*conn_flags) | extra;
    // Masked so that the verifier sees `size` never exceed the scratch record.
    let size = core::mem::size_of::<agent_common::DataEventHeader>() as u64
        + (core::hint::black_box(captured.min(MAX_CAPTURE as u64)) & (2 * MAX_CAPTURE as u64 - 1));
    // The reply to an injected request: the agent re-arms injection once it has seen it.
    let wake = p.direction == DIR_INGRESS && *conn_flags & CONN_WAKE_ON_REPLY != 0;
    if wake {
        *conn_flags &= !CONN_WAKE_ON_REPLY;
    }
    note_output(ring_output_waking(scratch, size, wake), conn_flags);
}

/// A data record's flags: [`DATA_AFTER_GAP`] when a record of the connection was lost
/// since the last one sent, [`DATA_HTTP2`] when the connection speaks HTTP/2.
#[inline(always)]
pub fn data_flags(conn_flags: u16) -> u8 {
    let gap = if conn_flags & CONN_GAP != 0 {
        DATA_AFTER_GAP
    } else {
        0
    };
    let http2 = if conn_flags & CONN_HTTP2 != 0 {
        DATA_HTTP2
    } else {
        0
    };
    gap | http2
}

/// Counts a data record's fate (`rc` of the ring output) and keeps the connection's
/// [`CONN_GAP`]: set while its records are lost, cleared once one is sent (carrying it).
#[inline(always)]
pub fn note_output(rc: i64, conn_flags: &mut u16) {
    if rc == 0 {
        count(counter::DATA_EVENTS);
        if *conn_flags & CONN_GAP != 0 {
            *conn_flags &= !CONN_GAP;
        }
    } else {
        count(counter::RINGBUF_FULL);
        *conn_flags |= CONN_GAP;
    }
}

/// Bytes first copied of every call; a call this short is kept whole. Most heads end
/// within them, and then nothing after the head is kept but [`BODY_SLACK`] bytes.
const HEAD_PROBE: u64 = 1024;
/// Bytes kept after a head's end: a chunked body's first size line.
const BODY_SLACK: u64 = 64;
/// Bytes kept of a call over HEAD_PROBE bytes that continues a body: a chunked body's size
/// line when a chunk starts the call.
const BODY_PREFIX: u64 = 64;

/// Does a request or a response start at `at` of the `n` copied bytes?
#[inline(always)]
fn message_at(data: &[u8; SCRATCH_BYTES], at: u64, n: u64) -> bool {
    if at + 5 > n {
        return false;
    }
    let b = [
        byte_at(data, at),
        byte_at(data, at + 1),
        byte_at(data, at + 2),
        byte_at(data, at + 3),
    ];
    is_method_prefix(&b) || (&b == b"HTTP" && byte_at(data, at + 4) == b'/')
}

/// A vectored write whose first segment is a whole head (nginx writes head and body as
/// two segments): where its body starts, without scanning the head.
#[inline(always)]
fn head_segment_end<const SHAPE: u8>(scratch: &DataScratch, copied: u64) -> Option<u64> {
    if SHAPE == SHAPE_BUF {
        return None;
    }
    let first = scratch.iovecs[0][1];
    (first <= copied && ends_with_empty_line(&scratch.data, first)).then_some(first)
}

/// Copies the call's bytes `[have, upto)` into the scratch record, after the `have`
/// already there; returns the bytes copied in all.
#[inline(always)]
fn copy_upto<const SHAPE: u8>(
    scratch: &mut DataScratch,
    p: &PendingIo,
    have: u64,
    upto: u64,
) -> u64 {
    if upto <= have {
        return have;
    }
    if SHAPE == SHAPE_BUF {
        return have + copy_user(&mut scratch.data, have, p.buf + have, upto - have);
    }
    let g = scratch.gather;
    Gather::store(
        &mut scratch.gather,
        Gather {
            cap: upto,
            captured: have,
            consumed: 0,
            ..g
        },
    );
    // A bpf_loop callback is verified once, however many segments there are: an unrolled
    // loop left the vectored reads at the verifier's 1M-instruction limit. One step per
    // iovec read and no more: each step is a call, and a step that only says "stop" costs
    // as much as one that copies (a return is a mispredicted branch under SRSO's Safe RET).
    repeat!(
        tapir_compat_gather,
        gather_segment,
        MAX_IOVECS,
        g.read.min(MAX_IOVECS as u64) as u32,
        0
    );
    scratch.gather.captured
}

/// One bpf_loop step of a vectored call's copy: segment `i` of `scratch.iovecs`, until
/// `total` bytes are accounted for; up to `cap` bytes land in `scratch.data`.
extern "C" fn gather_segment(i: u64, _ctx: *mut core::ffi::c_void) -> i64 {
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return 1;
    };
    // SAFETY: per-CPU scratch filled by the caller on this CPU.
    let scratch = unsafe { &mut *scratch };
    let g = scratch.gather;
    if i >= g.read || g.consumed >= g.total {
        return 1;
    }
    let [base, len] = scratch.iovecs[(i as usize) & (MAX_IOVECS - 1)];
    let seg = len.min(g.total - g.consumed);
    let mut captured = g.captured;
    // The call's first `captured` bytes are already copied (by an earlier pass).
    let done = captured.saturating_sub(g.consumed).min(seg);
    if captured < g.cap && done < seg {
        captured += copy_user(
            &mut scratch.data,
            captured,
            base + done,
            (seg - done).min(g.cap - captured),
        );
    }
    scratch.gather = Gather {
        captured,
        consumed: g.consumed + seg,
        last_base: base,
        last_len: seg,
        ..g
    };
    0
}

/// Zeroes `ids` in 8-byte stores. Volatile, or LLVM folds the loop back into a memset,
/// which the BPF backend turns into a call to a byte-by-byte loop.
#[inline(always)]
fn clear_ids(ids: &mut TraceIds) {
    const WORDS: usize = core::mem::size_of::<TraceIds>() / 8;
    let words = ids as *mut TraceIds as *mut u64;
    for i in 0..WORDS {
        // SAFETY: TraceIds is 8-aligned and WORDS × 8 bytes long (agent_common layout test).
        unsafe { core::ptr::write_volatile(words.add(i), 0) };
    }
}

/// Request starts get span ids; a response written ends the thread's SERVER context.
/// `whole`: the `n` bytes are all the call moved (a head read on from a cut-off copy
/// cannot be followed).
#[inline(always)]
fn trace_ids(
    pid_tgid: u64,
    direction: u8,
    data: &[u8; SCRATCH_BYTES],
    n: u64,
    whole: bool,
    ids: &mut TraceIds,
    conn: &mut agent_common::ConnState,
    learn_port: bool,
) {
    if is_request_start(data, n) {
        // This port serves HTTP: later connections to it get a traceparent. Once per
        // connection, not once per request; never from TLS plaintext (injection writes
        // into the socket's bytes, which are ciphertext there).
        if learn_port && conn.flags & CONN_PORT_LEARNED == 0 {
            conn.flags |= CONN_PORT_LEARNED;
            learn_http_port(if direction == DIR_INGRESS {
                conn.local_port
            } else {
                conn.remote_port
            });
        }
        if direction == DIR_INGRESS {
            let scan = on_server_request(pid_tgid, data, n, ids);
            conn.head_span = span_head(&ids.span_id);
            follow_head(conn, scan, whole, data, n);
        } else {
            on_client_request(pid_tgid, data, n, ids, conn);
        }
    } else if direction == DIR_INGRESS {
        if conn.flags & CONN_HEAD_OPEN != 0 {
            let line_start = conn.flags & CONN_HEAD_AT_LINE != 0;
            let scan = on_server_head_continued(pid_tgid, data, n, line_start, conn.head_span, ids);
            follow_head(conn, scan, whole, data, n);
        }
    } else {
        // Writing anything means the head was read.
        if conn.flags & CONN_HEAD_OPEN != 0 {
            conn.flags &= !(CONN_HEAD_OPEN | CONN_HEAD_AT_LINE);
        }
        if is_response_start(data, n) {
            on_server_response(pid_tgid);
        }
    }
}

/// Keeps scanning the connection's next read while its request head is incomplete and
/// has shown no `traceparent`.
#[inline(always)]
fn follow_head(
    conn: &mut agent_common::ConnState,
    scan: HeadScan,
    whole: bool,
    data: &[u8; SCRATCH_BYTES],
    n: u64,
) {
    conn.flags &= !(CONN_HEAD_OPEN | CONN_HEAD_AT_LINE);
    // An invalid `traceparent` ends the following too: the scan stopped at it, and the
    // head's end may already have passed (later reads would be body).
    if scan.header_seen || scan.ended || !whole || n == 0 {
        return;
    }
    // The compat build scanned only the first COMPAT_SCAN_BYTES: past them the head may
    // have ended, and a body line must never be taken for a header.
    if cfg!(feature = "compat") && n > agent_common::COMPAT_SCAN_BYTES {
        return;
    }
    conn.flags |= CONN_HEAD_OPEN;
    // A line end, or a line end and the `\r` of what may be the empty line.
    let last = byte_at(data, n - 1);
    if last == b'\n' || (last == b'\r' && n >= 2 && byte_at(data, n - 2) == b'\n') {
        conn.flags |= CONN_HEAD_AT_LINE;
    }
}

/// Copies `len` (≤ MAX_CAPTURE) user bytes to `dst[off..]`; returns the bytes copied (0 on
/// failure). Offset and length pass through `black_box` and a mask so that the verifier
/// sees explicit bounds (off < MAX, len < 2×MAX) and the write stays inside 3×MAX.
#[inline(always)]
pub fn copy_user(dst: &mut [u8; SCRATCH_BYTES], off: u64, src: u64, len: u64) -> u64 {
    let len = len.min(MAX_CAPTURE as u64);
    let off = core::hint::black_box(off) & (MAX_CAPTURE as u64 - 1);
    let len = core::hint::black_box(len) & (2 * MAX_CAPTURE as u64 - 1);
    if len == 0 {
        return 0;
    }
    // SAFETY: off < MAX_CAPTURE and len < 2×MAX_CAPTURE, so the write stays in `dst`.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            dst.as_mut_ptr().add(off as usize) as *mut _,
            len as u32,
            src as *const _,
        )
    };
    if rc == 0 {
        len
    } else {
        count(counter::READ_USER_FAILED);
        0
    }
}

// Syscalls of the same shape and direction share a program, told apart by the syscall
// number in the tracepoint's record: the kernel verifies each program at start-up (most of
// the agent's start-up time), and a shared program is verified once for both. Their costs
// (`--ebpf-stats`) are then reported together.

/// Which of a shared program's two syscalls this is: `(other, true)` when the record's
/// syscall number is `other_nr`, else `(first, false)`. Both values pass through
/// `black_box`: LLVM would otherwise inline the whole exit path once per syscall, and the
/// verifier would walk both copies.
#[inline(always)]
fn which_call(ctx: &TracePointContext, other_nr: u64, other: u8, first: u8) -> (u8, bool) {
    let is_other = syscall_nr(ctx) == other_nr;
    let call = if is_other { other } else { first };
    (core::hint::black_box(call), core::hint::black_box(is_other))
}

/// `read` and `recvfrom`: one buffer in.
#[tracepoint]
pub fn tapir_exit_read_buf(ctx: TracePointContext) -> u32 {
    let (call, _) = which_call(&ctx, NR_RECVFROM, syscall::RECVFROM, syscall::READ);
    exit::<SHAPE_BUF>(&ctx, call, DIR_INGRESS, false)
}

/// `write` and `sendto`: one buffer out.
#[tracepoint]
pub fn tapir_exit_write_buf(ctx: TracePointContext) -> u32 {
    let (call, _) = which_call(&ctx, NR_SENDTO, syscall::SENDTO, syscall::WRITE);
    exit::<SHAPE_BUF>(&ctx, call, DIR_EGRESS, false)
}

/// `readv` and `recvmsg` (its msghdr's iovec array): iovecs in.
#[tracepoint]
pub fn tapir_exit_read_vec(ctx: TracePointContext) -> u32 {
    let (call, msghdr) = which_call(&ctx, NR_RECVMSG, syscall::RECVMSG, syscall::READV);
    exit::<SHAPE_IOVEC>(&ctx, call, DIR_INGRESS, msghdr)
}

/// `writev` and `sendmsg` (its msghdr's iovec array): iovecs out.
#[tracepoint]
pub fn tapir_exit_write_vec(ctx: TracePointContext) -> u32 {
    let (call, msghdr) = which_call(&ctx, NR_SENDMSG, syscall::SENDMSG, syscall::WRITEV);
    exit::<SHAPE_IOVEC>(&ctx, call, DIR_EGRESS, msghdr)
}

/// sendfile64(out_fd, in_fd, offset, count): the socket is `out_fd`; only the byte count is
/// reported (the payload is in a file, not in user memory).
#[tracepoint]
pub fn tapir_exit_sendfile(ctx: TracePointContext) -> u32 {
    exit::<SHAPE_NONE>(&ctx, syscall::SENDFILE, DIR_EGRESS, false)
}

/// The first argument (an fd) of the current syscall, at its exit.
#[inline(always)]
pub fn syscall_fd(ctx: &TracePointContext) -> Option<u32> {
    syscall_args(ctx).map(|(fd, _, _)| fd as u32)
}
