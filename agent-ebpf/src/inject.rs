//! `traceparent` injection into outgoing HTTP/1.x requests (see spikes/injection/README.md).
//!
//! `tapir_sock_ops` (cgroup v2 root) claims client sockets to HTTP ports (`INJ_PORTS`,
//! learned from traffic and given by the user) at connection setup; `tapir_sk_msg` inserts
//! `traceparent: 00-<trace>-<span>-<flags>\r\n` after the request line of the FIRST
//! request written on the connection, unless the request already has one, and leaves the
//! ids in `OUT_CTX[pid_tgid]` for the write's exit tracepoint, so that the exported CLIENT
//! span has exactly the injected ids. A socket in a sockhash reports FIONREAD = 0 (nginx
//! and others then stall), so each socket is released on its first RTT sample after the
//! request: the server acknowledged it, the response has not been read yet. The agent puts
//! an idle kept-alive socket back (agent/src/rearm.rs) so that its next request is injected
//! too, and says so in `INJ_REARM`; the RTT callback stays enabled for that until the agent
//! asks for a socket that never pauses between requests to be retired.
use agent_common::{
    inject_counter as c, InjSockKey as SockKey, InjSockState as SockState, TraceIds,
    INJECTED_REARMED, INJ_JUDGED, INJ_PENDING, INJ_REARM_ARMED, INJ_REARM_RETIRE, INJ_RELEASED,
    INJ_RETIRED, MAX_CAPTURE, TRACE_CLIENT,
};
use aya_ebpf::{
    bindings::{
        sk_action::SK_PASS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_RTT_CB,
        BPF_SOCK_OPS_RTT_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
    },
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_kernel_buf,
        generated::{bpf_map_delete_elem, bpf_msg_pull_data},
    },
    macros::{map, sk_msg, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkMsgContext, SockOpsContext},
};

use crate::{
    looping::repeat,
    maps::{agent_tgid, choosing, observed, sockops_pid, SCRATCH},
    trace::{
        birth_key, connection_parent, each_newline, empty_line_at, find_traceparent,
        is_request_start, new_span_id, past_empty_line, step_inputs, thread_parent, OUT_CTX,
        SCAN_STEP,
    },
};

#[map(name = "TAPIR_INJ_SOCKS")]
pub static INJ_SOCKS: SockHash<SockKey> = SockHash::with_max_entries(65536, 0);

#[map(name = "TAPIR_INJ_STATE")]
pub static INJ_STATE: LruHashMap<SockKey, SockState> = LruHashMap::with_max_entries(65536, 0);

/// Written by the agent (agent/src/rearm.rs) for released sockets: `INJ_REARM_ARMED` when
/// it put the socket back into the sockhash, `INJ_REARM_RETIRE` when it gave up on it.
#[map(name = "TAPIR_INJ_REARM")]
pub static INJ_REARM: LruHashMap<SockKey, u32> = LruHashMap::with_max_entries(65536, 0);

/// Destination ports (host order) whose connections are claimed: HTTP ports seen in
/// traffic (see data.rs) and the ones the user named.
#[map(name = "TAPIR_INJ_PORTS")]
pub static INJ_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// With `--pid`/`--exe`/`--exclude-exe`: client sockets that a process left out
/// connected (marked at `TCP_CONNECT_CB`, in the caller's context; establishment may run
/// in any context). These are not claimed, so a left-out process pays nothing for
/// injection.
#[map(name = "TAPIR_INJ_SKIP")]
pub static INJ_SKIP: LruHashMap<SockKey, u8> = LruHashMap::with_max_entries(16384, 0);

#[map(name = "TAPIR_INJ_COUNTERS")]
pub static INJ_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(c::COUNT, 0);

/// [first line end + 1, head end + 1] found by the line scan (map memory: see trace.rs).
#[map(name = "TAPIR_INJ_SCAN")]
pub static INJ_SCAN: PerCpuArray<[u64; 2]> = PerCpuArray::with_max_entries(1, 0);

/// Only the first this-many bytes of a message are looked at.
const WINDOW: u32 = MAX_CAPTURE as u32;
/// "traceparent: " (13) + 55 + "\r\n" (2).
const HDR_LEN: u32 = agent_common::TRACEPARENT_HEADER_LEN;
const HEXD: &[u8; 16] = b"0123456789abcdef";

#[inline(always)]
fn count(i: u32) {
    if let Some(p) = INJ_COUNTERS.get_ptr_mut(i) {
        // SAFETY: this CPU's slot.
        unsafe { *p += 1 };
    }
}

