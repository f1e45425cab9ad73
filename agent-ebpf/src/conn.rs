//! The per-(tgid, fd) cache: one map lookup decides whether a syscall is on a TCP socket.
use agent_common::{
    counter, ConnEvent, ConnKey, ConnState, EventHeader, EventKind, Role, CONN_TCP,
};
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns};

use crate::{
    maps::{count, observed, ring_output, CONNS, CONN_SCRATCH, CPU_STATE, GEN_EPOCH, PROC_GEN},
    sock::{clear_addr, resolve_fd, FdKind},
};

/// The process's fd generation, and whether it is observed. Each CPU keeps the last
/// answer: consecutive syscalls on a CPU are mostly the same process, and the epoch check
/// is a plain load where the `PROC_GEN` lookup was a hash lookup per syscall. Whatever
/// changes a process's selection bumps the epoch (exec, exit, the agent's late seeding)
/// or concerns a process that has not run yet (fork).
#[inline(always)]
pub fn current_gen(tgid: u32) -> (u32, bool) {
    let Some(epoch) = GEN_EPOCH.get_ptr(0) else {
        return (proc_gen(tgid), observed(tgid));
    };
    // SAFETY: the single slot of an array map; read once, before PROC_GEN (see bump_gen).
    let epoch = unsafe { core::ptr::read_volatile(epoch) };
    let Some(cpu) = CPU_STATE.get_ptr_mut(0) else {
        return (proc_gen(tgid), observed(tgid));
    };
    // SAFETY: this CPU's slot.
    let cpu = unsafe { &mut *cpu };
    if cpu.gen_tgid == tgid && cpu.gen_epoch == epoch {
        return (cpu.gen, cpu.gen_observed != 0);
    }
    let gen = proc_gen(tgid);
    let seen = observed(tgid);
    cpu.gen_tgid = tgid;
    cpu.gen = gen;
    cpu.gen_epoch = epoch;
    cpu.gen_observed = u32::from(seen);
    (gen, seen)
}

#[inline(always)]
fn proc_gen(tgid: u32) -> u32 {
    // SAFETY: plain value read of a map entry.
    unsafe { PROC_GEN.get(tgid).copied().unwrap_or(0) }
}

/// Invalidates every cached fd of `tgid` (exec, close_range, exit), then every CPU's cached
/// generation, by storing an epoch never used before (this CPU's clock and number: no
/// atomics needed, and two bumps racing still leave a value no CPU cached under). A CPU
/// that read the old epoch sees a new one on its next lookup; one that read the new epoch
/// read the new generation too (PROC_GEN is written first).
#[inline(always)]
pub fn bump_gen(tgid: u32) {
    let next = proc_gen(tgid).wrapping_add(1);
    let _ = PROC_GEN.insert(tgid, next, 0);
    if let Some(epoch) = GEN_EPOCH.get_ptr_mut(0) {
        // SAFETY: helpers without preconditions.
        let (now, cpu) = unsafe { (bpf_ktime_get_ns(), bpf_get_smp_processor_id()) };
        // SAFETY: the single slot of an array map.
        unsafe { core::ptr::write_volatile(epoch, now.wrapping_mul(4096) | (cpu as u64 & 4095)) };
    }
}

/// The cached state of `fd` in the current process, resolving and caching it on a miss.
/// Returns `None` for anything that is not a tracked TCP connection.
#[inline(always)]
pub fn lookup_tcp(tgid: u32, fd: u32) -> Option<*mut ConnState> {
    let key = ConnKey { tgid, fd };
    let (gen, seen) = current_gen(tgid);
    if !seen {
        // Left out (--pid/--exe/--exclude-exe): no lookup, and no cache entry that could
        // push an observed connection out of the LRU.
        return None;
    }
    if let Some(state) = CONNS.get_ptr_mut(key) {
        // SAFETY: pointer from a successful lookup.
        let s = unsafe { &*state };
        if s.gen == gen {
            return if s.flags & CONN_TCP != 0 {
                Some(state)
            } else {
                None
            };
        }
    }
    // First sight of this fd (or a stale entry): classify it once.
    match resolve_fd(fd) {
        FdKind::Tcp {
            sock_id,
            local_port,
            remote_port,
        } => {
            let state = ConnState {
                sock_id,
                flags: CONN_TCP,
                gen,
                role: Role::Unknown as u8,
                local_port,
                remote_port,
                ..ConnState::default()
            };
            if CONNS.insert(key, state, 0).is_err() {
                count(counter::CONN_TABLE_FULL);
                return None;
            }
            if !announce(&key, sock_id, Role::Unknown) {
                return None;
            }
            CONNS.get_ptr_mut(key)
        }
        FdKind::Other => {
            let state = ConnState {
                gen,
                ..ConnState::default()
            };
            let _ = CONNS.insert(key, state, 0);
            None
        }
        FdKind::Unknown => {
            count(counter::WALK_FAILED);
            None
        }
    }
}

