//! Re-arms traceparent injection on kept-alive client connections.
//!
//! The kernel injects into the first request written after a client socket is claimed,
//! then releases the socket from the injection sockhash when that request is acknowledged
//! (a socket in a sockhash reports FIONREAD = 0, which stalls nginx and others reading
//! the response). The kernel cannot put it back: sock_ops may add sockets to a sockhash
//! only while a connection is set up, tracepoints never. So the agent does, from
//! userspace, when the pipeline has just seen a client connection read a whole response:
//!
//! 1. it takes a copy of the socket from its process (`pidfd_getfd`) and checks that it is
//!    the tracked connection (same addresses and ports);
//! 2. it checks that the socket is idle *and* that nothing happened on it that the
//!    pipeline has not seen: no byte unread or unacknowledged, every byte the kernel says
//!    was sent and received went through the pipeline. Otherwise the process may already
//!    have sent its next request, whose response must not arrive while the socket is
//!    claimed;
//! 3. it marks the socket "armed" in `TAPIR_INJ_REARM` and inserts it into the sockhash
//!    (sk_msg then moves the kernel's state from "released" back to "pending"). Only
//!    sockets the kernel claimed and released itself are eligible: theirs is the RTT
//!    callback that releases them again. A socket busy at every try is marked "retire"
//!    instead, and the kernel stops watching it;
//! 4. it reads the counters again: if the process wrote while the socket was being
//!    inserted (sk_msg may not have seen it), the socket is taken out at once.
//!
//! Each attempt costs about ten system calls, so attempts are rate-limited; every outcome
//! is counted (`tapir.inject.rearm.*`).
use std::{
    mem::{size_of, MaybeUninit},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    num::NonZeroUsize,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::Arc,
    time::Instant,
};

use agent_common::{
    InjSockKey, InjSockState, INJ_REARM_ARMED, INJ_REARM_RETIRE, INJ_RELEASED, INJ_RETIRED,
};
use aya::maps::{HashMap, Map, MapData, MapError, SockHash};

use crate::{pipeline::Endpoints, stats::Stats};

/// Attempts per second, and how many may come at once.
const RATE_PER_SEC: f64 = 2000.0;
const BURST: f64 = 200.0;
/// Processes whose pidfd is kept open.
const PIDFDS: usize = 256;

/// The part of `struct tcp_info` read here (up to `tcpi_bytes_received`, Linux 4.1):
/// older kernels fill less of the struct than the libc crate declares.
const TCP_INFO_NEEDED: usize =
    std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + size_of::<u64>();
/// `TCP_ESTABLISHED` of include/net/tcp_states.h (`tcpi_state`).
const TCP_ESTABLISHED: u8 = 1;
const BPF_ANY: u64 = 0;
const BPF_NOEXIST: u64 = 1;

/// What the pipeline knows of a client connection that just read a whole response.
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub tgid: u32,
    pub fd: u32,
    pub endpoints: Endpoints,
    /// Bytes the connection carried out, as the kernel put them on the wire (injected
    /// headers included), and in, since it was opened.
    pub sent: u64,
    pub received: u64,
    /// When the response was read (kernel time).
    pub read_ns: u64,
}

/// Per-connection backoff: a connection found busy because it does not pause (its process
/// writes its next request right after it reads a response, before any agent could re-arm
/// it) is tried on every 2nd, 4th … 1024th response only, until it is found idle again; one
/// the kernel retired is not tried again. A busy try is judged by the request that made it
/// busy: when that came [`PAUSE_NS`] or more after the response, the agent was late (a
/// drain that came after the connection's pause, on a busy host), not the connection
/// quick, and the next response is tried as usual.
#[derive(Debug, Default, Clone, Copy)]
pub struct Backoff {
    skip: u8,
    never: bool,
    wait: u16,
    /// When the response of a busy try was read, in ticks of 2^16 ns (65.5 µs, wrapping
    /// every 4.3 s; 0: none): judged at the connection's next write ([`Backoff::on_write`]).
    /// Two bytes: every tracked connection has one.
    busy_read: u16,
}

