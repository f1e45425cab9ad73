//! The pipeline's table of tracked connections: a bounded LRU keyed by (tgid, fd), plus an
//! ordered index of its keys so that a process exit finds that process's connections in
//! O(log n) instead of scanning the whole table (hosts that run thousands of short-lived
//! processes while tens of thousands of connections are tracked).
use std::{collections::BTreeSet, num::NonZeroUsize};

use lru::LruCache;

/// (tgid, fd)
pub type ConnKey = (u32, u32);

pub struct ConnTable<V> {
    lru: LruCache<ConnKey, V>,
    /// Exactly the keys in `lru`.
    keys: BTreeSet<ConnKey>,
}

impl<V> ConnTable<V> {
    pub fn new(capacity: NonZeroUsize) -> Self {
        // Bounded, but sized by what is tracked: `LruCache::new` would allocate the table
        // for `capacity` at once (2.2 MiB for the default 65,536), and every page that a
        // connection ever touched would stay in RSS.
        let mut lru = LruCache::unbounded();
        lru.resize(capacity);
        Self {
            lru,
            keys: BTreeSet::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    pub fn get_mut(&mut self, key: &ConnKey) -> Option<&mut V> {
        self.lru.get_mut(key)
    }

    pub fn pop(&mut self, key: &ConnKey) -> Option<V> {
        let v = self.lru.pop(key)?;
        self.keys.remove(key);
        Some(v)
    }

    /// Inserts `v`. Returns the entry that made room (the least recently used one) or the
    /// value `key` had before.
    pub fn push(&mut self, key: ConnKey, v: V) -> Option<(ConnKey, V)> {
        let out = self.lru.push(key, v);
        if let Some((old, _)) = &out {
            self.keys.remove(old);
        }
        self.keys.insert(key);
        out
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&ConnKey, &mut V)> {
        self.lru.iter_mut()
    }

    /// Removes and returns every connection of process `tgid`.
    pub fn pop_process(&mut self, tgid: u32) -> Vec<(ConnKey, V)> {
        let keys: Vec<ConnKey> = self
            .keys
            .range((tgid, 0)..=(tgid, u32::MAX))
            .copied()
            .collect();
        keys.into_iter()
            .filter_map(|k| self.pop(&k).map(|v| (k, v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    fn table(cap: usize) -> ConnTable<u64> {
        ConnTable::new(NonZeroUsize::new(cap).unwrap())
    }

    #[test]
    fn a_process_exit_takes_exactly_its_connections() {
        let mut t = table(10);
        for (k, v) in [((1, 3), 13), ((2, 3), 23), ((1, 9), 19), ((2, u32::MAX), 2)] {
            assert!(t.push(k, v).is_none());
        }
        let mut got = t.pop_process(1);
        got.sort();
        assert_eq!(got, vec![((1, 3), 13), ((1, 9), 19)]);
        assert!(t.pop_process(1).is_empty());
        assert!(t.pop_process(7).is_empty());
        assert_eq!(t.len(), 2);
        assert_eq!(t.pop_process(2).len(), 2);
        assert!(t.is_empty() && t.keys.is_empty());
    }

    #[test]
    fn eviction_and_replacement_keep_the_index_exact() {
        let mut t = table(2);
        t.push((1, 1), 1);
        t.push((1, 2), 2);
        assert_eq!(t.push((1, 2), 22), Some(((1, 2), 2)));
        assert_eq!(t.push((3, 1), 31), Some(((1, 1), 1)));
        assert_eq!(
            t.keys.iter().copied().collect::<Vec<_>>(),
            vec![(1, 2), (3, 1)]
        );
        assert_eq!(t.pop_process(1), vec![((1, 2), 22)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push(u32, u32),
        Pop(u32, u32),
        Exit(u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..4u32, 0..6u32).prop_map(|(p, f)| Op::Push(p, f)),
            (0..4u32, 0..6u32).prop_map(|(p, f)| Op::Pop(p, f)),
            (0..4u32).prop_map(Op::Exit),
        ]
    }

    proptest! {
        /// Whatever happens, the index holds exactly the table's keys, and an exit returns
        /// what a full scan would have found.
        #[test]
        fn index_matches_the_table(ops in proptest::collection::vec(op(), 0..200), cap in 1..8usize) {
            let mut t = table(cap);
            let mut n = 0u64;
            for o in ops {
                match o {
                    Op::Push(p, f) => { n += 1; t.push((p, f), n); }
                    Op::Pop(p, f) => { t.pop(&(p, f)); }
                    Op::Exit(p) => {
                        let mut scan: HashMap<ConnKey, u64> = t.lru.iter()
                            .filter(|(k, _)| k.0 == p).map(|(k, v)| (*k, *v)).collect();
                        for (k, v) in t.pop_process(p) {
                            prop_assert_eq!(scan.remove(&k), Some(v));
                        }
                        prop_assert!(scan.is_empty());
                    }
                }
                let mut in_lru: Vec<ConnKey> = t.lru.iter().map(|(k, _)| *k).collect();
                in_lru.sort();
                prop_assert_eq!(in_lru, t.keys.iter().copied().collect::<Vec<_>>());
            }
        }
    }
}
