//! Ring-buffer records → per-connection state → finished exchanges, on one thread.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{
    ConnEvent, ConnTuple, Role, AF_INET, DATA_HTTP2, DATA_RESP, DIR_EGRESS, DIR_INGRESS,
    TRACEPARENT_HEADER_LEN, TRACE_CLIENT,
};
use aya::maps::{MapData, PerCpuArray};

use crate::{
    capture::{
        events::{decode, DataEvent, KernelEvent},
        reader::RecordSink,
    },
    clock::MonoToWall,
    conn_table::ConnTable,
    process::{ProcessCache, ProcessInfo},
    stats::Stats,
    unreadable::{Notices, Sighting, Unreadable},
};

/// Which connections to follow (`--port`); an empty list follows everything. Processes
/// (`--pid`, `--exe`) are chosen in the kernel: see [`crate::select`].
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub ports: Vec<u16>,
}

impl Filter {
    fn wants(&self, tuple: &ConnTuple) -> bool {
        self.ports.is_empty()
            || self.ports.contains(&tuple.local_port)
            || self.ports.contains(&tuple.remote_port)
    }
}

/// A TCP endpoint as the observed process sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Endpoints {
    pub local: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

impl Endpoints {
    pub fn from_tuple(t: &ConnTuple) -> Self {
        let ip = |a: &[u8; 16]| -> IpAddr {
            if t.family == AF_INET {
                IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
            } else {
                let v6 = Ipv6Addr::from(*a);
                // Show v4-mapped peers of dual-stack sockets as plain IPv4.
                v6.to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6))
            }
        };
        Self {
            local: (ip(&t.local_addr), t.local_port),
            remote: (ip(&t.remote_addr), t.remote_port),
        }
    }
}

/// How often connections idle since the previous sweep release their buffers.
const IDLE_SWEEP: Duration = Duration::from_secs(5);
/// How often the monotonic-to-wall clock offset and the kernel counters are re-read.
const CLOCK_REFRESH: Duration = Duration::from_secs(1);

/// One tracked connection.
pub struct Conn {
    pub sock_id: u64,
    pub endpoints: Endpoints,
    pub role: Role,
    pub wanted: bool,
    pub process: Arc<ProcessInfo>,
    pub http: crate::assemble::ConnAssembler,
    /// Saw data since the last idle sweep.
    pub active: bool,
    /// Bytes this connection carried out (as sent on the wire: injected headers included)
    /// and in, since it was opened: re-arming injection compares them with the kernel's.
    pub sent: u64,
    pub received: u64,
    pub rearm: crate::rearm::Backoff,
    /// Its bytes come from a TLS library's probes (plaintext), not the socket.
    pub tls: bool,
    /// It started with a TLS handshake and no plaintext has come through the probes yet:
    /// if none comes before it ends, it is reported unreadable then.
    pub tls_unconfirmed: bool,
}

impl Conn {
    /// Its plaintext came through the TLS probes: a TLS connection read, counted once.
    fn tls_read(&mut self, stats: &Stats) {
        self.tls = true;
        if std::mem::take(&mut self.tls_unconfirmed) {
            Stats::inc(&stats.conns_tls_read);
        }
    }
}

/// Receives what the pipeline produces.
pub trait ExchangeSink {
    /// By reference: an exchange is a few hundred bytes, and no sink keeps it.
    fn on_exchange(&mut self, exchange: &crate::exchange::CapturedExchange);
    /// Called after each drain of the ring buffer.
    fn flush(&mut self) {}
    /// Called every idle sweep: free what was kept for connections not seen since the
    /// previous one.
    fn release_idle(&mut self) {}
    /// A process exited, after its last exchanges were passed on.
    fn on_process_exit(&mut self, _pid: u32) {}
}

