//! Maps and read-only globals shared with userspace (names in `agent_common::names`).
use agent_common::{
    select, ConnKey, ConnState, DataEventHeader, KernelOffsets, EVENT_RINGS, MAX_CAPTURE,
};
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, generated::bpf_ringbuf_output},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, Queue, RingBuf},
};

/// Kernel struct offsets, filled by the agent from BTF before loading.
#[unsafe(no_mangle)]
pub static TAPIR_OFFSETS: KernelOffsets = KernelOffsets {
    task_files: 0,
    files_fdt: 0,
    fdtable_max_fds: 0,
    fdtable_fd: 0,
    file_private_data: 0,
    file_f_inode: 0,
    inode_i_mode: 0,
    socket_type: 0,
    socket_sk: 0,
    sock_protocol: 0,
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    sock_protocol_size: 0,
    task_stack: 0,
};

/// The agent's own process: its exporter traffic must never be observed.
#[unsafe(no_mangle)]
pub static TAPIR_AGENT_TGID: u32 = 0;

/// Payload bytes copied per syscall (≤ MAX_CAPTURE).
#[unsafe(no_mangle)]
pub static TAPIR_CAPTURE: u32 = agent_common::DEFAULT_CAPTURE;

/// One field of the kernel's struct offsets, read where it is used: a copy of the whole
/// struct up front is spilled to the stack across the helper calls.
macro_rules! kernel_offset {
    ($field:ident) => {{
        // SAFETY: reading a static; volatile so the loader's value is used, not the
        // default.
        #[allow(unused_unsafe)]
        let v = unsafe { core::ptr::read_volatile(&raw const $crate::maps::TAPIR_OFFSETS.$field) };
        v
    }};
}
pub(crate) use kernel_offset;

#[inline(always)]
pub fn agent_tgid() -> u32 {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&TAPIR_AGENT_TGID) }
}

/// 1 when only the processes in `SELECTED` are observed (`--pid`, `--exe`).
#[unsafe(no_mangle)]
pub static TAPIR_SELECTIVE: u32 = 0;

/// 1 when some programs are left out (`--exclude-exe`, on by default for collectors).
#[unsafe(no_mangle)]
pub static TAPIR_EXCLUDING: u32 = 0;

/// tgid → whether and why it is observed (`agent_common::select`). Filled by the agent
/// from /proc at start, by fork (children inherit) and exec (by name); entries leave at
/// exit.
#[map(name = "TAPIR_SELECTED")]
pub static SELECTED: HashMap<u32, u8> = HashMap::with_max_entries(65536, 0);

/// Process names (`comm`, NUL-padded) → `BY_NAME` (observed) or `EXCLUDED`, applied at
/// exec().
#[map(name = "TAPIR_SELECT_NAMES")]
pub static SELECT_NAMES: HashMap<[u8; select::COMM_LEN], u8> = HashMap::with_max_entries(256, 0);

/// `--open-port`: a bit per TCP port (`select::OPEN_PORT_WORDS` words); a process that
/// starts listening on one of them becomes observed (`lifecycle::tapir_exit_listen`).
#[map(name = "TAPIR_OPEN_PORTS")]
pub static OPEN_PORTS: Array<[u64; select::OPEN_PORT_WORDS]> = Array::with_max_entries(1, 0);

/// Processes just chosen by `--open-port`, for the agent to choose the children they forked
/// before they listened (Node's cluster workers, handed connections by their primary).
/// When full, a push drops the oldest.
#[map(name = "TAPIR_LISTENERS")]
pub static LISTENERS: Queue<u32> = Queue::with_max_entries(1024, 0);

/// 1 when `OPEN_PORTS` has a port set.
#[unsafe(no_mangle)]
pub static TAPIR_OPEN_PORTS_ON: u32 = 0;

#[inline(always)]
pub fn open_ports_on() -> bool {
    // SAFETY: reading a static; volatile so the loader's value is used.
    unsafe { core::ptr::read_volatile(&TAPIR_OPEN_PORTS_ON) != 0 }
}

/// 1 when the TLS library probes are attached (`tls.rs`): TLS connections' calls then
/// look for an SSL call around them.
#[unsafe(no_mangle)]
pub static TAPIR_TLS_ON: u32 = 0;

