//! `http.route` without the application's help: user-given route patterns first, else a
//! heuristic that replaces identifier-like path segments with `*`, and a per-service cap on
//! distinct routes so that a raw path never becomes an unbounded metric attribute.
use std::{fmt, hash::BuildHasher, num::NonZeroUsize, str::FromStr, sync::Arc};

use lru::LruCache;

/// The route of every exchange past a service's `--max-routes-per-service` distinct routes.
pub const OVERFLOW_ROUTE: &str = "/*overflow*";

/// A segment with a run of this many digits or more is an identifier.
const MAX_DIGIT_RUN: usize = 4;
/// Mixed letters and digits this long (or longer) look like a random token.
const TOKEN_LEN: usize = 16;
/// Hex strings (with at least one digit) this long or longer are hashes / ids.
const HEX_LEN: usize = 8;
/// Longer segments are never kept as they are.
const MAX_SEGMENT: usize = 64;

/// The heuristic route of a path: segments that look like identifiers become `*`
/// (numbers, UUIDs, hex ≥ 8 characters, long letters+digits tokens, any run of 4 or more
/// digits, segments longer than 64 bytes). `/users/42/orders/9f86d081` → `/users/*/orders/*`.
/// `None` for a path that is not origin-form (`*`, `host:443`, empty).
pub fn collapse_path(path: &str) -> Option<String> {
    let mut out = String::new();
    collapse_into(path, &mut out).then_some(out)
}

/// [`collapse_path`] into `out` (cleared first; its capacity is reused): false when the
/// path is not origin-form.
fn collapse_into(path: &str, out: &mut String) -> bool {
    out.clear();
    if !path.starts_with('/') {
        return false;
    }
    // Cut at each '/' byte (an ASCII byte is always a char boundary): this runs on every
    // exchange, and `str::split` with a char pattern costs several times more.
    let mut start = 0;
    loop {
        let end = path.as_bytes()[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(path.len(), |i| start + i);
        let seg = path.get(start..end).unwrap_or_default();
        out.push_str(if is_identifier(seg) { "*" } else { seg });
        if end == path.len() {
            return true;
        }
        out.push('/');
        start = end + 1;
    }
}

/// Whether a path segment looks like a value rather than a name.
pub fn is_identifier(seg: &str) -> bool {
    if seg.is_empty() || seg == "*" {
        return false;
    }
    if seg.len() > MAX_SEGMENT {
        return true;
    }
    let bytes = seg.as_bytes();
    // One pass for the counts the rules below need (this runs on every exchange).
    let (mut digits, mut alnum, mut run, mut longest_run, mut all_hex) = (0, 0, 0, 0, true);
    for c in bytes {
        if c.is_ascii_digit() {
            digits += 1;
            run += 1;
            longest_run = longest_run.max(run);
        } else {
            run = 0;
            all_hex &= c.is_ascii_hexdigit();
        }
        alnum += usize::from(c.is_ascii_alphanumeric());
    }
    if contains_uuid(bytes) {
        return true;
    }
    if digits == 0 {
        return false;
    }
    if digits == bytes.len() || longest_run >= MAX_DIGIT_RUN {
        return true;
    }
    if bytes.len() >= HEX_LEN && all_hex {
        return true;
    }
    alnum >= TOKEN_LEN && alnum > digits
}

#[cfg(test)]
fn longest_digit_run(b: &[u8]) -> usize {
    let (mut best, mut cur) = (0, 0);
    for c in b {
        if c.is_ascii_digit() {
            cur += 1;
            best = best.max(cur);
        } else {
            cur = 0;
        }
    }
    best
}

fn contains_uuid(b: &[u8]) -> bool {
    b.len() >= 36 && b.windows(36).any(is_uuid)
}

/// 8-4-4-4-12 hex digits, either case.
pub fn is_uuid(b: &[u8]) -> bool {
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Literal(String),
    /// `{name}`: exactly one non-empty segment.
    Param,
    /// A last `*` or `{name...}`: the rest of the path (zero or more segments).
    Rest,
}

/// A user-given route pattern (`--route`): `/users/{id}`, `/static/*`,
/// `/files/{path...}`. The pattern text itself becomes `http.route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    text: String,
    segs: Vec<Seg>,
}