pub struct Pipeline<S: ExchangeSink> {
    conns: ConnTable<Conn>,
    procs: ProcessCache,
    clock: MonoToWall,
    filter: Filter,
    stats: Arc<Stats>,
    sink: S,
    last_refresh: Instant,
    last_sweep: Instant,
    kernel_counters: Option<PerCpuArray<MapData, u64>>,
    inject_counters: Option<PerCpuArray<MapData, u64>>,
    rearm: Option<crate::rearm::Rearm>,
    /// What the current record completed (reused).
    completed: crate::assemble::Completed,
    /// TLS and HTTP/2 connections already said.
    unreadable: crate::unreadable::Notices,
    /// The TLS library probes are attached: a TLS connection is unreadable only if it
    /// ends without plaintext through them.
    tls_probes: bool,
}

impl<S: ExchangeSink> Pipeline<S> {
    pub fn new(max_connections: usize, filter: Filter, stats: Arc<Stats>, sink: S) -> Self {
        let cap = NonZeroUsize::new(max_connections.max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            conns: ConnTable::new(cap),
            procs: ProcessCache::new(4096),
            clock: MonoToWall::new(),
            filter,
            stats,
            sink,
            last_refresh: Instant::now(),
            last_sweep: Instant::now(),
            kernel_counters: None,
            inject_counters: None,
            rearm: None,
            completed: Default::default(),
            unreadable: Default::default(),
            tls_probes: false,
        }
    }

    /// Whether the TLS library probes are attached.
    pub fn set_tls_probes(&mut self, on: bool) {
        self.tls_probes = on;
    }

    /// Re-arms traceparent injection on kept-alive client connections (injection on).
    pub fn set_rearm(&mut self, rearm: crate::rearm::Rearm) {
        self.rearm = Some(rearm);
    }

    /// The kernel's traceparent-injection counters, summed into [`Stats`] with the others.
    pub fn set_inject_counters(&mut self, map: PerCpuArray<MapData, u64>) {
        self.inject_counters = Some(map);
    }

    /// The kernel's per-CPU drop counters, summed into [`Stats`] about once a second.
    pub fn set_kernel_counters(&mut self, map: PerCpuArray<MapData, u64>) {
        self.kernel_counters = Some(map);
    }