/// Records a connection the process just accepted or connected, replacing whatever was
/// cached for that fd number.
#[inline(always)]
pub fn track_new(tgid: u32, fd: u32, role: Role) -> bool {
    let (gen, seen) = current_gen(tgid);
    if !seen {
        return false;
    }
    match resolve_fd(fd) {
        FdKind::Tcp {
            sock_id,
            local_port,
            remote_port,
        } => {
            let state = ConnState {
                sock_id,
                flags: CONN_TCP,
                gen,
                role: role as u8,
                local_port,
                remote_port,
                ..ConnState::default()
            };
            let key = ConnKey { tgid, fd };
            if CONNS.insert(key, state, 0).is_err() {
                count(counter::CONN_TABLE_FULL);
                return false;
            }
            announce(&key, sock_id, role)
        }
        FdKind::Other => false,
        FdKind::Unknown => {
            count(counter::WALK_FAILED);
            false
        }
    }
}

/// Tells the agent of the connection just cached under `key`. When the event cannot be
/// queued (the ring is full), the agent would never learn of the connection and drop all
/// its data as unknown: the entry is forgotten instead, so that the fd's next call finds
/// it anew and announces it again (as first seen in use).
#[inline(always)]
fn announce(key: &ConnKey, sock_id: u64, role: Role) -> bool {
    if emit_conn(EventKind::ConnOpen, key.fd, sock_id, role, true, 0) {
        return true;
    }
    let _ = CONNS.remove(key);
    false
}

#[inline(always)]
pub fn header(kind: EventKind, fd: u32) -> EventHeader {
    header_of(bpf_get_current_pid_tgid(), kind, fd)
}

/// The header of an event of thread `pid_tgid` (the current one), stamped now.
#[inline(always)]
pub fn header_of(pid_tgid: u64, kind: EventKind, fd: u32) -> EventHeader {
    EventHeader {
        kind: kind as u8,
        _pad0: 0,
        _pad1: 0,
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        fd,
        // SAFETY: helper without preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Sends a connection event from this CPU's `CONN_SCRATCH` slot: with the 4-tuple the fd
/// walk left there (`with_tuple`), else with none (a close). `protocol`: what a
/// [`EventKind::ConnOpaque`] connection speaks (0 for other events). Returns whether it was
/// queued.
#[inline(always)]
pub fn emit_conn(
    kind: EventKind,
    fd: u32,
    sock_id: u64,
    role: Role,
    with_tuple: bool,
    protocol: u8,
) -> bool {
    let Some(ev) = CONN_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's slot; nothing else on this CPU uses it during this program.
    let ev = unsafe { &mut *ev };
    if !with_tuple {
        ev.tuple.family = 0;
        ev.tuple.local_port = 0;
        ev.tuple.remote_port = 0;
        clear_addr(&mut ev.tuple.local_addr);
        clear_addr(&mut ev.tuple.remote_addr);
    }
    ev.header = header(kind, fd);
    ev.sock_id = sock_id;
    ev.role = role as u8;
    ev.protocol = protocol;
    // SAFETY: the helper writes at most 16 bytes, the size of `comm`.
    let rc = unsafe {
        aya_ebpf::helpers::generated::bpf_get_current_comm(
            ev.comm.as_mut_ptr() as *mut core::ffi::c_void,
            ev.comm.len() as u32,
        )
    };
    if rc != 0 {
        ev.comm[0] = 0;
    }
    // Connection events are rare and userspace wants them promptly.
    if ring_output(ev, size_of::<ConnEvent>() as u64) == 0 {
        count(counter::CONN_EVENTS);
        true
    } else {
        count(counter::RINGBUF_FULL);
        false
    }
}