const MAX_SKIP: u8 = 10;

/// A client that waits this long between reading a response and writing its next request
/// pauses long enough for a prompt re-arm (the kernel wakes the agent for the reply, which
/// is then passed on within a millisecond or so).
const PAUSE_NS: u64 = 2_000_000;

/// Bits of a kernel timestamp dropped for [`Backoff::busy_read`].
const TICK_SHIFT: u32 = 16;

/// A kernel timestamp in the units of [`Backoff::busy_read`].
fn ticks(ts_ns: u64) -> u16 {
    // Truncated on purpose: only short differences are taken (a pause longer than the
    // wrap that lands within PAUSE_NS of it backs off once more than it should).
    ((ts_ns >> TICK_SHIFT) as u16).max(1)
}

impl Backoff {
    /// Busy at every try, as far apart as tries get.
    fn at_max(&self) -> bool {
        self.skip >= MAX_SKIP
    }

    /// Whether this response's turn has come.
    fn due(&mut self) -> bool {
        if self.never {
            false
        } else if self.wait > 0 {
            self.wait -= 1;
            false
        } else {
            true
        }
    }

    fn back_off(&mut self) {
        self.skip = (self.skip + 1).min(MAX_SKIP);
        self.wait = (1u16 << self.skip) - 1;
    }

    /// `read_ns`: when the response the try followed was read.
    fn after(&mut self, outcome: Outcome, read_ns: u64) {
        match outcome {
            Outcome::Busy => self.busy_read = ticks(read_ns),
            // Not eligible now (still claimed, never claimed): rarely better later.
            Outcome::NotEligible => self.back_off(),
            Outcome::Retired => self.never = true,
            Outcome::Rearmed => *self = Self::default(),
            _ => {}
        }
    }

    /// The connection wrote at `ts_ns` (kernel time): if a busy try awaits judgement, this
    /// is the request that made it busy.
    pub fn on_write(&mut self, ts_ns: u64) {
        if self.busy_read == 0 {
            return;
        }
        let gap = ticks(ts_ns).wrapping_sub(self.busy_read);
        self.busy_read = 0;
        if u64::from(gap) << TICK_SHIFT < PAUSE_NS {
            self.back_off();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Rearmed,
    /// Unread, unacknowledged or unseen bytes: the process is ahead of the pipeline.
    Busy,
    /// Not released by the kernel (never claimed, or still in the sockhash).
    NotEligible,
    /// Retired by the kernel: it never paused between requests.
    Retired,
    OverBudget,
    /// The process exited or closed the socket (short-lived clients do, right after the
    /// response), or the fd is another socket now.
    Gone,
    /// A system call or map update failed.
    Failed,
}

/// The kernel's view of one socket, read through our copy of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SocketCounters {
    established: bool,
    unread: u64,
    unacked: u64,
    acked: u64,
    received: u64,
}

impl SocketCounters {
    /// Bytes the process wrote, acknowledged or not. The kernel's `bytes_acked` counts the
    /// SYN of the connect (these are client connections) as one byte.
    fn written(&self) -> u64 {
        (self.acked + self.unacked).saturating_sub(1)
    }