/// 1: learn HTTP ports from traffic; 0: only the ports the loader put in `INJ_PORTS`
/// (set when the user limited Tapir to some ports).
#[unsafe(no_mangle)]
pub static TAPIR_INJ_LEARN: u32 = 1;

/// Remembers that `port` serves HTTP/1.x, so later connections to it are claimed.
#[inline(always)]
pub fn learn_http_port(port: u16) {
    // SAFETY: reading a static; volatile so the loader's value is used.
    if unsafe { core::ptr::read_volatile(&TAPIR_INJ_LEARN) } == 0 {
        return;
    }
    // SAFETY: plain lookup.
    if port != 0 && unsafe { INJ_PORTS.get(&port) }.is_none() {
        let _ = INJ_PORTS.insert(&port, &1, 0);
    }
}

/// Takes the socket out of the sockhash (if it is in it).
#[inline(always)]
fn unclaim(key: &SockKey) -> bool {
    // SAFETY: deleting from a sockhash is allowed from sock_ops.
    let r = unsafe {
        bpf_map_delete_elem(
            &INJ_SOCKS as *const _ as *mut core::ffi::c_void,
            key as *const SockKey as *const core::ffi::c_void,
        )
    };
    r == 0
}

#[inline(always)]
fn release(key: &SockKey, st: &mut SockState) {
    count(if unclaim(key) {
        c::RELEASED
    } else {
        c::MAP_FAILED
    });
    st.done = INJ_RELEASED;
}

/// This socket's acknowledgements no longer run the program.
#[inline(always)]
fn stop_rtt_callbacks(ctx: &SockOpsContext) {
    let _ = ctx.set_cb_flags((ctx.cb_flags() & !BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
}

#[sock_ops]
pub fn tapir_sock_ops(ctx: SockOpsContext) -> u32 {
    // SAFETY: ctx fields read through the context pointer (rewritten by the verifier).
    let o = unsafe { &*ctx.ops };
    // Every TCP socket of the host comes here about ten times per connection (timeouts,
    // windows, ECN, establishment...): leave before reading anything else.
    let op = ctx.op();
    // Left-out clients are recognised at connect() and not claimed (see INJ_SKIP).
    let skip_left_out = choosing() && sockops_pid();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        || (op == BPF_SOCK_OPS_TCP_CONNECT_CB && skip_left_out)
    {
        let rport = (u32::from_be(o.remote_port) & 0xffff) as u16;
        // SAFETY: plain lookup.
        if unsafe { INJ_PORTS.get(&rport) }.is_none() {
            return 1;
        }
    } else if op != BPF_SOCK_OPS_RTT_CB {
        return 1;
    }
    let mut key = SockKey {
        family: o.family,
        lport: o.local_port,
        rport: o.remote_port,
        _pad: 0,
        lip: [o.local_ip4, 0, 0, 0],
        rip: [o.remote_ip4, 0, 0, 0],
    };
    if o.family != 2 {
        // Field by field: the verifier rejects copies through a moved context pointer.
        key.lip = [
            o.local_ip6[0],
            o.local_ip6[1],
            o.local_ip6[2],
            o.local_ip6[3],
        ];
        key.rip = [
            o.remote_ip6[0],
            o.remote_ip6[1],
            o.remote_ip6[2],
            o.remote_ip6[3],
        ];
    }
    // Only reached when skip_left_out holds: older kernels reject the helper here, and the
    // branch is dead code for their verifier (the loader freezes the flags).
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        if !observed((bpf_get_current_pid_tgid() >> 32) as u32) {
            let _ = INJ_SKIP.insert(&key, &1, 0);
        }
        return 1;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && skip_left_out && INJ_SKIP.remove(&key).is_ok() {
        count(c::NOT_OBSERVED);
        return 1;
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        // SAFETY: the context pointer is the bpf_sock_ops the helper expects.
        if INJ_SOCKS
            .update(&mut key, unsafe { &mut *ctx.ops }, BPF_NOEXIST as u64)
            .is_ok()
        {
            count(c::CLAIMED);
            let _ = INJ_STATE.insert(
                &key,
                &SockState {
                    done: INJ_PENDING,
                    _pad: 0,
                },
                0,
            );
            // A re-arm left over from an earlier connection with the same addresses.
            let _ = INJ_REARM.remove(&key);
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_RTT_CB_FLAG) as i32);
        } else {
            count(c::MAP_FAILED);
        }
    } else if op == BPF_SOCK_OPS_RTT_CB {
        // New data of ours was acknowledged: the server has the request, its response is
        // still to come. A socket in the sockhash must leave it now.
        let Some(st) = INJ_STATE.get_ptr_mut(&key) else {
            // Its state was evicted: never leave it claimed, stop watching it.
            if unclaim(&key) {
                count(c::RELEASED);
            }
            stop_rtt_callbacks(&ctx);
            return 1;
        };
        // SAFETY: map value pointer.
        let st = unsafe { &mut *st };
        if st.done == INJ_PENDING || st.done == INJ_JUDGED {
            release(&key, st);
        } else if st.done == INJ_RELEASED {
            // SAFETY: plain lookup.
            let rearm = unsafe { INJ_REARM.get(&key) }.copied();
            if rearm == Some(INJ_REARM_ARMED) {
                // Re-armed by the agent, and data went out that sk_msg did not see (a
                // write racing the re-arm): out again.
                let _ = INJ_REARM.remove(&key);
                release(&key, st);
            } else if rearm == Some(INJ_REARM_RETIRE) {
                let _ = INJ_REARM.remove(&key);
                st.done = INJ_RETIRED;
                count(c::RETIRED);
                stop_rtt_callbacks(&ctx);
            }
        }
    }
    1
}