    /// Sums the kernel's counters into [`Stats`] now (also done about once a second).
    pub fn read_kernel_counters(&self) {
        let sum = |map: &PerCpuArray<MapData, u64>, n: u32| -> Vec<u64> {
            (0..n)
                .map(|i| map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0))
                .collect()
        };
        if let Some(map) = &self.kernel_counters {
            self.stats
                .set_kernel(&sum(map, agent_common::counter::COUNT));
        }
        if let Some(map) = &self.inject_counters {
            self.stats
                .set_inject(&sum(map, agent_common::inject_counter::COUNT));
        }
    }

    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn tracked_connections(&self) -> usize {
        self.conns.len()
    }

    fn on_open(&mut self, ev: &ConnEvent) {
        Stats::inc(&self.stats.conns_opened);
        let key = (ev.header.tgid, ev.header.fd);
        let endpoints = Endpoints::from_tuple(&ev.tuple);
        let role = Role::from_u8(ev.role);
        let wanted = self.filter.wants(&ev.tuple);
        tracing::debug!(
            pid = ev.header.tgid,
            fd = ev.header.fd,
            role = ?role,
            local = %fmt_addr(endpoints.local),
            remote = %fmt_addr(endpoints.remote),
            "tcp connection opened"
        );
        // A new connection on a known fd number: the old one ended unseen.
        if let Some(mut old) = self.conns.pop(&key) {
            self.finish(&mut old, ev.header.ts_ns, false);
        }
        // Read /proc now, while the process surely exists (a short-lived client may be
        // gone by the time its exchange completes).
        let process = self.procs.get(ev.header.tgid, &ev.comm);
        let conn = Conn {
            sock_id: ev.sock_id,
            endpoints,
            role,
            wanted,
            process,
            http: crate::assemble::ConnAssembler::new(role != Role::Unknown),
            active: true,
            sent: 0,
            received: 0,
            rearm: Default::default(),
            tls: false,
            tls_unconfirmed: false,
        };
        if let Some((k, mut evicted)) = self.conns.push(key, conn) {
            if k != key {
                Stats::inc(&self.stats.conns_evicted);
                self.finish(&mut evicted, ev.header.ts_ns, false);
            }
        }
    }

    fn on_close(&mut self, ev: &ConnEvent) {
        let key = (ev.header.tgid, ev.header.fd);
        if let Some(mut conn) = self.conns.pop(&key) {
            Stats::inc(&self.stats.conns_closed);
            tracing::debug!(pid = key.0, fd = key.1, "tcp connection closed");
            self.finish(&mut conn, ev.header.ts_ns, true);
        }
    }

    /// The kernel found a connection speaking TLS: count it, say it once.
    fn on_opaque(&mut self, ev: &ConnEvent) {
        let Some(what) = Unreadable::from_protocol(ev.protocol) else {
            Stats::inc(&self.stats.records_malformed);
            return;
        };
        let key = (ev.header.tgid, ev.header.fd);
        let Some(conn) = self.conns.get_mut(&key).filter(|c| c.sock_id == ev.sock_id) else {
            tracing::debug!(
                pid = key.0,
                fd = key.1,
                protocol = ev.protocol,
                "notice for an unknown connection"
            );
            Stats::inc(&self.stats.data_unknown_conn);
            return;
        };
        if !conn.wanted {
            return;
        }
        if what == Unreadable::Tls && self.tls_probes {
            // Its plaintext may come through the probes (when the process uses the probed
            // libssl): judged when it does, or when the connection ends without any.
            if conn.tls {
                Stats::inc(&self.stats.conns_tls_read);
            } else {
                conn.tls_unconfirmed = true;
            }
            return;
        }
        Self::unreadable(&mut self.unreadable, &self.stats, conn, what);
    }

    /// Counts and (once per program and port) says a connection Tapir cannot read.
    fn unreadable(notices: &mut Notices, stats: &Stats, conn: &Conn, what: Unreadable) {
        Stats::inc(what.counter(stats));
        let seen = Sighting {
            exe: &conn.process.exe_name,
            pid: conn.process.pid,
            role: conn.role,
            endpoints: conn.endpoints,
            what,
        };
        if let Some(line) = notices.notice(&seen) {
            tracing::warn!("{line}");
        }
    }

    fn on_data(&mut self, d: &DataEvent<'_>) {
        let key = (d.header.header.tgid, d.header.header.fd);
        let Some(conn) = self.conns.get_mut(&key) else {
            tracing::debug!(pid = key.0, fd = key.1, "data for an unknown connection");
            Stats::inc(&self.stats.data_unknown_conn);
            return;
        };
        if conn.sock_id != d.header.sock_id {
            tracing::debug!(pid = key.0, fd = key.1, "data for an unknown socket");
            Stats::inc(&self.stats.data_unknown_conn);
            return;
        }
        if !conn.wanted {
            return;
        }
        conn.active = true;
        let h = &d.header;
        if agent_common::syscall::is_tls(h.syscall) && !conn.tls {
            conn.tls_read(&self.stats);
        }
        if h.flags & DATA_RESP != 0 && !conn.http.is_resp() {
            Stats::inc(&self.stats.conns_redis);
            conn.http.use_resp();
            if let Some(rearm) = &mut self.rearm {
                // Claimed for injection (its port was given): no header to inject into.
                rearm.retire_not_http(h.header.tgid, h.header.fd, &conn.endpoints);
            }
        }
        if h.flags & DATA_HTTP2 != 0 && !conn.http.is_http2() {
            // Its frames are read from now on (h2c, or h2 through the TLS probes).
            Stats::inc(&self.stats.conns_http2);
            conn.http.use_http2();
        }
        if h.direction == DIR_EGRESS {
            conn.rearm.on_write(h.header.ts_ns);
            let injected = h.trace.kind == TRACE_CLIENT && h.trace.injected != 0;
            conn.sent += u64::from(h.total)
                + if injected {
                    u64::from(TRACEPARENT_HEADER_LEN)
                } else {
                    0
                };
        } else {
            conn.received += u64::from(h.total);
        }
        conn.http.on_data(d, &mut self.completed, &self.stats);
        if let Some(reason) = conn.http.take_http2_loss() {
            let what = Unreadable::Http2GivenUp(reason);
            Self::unreadable(&mut self.unreadable, &self.stats, conn, what);
        }
        let done = &mut self.completed;
        // A client read a whole response that keeps the connection: its socket may take the
        // next request's header.
        // Before the exchange is passed on, so that whoever sees it sees the attempt made.
        let reused = done.last().is_some_and(|ex| ex.keep_alive);
        // Not over TLS: the byte counts compared are the socket's, and injection writes
        // plaintext headers.
        if reused
            && h.direction == DIR_INGRESS
            && conn.role == Role::Client
            && !conn.tls
            && !conn.http.is_resp()
        {
            if let Some(rearm) = &mut self.rearm {
                let c = crate::rearm::Candidate {
                    tgid: h.header.tgid,
                    fd: h.header.fd,
                    endpoints: conn.endpoints,
                    sent: conn.sent,
                    received: conn.received,
                    read_ns: h.header.ts_ns,
                };
                rearm.try_rearm(&c, &mut conn.rearm);
            }
        }
        Self::emit(&mut self.sink, &self.stats, &self.clock, conn, done);
    }

    /// Connections without data since the last sweep give back their buffers: thousands
    /// of idle keep-alive connections would otherwise each hold ~1 KiB of queues sized
    /// by their last request.
    fn release_idle_buffers(&mut self) {
        for (_, conn) in self.conns.iter_mut() {
            if !std::mem::replace(&mut conn.active, false) {
                conn.http.release_idle_buffers();
            }
        }
        self.sink.release_idle();
        crate::heap::trim();
    }

    fn on_exit(&mut self, tgid: u32, ts_ns: u64) {
        Stats::inc(&self.stats.process_exits);
        for (_, mut conn) in self.conns.pop_process(tgid) {
            self.finish(&mut conn, ts_ns, true);
        }
        self.procs.forget(tgid);
        if let Some(r) = &mut self.rearm {
            r.forget(tgid);
        }
        self.sink.on_process_exit(tgid);
    }

    /// Ends a connection's tracking: close-delimited responses complete here, and, when
    /// its end was `seen` (its close, or its process's exit), unanswered requests fail.
    fn finish(&mut self, conn: &mut Conn, ts_ns: u64, seen: bool) {
        if !conn.wanted {
            return;
        }
        if std::mem::take(&mut conn.tls_unconfirmed) {
            Self::unreadable(&mut self.unreadable, &self.stats, conn, Unreadable::Tls);
        }
        conn.http
            .on_close(ts_ns, seen, &mut self.completed, &self.stats);
        Self::emit(
            &mut self.sink,
            &self.stats,
            &self.clock,
            conn,
            &mut self.completed,
        );
    }

    fn emit(
        sink: &mut S,
        stats: &Stats,
        clock: &MonoToWall,
        conn: &Conn,
        done: &mut crate::assemble::Completed,
    ) {
        for (http, trace) in done.drain() {
            Stats::inc(&stats.exchanges);
            let mut ex = crate::exchange::CapturedExchange::new(
                http,
                conn.process.clone(),
                conn.endpoints,
                clock,
            );
            ex.trace = trace;
            ex.tls = conn.tls;
            sink.on_exchange(&ex);
        }
    }
}

