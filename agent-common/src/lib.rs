//! The contract between Tapir's kernel programs (`agent-ebpf`) and its userspace agent.
//!
//! Every type here is `#[repr(C)]`, padding-free, and has its size asserted by tests, so both
//! sides agree byte for byte. Every ring-buffer record starts with an [`EventHeader`] whose
//! first byte is an [`EventKind`] tag.
#![no_std]

/// Names of the maps and globals shared by both sides (map names are at most 15 bytes).
pub mod names {
    /// The event rings, one per CPU up to [`super::EVENT_RINGS`] (CPU `c` writes to ring
    /// `c % EVENT_RINGS`).
    pub const EVENT_RINGS: [&str; super::EVENT_RINGS] = [
        "TAPIR_EVENTS_0",
        "TAPIR_EVENTS_1",
        "TAPIR_EVENTS_2",
        "TAPIR_EVENTS_3",
        "TAPIR_EVENTS_4",
        "TAPIR_EVENTS_5",
        "TAPIR_EVENTS_6",
        "TAPIR_EVENTS_7",
        "TAPIR_EVENTS_8",
        "TAPIR_EVENTS_9",
        "TAPIR_EVENTS_10",
        "TAPIR_EVENTS_11",
        "TAPIR_EVENTS_12",
        "TAPIR_EVENTS_13",
        "TAPIR_EVENTS_14",
        "TAPIR_EVENTS_15",
    ];
    pub const CONNS: &str = "TAPIR_CONNS";
    pub const COUNTERS: &str = "TAPIR_COUNTERS";
    pub const OFFSETS: &str = "TAPIR_OFFSETS";
    pub const AGENT_TGID: &str = "TAPIR_AGENT_TGID";
    pub const CAPTURE_BYTES: &str = "TAPIR_CAPTURE";
    pub const WAKEUP_BYTES: &str = "TAPIR_WAKEUP_BYTES";
    pub const SELECTIVE: &str = "TAPIR_SELECTIVE";
    pub const SELECTED: &str = "TAPIR_SELECTED";
    pub const SELECT_NAMES: &str = "TAPIR_SELECT_NAMES";
    pub const OPEN_PORTS: &str = "TAPIR_OPEN_PORTS";
    pub const LISTENERS: &str = "TAPIR_LISTENERS";
    pub const PROC_GEN: &str = "TAPIR_PROC_GEN";
    pub const GEN_EPOCH: &str = "TAPIR_GEN_EPOCH";
    pub const EXECS: &str = "TAPIR_EXECS";
}

/// Kernel → agent event rings. One ring written by every CPU cost each record ~200 ns
/// more on a 2-CPU host than a ring of its own (its lock and producer position bounce
/// between the CPUs; BENCHMARKS.md finding 22), and more with every CPU added. The agent
/// merges the rings back into one order by `EventHeader::ts_ns`.
pub const EVENT_RINGS: usize = 16;
const _: () = assert!(EVENT_RINGS.is_power_of_two()); // the kernel side masks the CPU

/// Why a process is in `TAPIR_SELECTED` (`--pid` / `--exe`): it decides what exec() does.
pub mod select {
    /// Named by pid (or forked by such a process): stays selected across exec().
    pub const BY_PID: u8 = 1;
    /// Runs a named program (or was forked by one): re-judged by name at exec().
    pub const BY_NAME: u8 = 2;
    /// Runs a program left out by `--exclude-exe` (or was forked by one): never observed,
    /// re-judged by name at exec().
    pub const EXCLUDED: u8 = 3;
    /// Listens on a port given with `--open-port` (or was forked by such a process): stays
    /// selected across exec(), as a listening socket may, even into a program not named
    /// (a process chosen by name that listens there becomes this). Only `--exclude-exe`
    /// takes it back.
    pub const BY_PORT: u8 = 4;
    /// `TAPIR_OPEN_PORTS`: one bit per TCP port, in u64 words.
    pub const OPEN_PORT_WORDS: usize = 65536 / 64;
    /// The kernel's process name (`comm`) length, NUL included.
    pub const COMM_LEN: usize = 16;
}

/// The most payload bytes one data event carries. A power of two: the kernel side masks
/// offsets with `MAX_CAPTURE - 1` to keep the verifier's bounds simple.
pub const MAX_CAPTURE: usize = 8192;
/// Default number of payload bytes copied per syscall.
pub const DEFAULT_CAPTURE: u32 = MAX_CAPTURE as u32;
/// At most this many iovec entries are copied from readv/writev/recvmsg/sendmsg.
pub const MAX_IOVECS: usize = 32;