impl RoutePattern {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `path` (origin-form, without query) is an instance of this pattern. One
    /// trailing slash of the path is ignored.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let rest = if rest.len() > 1 {
            rest.strip_suffix('/').unwrap_or(rest)
        } else {
            rest
        };
        let mut parts = rest.split('/').filter(|_| !rest.is_empty());
        for seg in &self.segs {
            match seg {
                Seg::Rest => return true,
                Seg::Param => match parts.next() {
                    Some(p) if !p.is_empty() => {}
                    _ => return false,
                },
                Seg::Literal(l) => match parts.next() {
                    Some(p) if p == l => {}
                    _ => return false,
                },
            }
        }
        parts.next().is_none()
    }
}

impl fmt::Display for RoutePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for RoutePattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let text = s.trim();
        let Some(body) = text.strip_prefix('/') else {
            return Err(format!("route pattern {text:?} must start with '/'"));
        };
        if text.contains(['?', '#', ' ']) {
            return Err(format!(
                "route pattern {text:?} must be a path (no query, fragment or spaces)"
            ));
        }
        let body = if body.len() > 1 {
            body.strip_suffix('/').unwrap_or(body)
        } else {
            body
        };
        let raw: Vec<&str> = if body.is_empty() {
            Vec::new()
        } else {
            body.split('/').collect()
        };
        let mut segs = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let last = i + 1 == raw.len();
            let seg = if *r == "*" || (r.starts_with('{') && r.ends_with("...}")) {
                if r.len() > 1 && r.len() <= "{...}".len() {
                    return Err(format!("route pattern {text:?}: empty name in {r:?}"));
                }
                if !last {
                    return Err(format!(
                        "route pattern {text:?}: {r:?} matches the rest of the path, so it must be the last segment"
                    ));
                }
                Seg::Rest
            } else if r.starts_with('{') && r.ends_with('}') {
                if r.len() == 2 {
                    return Err(format!("route pattern {text:?}: empty name in {{}}"));
                }
                Seg::Param
            } else if r.contains(['{', '}', '*']) {
                return Err(format!(
                    "route pattern {text:?}: {r:?} mixes text and a parameter; a parameter is a whole segment"
                ));
            } else {
                Seg::Literal((*r).to_string())
            };
            segs.push(seg);
        }
        Ok(Self {
            text: text.to_string(),
            segs,
        })
    }
}

/// Turns paths into bounded routes, per service.
pub struct RouteTable {
    patterns: Vec<(RoutePattern, Arc<str>)>,
    max_per_service: usize,
    /// Heuristic routes seen, per service.name (the services themselves are bounded). A
    /// known route is handed out as a shared string: no allocation per exchange.
    seen: LruCache<String, RouteSet>,
    overflow: Arc<str>,
    /// The route being computed (its capacity is reused).
    scratch: String,
    /// Recent answers: a service asks for the same few paths again and again, and a known
    /// answer costs a hash and two compares instead of the heuristic's byte loops and two
    /// table lookups. Direct-mapped (a path replaces the one in its slot, reusing its
    /// strings' capacity); overflow answers are not kept, so a path the cap turned away
    /// is asked again. A hit does not refresh the service in `seen`: past 1,024 services a
    /// busy one's set may be dropped and its cap counted afresh, by at most these slots.
    memo: Vec<Memo>,
    hasher: foldhash::fast::RandomState,
}

/// Slots of [`RouteTable::memo`] (a power of two).
const MEMO_SLOTS: usize = 256;
/// Longer paths are not kept in the memo (its memory stays under ~100 KiB).
const MEMO_MAX_PATH: usize = 256;

#[derive(Default)]
struct Memo {
    service: String,
    path: String,
    route: Option<Route>,
}

type RouteSet = hashbrown::HashSet<Arc<str>, foldhash::fast::RandomState>;

/// The route chosen for one exchange.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub route: Arc<str>,
    /// It came from a user pattern.
    pub from_pattern: bool,
    /// The service had too many routes: this is [`OVERFLOW_ROUTE`].
    pub overflow: bool,
}