impl<S: ExchangeSink> RecordSink for Pipeline<S> {
    fn on_record(&mut self, bytes: &[u8]) {
        Stats::inc(&self.stats.records);
        match decode(bytes) {
            Ok(KernelEvent::ConnOpen(ev)) => self.on_open(&ev),
            Ok(KernelEvent::ConnClose(ev)) => self.on_close(&ev),
            Ok(KernelEvent::ConnOpaque(ev)) => self.on_opaque(&ev),
            Ok(KernelEvent::Data(d)) => {
                let copied = d.payload.len() + usize::from(d.header.tail_len);
                Stats::add(&self.stats.payload_bytes, copied as u64);
                self.on_data(&d);
            }
            Ok(KernelEvent::ProcExit(h)) => self.on_exit(h.tgid, h.ts_ns),
            Err(e) => {
                Stats::inc(&self.stats.records_malformed);
                tracing::debug!(error = %e, "malformed ring buffer record");
            }
        }
    }

    fn on_out_of_order(&mut self, n: u64) {
        Stats::add(&self.stats.records_out_of_order, n);
    }

    fn on_idle(&mut self) {
        self.sink.flush();
        // Re-measure the clock offset about once a second.
        if self.last_refresh.elapsed() >= CLOCK_REFRESH {
            self.last_refresh = Instant::now();
            self.clock.refresh();
            self.read_kernel_counters();
        }
        if self.last_sweep.elapsed() >= IDLE_SWEEP {
            self.last_sweep = Instant::now();
            self.release_idle_buffers();
        }
    }
}