/// Head bytes of one read that the compat programs (kernels without bpf_loop, whose loops
/// the verifier walks step by step) scan for a `traceparent` and for the head's end.
pub const COMPAT_SCAN_BYTES: u64 = 2048;
/// Request bytes the compat programs scan for the head's end before injecting (a step per
/// 32 bytes; the verifier follows at most 8192 jumps along one path). A longer head is left
/// as it is (counted in `tapir.inject.head_split`).
pub const COMPAT_INJECT_SCAN_BYTES: u64 = 1024;

/// The first byte of every ring-buffer record.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A TCP connection was accepted, connected, or first seen ([`ConnEvent`]).
    ConnOpen = 1,
    /// A tracked TCP connection was closed by its process ([`ConnEvent`]).
    ConnClose = 2,
    /// Bytes were read from or written to a tracked TCP connection ([`DataEvent`]).
    Data = 3,
    /// A process exited ([`EventHeader`] only).
    ProcExit = 4,
    /// A tracked TCP connection started with bytes Tapir cannot read as HTTP/1.x: a TLS
    /// handshake or an HTTP/2 preface ([`ConnEvent`], its `protocol`). Sent once; the
    /// connection's later calls are not looked at.
    ConnOpaque = 5,
}

impl EventKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::ConnOpen),
            2 => Some(Self::ConnClose),
            3 => Some(Self::Data),
            4 => Some(Self::ProcExit),
            5 => Some(Self::ConnOpaque),
            _ => None,
        }
    }
}

/// Common start of every event. `ts_ns` is `CLOCK_MONOTONIC` (bpf_ktime_get_ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u8,
    // Scalar padding, not `[u8; 3]`: the BPF backend zeroes byte arrays with a call to a
    // byte-by-byte memset loop on every event.
    pub _pad0: u8,
    pub _pad1: u16,
    pub tgid: u32,
    pub tid: u32,
    pub fd: u32,
    pub ts_ns: u64,
}

/// Where `ts_ns` sits in every record: the agent orders records from different rings by it.
pub const EVENT_TS_OFFSET: usize = core::mem::offset_of!(EventHeader, ts_ns);

/// Which side of the connection the process is on.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Opened before the agent started or otherwise not seen being set up.
    Unknown = 0,
    /// The process accepted the connection.
    Server = 1,
    /// The process connected it.
    Client = 2,
}

impl Role {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Server,
            2 => Self::Client,
            _ => Self::Unknown,
        }
    }
}

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Addresses of a TCP connection as the observing process sees them. Ports are host order;
/// IPv4 addresses occupy the first 4 bytes of the 16-byte fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub family: u16,
    pub local_port: u16,
    pub remote_port: u16,
    pub _pad: u16,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// [`EventKind::ConnOpen`] / [`EventKind::ConnClose`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEvent {
    pub header: EventHeader,
    /// Kernel address of the `struct sock`: tells a reused fd number from the same connection.
    pub sock_id: u64,
    pub tuple: ConnTuple,
    /// A [`Role`].
    pub role: u8,
    /// [`ConnOpaque`](EventKind::ConnOpaque) events: what the connection speaks
    /// ([`OPAQUE_TLS`], [`OPAQUE_HTTP2`]); 0 otherwise.
    pub protocol: u8,
    pub _pad: [u8; 6],
    /// The thread's command name: identifies processes that exit before /proc is read.
    pub comm: [u8; 16],
}

/// Direction of a [`DataEvent`], from the observed process's point of view.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// The syscall family that produced a [`DataEvent`] (for diagnostics).
pub mod syscall {
    pub const READ: u8 = 1;
    pub const READV: u8 = 2;
    pub const RECVFROM: u8 = 3;
    pub const RECVMSG: u8 = 4;
    pub const WRITE: u8 = 5;
    pub const WRITEV: u8 = 6;
    pub const SENDTO: u8 = 7;
    pub const SENDMSG: u8 = 8;
    pub const SENDFILE: u8 = 9;
    /// Plaintext that OpenSSL's `SSL_read`/`SSL_read_ex` returned (a uprobe, not a syscall).
    pub const SSL_READ: u8 = 10;
    /// Plaintext handed to `SSL_write`/`SSL_write_ex`.
    pub const SSL_WRITE: u8 = 11;