impl RouteTable {
    pub fn new(patterns: Vec<RoutePattern>, max_per_service: usize) -> Self {
        Self {
            patterns: patterns
                .into_iter()
                .map(|p| {
                    let text = Arc::from(p.as_str());
                    (p, text)
                })
                .collect(),
            max_per_service,
            seen: LruCache::new(NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN)),
            overflow: Arc::from(OVERFLOW_ROUTE),
            scratch: String::new(),
            memo: std::iter::repeat_with(Memo::default)
                .take(MEMO_SLOTS)
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    /// The route of `path` for `service`: the first matching pattern (in the order given),
    /// else the heuristic route, replaced by [`OVERFLOW_ROUTE`] once the service already
    /// has `max_per_service` other heuristic routes. `None` when the path is not
    /// origin-form.
    pub fn route(&mut self, service: &str, path: &str) -> Option<Route> {
        if path.len() > MEMO_MAX_PATH {
            return self.resolve(service, path);
        }
        // A power of two: MEMO_SLOTS (fewer in tests, to force collisions).
        let slot = self.hasher.hash_one((service, path)) as usize & (self.memo.len() - 1);
        if let Some(Memo {
            service: s,
            path: p,
            route: Some(known),
        }) = self.memo.get(slot)
        {
            if p == path && s == service {
                return Some(known.clone());
            }
        }
        let route = self.resolve(service, path);
        if let (Some(r), Some(memo)) = (&route, self.memo.get_mut(slot)) {
            if !r.overflow {
                memo.service.clear();
                memo.service.push_str(service);
                memo.path.clear();
                memo.path.push_str(path);
                memo.route = Some(r.clone());
            }
        }
        route
    }

    /// [`RouteTable::route`] without the memo.
    fn resolve(&mut self, service: &str, path: &str) -> Option<Route> {
        if let Some((_, text)) = self.patterns.iter().find(|(p, _)| p.matches(path)) {
            return Some(Route {
                route: text.clone(),
                from_pattern: true,
                overflow: false,
            });
        }
        if !collapse_into(path, &mut self.scratch) {
            return None;
        }
        let set = match self.seen.get_mut(service) {
            Some(s) => s,
            None => {
                self.seen.put(service.to_string(), RouteSet::default());
                self.seen.get_mut(service)?
            }
        };
        let route = match set.get(self.scratch.as_str()) {
            Some(known) => known.clone(),
            None if set.len() >= self.max_per_service => {
                return Some(Route {
                    route: self.overflow.clone(),
                    from_pattern: false,
                    overflow: true,
                });
            }
            None => {
                let new: Arc<str> = Arc::from(self.scratch.as_str());
                set.insert(new.clone());
                new
            }
        };
        Some(Route {
            route,
            from_pattern: false,
            overflow: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(p: &str) -> String {
        collapse_path(p).unwrap()
    }

    #[test]
    fn collapses_identifiers() {
        assert_eq!(c("/users/42/orders/9f86d081"), "/users/*/orders/*");
        assert_eq!(c("/"), "/");
        assert_eq!(c("/hello/world"), "/hello/world");
        assert_eq!(c("/users/42/"), "/users/*/");
        assert_eq!(c("/item/550e8400-e29b-41d4-a716-446655440000"), "/item/*");
        assert_eq!(
            c("/item/550E8400-E29B-41D4-A716-446655440000/x"),
            "/item/*/x"
        );
        assert_eq!(c("/blob/deadbeef00"), "/blob/*");
        assert_eq!(c("/t/aB3xY9qLm2Nw8PzK"), "/t/*");
        assert_eq!(c("/order-12345"), "/*");
        assert_eq!(c("/2024/posts"), "/*/posts");
        assert_eq!(c(&format!("/x/{}", "a".repeat(65))), "/x/*");
        assert_eq!(c("/k/aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"), "/k/*");
    }

    #[test]
    fn keeps_names() {
        for p in [
            "/api/v1/users",
            "/v2",
            "/oauth2/token",
            "/html5/page",
            "/static/app.js",
            "/feedface", // hex letters only: a word
            "/a/b/c/d",
            "/%E2%82%AC",
            "/über/straße",
            "/users/*",
        ] {
            assert_eq!(c(p), p);
        }
    }

    #[test]
    fn not_origin_form_has_no_route() {
        assert_eq!(collapse_path(""), None);
        assert_eq!(collapse_path("*"), None);
        assert_eq!(collapse_path("example.com:443"), None);
    }

    #[test]
    fn patterns_parse_and_match() {
        let p: RoutePattern = "/users/{id}".parse().unwrap();
        assert!(p.matches("/users/42"));
        assert!(p.matches("/users/42/"));
        assert!(p.matches("/users/bob"));
        assert!(!p.matches("/users"));
        assert!(!p.matches("/users/"));
        assert!(!p.matches("/users/42/orders"));
        assert!(!p.matches("/customers/42"));
        let rest: RoutePattern = "/static/*".parse().unwrap();
        assert!(rest.matches("/static/a/b/c.js"));
        assert!(rest.matches("/static"));
        assert!(!rest.matches("/stat"));
        let named: RoutePattern = "/files/{path...}".parse().unwrap();
        assert!(named.matches("/files/a/b"));
        let root: RoutePattern = "/".parse().unwrap();
        assert!(root.matches("/"));
        assert!(!root.matches("/a"));
        assert_eq!(named.to_string(), "/files/{path...}");
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "users/{id}",
            "/users/{}",
            "/a/*/b",
            "/a/{x...}/b",
            "/a/x{id}",
            "/a?b=1",
            "/{...}",
        ] {
            assert!(bad.parse::<RoutePattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn patterns_take_precedence_in_order() {
        let mut t = RouteTable::new(
            vec!["/users/{id}".parse().unwrap(), "/users/*".parse().unwrap()],
            100,
        );
        let r = t.route("svc", "/users/42").unwrap();
        assert_eq!(&*r.route, "/users/{id}");
        assert!(r.from_pattern);
        assert_eq!(&*t.route("svc", "/users/42/x").unwrap().route, "/users/*");
        assert_eq!(&*t.route("svc", "/orders/42").unwrap().route, "/orders/*");
        assert_eq!(t.route("svc", "*"), None);
    }

    #[test]
    fn a_known_route_is_shared_not_rebuilt() {
        let mut t = RouteTable::new(vec!["/p/{x}".parse().unwrap()], 10);
        let a = t.route("svc", "/users/1").unwrap().route;
        let b = t.route("svc", "/users/2").unwrap().route;
        assert!(Arc::ptr_eq(&a, &b));
        let p = t.route("svc", "/p/1").unwrap().route;
        assert!(Arc::ptr_eq(&p, &t.route("svc", "/p/2").unwrap().route));
        // Same route text in another service: its own entry, same text.
        assert_eq!(t.route("other", "/users/3").unwrap().route, a);
    }

    #[test]
    fn distinct_routes_are_capped_per_service() {
        let mut t = RouteTable::new(vec!["/p/{x}".parse().unwrap()], 3);
        for name in ["a", "b", "c"] {
            assert!(!t.route("svc", &format!("/{name}")).unwrap().overflow);
        }
        let over = t.route("svc", "/d").unwrap();
        assert!(over.overflow);
        assert_eq!(&*over.route, OVERFLOW_ROUTE);
        // Known routes, patterns and other services still work.
        assert_eq!(&*t.route("svc", "/a").unwrap().route, "/a");
        assert_eq!(&*t.route("svc", "/p/zzz").unwrap().route, "/p/{x}");
        assert_eq!(&*t.route("other", "/d").unwrap().route, "/d");
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn segment() -> impl Strategy<Value = String> {
            prop_oneof![
                "[a-z]{1,12}",
                "[0-9]{1,20}",
                "[0-9a-f]{6,40}",
                "[A-Za-z0-9]{10,30}",
                "[a-z]{1,6}[0-9]{1,8}",
                "[a-zA-Z0-9._~%-]{0,80}",
                "\\PC{0,20}",
                Just("*".to_string()),
                "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            ]
        }

        fn path() -> impl Strategy<Value = String> {
            prop::collection::vec(segment(), 0..8).prop_map(|s| format!("/{}", s.join("/")))
        }

        /// `is_identifier` as it was before its one-pass rewrite (session 6).
        fn is_identifier_before(seg: &str) -> bool {
            if seg.is_empty() || seg == "*" {
                return false;
            }
            if seg.len() > MAX_SEGMENT {
                return true;
            }
            let bytes = seg.as_bytes();
            if contains_uuid(bytes) {
                return true;
            }
            let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
            if digits == 0 {
                return false;
            }
            if digits == bytes.len() || longest_digit_run(bytes) >= MAX_DIGIT_RUN {
                return true;
            }
            if bytes.len() >= HEX_LEN && bytes.iter().all(u8::is_ascii_hexdigit) {
                return true;
            }
            let alnum = bytes.iter().filter(|b| b.is_ascii_alphanumeric()).count();
            alnum >= TOKEN_LEN && alnum - digits > 0
        }

        proptest! {
            #[test]
            fn identifiers_are_judged_as_before(seg in segment()) {
                prop_assert_eq!(is_identifier(&seg), is_identifier_before(&seg), "{:?}", seg);
            }

            #[test]
            fn never_panics(s in "\\PC{0,200}") {
                let _ = collapse_path(&s);
                let _ = s.parse::<RoutePattern>().map(|p| p.matches(&s));
            }

            #[test]
            fn idempotent(p in path()) {
                let once = collapse_path(&p).unwrap();
                prop_assert_eq!(collapse_path(&once).unwrap(), once.clone());
            }

            #[test]
            fn no_identifiers_survive(p in path()) {
                let out = collapse_path(&p).unwrap();
                prop_assert!(longest_digit_run(out.as_bytes()) < MAX_DIGIT_RUN, "{}", out);
                prop_assert!(!contains_uuid(out.as_bytes()), "{}", out);
                for seg in out.split('/') {
                    prop_assert!(seg.len() <= MAX_SEGMENT);
                    prop_assert!(!is_identifier(seg), "{}", seg);
                }
                // Same shape: as many segments as the input.
                prop_assert_eq!(out.split('/').count(), p.split('/').count());
            }

        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(32))]

            #[test]
            fn route_table_is_bounded(paths in prop::collection::vec(path(), 1..60), cap in 1usize..20) {
                let mut t = RouteTable::new(Vec::new(), cap);
                let mut distinct = std::collections::HashSet::new();
                for p in &paths {
                    distinct.insert(t.route("svc", p).unwrap().route);
                }
                prop_assert!(distinct.len() <= cap + 1);
            }

            /// The memo never changes an answer: a twin table that always computes gives
            /// the same route for every exchange, overflow included, across slot reuse
            /// (far more paths than slots) and with a user pattern.
            #[test]
            fn memo_answers_as_computing_would(
                asks in prop::collection::vec((0usize..3, 0usize..40, any::<bool>()), 1..400),
                cap in 1usize..12,
                extra in prop::collection::vec(path(), 0..300),
                slots in prop_oneof![Just(1usize), Just(2), Just(MEMO_SLOTS)],
            ) {
                let pattern = || vec!["/users/{id}".parse::<RoutePattern>().unwrap()];
                let mut memo = RouteTable::new(pattern(), cap);
                memo.memo.truncate(slots);
                let mut twin = RouteTable::new(pattern(), cap);
                let services = ["svc", "other", "svc2"];
                // A few paths asked again and again, between one-offs that take their slots.
                let repeated: Vec<String> = (0..40)
                    .map(|i| match i % 4 {
                        0 => format!("/users/{i}"),
                        1 => format!("/api/v{}/items/{}", i % 3, i * 7),
                        2 => format!("/static/f{i}.css"),
                        _ => format!("/r{}/x", i % 9),
                    })
                    .collect();
                let mut extra = extra.iter();
                for (s, i, one_off) in asks {
                    let p = if one_off { extra.next().unwrap_or(&repeated[i]) } else { &repeated[i] };
                    let (a, b) = (memo.route(services[s], p), twin.resolve(services[s], p));
                    prop_assert_eq!(a, b, "{} {}", services[s], p);
                }
            }
        }
    }

    #[test]
    fn memo_keeps_known_routes_but_asks_again_after_an_overflow() {
        let mut t = RouteTable::new(Vec::new(), 1);
        let first = t.route("svc", "/a/1").unwrap();
        assert_eq!(&*first.route, "/a/*");
        // Served from the memo: the same shared string.
        assert!(Arc::ptr_eq(
            &t.route("svc", "/a/1").unwrap().route,
            &first.route
        ));
        assert!(t.route("svc", "/b").unwrap().overflow);
        assert!(t.route("svc", "/b").unwrap().overflow);
        // Another service has its own cap and its own memo entries.
        assert_eq!(&*t.route("other", "/b").unwrap().route, "/b");
        assert!(
            t.route("svc", &format!("/{}", "x".repeat(MEMO_MAX_PATH)))
                .unwrap()
                .overflow
        );
        assert_eq!(t.route("svc", "*"), None);
    }
}
