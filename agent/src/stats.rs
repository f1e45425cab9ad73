//! The agent's own counters: every drop has a named reason. Exported as `tapir.*` metrics.
use std::sync::atomic::{AtomicU64, Ordering};

use crate::http::{DropReason, StreamStats};

const INJECT_COUNT: usize = agent_common::inject_counter::COUNT as usize;

/// `tapir.inject.*` metric names, in `agent_common::inject_counter` order.
const INJECT_METRICS: [&str; INJECT_COUNT] = [
    "tapir.inject.claimed",
    "tapir.inject.injected",
    "tapir.inject.not_request",
    "tapir.inject.has_traceparent",
    "tapir.inject.head_split",
    "tapir.inject.keepalive_later",
    "tapir.inject.push_failed",
    "tapir.inject.released",
    "tapir.inject.map_failed",
    "tapir.inject.retired",
    "tapir.inject.not_observed",
];

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident => $metric:literal ),* $(,)?) => {
        /// Monotonic counters, shared between the capture thread and exporters.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
            /// HTTP messages dropped, by [`DropReason`].
            pub http_drops: [AtomicU64; DropReason::COUNT],
            /// traceparent injection outcomes, by `agent_common::inject_counter` index.
            pub inject: [AtomicU64; INJECT_COUNT],
            /// The kernel programs' run counts and times (set after loading, with
            /// `--ebpf-stats`).
            pub programs: std::sync::OnceLock<crate::program_stats::ProgramStats>,
        }

        impl Stats {
            /// (metric name, value) for every counter.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                let mut v = vec![$( ($metric, self.$name.load(Ordering::Relaxed)), )*];
                for (name, c) in INJECT_METRICS.iter().zip(self.inject.iter()) {
                    v.push((name, c.load(Ordering::Relaxed)));
                }
                v
            }
        }
    };
}

counters! {
    /// Ring-buffer records received from the kernel.
    records => "tapir.events.received",
    /// Records that could not be decoded.
    records_malformed => "tapir.events.malformed",
    /// Records that reached the agent from their CPU's ring after a newer record from
    /// another CPU had been processed: written more than 0.1 ms after they were stamped
    /// (an interrupt in between). Harmless unless both were of one connection.
    records_out_of_order => "tapir.events.out_of_order",
    /// Payload bytes the kernel copied into data records: a prefix of what each call moved
    /// (a head, not a body) and its last bytes.
    payload_bytes => "tapir.events.payload_bytes",
    /// TCP connections seen opening (accept/connect) or first seen in use.
    conns_opened => "tapir.connections.opened",
    /// TCP connections seen closing.
    conns_closed => "tapir.connections.closed",
    /// Connections evicted from the agent's table because it was full.
    conns_evicted => "tapir.connections.evicted",
    /// Connections that started with a TLS handshake and ended without plaintext through
    /// the libssl probes (a TLS library of its own, or --no-tls: then counted at once):
    /// encrypted before the socket, so Tapir reads no HTTP from them.
    conns_unreadable_tls => "tapir.connections.unreadable.tls",
    /// TLS connections (counted at each end seen) whose plaintext is read through the
    /// libssl probes.
    conns_tls_read => "tapir.connections.tls",
    /// Connections that speak HTTP/2 (h2c, or h2 inside TLS read through the probes; gRPC),
    /// seen from their start: read frame by frame (counted at each end seen).
    conns_http2 => "tapir.connections.http2",
    /// HTTP/2 connections whose header blocks could no longer be followed (one lay beyond
    /// the capture, records were lost, or it could not be decoded): their later calls are
    /// not seen.
    conns_http2_given_up => "tapir.connections.http2_given_up",
    /// Redis client connections (the client connected while Tapir ran and wrote a RESP
    /// command first): each command becomes a CLIENT span.
    conns_redis => "tapir.connections.redis",
    /// Data (or TLS/HTTP/2 notice) records for a connection the agent did not know (fd
    /// reused, table evicted).
    data_unknown_conn => "tapir.events.unknown_connection",
    /// HTTP exchanges completed.
    exchanges => "tapir.exchanges",
    /// Processes seen exiting.
    process_exits => "tapir.processes.exited",
    /// Kernel: records lost because the ring buffer was full (the agent fell behind).
    kernel_ringbuf_full => "tapir.kernel.ringbuf_full",
    /// Kernel: the fd → socket walk could not read kernel memory.
    kernel_walk_failed => "tapir.kernel.socket_lookup_failed",
    /// Kernel: the connection table was full when a connection was first seen.
    kernel_conn_table_full => "tapir.kernel.connection_table_full",
    /// Kernel: a payload could not be read from the process's memory.
    kernel_read_user_failed => "tapir.kernel.payload_read_failed",
    /// Kernel: requests whose `traceparent` came in a later read of the head than the first.
    kernel_traceparent_late => "tapir.kernel.traceparent_in_later_read",
    /// Kernel (compat programs, kernels before 5.17): a syscall's arguments were not found
    /// on the task's kernel stack, so the call was not seen.
    kernel_regs_not_found => "tapir.kernel.syscall_args_not_found",
    /// Kernel: processes that started listening on an `--open-port` port and became
    /// observed.
    kernel_selected_by_port => "tapir.kernel.selected_by_open_port",
    /// Kernel: connections seen from their start whose first bytes were not HTTP/1.x (nor
    /// TLS or HTTP/2): another protocol, skipped from then on.
    kernel_other_protocol => "tapir.connections.other_protocol",
    /// Kernel: TLS plaintext (SSL_read/SSL_write) not reported because the socket of its
    /// `SSL*` was not known yet.
    kernel_tls_socket_unknown => "tapir.kernel.tls_socket_unknown",
    /// Kept-alive client sockets put back for injection into their next request.
    rearm_done => "tapir.inject.rearm.done",
    /// Re-arming skipped: the process had already moved on (bytes unread, unacknowledged
    /// or not yet seen by the agent).
    rearm_busy => "tapir.inject.rearm.busy",
    /// Re-arming skipped: the socket was not released by the kernel (never claimed).
    rearm_not_eligible => "tapir.inject.rearm.not_eligible",
    /// Re-arming skipped: over the rate limit.
    rearm_over_budget => "tapir.inject.rearm.over_budget",
    /// Re-arming skipped: the process exited or closed the socket after the response.
    rearm_gone => "tapir.inject.rearm.gone",
    /// Re-arming failed: a system call or map update was refused.
    rearm_failed => "tapir.inject.rearm.failed",
}