    /// Everything the pipeline saw and nothing more, nothing in flight.
    fn idle_at(&self, sent: u64, received: u64) -> bool {
        self.established
            && self.unread == 0
            && self.unacked == 0
            && self.written() == sent
            && self.received == received
    }
}

/// The kernel maps re-arming works on, taken out of the loaded object.
pub struct InjectionMaps {
    pub socks: Map,
    pub state: Map,
    pub rearm: Map,
}

pub struct Rearm {
    socks: SockHash<MapData, InjSockKey>,
    /// Read only: the kernel programs write it through value pointers.
    state: HashMap<MapData, InjSockKey, InjSockState>,
    /// What the agent did with a released socket (`INJ_REARM_*`).
    rearm: HashMap<MapData, InjSockKey, u32>,
    pidfds: lru::LruCache<u32, OwnedFd>,
    budget: TokenBucket,
    stats: Arc<Stats>,
}

impl Rearm {
    /// The `TAPIR_INJ_SOCKS` sockhash and the `TAPIR_INJ_STATE` and `TAPIR_INJ_REARM` maps.
    pub fn new(maps: InjectionMaps, stats: Arc<Stats>) -> Result<Self, MapError> {
        Ok(Self {
            socks: SockHash::try_from(maps.socks)?,
            state: HashMap::try_from(maps.state)?,
            rearm: HashMap::try_from(maps.rearm)?,
            pidfds: lru::LruCache::new(NonZeroUsize::new(PIDFDS).unwrap_or(NonZeroUsize::MIN)),
            budget: TokenBucket::new(RATE_PER_SEC, BURST),
            stats,
        })
    }

    /// Tries to put the connection's socket back into the injection sockhash (`None`: not
    /// this response, the connection is backing off).
    pub fn try_rearm(&mut self, c: &Candidate, backoff: &mut Backoff) -> Option<Outcome> {
        if !backoff.due() {
            return None;
        }
        let outcome = self.attempt(c, backoff.at_max());
        backoff.after(outcome, c.read_ns);
        let counter = match outcome {
            Outcome::Rearmed => &self.stats.rearm_done,
            Outcome::Busy => &self.stats.rearm_busy,
            Outcome::NotEligible | Outcome::Retired => &self.stats.rearm_not_eligible,
            Outcome::OverBudget => &self.stats.rearm_over_budget,
            Outcome::Gone => &self.stats.rearm_gone,
            Outcome::Failed => &self.stats.rearm_failed,
        };
        Stats::inc(counter);
        Some(outcome)
    }

    /// The client connection `fd` of `tgid` turned out to speak something other than HTTP
    /// (Redis): nothing will be injected into it, so if the kernel claimed it (its port was
    /// an injection port) it is asked to retire it, and its acknowledgements stop running
    /// the RTT callback (~0.2 µs each). Rate-limited with the re-arms.
    pub fn retire_not_http(&mut self, tgid: u32, fd: u32, endpoints: &Endpoints) -> Outcome {
        if !self.budget.take(Instant::now()) {
            return Outcome::OverBudget;
        }
        let (_sock, key) = match self.tracked_socket(tgid, fd, endpoints) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        match self.state.get(&key, 0) {
            Ok(s) if s.done == INJ_RETIRED => Outcome::Retired,
            Ok(_) => match self.rearm.insert(key, INJ_REARM_RETIRE, BPF_ANY) {
                Ok(()) => Outcome::Retired,
                Err(_) => Outcome::Failed,
            },
            // Never claimed: nothing to stop.
            Err(MapError::KeyNotFound) => Outcome::NotEligible,
            Err(_) => Outcome::Failed,
        }
    }

    /// Our copy of the process's socket `fd` and its sockhash key, if it is still the
    /// tracked connection (`Gone` otherwise).
    fn tracked_socket(
        &mut self,
        tgid: u32,
        fd: u32,
        endpoints: &Endpoints,
    ) -> Result<(OwnedFd, InjSockKey), Outcome> {
        let sock = self.socket_of(tgid, fd).ok_or(Outcome::Gone)?;
        // Not connected any more, or not a TCP socket.
        let (key, found) = socket_key(sock.as_raw_fd()).ok_or(Outcome::Gone)?;
        if !same_connection(&found, endpoints) {
            return Err(Outcome::Gone);
        }
        Ok((sock, key))
    }

    /// A process exited: its pidfd is closed.
    pub fn forget(&mut self, tgid: u32) {
        self.pidfds.pop(&tgid);
    }