pub fn fmt_addr((ip, port): (IpAddr, u16)) -> String {
    match ip {
        IpAddr::V4(v4) => format!("{v4}:{port}"),
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{atomic::Ordering, Arc};

    use agent_common::{
        syscall, ConnEvent, ConnTuple, DataEventHeader, EventHeader, EventKind, AF_INET, OPAQUE_TLS,
    };

    use super::*;
    use crate::{capture::reader::RecordSink, exchange::CapturedExchange};

    #[derive(Default)]
    struct Collect(Vec<(String, &'static str)>);

    impl ExchangeSink for Collect {
        fn on_exchange(&mut self, ex: &CapturedExchange) {
            self.0.push((ex.http.path.to_string(), ex.scheme()));
        }
    }

    fn bytes<T>(v: &T) -> Vec<u8> {
        // SAFETY: test-only view of a repr(C) POD value.
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    const FD: u32 = 5;

    fn conn(kind: EventKind, protocol: u8) -> Vec<u8> {
        bytes(&ConnEvent {
            header: EventHeader {
                kind: kind as u8,
                tgid: std::process::id(),
                fd: FD,
                ts_ns: 1,
                ..Default::default()
            },
            sock_id: 77,
            tuple: ConnTuple {
                family: AF_INET,
                local_port: 443,
                remote_port: 50000,
                ..Default::default()
            },
            role: Role::Server as u8,
            protocol,
            ..Default::default()
        })
    }

    fn data(call: u8, direction: u8, payload: &[u8], ts_ns: u64) -> Vec<u8> {
        flagged_data(call, direction, payload, ts_ns, 0)
    }

    fn flagged_data(call: u8, direction: u8, payload: &[u8], ts_ns: u64, flags: u8) -> Vec<u8> {
        let mut v = bytes(&DataEventHeader {
            header: EventHeader {
                kind: EventKind::Data as u8,
                tgid: std::process::id(),
                fd: FD,
                ts_ns,
                ..Default::default()
            },
            sock_id: 77,
            total: payload.len() as u32,
            captured: payload.len() as u32,
            direction,
            syscall: call,
            flags,
            ..Default::default()
        });
        v.extend_from_slice(payload);
        v
    }

    fn pipeline(tls_probes: bool) -> (Pipeline<Collect>, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        let mut p = Pipeline::new(
            16,
            Filter { ports: vec![] },
            stats.clone(),
            Collect::default(),
        );
        p.set_tls_probes(tls_probes);
        (p, stats)
    }

    fn counts(s: &Stats) -> [u64; 3] {
        [
            s.conns_tls_read.load(Ordering::Relaxed),
            s.conns_unreadable_tls.load(Ordering::Relaxed),
            s.conns_http2.load(Ordering::Relaxed),
        ]
    }

    const REQUEST: &[u8] = b"GET /secure HTTP/1.1\r\nHost: x\r\n\r\n";
    const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[test]
    fn tls_read_through_the_probes_is_https_and_counted_once() {
        let (mut p, stats) = pipeline(true);
        p.on_record(&conn(EventKind::ConnOpen, 0));
        p.on_record(&conn(EventKind::ConnOpaque, OPAQUE_TLS));
        assert_eq!(
            counts(&stats),
            [0, 0, 0],
            "judged when plaintext comes or the connection ends"
        );
        for i in 0..2 {
            p.on_record(&data(syscall::SSL_READ, DIR_INGRESS, REQUEST, 10 + i * 10));
            p.on_record(&data(syscall::SSL_WRITE, DIR_EGRESS, RESPONSE, 15 + i * 10));
        }
        p.on_record(&conn(EventKind::ConnClose, 0));
        assert_eq!(
            p.sink.0,
            [("/secure".into(), "https"), ("/secure".into(), "https")]
        );
        assert_eq!(counts(&stats), [1, 0, 0]);
    }

    #[test]
    fn tls_that_ends_without_plaintext_is_unreadable_then() {
        let (mut p, stats) = pipeline(true);
        p.on_record(&conn(EventKind::ConnOpen, 0));
        p.on_record(&conn(EventKind::ConnOpaque, OPAQUE_TLS));
        p.on_record(&conn(EventKind::ConnClose, 0));
        assert_eq!(counts(&stats), [0, 1, 0]);
        assert!(p.sink.0.is_empty());
    }

    #[test]
    fn without_the_probes_tls_is_unreadable_at_once() {
        let (mut p, stats) = pipeline(false);
        p.on_record(&conn(EventKind::ConnOpen, 0));
        p.on_record(&conn(EventKind::ConnOpaque, OPAQUE_TLS));
        assert_eq!(counts(&stats), [0, 1, 0]);
        p.on_record(&conn(EventKind::ConnClose, 0));
        assert_eq!(counts(&stats), [0, 1, 0], "not counted twice");
    }

    /// A frame: length, type, flags, stream, payload.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn http2_inside_tls_is_read_and_counts_the_tls_as_read() {
        let (mut p, stats) = pipeline(true);
        p.on_record(&conn(EventKind::ConnOpen, 0));
        p.on_record(&conn(EventKind::ConnOpaque, OPAQUE_TLS));
        assert_eq!(counts(&stats), [0, 0, 0]);
        let mut request = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        let block = loona_hpack::Encoder::new()
            .encode([(&b":method"[..], &b"GET"[..]), (b":path", b"/h2")]);
        request.extend(frame(1, 0x5, 1, &block));
        let block = loona_hpack::Encoder::new().encode([(&b":status"[..], &b"200"[..])]);
        let response = frame(1, 0x5, 1, &block);
        for (call, dir, bytes, ts) in [
            (syscall::SSL_READ, DIR_INGRESS, &request, 10),
            (syscall::SSL_WRITE, DIR_EGRESS, &response, 15),
        ] {
            p.on_record(&flagged_data(call, dir, bytes, ts, DATA_HTTP2));
        }
        p.on_record(&conn(EventKind::ConnClose, 0));
        assert_eq!(p.sink.0, [("/h2".into(), "https")]);
        assert_eq!(counts(&stats), [1, 0, 1]);
    }

    #[test]
    fn plain_http_stays_http() {
        let (mut p, stats) = pipeline(true);
        p.on_record(&conn(EventKind::ConnOpen, 0));
        p.on_record(&data(syscall::READ, DIR_INGRESS, REQUEST, 10));
        p.on_record(&data(syscall::WRITE, DIR_EGRESS, RESPONSE, 15));
        p.on_record(&conn(EventKind::ConnClose, 0));
        assert_eq!(p.sink.0, [("/secure".into(), "http")]);
        assert_eq!(counts(&stats), [0, 0, 0]);
    }
}