/// One bpf_loop step over bytes `[32w, 32w + 32)`: records where the request line ends
/// and where the head ends (just past its empty line).
extern "C" fn scan_lines(w: u64, ctx: *mut core::ffi::c_void) -> i64 {
    let Some((n, scratch)) = step_inputs(ctx) else {
        return 1;
    };
    let Some(res) = INJ_SCAN.get_ptr_mut(0) else {
        return 1;
    };
    let data = &scratch.data;
    // SAFETY: this CPU's slot.
    let res = unsafe { &mut *res };
    each_newline(data, w, n, |nl| {
        if res[0] == 0 {
            res[0] = nl + 1;
        }
        if empty_line_at(data, nl + 1, n) {
            res[1] = past_empty_line(data, nl);
            return true;
        }
        false
    })
}

#[sk_msg]
pub fn tapir_sk_msg(ctx: SkMsgContext) -> u32 {
    let _ = try_sk_msg(&ctx);
    SK_PASS
}

#[inline(always)]
fn try_sk_msg(ctx: &SkMsgContext) -> Option<()> {
    let pid_tgid = bpf_get_current_pid_tgid();
    if (pid_tgid >> 32) as u32 == agent_tgid() {
        return None;
    }
    // SAFETY: ctx fields.
    // The key is built here and in tapir_sock_ops field by field on purpose: a shared helper
    // let LLVM fold the loads into copies through a moved context pointer, which the
    // verifier rejects ("dereference of modified ctx ptr").
    let m = unsafe { &*ctx.msg };
    let mut key = SockKey {
        family: m.family,
        lport: m.local_port,
        rport: m.remote_port,
        _pad: 0,
        lip: [m.local_ip4, 0, 0, 0],
        rip: [m.remote_ip4, 0, 0, 0],
    };
    if m.family != 2 {
        // Field by field: the verifier rejects copies through a moved context pointer.
        key.lip = [
            m.local_ip6[0],
            m.local_ip6[1],
            m.local_ip6[2],
            m.local_ip6[3],
        ];
        key.rip = [
            m.remote_ip6[0],
            m.remote_ip6[1],
            m.remote_ip6[2],
            m.remote_ip6[3],
        ];
    }
    let st = INJ_STATE.get_ptr_mut(&key)?;
    // SAFETY: map value pointer.
    let st = unsafe { &mut *st };
    let mut first = true;
    // SAFETY: plain lookup.
    if st.done == INJ_RELEASED && unsafe { INJ_REARM.get(&key) } == Some(&INJ_REARM_ARMED) {
        // Put back by the agent: this is the next request of a kept-alive connection.
        let _ = INJ_REARM.remove(&key);
        st.done = INJ_PENDING;
        first = false;
    }
    if st.done != INJ_PENDING {
        count(c::KEEPALIVE_LATER);
        return None;
    }
    // Whatever happens below, this connection's first message has been judged.
    st.done = INJ_JUDGED;
    if !observed((pid_tgid >> 32) as u32) {
        count(c::NOT_OBSERVED);
        return None;
    }
    let size = ctx.size();
    let n = if size < WINDOW { size } else { WINDOW };
    if n < 16 {
        count(c::HEAD_SPLIT);
        return None;
    }
    // SAFETY: msg pointer is the context.
    if unsafe { bpf_msg_pull_data(ctx.msg, 0, n, 0) } != 0 {
        count(c::PUSH_FAILED);
        return None;
    }
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch slot (the write's exit tracepoint, which also uses it,
    // runs later in the same syscall).
    let data = unsafe { &mut (*scratch).data };
    let len = (n as usize) & (2 * MAX_CAPTURE - 1);
    // SAFETY: copies `len` (< 2×MAX ≤ SCRATCH_BYTES) bytes of the message.
    if unsafe { bpf_probe_read_kernel_buf(ctx.data() as *const u8, &mut data[..len]) }.is_err() {
        count(c::PUSH_FAILED);
        return None;
    }
    if !is_request_start(data, n as u64) {
        count(c::NOT_REQUEST);
        return None;
    }
    let res = INJ_SCAN.get_ptr_mut(0)?;
    // SAFETY: this CPU's slot.
    unsafe { *res = [0, 0] };
    repeat!(
        tapir_compat_inject_scan,
        scan_lines,
        agent_common::COMPAT_INJECT_SCAN_BYTES / SCAN_STEP,
        n.div_ceil(SCAN_STEP as u32),
        n as u64
    );
    // SAFETY: as above.
    let [first_nl, head_end] = unsafe { *res };
    let first_nl = first_nl & (MAX_CAPTURE as u64 - 1);
    // The whole head must be in this message (or fill the window): never split a request
    // line, never guess where a head continues. The compat build scans less than the
    // window: a head it did not see end may hold a traceparent it did not see either.
    if first_nl == 0 || (head_end == 0 && (size <= WINDOW || cfg!(feature = "compat"))) {
        count(c::HEAD_SPLIT);
        return None;
    }
    let scratch_ids = &mut unsafe { &mut *scratch }.hdr.trace;
    let mut tp_flags = 0u8;
    let mut tp_span = [0u8; 8];
    if find_traceparent(
        data,
        n as u64,
        &mut scratch_ids.trace_id,
        &mut tp_span,
        &mut tp_flags,
    )
    .is_some()
    {
        count(c::HAS_TRACEPARENT);
        return None;
    }
    let mut ids = TraceIds {
        kind: TRACE_CLIENT,
        span_id: new_span_id(),
        injected: if first { 1 } else { INJECTED_REARMED },
        ..TraceIds::default()
    };
    if first {
        // Host-order ports, as the tracepoints keep them.
        let rport = (u32::from_be(key.rport) & 0xffff) as u16;
        let opened = birth_key(pid_tgid, key.lport as u16, rport);
        connection_parent(pid_tgid, opened, &mut ids);
    } else {
        thread_parent(pid_tgid, &mut ids);
    }
    // The header line, built in scratch after the copied window.
    let h = &mut data[2 * MAX_CAPTURE..2 * MAX_CAPTURE + HDR_LEN as usize];
    h[..16].copy_from_slice(b"traceparent: 00-");
    for k in 0..16 {
        let v = ids.trace_id[k];
        h[16 + 2 * k] = HEXD[(v >> 4) as usize];
        h[17 + 2 * k] = HEXD[(v & 15) as usize];
    }
    h[48] = b'-';
    for k in 0..8 {
        let v = ids.span_id[k];
        h[49 + 2 * k] = HEXD[(v >> 4) as usize];
        h[50 + 2 * k] = HEXD[(v & 15) as usize];
    }
    h[65] = b'-';
    h[66] = HEXD[((ids.flags >> 4) & 15) as usize];
    h[67] = HEXD[(ids.flags & 15) as usize];
    h[68] = b'\r';
    h[69] = b'\n';
    let at = first_nl as u32;
    if ctx.push_data(at, HDR_LEN, 0).is_err() {
        count(c::PUSH_FAILED);
        return None;
    }
    // SAFETY: msg pointer is the context.
    if unsafe { bpf_msg_pull_data(ctx.msg, at, at + HDR_LEN, 0) } != 0 {
        count(c::PUSH_FAILED);
        return None;
    }
    let p = ctx.data();
    if p + HDR_LEN as usize > ctx.data_end() {
        count(c::PUSH_FAILED);
        return None;
    }
    let dst = p as *mut u8;
    let src = h.as_ptr();
    // SAFETY: dst has HDR_LEN writable bytes (checked above); src is HDR_LEN map bytes.
    unsafe {
        for k in 0..(HDR_LEN as usize / 8) {
            core::ptr::write_unaligned(
                dst.add(8 * k) as *mut u64,
                core::ptr::read_unaligned(src.add(8 * k) as *const u64),
            );
        }
        for k in (HDR_LEN as usize / 8) * 8..HDR_LEN as usize {
            *dst.add(k) = *src.add(k);
        }
    }
    count(c::INJECTED);
    let _ = OUT_CTX.insert(pid_tgid, &ids, 0);
    None
}