    /// `retire_if_busy`: the connection has been busy at every try so far; if it is busy
    /// again, ask the kernel to stop watching it (its RTT callback costs every request).
    fn attempt(&mut self, c: &Candidate, retire_if_busy: bool) -> Outcome {
        if !self.budget.take(Instant::now()) {
            return Outcome::OverBudget;
        }
        let failed = |why: &str| {
            tracing::debug!(pid = c.tgid, fd = c.fd, why, "re-arming injection failed");
            Outcome::Failed
        };
        let (sock, key) = match self.tracked_socket(c.tgid, c.fd, &c.endpoints) {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        match self.state.get(&key, 0) {
            Ok(s) if s.done == INJ_RELEASED => {}
            Ok(s) if s.done == INJ_RETIRED => return Outcome::Retired,
            Ok(_) | Err(MapError::KeyNotFound) => return Outcome::NotEligible,
            Err(_) => return failed("state lookup"),
        }
        match counters(sock.as_raw_fd()) {
            Some(k) if k.idle_at(c.sent, c.received) => {}
            Some(_) if retire_if_busy => {
                let _ = self.rearm.insert(key, INJ_REARM_RETIRE, BPF_ANY);
                return Outcome::Retired;
            }
            Some(_) => return Outcome::Busy,
            None => return failed("TCP_INFO"),
        }
        // Said first: sk_msg injects into a released socket's message only when told so.
        if self.rearm.insert(key, INJ_REARM_ARMED, BPF_ANY).is_err() {
            return failed("rearm map update");
        }
        if let Err(e) = self.socks.insert(key, sock.as_raw_fd(), BPF_NOEXIST) {
            let _ = self.rearm.remove(&key);
            tracing::debug!(pid = c.tgid, fd = c.fd, error = %e, "re-arming injection failed: sockhash insert");
            return Outcome::Failed;
        }
        // Written to or read from while being inserted: sk_msg may have missed a request
        // whose response would then arrive while the socket is claimed.
        match counters(sock.as_raw_fd()) {
            Some(k) if k.written() == c.sent && k.received == c.received => Outcome::Rearmed,
            _ => {
                let _ = self.socks.remove(&key);
                let _ = self.rearm.remove(&key);
                Outcome::Busy
            }
        }
    }

    /// Our own copy of the process's socket (closed when dropped).
    fn socket_of(&mut self, tgid: u32, fd: u32) -> Option<OwnedFd> {
        if !self.pidfds.contains(&tgid) {
            self.pidfds.put(tgid, pidfd_open(tgid).ok()?);
        }
        match pidfd_getfd(self.pidfds.get(&tgid)?, fd as RawFd) {
            Ok(sock) => Some(sock),
            Err(e) => {
                if e.raw_os_error() == Some(libc::ESRCH) {
                    // That process is gone (its exit may not have reached us): a new
                    // process with the same pid must get a pidfd of its own.
                    self.pidfds.pop(&tgid);
                }
                None
            }
        }
    }
}

/// An fd that refers to process `pid` (`pidfd_open`, Linux 5.3).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Our own copy of the process's descriptor `fd` (`pidfd_getfd`, Linux 5.6; needs ptrace
/// rights over the process).
fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: plain system call; the result is checked.
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy as RawFd) })
}

/// Whether this process may copy other processes' sockets (`pidfd_getfd`, Linux 5.6, with
/// ptrace rights over them): tried on its own pidfd. `tapir doctor` reports it.
pub fn pidfd_getfd_works() -> std::io::Result<()> {
    let pidfd = pidfd_open(std::process::id())?;
    pidfd_getfd(&pidfd, pidfd.as_raw_fd()).map(drop)
}

/// The two ends as a socket reports them, v4-mapped addresses shown as IPv4 (as in
/// [`Endpoints::from_tuple`]).
fn same_connection(a: &Endpoints, b: &Endpoints) -> bool {
    let canon = |(ip, port): (IpAddr, u16)| (ip.to_canonical(), port);
    canon(a.local) == canon(b.local) && canon(a.remote) == canon(b.remote)
}