#[inline(always)]
pub fn tls_on() -> bool {
    // SAFETY: reading a static; volatile so the loader's value is used.
    unsafe { core::ptr::read_volatile(&TAPIR_TLS_ON) != 0 }
}

/// Whether `port` was given with `--open-port`.
#[inline(always)]
pub fn open_port(port: u16) -> bool {
    let Some(bits) = OPEN_PORTS.get(0) else {
        return false;
    };
    let word = (port as usize >> 6) & (select::OPEN_PORT_WORDS - 1);
    bits[word] & (1u64 << (port & 63)) != 0
}

#[inline(always)]
pub fn selective() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&TAPIR_SELECTIVE) != 0 }
}

/// 1 when sock_ops may call `bpf_get_current_pid_tgid` (Linux 6.10 and later): only then
/// are left-out processes' connections recognised at connect() and not claimed.
#[unsafe(no_mangle)]
pub static TAPIR_SOCKOPS_PID: u32 = 0;

#[inline(always)]
pub fn sockops_pid() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&TAPIR_SOCKOPS_PID) != 0 }
}

/// 1 when `--exe` has glob patterns: exec() also queues the process in `EXECS`, and the
/// agent matches the patterns (the kernel matches exact names only).
#[unsafe(no_mangle)]
pub static TAPIR_EXEC_QUEUE: u32 = 0;

#[inline(always)]
pub fn exec_queue() -> bool {
    // SAFETY: as above.
    unsafe { core::ptr::read_volatile(&TAPIR_EXEC_QUEUE) != 0 }
}

/// tgids that exec'd, for the agent's pattern matching. When full, a push drops the
/// oldest (the agent also rescans /proc now and then).
#[map(name = "TAPIR_EXECS")]
pub static EXECS: Queue<u32> = Queue::with_max_entries(4096, 0);

/// Some processes are chosen or left out: `SELECTED` must be kept current.
#[inline(always)]
pub fn choosing() -> bool {
    // SAFETY: as above.
    selective() || unsafe { core::ptr::read_volatile(&TAPIR_EXCLUDING) != 0 }
}

/// Whether the process's traffic is captured. The data path asks through
/// `conn::current_gen`, which caches the answer per CPU with the fd generation.
#[inline(always)]
pub fn observed(tgid: u32) -> bool {
    if !choosing() {
        return true;
    }
    // SAFETY: plain lookup.
    match unsafe { SELECTED.get(&tgid) } {
        Some(&why) => why != select::EXCLUDED,
        None => !selective(),
    }
}

#[inline(always)]
pub fn capture_bytes() -> usize {
    // SAFETY: as above.
    let v = unsafe { core::ptr::read_volatile(&TAPIR_CAPTURE) } as usize;
    if v > MAX_CAPTURE {
        MAX_CAPTURE
    } else {
        v
    }
}

/// The event rings (`agent_common::EVENT_RINGS`): the agent sizes those CPUs write to and
/// shrinks the rest to a page.
macro_rules! event_rings {
    ($($ring:ident $name:literal $cpu:literal),* $(,)?) => {
        $(
            #[map(name = $name)]
            pub static $ring: RingBuf = RingBuf::with_byte_size(4096, 0);
        )*

        /// Sends the first `size` bytes of `record` (at most its size) to this CPU's ring
        /// (`bpf_ringbuf_output`'s result). One call per ring: the verifier needs each
        /// call's map to be a constant.
        #[inline(always)]
        pub fn ring_output<T>(record: &T, size: u64) -> i64 {
            ring_output_waking(record, size, false)
        }

        /// [`ring_output`], waking the agent at once with `wake`.
        #[inline(always)]
        pub fn ring_output_waking<T>(record: &T, size: u64, wake: bool) -> i64 {
            let data = record as *const T;
            let flags = ringbuf_flags(size, wake);
            // SAFETY: helper without preconditions.
            let cpu = unsafe { bpf_get_smp_processor_id() } as usize & (EVENT_RINGS - 1);
            match cpu {
                $(
                    // SAFETY: `record` holds `size` readable bytes (the callers' contract).
                    $cpu => unsafe {
                        bpf_ringbuf_output(
                            core::ptr::addr_of!($ring) as *mut _,
                            data as *mut _,
                            size,
                            flags,
                        )
                    },
                )*
                _ => -1,
            }
        }
    };
}

