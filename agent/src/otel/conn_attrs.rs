//! A span's connection attributes (addresses, ports, protocol version, user agent), kept
//! per connection: on a kept-alive connection every exchange has the same ones, and
//! formatting two IP addresses, parsing `Host` and encoding eight attributes was a large
//! share of a span's encoding. What is kept is a pure function of the connection's ends,
//! its role and three request fields, so a slot is used only when those match and is
//! refilled otherwise; nothing needs invalidating when a connection closes.
//!
//! A fixed table of slots, one per hash of the connection's ends, not an LRU: a
//! connection that lives for one exchange (or collides with another) costs one hash and
//! a refill in place, with the slot's buffers reused, instead of an insertion, an
//! eviction and their allocations, which cost more than the encoding they save.
use std::hash::BuildHasher;

use compact_str::CompactString;

use super::wire::ConnAttrs;
use crate::{exchange::CapturedExchange, http::HttpVersion, pipeline::Endpoints};

/// Slots (a power of two); ~0.5 KiB each once filled.
const SLOTS: usize = 1024;

#[derive(Default)]
struct Slot {
    /// Asked for since the last idle sweep.
    used: bool,
    /// The connection's ends, whether it is a SERVER's, whether it is TLS.
    key: Option<(Endpoints, bool, bool)>,
    host: Option<CompactString>,
    user_agent: Option<CompactString>,
    version: Option<HttpVersion>,
    attrs: ConnAttrs,
}

impl Slot {
    fn holds(&self, key: &(Endpoints, bool, bool), ex: &CapturedExchange) -> bool {
        self.key.as_ref() == Some(key)
            && self.version == Some(ex.http.version)
            && self.host == ex.http.host
            && self.user_agent == ex.http.user_agent
    }

    fn fill(&mut self, key: (Endpoints, bool, bool), ex: &CapturedExchange) {
        self.key = Some(key);
        self.host.clone_from(&ex.http.host);
        self.user_agent.clone_from(&ex.http.user_agent);
        self.version = Some(ex.http.version);
        self.attrs.fill(ex);
    }
}

pub struct ConnAttrCache {
    slots: Box<[Slot]>,
    hasher: foldhash::fast::RandomState,
}

impl Default for ConnAttrCache {
    fn default() -> Self {
        Self {
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }
}

impl ConnAttrCache {
    /// `ConnAttrs::of(ex)`, built once per connection while its fields stay the same.
    pub fn get(&mut self, ex: &CapturedExchange) -> &ConnAttrs {
        let key = (ex.endpoints, ex.is_server(), ex.tls);
        // In range: the table always has SLOTS slots.
        let slot = &mut self.slots[self.hasher.hash_one(key) as usize & (SLOTS - 1)];
        if !slot.holds(&key, ex) {
            slot.fill(key, ex);
        }
        slot.used = true;
        &slot.attrs
    }

    /// Frees the slots not asked for since the previous call (the pipeline's idle sweep):
    /// the buffers of connections gone would otherwise stay, scattered over the heap.
    pub fn release_idle(&mut self) {
        for slot in self.slots.iter_mut() {
            if !std::mem::take(&mut slot.used) && slot.key.is_some() {
                *slot = Slot::default();
            }
        }
    }

    #[cfg(test)]
    fn filled(&self) -> usize {
        self.slots.iter().filter(|s| s.key.is_some()).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        http::ExchangeRole,
        otel::span::{
            server_address,
            tests::{exchange, HOST_CASES},
        },
    };

    #[test]
    fn same_as_fresh_whatever_changes() {
        let mut cache = ConnAttrCache::default();
        let mut ex = exchange(ExchangeRole::Client, "GET", "/", 200);
        assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        // Each field the attributes depend on, changed on the same connection.
        ex.http.host = Some("other.example:81".into());
        assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        ex.http.host = None;
        assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        ex.http.user_agent = Some("wget".into());
        assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        ex.http.version = HttpVersion::Http10;
        assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        ex.endpoints.remote.1 = 9;
        assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        // The other side of a connection with the same ends is a different entry.
        let server = exchange(ExchangeRole::Server, "GET", "/", 200);
        let mut as_client = server.clone();
        as_client.http.role = ExchangeRole::Client;
        assert_eq!(*cache.get(&server), ConnAttrs::of(&server));
        assert_eq!(*cache.get(&as_client), ConnAttrs::of(&as_client));
        assert_ne!(ConnAttrs::of(&server), ConnAttrs::of(&as_client));
    }

    #[test]
    fn a_clients_server_address_is_the_spans() {
        let mut ex = exchange(ExchangeRole::Client, "GET", "/", 200);
        for host in HOST_CASES {
            ex.http.host = host.map(Into::into);
            let conn = ConnAttrs::of(&ex);
            let (a, p) = server_address(&ex);
            assert_eq!(conn.server_address(), Some((a.as_str(), p)), "{host:?}");
        }
        let server = exchange(ExchangeRole::Server, "GET", "/", 200);
        assert_eq!(ConnAttrs::of(&server).server_address(), None);
    }

    #[test]
    fn bounded_and_right_after_collisions() {
        let mut cache = ConnAttrCache::default();
        let mut ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        // Many more connections than slots, then the first ones again: every answer is
        // the fresh one (refilled in place when its slot was taken).
        for round in 0..2 {
            for port in 0..(4 * SLOTS as u16) {
                ex.endpoints.remote.1 = port;
                assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex), "round {round}");
            }
        }
        assert!(cache.filled() <= SLOTS);
    }

    #[test]
    fn idle_slots_are_freed() {
        let mut cache = ConnAttrCache::default();
        let a = exchange(ExchangeRole::Server, "GET", "/", 200);
        let mut b = a.clone();
        b.endpoints.remote.1 += 1;
        cache.get(&a);
        // b in another slot than a (slots follow a random hash; a collision refills a's).
        while {
            cache.get(&b);
            cache.filled() < 2
        } {
            b.endpoints.remote.1 += 1;
            cache.get(&a);
        }
        cache.release_idle(); // both used since the start: kept
        assert_eq!(cache.filled(), 2);
        cache.get(&a);
        cache.release_idle(); // b idle for a whole sweep: freed
        assert_eq!(cache.filled(), 1);
        assert_eq!(*cache.get(&b), ConnAttrs::of(&b));
    }
}