/// The sockhash key of a TCP socket, as sock_ops and sk_msg build it, and its endpoints.
fn socket_key(fd: RawFd) -> Option<(InjSockKey, Endpoints)> {
    let local = sock_addr(fd, libc::getsockname)?;
    let remote = sock_addr(fd, libc::getpeername)?;
    key_of(&local, &remote)
}

/// A socket address as the kernel stores it.
enum SockAddr {
    V4(libc::sockaddr_in),
    V6(libc::sockaddr_in6),
}

type AddrCall = unsafe extern "C" fn(i32, *mut libc::sockaddr, *mut libc::socklen_t) -> i32;

fn sock_addr(fd: RawFd, call: AddrCall) -> Option<SockAddr> {
    let mut ss = MaybeUninit::<libc::sockaddr_storage>::zeroed();
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the buffer and its length are ours; the result is checked.
    if unsafe { call(fd, ss.as_mut_ptr().cast(), &mut len) } != 0 {
        return None;
    }
    // SAFETY: zero-initialised and filled by the kernel up to `len`.
    let ss = unsafe { ss.assume_init() };
    let p = &ss as *const libc::sockaddr_storage;
    match i32::from(ss.ss_family) {
        // SAFETY: the family says which struct the storage holds.
        libc::AF_INET => Some(SockAddr::V4(unsafe { *p.cast::<libc::sockaddr_in>() })),
        // SAFETY: as above.
        libc::AF_INET6 => Some(SockAddr::V6(unsafe { *p.cast::<libc::sockaddr_in6>() })),
        _ => None,
    }
}

impl SockAddr {
    /// (family, address as the kernel's four network-order words, port, address).
    fn parts(&self) -> (u32, [u32; 4], u16, IpAddr) {
        match self {
            SockAddr::V4(a) => {
                let ip = a.sin_addr.s_addr;
                (
                    libc::AF_INET as u32,
                    [ip, 0, 0, 0],
                    u16::from_be(a.sin_port),
                    IpAddr::V4(Ipv4Addr::from(ip.to_ne_bytes())),
                )
            }
            SockAddr::V6(a) => {
                let b = a.sin6_addr.s6_addr;
                let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
                (
                    libc::AF_INET6 as u32,
                    [w(0), w(4), w(8), w(12)],
                    u16::from_be(a.sin6_port),
                    IpAddr::V6(Ipv6Addr::from(b)),
                )
            }
        }
    }
}

fn key_of(local: &SockAddr, remote: &SockAddr) -> Option<(InjSockKey, Endpoints)> {
    let (family, lip, lport, lend) = local.parts();
    let (rfamily, rip, rport, rend) = remote.parts();
    if family != rfamily {
        return None;
    }
    let key = InjSockKey {
        family,
        lport: u32::from(lport),
        rport: InjSockKey::remote_port_field(rport),
        _pad: 0,
        lip,
        rip,
    };
    let endpoints = Endpoints {
        local: (lend, lport),
        remote: (rend, rport),
    };
    Some((key, endpoints))
}

fn counters(fd: RawFd) -> Option<SocketCounters> {
    let mut info = MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the buffer and its length are ours; the result is checked.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 || (len as usize) < TCP_INFO_NEEDED {
        return None;
    }
    // SAFETY: zero-initialised and filled by the kernel.
    let info = unsafe { info.assume_init() };
    let queued = |req: libc::Ioctl| -> Option<u64> {
        let mut n: libc::c_int = 0;
        // SAFETY: SIOCINQ / SIOCOUTQ write one int.
        let r = unsafe { libc::ioctl(fd, req, &mut n) };
        (r == 0).then_some(n.max(0) as u64)
    };
    Some(SocketCounters {
        established: info.tcpi_state == TCP_ESTABLISHED,
        unread: queued(libc::FIONREAD)?,
        unacked: queued(libc::TIOCOUTQ)?,
        acked: info.tcpi_bytes_acked,
        received: info.tcpi_bytes_received,
    })
}