event_rings!(
    EVENTS_0 "TAPIR_EVENTS_0" 0,
    EVENTS_1 "TAPIR_EVENTS_1" 1,
    EVENTS_2 "TAPIR_EVENTS_2" 2,
    EVENTS_3 "TAPIR_EVENTS_3" 3,
    EVENTS_4 "TAPIR_EVENTS_4" 4,
    EVENTS_5 "TAPIR_EVENTS_5" 5,
    EVENTS_6 "TAPIR_EVENTS_6" 6,
    EVENTS_7 "TAPIR_EVENTS_7" 7,
    EVENTS_8 "TAPIR_EVENTS_8" 8,
    EVENTS_9 "TAPIR_EVENTS_9" 9,
    EVENTS_10 "TAPIR_EVENTS_10" 10,
    EVENTS_11 "TAPIR_EVENTS_11" 11,
    EVENTS_12 "TAPIR_EVENTS_12" 12,
    EVENTS_13 "TAPIR_EVENTS_13" 13,
    EVENTS_14 "TAPIR_EVENTS_14" 14,
    EVENTS_15 "TAPIR_EVENTS_15" 15,
);
const _: () = assert!(EVENT_RINGS == 16); // one line above per ring

/// (tgid, fd) → what we know about that fd: a TCP connection or not a TCP socket.
#[map(name = "TAPIR_CONNS")]
pub static CONNS: LruHashMap<ConnKey, ConnState> = LruHashMap::with_max_entries(65536, 0);

/// tgid → generation, bumped when a process replaces fds wholesale (exec, close_range,
/// exit) so that cached (tgid, fd) entries from before are not trusted.
#[map(name = "TAPIR_PROC_GEN")]
pub static PROC_GEN: LruHashMap<u32, u32> = LruHashMap::with_max_entries(16384, 0);

/// One data syscall's arguments and result, as the copy routine needs them.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PendingIo {
    /// The calling thread (one helper call per event, not one per use).
    pub pid_tgid: u64,
    pub buf: u64,
    /// For vectored calls: number of iovecs; otherwise 0.
    pub vlen: u64,
    pub sock_id: u64,
    pub fd: u32,
    pub syscall: u8,
    pub direction: u8,
}

/// How a data call's `buf` is read (the `SHAPE` of `data::exit`): a plain buffer, an
/// iovec array (a msghdr's is read out first), or not at all (sendfile).
pub const SHAPE_BUF: u8 = 0;
pub const SHAPE_IOVEC: u8 = 1;
pub const SHAPE_NONE: u8 = 2;

/// Room for a copy at a masked offset (< MAX) with a masked length (< 2×MAX).
pub const SCRATCH_BYTES: usize = 3 * MAX_CAPTURE;

/// Per-CPU scratch record for a data event: header plus room for a masked copy.
#[repr(C)]
pub struct DataScratch {
    pub hdr: DataEventHeader,
    pub data: [u8; SCRATCH_BYTES],
    /// Where the traceparent scan found a value (see trace.rs); not sent to userspace.
    pub scan_at: u64,
    /// Non-zero when that scan reached the empty line that ends the head.
    pub head_end: u64,
    /// Where the body starts, one past the head's empty line (0: not found); see
    /// `trace::body_start`.
    pub body_at: u64,
    /// A vectored call's iovec array (base, len), read in one go.
    pub iovecs: [[u64; 2]; agent_common::MAX_IOVECS],
    /// The copy of a vectored call's segments, step by step (see data.rs).
    pub gather: Gather,
    /// The walk of an HTTP/2 call's frames (see h2.rs).
    pub h2: crate::h2::H2Walk,
}

/// Inputs and running results of copying a vectored call's segments.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct Gather {
    /// Bytes the call moved, bytes to copy at most, iovec entries read.
    pub total: u64,
    pub cap: u64,
    pub read: u64,
    /// Bytes copied so far, bytes of the call accounted for so far.
    pub captured: u64,
    pub consumed: u64,
    /// The last segment accounted for (its end holds the call's last bytes).
    pub last_base: u64,
    pub last_len: u64,
}

