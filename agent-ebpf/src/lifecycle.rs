//! Connection and process lifecycle: accept/connect start tracking with a known role,
//! close/dup2 end it, exec/close_range/exit invalidate a process's cached fds.
use agent_common::{counter, select, ConnKey, EventKind, Role, CONN_BORN, CONN_TCP};
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_get_current_pid_tgid},
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::debug;

use crate::{
    conn::{bump_gen, emit_conn, header, track_new},
    data::{arg, syscall_fd},
    maps::{
        agent_tgid, choosing, count, exec_queue, open_port, open_ports_on, ring_output, CONNS,
        EXECS, LISTENERS, SELECTED, SELECT_NAMES,
    },
    sock::stream_local_port,
    trace::{birth_key, on_connect, BIRTH_CTX},
};

const EINPROGRESS: i64 = -115;

/// 1 when the agent logs at debug level for `tapir_ebpf`: every log record costs the agent
/// a wakeup, so connection logs are off unless someone is reading them.
#[unsafe(no_mangle)]
pub static TAPIR_EBPF_DEBUG: u32 = 0;

#[inline(always)]
fn debug_on() -> bool {
    // SAFETY: reading a static; volatile so the loader's value is used.
    unsafe { core::ptr::read_volatile(&TAPIR_EBPF_DEBUG) != 0 }
}

#[inline(always)]
fn current() -> (u64, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    (pid_tgid, (pid_tgid >> 32) as u32)
}

#[inline(always)]
fn on_accept_exit(ctx: &TracePointContext) -> u32 {
    let (_, tgid) = current();
    if tgid == agent_tgid() {
        return 0;
    }
    let ret = arg(ctx, 0) as i64;
    if ret < 0 {
        return 0;
    }
    if track_new(tgid, ret as u32, Role::Server) && debug_on() {
        debug!(ctx, "tapir: pid {} accepted tcp fd {}", tgid, ret as u32);
    }
    0
}

#[tracepoint]
pub fn tapir_exit_accept4(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx)
}

#[tracepoint]
pub fn tapir_exit_accept(ctx: TracePointContext) -> u32 {
    on_accept_exit(&ctx)
}

/// connect(fd, …): the fd is read back from the saved registers at exit (see data.rs).
#[tracepoint]
pub fn tapir_exit_connect(ctx: TracePointContext) -> u32 {
    let (pid_tgid, tgid) = current();
    if tgid == agent_tgid() {
        return 0;
    }
    let ret = arg(&ctx, 0) as i64;
    if ret != 0 && ret != EINPROGRESS {
        return 0;
    }
    let Some(fd) = crate::data::syscall_fd(&ctx) else {
        return 0;
    };
    if !track_new(tgid, fd, Role::Client) {
        return 0;
    }
    on_connect(pid_tgid, ConnKey { tgid, fd });
    if debug_on() {
        debug!(&ctx, "tapir: pid {} connected tcp fd {}", tgid, fd);
    }
    0
}

/// Forgets `fd` of the current process, reporting the close of a tracked connection.
#[inline(always)]
fn forget_fd(pid_tgid: u64, fd: u32) {
    let tgid = (pid_tgid >> 32) as u32;
    let key = ConnKey { tgid, fd };
    // SAFETY: value copied out before the entry is removed.
    let Some(state) = (unsafe { CONNS.get(key).copied() }) else {
        return;
    };
    let _ = CONNS.remove(key);
    if state.flags & CONN_BORN != 0 {
        // Closed before its first request.
        let _ = BIRTH_CTX.remove(&birth_key(pid_tgid, state.local_port, state.remote_port));
    }
    if state.flags & CONN_TCP != 0 {
        emit_conn(
            EventKind::ConnClose,
            fd,
            state.sock_id,
            Role::from_u8(state.role),
            false,
            0,
        );
    }
}

#[tracepoint]
pub fn tapir_enter_close(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    forget_fd(pid_tgid, arg(&ctx, 0) as u32);
    0
}

/// dup2/dup3 silently close `newfd` first.
#[tracepoint]
pub fn tapir_enter_dup2(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    forget_fd(pid_tgid, arg(&ctx, 1) as u32);
    0
}

#[tracepoint]
pub fn tapir_enter_dup3(ctx: TracePointContext) -> u32 {
    let pid_tgid = bpf_get_current_pid_tgid();
    forget_fd(pid_tgid, arg(&ctx, 1) as u32);
    0
}

#[tracepoint]
pub fn tapir_enter_close_range(_ctx: TracePointContext) -> u32 {
    let (_, tgid) = current();
    bump_gen(tgid);
    0
}

/// sched/sched_process_exec: CLOEXEC fds are gone without a close(). With `--exe` or
/// `--exclude-exe`, the process is judged again by its new name (`comm` is the new
/// program's file name now).
#[tracepoint]
pub fn tapir_sched_exec(ctx: TracePointContext) -> u32 {
    let (_, tgid) = current();
    if choosing() {
        take_over_thread_entry(&ctx, tgid);
        reselect_at_exec(tgid);
        if exec_queue() {
            // BPF_EXIST: when full, the oldest entry makes room.
            let _ = EXECS.push(tgid, 2);
        }
    }
    // After the selection changed: CPUs cache it with the generation.
    bump_gen(tgid);
    0
}