impl Stats {
    pub fn inc(counter: &AtomicU64) {
        Self::add(counter, 1);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Stores the kernel's own cumulative counters (summed over CPUs).
    pub fn set_kernel(&self, per_counter: &[u64]) {
        use agent_common::counter;
        let get = |i: u32| per_counter.get(i as usize).copied().unwrap_or(0);
        self.kernel_ringbuf_full
            .store(get(counter::RINGBUF_FULL), Ordering::Relaxed);
        self.kernel_walk_failed
            .store(get(counter::WALK_FAILED), Ordering::Relaxed);
        self.kernel_conn_table_full
            .store(get(counter::CONN_TABLE_FULL), Ordering::Relaxed);
        self.kernel_read_user_failed
            .store(get(counter::READ_USER_FAILED), Ordering::Relaxed);
        self.kernel_traceparent_late
            .store(get(counter::TRACEPARENT_LATE), Ordering::Relaxed);
        self.kernel_regs_not_found
            .store(get(counter::REGS_NOT_FOUND), Ordering::Relaxed);
        self.kernel_selected_by_port
            .store(get(counter::SELECTED_BY_PORT), Ordering::Relaxed);
        self.kernel_other_protocol
            .store(get(counter::OTHER_PROTOCOL), Ordering::Relaxed);
        self.kernel_tls_socket_unknown
            .store(get(counter::TLS_SOCKET_UNKNOWN), Ordering::Relaxed);
    }

    /// Stores the kernel's cumulative injection counters (summed over CPUs).
    pub fn set_inject(&self, per_counter: &[u64]) {
        for (c, v) in self.inject.iter().zip(per_counter) {
            c.store(*v, Ordering::Relaxed);
        }
    }

    /// Folds one connection's drop counts into the totals.
    pub fn add_stream(&self, s: &StreamStats) {
        for (reason, n) in s.iter() {
            if n > 0 {
                if let Some(c) = self.http_drops.get(reason as usize) {
                    c.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
    }

    /// (reason, count) of HTTP messages dropped.
    pub fn http_drops(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .map(|r| {
                let n = self
                    .http_drops
                    .get(*r as usize)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                (r.as_str(), n)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inject_metric_names_follow_the_kernel_counter_order() {
        for (metric, name) in INJECT_METRICS
            .iter()
            .zip(agent_common::inject_counter::NAMES)
        {
            assert_eq!(*metric, format!("tapir.inject.{name}"));
        }
    }

    #[test]
    fn snapshot_reports_kernel_and_inject_counters() {
        let s = Stats::default();
        s.set_kernel(&[3, 0, 0, 0]);
        s.set_inject(&[0, 7]);
        let snap = s.snapshot();
        assert!(snap.contains(&("tapir.kernel.ringbuf_full", 3)));
        assert!(snap.contains(&("tapir.inject.injected", 7)));
    }
}
