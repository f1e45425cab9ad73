//! Connections Tapir sees but cannot read: TLS (encrypted inside the process, before the
//! socket) whose plaintext does not come through the libssl probes (the kernel reports
//! each one once, from its first bytes; judged when it ends, if the probes are on), and
//! HTTP/2 connections given up part way (a header block lost: HPACK's state is gone).
//! They are counted, and said once per program, role and port, so that spans missing for
//! them have a stated reason instead of silence.
use std::{collections::HashSet, sync::atomic::AtomicU64};

use agent_common::{Role, OPAQUE_TLS};

use crate::{
    http::DropReason,
    pipeline::{fmt_addr, Endpoints},
    stats::Stats,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unreadable {
    Tls,
    /// HTTP/2 given up for this reason (see `http::h2`).
    Http2GivenUp(DropReason),
}

impl Unreadable {
    /// From `ConnEvent::protocol`; `None` for a value that is not unreadable (HTTP/2 is
    /// read) or that this agent does not know.
    pub fn from_protocol(protocol: u8) -> Option<Self> {
        match protocol {
            OPAQUE_TLS => Some(Self::Tls),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Tls => "TLS",
            Self::Http2GivenUp(_) => "HTTP/2",
        }
    }

    /// Why Tapir cannot read them.
    fn why(self) -> &'static str {
        match self {
            Self::Tls => {
                "Tapir reads TLS only through OpenSSL (a libssl the program links, or an \
                 OpenSSL it carries and exports, as Node.js does), which this one does not \
                 use, or not with --no-tls"
            }
            Self::Http2GivenUp(DropReason::HeadTruncated) => {
                "a header block lay beyond what Tapir copies of a call (--capture-bytes, at \
                 most 8 KiB, and 32 buffers: a large message written at once with its \
                 headers or trailers), and HTTP/2's header compression cannot be followed \
                 past a lost block"
            }
            Self::Http2GivenUp(DropReason::CaptureGap) => {
                "records of a connection were lost (the agent fell behind), and HTTP/2's \
                 header compression cannot be followed past a lost block"
            }
            Self::Http2GivenUp(_) => "a header block could not be decoded",
        }
    }

    /// What it means for the spans.
    fn consequence(self) -> &'static str {
        match self {
            Self::Tls => "these connections give no spans or metrics",
            Self::Http2GivenUp(_) => "such a connection gives no spans or metrics after it",
        }
    }

    /// The counter that counts these connections.
    pub fn counter(self, stats: &Stats) -> &AtomicU64 {
        match self {
            Self::Tls => &stats.conns_unreadable_tls,
            Self::Http2GivenUp(_) => &stats.conns_http2_given_up,
        }
    }

    /// That counter's metric name (the notices name it; a test holds it to `Stats`'s).
    fn metric(self) -> &'static str {
        match self {
            Self::Tls => "tapir.connections.unreadable.tls",
            Self::Http2GivenUp(_) => "tapir.connections.http2_given_up",
        }
    }
}

/// Distinct notices kept (program, role, port, protocol): past this many, connections are
/// still counted but no longer said.
const MAX_NOTICES: usize = 256;

/// What has been said already.
#[derive(Debug, Default)]
pub struct Notices {
    said: HashSet<(String, u8, u16, Unreadable)>,
}

/// One unreadable connection, as the pipeline knows it.
pub struct Sighting<'a> {
    pub exe: &'a str,
    pub pid: u32,
    pub role: Role,
    pub endpoints: Endpoints,
    pub what: Unreadable,
}