/// exec() from a thread other than the main one: the kernel ended the old main thread
/// first (its exit removed the process's entry) and gave this thread the process's id.
/// The thread's own entry, made when it was created, carries the process's selection.
#[inline(always)]
fn take_over_thread_entry(ctx: &TracePointContext, tgid: u32) {
    // SAFETY: reading a static; volatile so the loader's value is used.
    let off = unsafe { core::ptr::read_volatile(&TAPIR_EXEC_OLD_PID) } as usize;
    if off == 0 {
        return;
    }
    // SAFETY: a probe read inside the tracepoint's record.
    let Ok(old) = (unsafe { ctx.read_at::<u32>(off) }) else {
        return;
    };
    if old == tgid {
        return;
    }
    // SAFETY: plain lookups.
    if let Some(why) = unsafe { SELECTED.get(&old).copied() } {
        let _ = SELECTED.remove(&old);
        if unsafe { SELECTED.get(&tgid) }.is_none() {
            let _ = SELECTED.insert(&tgid, &why, 0);
        }
    }
}

/// Offset of `old_pid` in sched_process_exec's record, from its tracefs format file (0:
/// unknown, the take-over is skipped).
#[unsafe(no_mangle)]
pub static TAPIR_EXEC_OLD_PID: u32 = 0;

#[inline(always)]
fn reselect_at_exec(tgid: u32) {
    let comm = bpf_get_current_comm().unwrap_or_default();
    // SAFETY: plain lookups.
    let named = unsafe { SELECT_NAMES.get(&comm).copied() };
    // 0: not selected. Plain integers: comparing Options of u8 let LLVM read a register
    // the verifier considers unset when the lookup found nothing.
    let why = unsafe { SELECTED.get(&tgid).copied() }.unwrap_or(0);
    // A pid the user named, or a listener on an --open-port port (it keeps its socket
    // across exec), stays as it is unless its new program is left out.
    let sticky = why == select::BY_PID || why == select::BY_PORT;
    match named {
        Some(n) if n == select::EXCLUDED || !sticky => {
            let _ = SELECTED.insert(&tgid, &n, 0);
        }
        Some(_) => {}
        // A named (or left-out) program's child that now runs something else.
        None if why == select::BY_NAME || why == select::EXCLUDED => {
            let _ = SELECTED.remove(&tgid);
        }
        None => {}
    }
}

/// syscalls/sys_exit_listen: with `--open-port`, a process that starts listening on one of
/// those ports becomes observed, and what it forks from then on (nginx's and gunicorn's
/// workers). At exit the port is known even when listen() bound it itself (no bind()
/// before: an ephemeral port), and still before the first accept; a failed listen chooses
/// nobody. A process chosen by name becomes chosen by port (which survives an exec into a
/// program not named); one chosen by pid, or left out (which wins), keeps its answer.
#[tracepoint]
pub fn tapir_exit_listen(ctx: TracePointContext) -> u32 {
    if arg(&ctx, 0) != 0 {
        return 0;
    }
    let (_, tgid) = current();
    // Never init: it listens for socket-activated services, and what it forks would all
    // inherit the choice.
    if !open_ports_on() || tgid == agent_tgid() || tgid == 1 {
        return 0;
    }
    // SAFETY: plain lookup.
    let why = unsafe { SELECTED.get(&tgid).copied() }.unwrap_or(0);
    if why != 0 && why != select::BY_NAME {
        return 0;
    }
    let Some(local_port) = syscall_fd(&ctx).and_then(stream_local_port) else {
        return 0;
    };
    if !open_port(local_port) {
        return 0;
    }
    let _ = SELECTED.insert(&tgid, &select::BY_PORT, 0);
    if why != 0 {
        // Already observed, and so are its children: only the reason changes.
        return 0;
    }
    // Its fds may be cached as not observed (accepted before it listened on this port).
    bump_gen(tgid);
    // BPF_EXIST: when full, the oldest entry makes room.
    let _ = LISTENERS.push(tgid, 2);
    count(counter::SELECTED_BY_PORT);
    if debug_on() {
        debug!(
            &ctx,
            "tapir: pid {} listens on --open-port {}", tgid, local_port
        );
    }
    0
}

/// sched/sched_process_fork: children of an observed process are observed (nginx and
/// gunicorn workers, Node cluster), children of a left-out one are left out. A new thread
/// lands here too; its entry is harmless (lookups are by tgid) and leaves when the thread
/// exits.
#[tracepoint]
pub fn tapir_sched_fork(ctx: TracePointContext) -> u32 {
    if !choosing() {
        return 0;
    }
    let (_, tgid) = current();
    // SAFETY: plain lookup.
    let Some(why) = (unsafe { SELECTED.get(&tgid).copied() }) else {
        return 0;
    };
    // SAFETY: a probe read inside the tracepoint's record, at the offset of `child_pid`
    // that the loader read from the tracepoint's format file.
    let off = unsafe { core::ptr::read_volatile(&TAPIR_FORK_CHILD_PID) } as usize;
    if let Ok(child) = unsafe { ctx.read_at::<u32>(off) } {
        let _ = SELECTED.insert(&child, &why, 0);
    }
    0
}

/// Offset of `child_pid` in sched_process_fork's record, from its tracefs format file (the
/// comm fields before it changed size in Linux 6.x).
#[unsafe(no_mangle)]
pub static TAPIR_FORK_CHILD_PID: u32 = 20;

/// sched/sched_process_exit fires per thread; the process is gone when its leader exits.
#[tracepoint]
pub fn tapir_sched_exit(_ctx: TracePointContext) -> u32 {
    let (pid_tgid, tgid) = current();
    if choosing() {
        // Every thread: fork() put new threads in too.
        let _ = SELECTED.remove(&(pid_tgid as u32));
    }
    if pid_tgid as u32 != tgid {
        return 0;
    }
    bump_gen(tgid);
    let hdr = header(EventKind::ProcExit, 0);
    let size = core::mem::size_of::<agent_common::EventHeader>() as u64;
    if ring_output(&hdr, size) != 0 {
        count(agent_common::counter::RINGBUF_FULL);
    }
    0
}