    /// Whether the bytes were decrypted by a TLS library rather than read from the socket.
    pub fn is_tls(call: u8) -> bool {
        matches!(call, SSL_READ | SSL_WRITE)
    }

    /// The syscall's name (`"?"` for a value no program sends).
    pub fn name(call: u8) -> &'static str {
        match call {
            READ => "read",
            READV => "readv",
            RECVFROM => "recvfrom",
            RECVMSG => "recvmsg",
            WRITE => "write",
            WRITEV => "writev",
            SENDTO => "sendto",
            SENDMSG => "sendmsg",
            SENDFILE => "sendfile",
            SSL_READ => "SSL_read",
            SSL_WRITE => "SSL_write",
            _ => "?",
        }
    }
}

/// [`EventKind::Data`]: fixed part; `captured` payload bytes follow it in the record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataEventHeader {
    pub header: EventHeader,
    pub sock_id: u64,
    /// Bytes the syscall moved.
    pub total: u32,
    /// Payload bytes that follow (a prefix of `total`, at most [`MAX_CAPTURE`]).
    pub captured: u32,
    pub direction: u8,
    pub syscall: u8,
    /// Valid bytes in `tail` (0 when the whole payload was captured).
    pub tail_len: u8,
    /// [`DATA_AFTER_GAP`], [`DATA_HTTP2`], [`DATA_H2_SPARSE`], [`DATA_RESP`].
    pub flags: u8,
    pub _pad: [u8; 4],
    /// The last bytes moved when they were not captured: enough to see the end of a
    /// chunked body (`0\r\n\r\n`) that lies beyond the captured prefix.
    pub tail: [u8; TAIL_BYTES],
    /// Trace ids born in the kernel for a request start (`trace.kind != TRACE_NONE`).
    pub trace: TraceIds,
}

/// [`DataEventHeader::flags`]: a record of this connection before this one was lost (the
/// ring was full): the agent cannot pair what was in flight, and resumes at the next
/// message start.
pub const DATA_AFTER_GAP: u8 = 1;
/// [`DataEventHeader::flags`]: the connection speaks HTTP/2 ([`CONN_HTTP2`]): the agent
/// reads its frames.
pub const DATA_HTTP2: u8 = 2;
/// [`DataEventHeader::flags`], with [`DATA_HTTP2`]: a call larger than the capture, walked
/// frame by frame by the kernel. The payload is the call's bytes without any DATA frame's
/// payload (every frame header and every other frame's payload, in order, up to the
/// capture); `tail[..4]` (u32 LE) is how many payload bytes of the frame under way were
/// still to come when the call started, `tail[4]` how many of a frame header's 9 bytes
/// had been moved, `tail[5]` non-zero when that frame is DATA (`tail_len` 6). A walk cut
/// short leaves the payload short of the call's non-DATA bytes.
pub const DATA_H2_SPARSE: u8 = 4;
/// [`DataEventHeader::flags`]: the connection speaks RESP (Redis) as its client
/// ([`PROTO_RESP`]): the agent reads commands and replies.
pub const DATA_RESP: u8 = 8;

/// [`TraceIds::kind`]: no ids (not a request start).
pub const TRACE_NONE: u8 = 0;
/// Ids of a SERVER span: the process read a request.
pub const TRACE_SERVER: u8 = 1;
/// Ids of a CLIENT span: the process wrote a request.
pub const TRACE_CLIENT: u8 = 2;
/// A later read of a request head carried the `traceparent` the first read lacked:
/// `trace_id`, `parent_span_id` and `flags` replace those of the SERVER span being read on
/// this connection; the first four bytes of `span_id` are that span's (the rest are zero).
pub const TRACE_SERVER_PARENT: u8 = 3;

/// [`TraceIds::origin`]: fresh ids (no incoming context).
pub const ORIGIN_NEW: u8 = 0;
/// Trace id and parent from a `traceparent` header the request carried.
pub const ORIGIN_HEADER: u8 = 1;
/// Trace id and parent from the SERVER span the same thread is handling.
pub const ORIGIN_THREAD: u8 = 2;