/// At most `rate` per second on average, `burst` at once.
#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            last: None,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let earned = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + earned).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        time::Duration,
    };

    use super::*;

    #[test]
    fn idle_means_nothing_queued_and_nothing_unseen() {
        let k = SocketCounters {
            established: true,
            unread: 0,
            unacked: 0,
            acked: 101,
            received: 250,
        };
        assert!(k.idle_at(100, 250));
        assert!(!k.idle_at(90, 250), "sent bytes the pipeline has not seen");
        assert!(
            !k.idle_at(100, 200),
            "received bytes the pipeline has not seen"
        );
        assert!(!SocketCounters { unread: 1, ..k }.idle_at(100, 250));
        assert!(!SocketCounters { unacked: 1, ..k }.idle_at(100, 250));
        assert!(!SocketCounters {
            established: false,
            ..k
        }
        .idle_at(100, 250));
    }

    /// Drives a backoff through `responses` responses, each followed by the next request
    /// `gap_ns` later, every try busy; returns the responses tried.
    fn busy_tries(b: &mut Backoff, responses: u64, gap_ns: u64) -> Vec<u64> {
        let mut tried = Vec::new();
        for i in 0..responses {
            let read = 5_000_000_000 + i * 50_000_000;
            if b.due() {
                tried.push(i);
                b.after(Outcome::Busy, read);
            }
            b.on_write(read + gap_ns);
        }
        tried
    }

    #[test]
    fn busy_connections_back_off_to_every_1024th_response() {
        let mut b = Backoff::default();
        let tried = busy_tries(&mut b, 5000, 20_000);
        assert_eq!(&tried[..7], &[0, 2, 6, 14, 30, 62, 126]);
        let gaps: Vec<_> = tried.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(gaps.iter().max(), Some(&1024), "{tried:?}");
        assert!(
            b.at_max(),
            "busy at every try: the next busy try retires it"
        );
        b.after(Outcome::Rearmed, 0);
        assert!(b.due() && b.due(), "found idle: tried every time again");
        b.after(Outcome::OverBudget, 0);
        assert!(b.due());
        b.after(Outcome::Retired, 0);
        assert!((0..5000).all(|_| !b.due()), "retired: never again");
    }

    #[test]
    fn a_busy_try_after_which_the_client_paused_was_the_agent_late() {
        let mut b = Backoff::default();
        let tried = busy_tries(&mut b, 50, PAUSE_NS + 200_000);
        assert_eq!(tried, (0..50).collect::<Vec<_>>(), "every response tried");
        assert!(!b.at_max());
        // Just under the pause: the connection is quick, it backs off.
        let mut b = Backoff::default();
        assert_eq!(busy_tries(&mut b, 7, PAUSE_NS - 200_000), [0, 2, 6]);
        // A write with no busy try pending changes nothing; one judges one try only.
        let mut b = Backoff::default();
        b.on_write(1);
        assert!(b.due());
        b.after(Outcome::Busy, 1 << 40);
        b.on_write((1 << 40) + 1000);
        b.on_write((1 << 40) + 2000);
        assert!(!b.due() && b.due(), "backed off once");
    }

    #[test]
    fn pause_judgement_survives_the_tick_clock_wrapping() {
        // A response read just before the 2^32 ns (~4.3 s) truncation wraps, and a
        // request written 3 ms later, after it wrapped: still a pause.
        let read = (1u64 << 32) - 1_000_000;
        let mut b = Backoff::default();
        b.after(Outcome::Busy, read);
        b.on_write(read + 3_000_000);
        assert!(b.due(), "paused: tried at the next response");
        let mut b = Backoff::default();
        b.after(Outcome::Busy, read);
        b.on_write(read + 10_000);
        assert!(!b.due(), "quick: backed off");
    }

    #[test]
    fn pidfd_getfd_works_on_this_kernel() {
        pidfd_getfd_works().unwrap();
    }

    #[test]
    fn tcp_info_needs_only_what_linux_4_1_fills() {
        // Linux 4.1's struct tcp_info ends with tcpi_bytes_received, at 136 bytes.
        assert_eq!(TCP_INFO_NEEDED, 136);
        assert!(TCP_INFO_NEEDED <= size_of::<libc::tcp_info>());
    }

    #[test]
    fn token_bucket_allows_bursts_then_the_rate() {
        let mut b = TokenBucket::new(10.0, 3.0);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        assert!(!b.take(t0 + Duration::from_millis(50)));
        assert!(b.take(t0 + Duration::from_millis(160)));
        assert!(!b.take(t0 + Duration::from_millis(170)));
        // A long pause refills to the burst, not beyond.
        let later = t0 + Duration::from_secs(60);
        assert!((0..3).all(|_| b.take(later)));
        assert!(!b.take(later));
    }

    #[test]
    fn keys_and_counters_of_a_real_loopback_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let (key, ends) = socket_key(client.as_raw_fd()).unwrap();
        let local = client.local_addr().unwrap();
        let remote = client.peer_addr().unwrap();
        assert_eq!(ends.local, (local.ip(), local.port()));
        assert_eq!(ends.remote, (remote.ip(), remote.port()));
        assert_eq!(key.family, libc::AF_INET as u32);
        assert_eq!(key.lport, u32::from(local.port()));
        assert_eq!(u32::from_be(key.rport) & 0xffff, u32::from(remote.port()));
        assert_eq!(key.lip[0].to_ne_bytes(), [127, 0, 0, 1]);
        assert_eq!(&key.lip[1..], &[0, 0, 0]);

        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let mut buf = [0u8; 18];
        server.read_exact(&mut buf).unwrap();
        server.write_all(b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
        // Unread: not idle.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut k = counters(client.as_raw_fd()).unwrap();
        while k.unread < 19 && Instant::now() < deadline {
            std::thread::yield_now();
            k = counters(client.as_raw_fd()).unwrap();
        }
        assert_eq!(k.unread, 19);
        assert_eq!(k.received, 19);
        assert!(!k.idle_at(18, 19));
        let mut resp = [0u8; 19];
        client.read_exact(&mut resp).unwrap();
        let k = counters(client.as_raw_fd()).unwrap();
        assert!(k.established);
        assert_eq!(
            (k.acked, k.unacked),
            (18 + 1, 0),
            "the SYN counts as one byte"
        );
        assert!(k.idle_at(18, 19));
    }

    #[test]
    fn v6_keys_keep_network_order_words() {
        let listener = TcpListener::bind("[::1]:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (key, ends) = socket_key(client.as_raw_fd()).unwrap();
        assert_eq!(key.family, libc::AF_INET6 as u32);
        assert_eq!(key.lip[3].to_ne_bytes(), [0, 0, 0, 1]);
        assert_eq!(key.rip[..3], [0, 0, 0]);
        assert_eq!(ends.remote.0, IpAddr::V6(Ipv6Addr::LOCALHOST));
        // v4-mapped and plain IPv4 name the same connection.
        let mapped = Endpoints {
            local: ("::ffff:127.0.0.1".parse().unwrap(), 1),
            remote: ("::ffff:127.0.0.2".parse().unwrap(), 2),
        };
        let plain = Endpoints {
            local: ("127.0.0.1".parse().unwrap(), 1),
            remote: ("127.0.0.2".parse().unwrap(), 2),
        };
        assert!(same_connection(&mapped, &plain));
        assert!(!same_connection(
            &plain,
            &Endpoints {
                remote: ("127.0.0.2".parse().unwrap(), 3),
                ..plain
            }
        ));
    }
}