impl Notices {
    /// The line to log for `s`, the first time its program, role, port and protocol come
    /// up; `None` after (or once [`MAX_NOTICES`] different ones were said).
    pub fn notice(&mut self, s: &Sighting<'_>) -> Option<String> {
        // A server is known by its port; a client by the port it connects to.
        let port = match s.role {
            Role::Client => s.endpoints.remote.1,
            Role::Server | Role::Unknown => s.endpoints.local.1,
        };
        if self.said.len() >= MAX_NOTICES
            || !self
                .said
                .insert((s.exe.to_string(), s.role as u8, port, s.what))
        {
            return None;
        }
        let (exe, pid, what) = (s.exe, s.pid, s.what.describe());
        let whose = match s.role {
            Role::Server => format!("{exe} (pid {pid}) serves {what} on port {port}"),
            Role::Client => format!(
                "{exe} (pid {pid}) talks {what} to {}",
                fmt_addr(s.endpoints.remote)
            ),
            Role::Unknown => format!(
                "{exe} (pid {pid}) has a {what} connection {} <-> {}",
                fmt_addr(s.endpoints.local),
                fmt_addr(s.endpoints.remote)
            ),
        };
        Some(format!(
            "not captured: {whose}; {}, so {} (counted in {}; said once per program and \
             port)",
            s.what.why(),
            s.what.consequence(),
            s.what.metric()
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;

    fn sighting(exe: &str, role: Role, local: u16, remote: u16, what: Unreadable) -> Sighting<'_> {
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        Sighting {
            exe,
            pid: 42,
            role,
            endpoints: Endpoints {
                local: (ip, local),
                remote: (ip, remote),
            },
            what,
        }
    }

    #[test]
    fn protocols_from_the_kernel() {
        assert_eq!(Unreadable::from_protocol(OPAQUE_TLS), Some(Unreadable::Tls));
        assert_eq!(Unreadable::from_protocol(agent_common::OPAQUE_HTTP2), None);
        assert_eq!(Unreadable::from_protocol(0), None);
        assert_eq!(Unreadable::from_protocol(200), None);
    }

    #[test]
    fn notices_name_the_metric_their_counter_is_exported_as() {
        let stats = Stats::default();
        for what in [
            Unreadable::Tls,
            Unreadable::Http2GivenUp(DropReason::HeadTruncated),
        ] {
            Stats::inc(what.counter(&stats));
            let exported: Vec<_> = stats
                .snapshot()
                .into_iter()
                .filter(|(_, v)| *v == 1)
                .collect();
            assert_eq!(exported, [(what.metric(), 1)]);
            what.counter(&stats)
                .store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn says_it_once_per_program_role_and_port() {
        let mut n = Notices::default();
        let first = n.notice(&sighting(
            "nginx",
            Role::Server,
            8443,
            50000,
            Unreadable::Tls,
        ));
        assert_eq!(
            first.as_deref(),
            Some(
                "not captured: nginx (pid 42) serves TLS on port 8443; Tapir reads TLS only \
                 through OpenSSL (a libssl the program links, or an OpenSSL it carries and \
                 exports, as Node.js does), which this one does not use, or not with \
                 --no-tls, so these connections give no spans or metrics (counted in tapir.connections.unreadable.tls; said once per program \
                 and port)"
            )
        );
        // Another client of the same port: already said.
        assert_eq!(
            n.notice(&sighting(
                "nginx",
                Role::Server,
                8443,
                50001,
                Unreadable::Tls
            )),
            None
        );
        // Another port, another program, another protocol: said.
        assert!(n
            .notice(&sighting(
                "nginx",
                Role::Server,
                9443,
                50000,
                Unreadable::Tls
            ))
            .is_some());
        let client = n.notice(&sighting(
            "curl",
            Role::Client,
            50002,
            8443,
            Unreadable::Tls,
        ));
        assert!(client.is_some_and(|c| c.contains("curl (pid 42) talks TLS to 127.0.0.1:8443;")));
        let unknown = n.notice(&sighting(
            "java",
            Role::Unknown,
            8080,
            40000,
            Unreadable::Tls,
        ));
        assert!(unknown.is_some_and(|c| c.contains("127.0.0.1:8080 <-> 127.0.0.1:40000")));
    }

    #[test]
    fn http2_given_up_says_why() {
        let mut n = Notices::default();
        let what = Unreadable::Http2GivenUp(DropReason::HeadTruncated);
        let line = n.notice(&sighting("python3", Role::Server, 50051, 40000, what));
        assert_eq!(
            line.as_deref(),
            Some(
                "not captured: python3 (pid 42) serves HTTP/2 on port 50051; a header block \
                 lay beyond what Tapir copies of a call (--capture-bytes, at most 8 KiB, and \
                 32 buffers: a large message written at once with its headers or trailers), \
                 and HTTP/2's header compression cannot be followed past a lost block, so \
                 such a connection gives no spans or metrics after it (counted in \
                 tapir.connections.http2_given_up; said once per program and port)"
            )
        );
        // Another reason is another notice.
        let gap = Unreadable::Http2GivenUp(DropReason::CaptureGap);
        assert!(n
            .notice(&sighting("python3", Role::Server, 50051, 40001, gap))
            .is_some_and(|l| l.contains("records of a connection were lost")));
    }

    #[test]
    fn notices_are_bounded() {
        let mut n = Notices::default();
        for port in 0..(MAX_NOTICES as u16 + 50) {
            let _ = n.notice(&sighting("svc", Role::Server, port, 1, Unreadable::Tls));
        }
        assert_eq!(n.said.len(), MAX_NOTICES);
        assert_eq!(
            n.notice(&sighting("other", Role::Server, 1, 1, Unreadable::Tls)),
            None
        );
    }
}