/// W3C trace context ids chosen in the kernel, so that what is injected on the wire and
/// what is exported agree. Ids are in wire order (big-endian hex order).
///
/// Aligned to 8 so that the eBPF side copies and clears it in 8-byte words rather than
/// byte by byte.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceIds {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// Valid when `has_parent != 0`.
    pub parent_span_id: [u8; 8],
    /// W3C trace flags (bit 0: sampled).
    pub flags: u8,
    pub kind: u8,
    pub origin: u8,
    pub has_parent: u8,
    /// Non-zero when this request was sent with a `traceparent` Tapir inserted:
    /// [`INJECTED_REARMED`] on a kept-alive connection the agent re-armed, else 1.
    pub injected: u8,
    pub _pad: [u8; 3],
}

/// Size of [`DataEventHeader::tail`].
pub const TAIL_BYTES: usize = 16;

/// What the kernel side remembers per (tgid, fd).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnKey {
    pub tgid: u32,
    pub fd: u32,
}

/// [`ConnState::flags`]: the fd is a TCP socket that is tracked.
pub const CONN_TCP: u16 = 1;
/// The connection has carried something that starts like HTTP/1.x (or speaks HTTP/2,
/// [`CONN_HTTP2`]): its later chunks (header continuations, bodies) are reported too.
pub const CONN_HTTP: u16 = 2;
/// The connection's HTTP port is already in the injection port set (saves a lookup per
/// request).
pub const CONN_PORT_LEARNED: u16 = 4;
/// An incoming request head is being read and no `traceparent` was found in it yet: the
/// next ingress read continues it and is scanned too.
pub const CONN_HEAD_OPEN: u16 = 8;
/// ... and the last read ended at a line end, or at a line end and a `\r` (a header, or
/// the head's end, may start at the next read's first byte).
pub const CONN_HEAD_AT_LINE: u16 = 16;
/// The last message read on the connection ended its head, so a read that does not start
/// a new message is body: only its first bytes (and its last, the tail) are copied.
pub const CONN_BODY_IN: u16 = 32;
/// The same for what the connection writes.
pub const CONN_BODY_OUT: u16 = 64;
/// The connection carries something Tapir does not read: it started with a TLS handshake
/// or an HTTP/2 preface (reported once, [`EventKind::ConnOpaque`]) or, seen from its
/// start, with bytes no HTTP/1.x message starts with ([`counter::OTHER_PROTOCOL`]). Its
/// calls stop at the flag check.
pub const CONN_OPAQUE: u16 = 128;

/// The connection is TLS (it started with a handshake, or a thread inside `SSL_read` or
/// `SSL_write` moved its bytes): its calls only tell which `SSL*` uses the fd.
pub const CONN_TLS: u16 = 256;
/// The plaintext of the TLS connection, seen through libssl, has carried HTTP/1.x (what
/// [`CONN_HTTP`] is for the bytes on the socket).
pub const CONN_TLS_HTTP: u16 = 512;
/// The plaintext of the TLS connection started with what Tapir does not read (a TLS
/// record inside TLS): its SSL calls are skipped. (HTTP/2 inside TLS is read:
/// [`CONN_TLS_HTTP`] with [`CONN_HTTP2`].)
pub const CONN_TLS_OPAQUE: u16 = 1024;
/// A data record of the connection could not be queued (its ring was full): the next one
/// that is carries [`DATA_AFTER_GAP`].
pub const CONN_GAP: u16 = 2048;
/// A client connection opened while its thread handled a request: the kernel's
/// `TAPIR_BIRTH_CTX` holds that SERVER span for the connection's first request.
pub const CONN_BORN: u16 = 4096;
/// The record of this client connection's next read wakes the agent at once, so that it
/// can re-arm injection between the reply and the connection's next request: the request
/// just written was injected on a re-armed connection, or is the first not injected after
/// one that was (the agent was late to re-arm; [`CONN_LAST_INJECTED`]).
pub const CONN_WAKE_ON_REPLY: u16 = 8192;
/// The connection speaks HTTP/2 (it started with the client preface, or its server's
/// first write was a SETTINGS frame): every call's bytes are copied up to the capture,
/// with no HTTP/1.x head or body logic and no trace-context work, in records flagged
/// [`DATA_HTTP2`].
pub const CONN_HTTP2: u16 = 16384;
/// The last request written on this client connection was injected. The first after it
/// that is not wakes the agent with its reply ([`CONN_WAKE_ON_REPLY`]): once per miss,
/// so a connection that never pauses (never re-armed) wakes nobody.
pub const CONN_LAST_INJECTED: u16 = 32768;
/// [`TraceIds::injected`] of a request on a connection the agent re-armed: its reply wakes
/// the agent ([`CONN_WAKE_ON_REPLY`]). Not the first request of a connection: most
/// connections that carry one request are closed after it, and a wakeup per connection
/// tripled the agent's CPU per connection under `Connection: close` load (a pooled one's
/// second request wakes it if it was not injected: [`CONN_LAST_INJECTED`]).
pub const INJECTED_REARMED: u8 = 2;

