//! A span's connection attributes (addresses, ports, protocol version, user agent), kept
//! per connection: on a kept-alive connection every exchange has the same ones, and
//! formatting two IP addresses, parsing `Host` and encoding eight attributes was a large
//! share of a span's encoding. What is kept is a pure function of the connection's ends,
//! its role and three request fields, so an entry is used only when those match and is
//! rebuilt otherwise; nothing needs invalidating when a connection closes.
use std::num::NonZeroUsize;

use compact_str::CompactString;
use lru::LruCache;

use super::wire::ConnAttrs;
use crate::{exchange::CapturedExchange, http::HttpVersion, pipeline::Endpoints};

/// Connections remembered; the least recently used is forgotten first. ~0.4 KiB each.
const CAPACITY: usize = 4096;

struct Entry {
    host: Option<CompactString>,
    user_agent: Option<CompactString>,
    version: HttpVersion,
    attrs: ConnAttrs,
}

impl Entry {
    fn new(ex: &CapturedExchange) -> Self {
        Self {
            host: ex.http.host.clone(),
            user_agent: ex.http.user_agent.clone(),
            version: ex.http.version,
            attrs: ConnAttrs::of(ex),
        }
    }

    fn matches(&self, ex: &CapturedExchange) -> bool {
        self.version == ex.http.version
            && self.host == ex.http.host
            && self.user_agent == ex.http.user_agent
    }
}

pub struct ConnAttrCache {
    entries: LruCache<(Endpoints, bool), Entry>,
}

impl Default for ConnAttrCache {
    fn default() -> Self {
        Self {
            entries: LruCache::new(NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN)),
        }
    }
}

impl ConnAttrCache {
    /// `ConnAttrs::of(ex)`, built once per connection while its fields stay the same.
    pub fn get(&mut self, ex: &CapturedExchange) -> &ConnAttrs {
        let key = (ex.endpoints, ex.is_server());
        let entry = self.entries.get_or_insert_mut(key, || Entry::new(ex));
        if !entry.matches(ex) {
            *entry = Entry::new(ex);
        }
        &entry.attrs
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        http::ExchangeRole,
        otel::span::{server_address, tests::exchange},
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
        for host in [
            Some("api.example.com:8080"),
            Some("[::1]:9"),
            Some("bad host"),
            None,
        ] {
            ex.http.host = host.map(Into::into);
            let conn = ConnAttrs::of(&ex);
            assert_eq!(conn.server_address, Some(server_address(&ex)), "{host:?}");
        }
        let server = exchange(ExchangeRole::Server, "GET", "/", 200);
        assert_eq!(ConnAttrs::of(&server).server_address, None);
    }

    #[test]
    fn bounded() {
        let mut cache = ConnAttrCache::default();
        let mut ex = exchange(ExchangeRole::Server, "GET", "/", 200);
        for port in 0..(CAPACITY as u16 + 100) {
            ex.endpoints.remote.1 = port;
            assert_eq!(*cache.get(&ex), ConnAttrs::of(&ex));
        }
        assert_eq!(cache.len(), CAPACITY);
    }
}