impl Gather {
    /// `dst = v`, field by field: a plain assignment with zeroed fields becomes a `memset`
    /// call, which the BPF backend turns into a byte-by-byte loop (on every vectored call).
    #[inline(always)]
    pub fn store(dst: &mut Gather, v: Gather) {
        let d: *mut Gather = dst;
        // SAFETY: `d` comes from a live `&mut`; each write stays inside it.
        unsafe {
            core::ptr::write_volatile(&raw mut (*d).total, v.total);
            core::ptr::write_volatile(&raw mut (*d).cap, v.cap);
            core::ptr::write_volatile(&raw mut (*d).read, v.read);
            core::ptr::write_volatile(&raw mut (*d).captured, v.captured);
            core::ptr::write_volatile(&raw mut (*d).consumed, v.consumed);
            core::ptr::write_volatile(&raw mut (*d).last_base, v.last_base);
            core::ptr::write_volatile(&raw mut (*d).last_len, v.last_len);
        }
    }
}

#[map(name = "TAPIR_SCRATCH")]
pub static SCRATCH: PerCpuArray<DataScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU connection event, built in place: the fd walk writes its 4-tuple here and
/// `emit_conn` sends it from here. On the stack, the tuple and the event (~140 bytes) put
/// the data programs over the 512 bytes of stack that kernels before 6.13 allow a program
/// and the subprograms it calls.
#[map(name = "TAPIR_CONN_SCRATCH")]
pub static CONN_SCRATCH: PerCpuArray<agent_common::ConnEvent> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "TAPIR_COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::counter::COUNT, 0);

#[inline(always)]
pub fn count(idx: u32) {
    if let Some(p) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, only this CPU writes it.
        unsafe { *p += 1 };
    }
}

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

/// Per-CPU state of the hot path.
#[repr(C)]
pub struct CpuState {
    /// Bytes this CPU has written to the ring buffer since it last woke the reader.
    pub unwoken_bytes: u64,
    /// The span and trace id generator (see trace.rs); 0 until first seeded.
    pub rng: u64,
    /// The last process whose fd generation this CPU looked up, that generation, and the
    /// `GEN_EPOCH` it was read under (see conn.rs).
    pub gen_tgid: u32,
    pub gen: u32,
    pub gen_epoch: u64,
    /// Whether `gen_tgid` is observed ([`observed`]), read with its generation: a left-out
    /// process's syscalls then end here, without a connection lookup or cache entry.
    pub gen_observed: u32,
    pub _pad: u32,
}

/// Bumped after every change to `PROC_GEN`: a CPU's cached generation is valid while the
/// epoch it was read under is current.
#[map(name = "TAPIR_GEN_EPOCH")]
pub static GEN_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

#[map(name = "TAPIR_CPU_STATE")]
pub static CPU_STATE: PerCpuArray<CpuState> = PerCpuArray::with_max_entries(1, 0);

/// Each CPU wakes the reader once it has written this many bytes since its last wakeup
/// (set by the loader from the ring's size and the CPU count); the reader also drains on a
/// short timer, so at moderate rates nobody is woken from here at all. A wakeup is a
/// self-IPI (a VM exit on virtual machines, ~10 µs); asking the ring for its fill level
/// per record instead cost a cache miss on the reader's position every time.
#[unsafe(no_mangle)]
pub static TAPIR_WAKEUP_BYTES: u64 = 128 * 1024;

/// The flags for a ring-buffer output of `size` bytes (`wake`: wake the reader whatever
/// is pending).
#[inline(always)]
pub fn ringbuf_flags(size: u64, wake: bool) -> u64 {
    let Some(state) = CPU_STATE.get_ptr_mut(0) else {
        return BPF_RB_NO_WAKEUP;
    };
    // SAFETY: this CPU's slot.
    let state = unsafe { &mut *state };
    let pending = state.unwoken_bytes + size;
    // SAFETY: reading a static; volatile so the loader's value is used.
    if wake || pending >= unsafe { core::ptr::read_volatile(&TAPIR_WAKEUP_BYTES) } {
        state.unwoken_bytes = 0;
        BPF_RB_FORCE_WAKEUP
    } else {
        state.unwoken_bytes = pending;
        BPF_RB_NO_WAKEUP
    }
}