/// [`ConnState::proto`]: a client connection whose first write was a RESP array (a Redis
/// command, `*<count>\r\n`): every call is copied up to the capture, in records flagged
/// [`DATA_RESP`]; each write gets CLIENT ids (a child of the thread's SERVER span).
pub const PROTO_RESP: u8 = 1;

/// [`ConnEvent::protocol`]: a TLS handshake record (content type 22, version 3.x).
pub const OPAQUE_TLS: u8 = 1;
/// [`ConnEvent::protocol`]: the HTTP/2 connection preface (`PRI * HTTP/2.0`), i.e. HTTP/2
/// or gRPC without TLS.
pub const OPAQUE_HTTP2: u8 = 2;

/// 24 bytes: the connection map preallocates 65,536 of them.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnState {
    pub sock_id: u64,
    pub flags: u16,
    pub role: u8,
    /// What a connection that is not HTTP speaks and Tapir reads: [`PROTO_RESP`], or 0.
    pub proto: u8,
    /// The process's fd generation when this was cached (see the kernel's PROC_GEN map).
    pub gen: u32,
    /// Host-order ports of the connection (port learning for traceparent injection).
    pub local_port: u16,
    pub remote_port: u16,
    /// While `CONN_HEAD_OPEN`: the first four bytes of the span id of the request whose
    /// head is being followed, so that a late `traceparent` updates that span and no other
    /// the reading thread may have opened since.
    pub head_span: [u8; 4],
}

/// Struct member offsets (bytes) of the running kernel, read from its BTF at start-up and
/// handed to the programs as a read-only global, so that no layout is hard-coded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_max_fds: u32,
    pub fdtable_fd: u32,
    pub file_private_data: u32,
    pub file_f_inode: u32,
    pub inode_i_mode: u32,
    pub socket_type: u32,
    pub socket_sk: u32,
    pub sock_protocol: u32,
    pub skc_family: u32,
    pub skc_daddr: u32,
    pub skc_rcv_saddr: u32,
    pub skc_dport: u32,
    pub skc_num: u32,
    pub skc_v6_daddr: u32,
    pub skc_v6_rcv_saddr: u32,
    /// Size in bytes of `sock.sk_protocol` (2 on current kernels, 1 on old bitfield ones).
    pub sock_protocol_size: u32,
    /// `task_struct.stack`: the compat build finds a task's saved registers (its syscall's
    /// arguments) at the top of its kernel stack, on kernels without bpf_task_pt_regs.
    pub task_stack: u32,
}

/// Indexes of the kernel-side counters (a per-CPU array summed by userspace).
pub mod counter {
    /// A record did not fit in the ring buffer.
    pub const RINGBUF_FULL: u32 = 0;
    /// The fd → socket walk failed (unreadable kernel memory).
    pub const WALK_FAILED: u32 = 1;
    /// The connection table was full when a connection was first seen.
    pub const CONN_TABLE_FULL: u32 = 2;
    /// A user buffer could not be read.
    pub const READ_USER_FAILED: u32 = 3;
    /// Data events submitted.
    pub const DATA_EVENTS: u32 = 4;
    /// Connection events submitted.
    pub const CONN_EVENTS: u32 = 5;
    /// A request's `traceparent` was found in a later read of its head, not the first.
    pub const TRACEPARENT_LATE: u32 = 6;
    /// The compat programs found no saved registers of the current syscall on the task's
    /// kernel stack (a stack layout they do not know): its arguments are unknown.
    pub const REGS_NOT_FOUND: u32 = 7;
    /// A process started listening on a port given with `--open-port` and became observed.
    pub const SELECTED_BY_PORT: u32 = 8;
    /// A connection seen from its start began with bytes no HTTP/1.x message starts with
    /// (a database, cache or queue protocol): its later calls are skipped.
    pub const OTHER_PROTOCOL: u32 = 9;
    /// Plaintext passed through `SSL_read`/`SSL_write` before Tapir learnt which socket its
    /// `SSL*` uses (a call served from OpenSSL's buffer on a connection whose calls it has
    /// not seen touch the socket yet): not reported.
    pub const TLS_SOCKET_UNKNOWN: u32 = 10;
    pub const COUNT: u32 = 11;
}

/// Key of the injection sockhash and its state map (`TAPIR_INJ_SOCKS`, `TAPIR_INJ_STATE`),
/// in the field conventions of `bpf_sock_ops` and `sk_msg_md`: `lport` in host order,
/// `rport` as those contexts load it (the network-order port shifted into the upper half),
/// addresses in network order (IPv4 in `lip[0]`/`rip[0]`). Built by the kernel programs
/// and, to re-arm a kept-alive connection, by the agent from the socket's own addresses.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjSockKey {
    pub family: u32,
    pub lport: u32,
    pub rport: u32,
    pub _pad: u32,
    pub lip: [u32; 4],
    pub rip: [u32; 4],
}

impl InjSockKey {
    /// `rport` for a remote port in host order.
    pub const fn remote_port_field(port: u16) -> u32 {
        (port.to_be() as u32) << 16
    }
}

/// A claimed socket's injection state (`TAPIR_INJ_STATE`). Written by the kernel
/// programs only (through map value pointers): the agent reads it, and asks for changes
/// through `TAPIR_INJ_REARM`, so that no update of the agent's replaces an element a
/// program is writing to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InjSockState {
    /// [`INJ_PENDING`], [`INJ_JUDGED`], [`INJ_RELEASED`] or [`INJ_RETIRED`].
    pub done: u32,
    pub _pad: u32,
}

/// Bytes sk_msg inserts into an injected request: `traceparent: 00-<32>-<16>-<2>\r\n`.
pub const TRACEPARENT_HEADER_LEN: u32 = 70;

/// In the sockhash; its next request will be injected.
pub const INJ_PENDING: u32 = 0;
/// In the sockhash; its request was handled (injected or deliberately not); it leaves at
/// the next acknowledgement of its data.
pub const INJ_JUDGED: u32 = 1;
/// Out of the sockhash, its RTT callback still on: the agent may re-arm it.
pub const INJ_RELEASED: u32 = 2;
/// Out of the sockhash for good, RTT callback off: the agent found it busy every time it
/// tried to re-arm it (back-to-back requests) and asked for it to be retired.
pub const INJ_RETIRED: u32 = 3;

/// `TAPIR_INJ_REARM` values, written by the agent for a released socket: it put the
/// socket back into the sockhash (its next request is injected; an acknowledgement of
/// data sk_msg did not see releases it again) ...
pub const INJ_REARM_ARMED: u32 = 1;
/// ... or it gave up on it: switch its RTT callback off at the next acknowledgement.
pub const INJ_REARM_RETIRE: u32 = 2;

/// Indexes of the traceparent-injection counters (`TAPIR_INJ_COUNTERS`, per-CPU).
pub mod inject_counter {
    /// Client sockets put in the injection sockhash at connection setup.
    pub const CLAIMED: u32 = 0;
    /// Requests that got a `traceparent` inserted.
    pub const INJECTED: u32 = 1;
    /// First message was not an HTTP request (other protocol): left alone.
    pub const NOT_REQUEST: u32 = 2;
    /// The request already carried a `traceparent`: left alone, its ids used.
    pub const HAS_TRACEPARENT: u32 = 3;
    /// The request head did not fit in the first send (or had no line end): left alone.
    pub const HEAD_SPLIT: u32 = 4;
    /// Later messages on a claimed connection before its release (only the first request
    /// after a claim is injected; the agent re-arms idle kept-alive connections).
    pub const KEEPALIVE_LATER: u32 = 5;
    /// The kernel refused to grow or linearize the message.
    pub const PUSH_FAILED: u32 = 6;
    /// Sockets released from the sockhash once their request was acknowledged.
    pub const RELEASED: u32 = 7;
    /// Claiming or releasing a socket failed.
    pub const MAP_FAILED: u32 = 8;
    /// Released sockets retired at the agent's request (never idle when it tried).
    pub const RETIRED: u32 = 9;
    /// Connections (and requests) of processes left out by `--pid` / `--exe`: not claimed
    /// or not injected, since their span would never be exported (the downstream span's
    /// parent would be missing).
    pub const NOT_OBSERVED: u32 = 10;
    pub const COUNT: u32 = 11;
    /// Metric-name suffixes, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "claimed",
        "injected",
        "not_request",
        "has_traceparent",
        "head_split",
        "keepalive_later",
        "push_failed",
        "released",
        "map_failed",
        "retired",
        "not_observed",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all are repr(C), contain only integers and byte arrays, and have no padding
    // (asserted by the layout tests below).
    unsafe impl aya::Pod for KernelOffsets {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnState {}
    unsafe impl aya::Pod for TraceIds {}
    unsafe impl aya::Pod for InjSockKey {}
    unsafe impl aya::Pod for InjSockState {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, offset_of, size_of};

    #[test]
    fn every_syscall_has_its_own_name() {
        let names = [
            "read",
            "readv",
            "recvfrom",
            "recvmsg",
            "write",
            "writev",
            "sendto",
            "sendmsg",
            "sendfile",
            "SSL_read",
            "SSL_write",
        ];
        for (call, name) in (syscall::READ..=syscall::SSL_WRITE).zip(names) {
            assert_eq!(syscall::name(call), name);
            assert_eq!(syscall::is_tls(call), name.starts_with("SSL_"));
        }
        assert_eq!(syscall::name(0), "?");
        assert_eq!(syscall::name(12), "?");
    }

    #[test]
    fn layouts_are_padding_free_and_stable() {
        assert_eq!(size_of::<EventHeader>(), 24);
        assert_eq!(size_of::<ConnTuple>(), 40);
        assert_eq!(size_of::<ConnEvent>(), 24 + 8 + 40 + 8 + 16);
        assert_eq!(offset_of!(ConnEvent, comm), 80);
        assert_eq!(offset_of!(ConnEvent, tuple), 32);
        assert_eq!(offset_of!(ConnEvent, role), 72);
        assert_eq!(offset_of!(ConnEvent, protocol), 73);
        assert_eq!(size_of::<TraceIds>(), 40);
        assert_eq!(align_of::<TraceIds>(), 8);
        assert_eq!(offset_of!(EventHeader, tgid), 4);
        assert_eq!(offset_of!(DataEventHeader, trace), 64);
        assert_eq!(size_of::<DataEventHeader>(), 104);
        assert_eq!(offset_of!(DataEventHeader, tail), 48);
        assert_eq!(offset_of!(DataEventHeader, total), 32);
        assert_eq!(offset_of!(DataEventHeader, direction), 40);
        assert_eq!(offset_of!(DataEventHeader, flags), 43);
        assert_eq!(size_of::<ConnKey>(), 8);
        assert_eq!(size_of::<ConnState>(), 24);
        assert_eq!(offset_of!(ConnState, gen), 12);
        assert_eq!(offset_of!(ConnState, head_span), 20);
        assert_eq!(size_of::<KernelOffsets>(), 19 * 4);
        assert_eq!(align_of::<DataEventHeader>(), 8);
        assert_eq!(size_of::<InjSockKey>(), 48);
        assert_eq!(offset_of!(InjSockKey, lip), 16);
        assert_eq!(offset_of!(InjSockKey, rip), 32);
        assert_eq!(size_of::<InjSockState>(), 8);
    }

    #[test]
    fn remote_port_field_is_what_the_kernel_programs_decode() {
        // tapir_sock_ops reads the port back as `u32::from_be(rport) & 0xffff`.
        for port in [1u16, 80, 8080, 0xff00, u16::MAX] {
            let field = InjSockKey::remote_port_field(port);
            assert_eq!(u32::from_be(field) & 0xffff, u32::from(port));
            // In memory: two zero bytes, then the port in network order.
            let b = port.to_be_bytes();
            assert_eq!(field.to_ne_bytes(), [0, 0, b[0], b[1]]);
        }
    }

    #[test]
    fn event_kinds_round_trip() {
        for k in [
            EventKind::ConnOpen,
            EventKind::ConnClose,
            EventKind::Data,
            EventKind::ProcExit,
        ] {
            assert_eq!(EventKind::from_u8(k as u8), Some(k));
        }
        assert_eq!(EventKind::from_u8(0), None);
        assert_eq!(EventKind::from_u8(255), None);
        assert_eq!(Role::from_u8(7), Role::Unknown);
    }

    #[test]
    fn max_capture_is_a_power_of_two() {
        assert!(MAX_CAPTURE.is_power_of_two());
    }
}
