//! The subscription index: which keys (subscribers) want a given topic.
//!
//! Same shape as the NATS sublist: each trie level maps literal segments to
//! child nodes and has dedicated `*` and `>` slots, so a lookup costs one hash
//! probe per topic segment plus the wildcard branches actually present,
//! independent of how many patterns are stored.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;

/// Matching probes one map per topic segment; for short segments SipHash
/// (the std default) is a visible share of a match, so the literal maps use
/// foldhash, which is fast on short keys and seeded per map so that clients
/// cannot precompute collisions by choosing segment names.
type SegmentHash = foldhash::fast::RandomState;

use super::{Pattern, Topic};

/// Subscription trie (NATS sublist shape: each level has a map of literal
/// segment -> node plus dedicated `*` and `>` slots).
pub struct PatternIndex<K> {
    root: Level<K>,
    /// Number of (pattern, key) pairs.
    len: usize,
    /// Number of live nodes; kept so pruning is observable in tests.
    nodes: usize,
}

/// The children of one position in the pattern.
struct Level<K> {
    literals: HashMap<Box<[u8]>, Node<K>, SegmentHash>,
    star: Option<Box<Node<K>>>,
    /// A `>` node never has children (`>` is always last).
    tail: Option<Box<Node<K>>>,
}

struct Node<K> {
    next: Level<K>,
    /// Keys whose pattern ends at this node. Kept sorted so that a single
    /// contributing node yields output already in order and unique, and so
    /// lookups are binary searches.
    keys: Vec<K>,
}

impl<K> Level<K> {
    fn new() -> Self {
        Level {
            literals: HashMap::with_hasher(SegmentHash::default()),
            star: None,
            tail: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.literals.is_empty() && self.star.is_none() && self.tail.is_none()
    }
}

impl<K> Node<K> {
    fn new() -> Self {
        Node {
            next: Level::new(),
            keys: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.next.is_empty()
    }
}

/// Splits off the first segment of a validated, non-empty topic or pattern.
fn split_first(rest: &[u8]) -> (&[u8], Option<&[u8]>) {
    match memchr::memchr(b'.', rest) {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    }
}

impl<K> PatternIndex<K> {
    pub fn new() -> Self {
        PatternIndex {
            root: Level::new(),
            len: 0,
            nodes: 0,
        }
    }
}

impl<K> Default for PatternIndex<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K> fmt::Debug for PatternIndex<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PatternIndex")
            .field("len", &self.len)
            .field("nodes", &self.nodes)
            .finish()
    }
}

impl<K: Copy + Eq + Hash + Ord> PatternIndex<K> {
    /// Adds `key` under `pattern`; false if that pair was already present.
    pub fn insert(&mut self, pattern: &Pattern, key: K) -> bool {
        let mut level = &mut self.root;
        let mut rest = pattern.as_bytes();
        let node = loop {
            let (seg, tail) = split_first(rest);
            let slot = match seg {
                b"*" => &mut level.star,
                b">" => &mut level.tail,
                _ => {
                    if !level.literals.contains_key(seg) {
                        level.literals.insert(seg.into(), Node::new());
                        self.nodes += 1;
                    }
                    // Present: inserted just above if it was missing.
                    let node = level.literals.get_mut(seg).expect("literal node");
                    match tail {
                        Some(t) => {
                            level = &mut node.next;
                            rest = t;
                            continue;
                        }
                        None => break node,
                    }
                }
            };
            let node = slot.get_or_insert_with(|| {
                self.nodes += 1;
                Box::new(Node::new())
            });
            match tail {
                Some(t) => {
                    level = &mut node.next;
                    rest = t;
                }
                None => break &mut **node,
            }
        };
        match node.keys.binary_search(&key) {
            Ok(_) => false,
            Err(i) => {
                node.keys.insert(i, key);
                self.len += 1;
                true
            }
        }
    }

    /// Removes `key` from `pattern`; false if that pair was absent. Nodes
    /// left with no keys and no children are dropped, so subscribe/unsubscribe
    /// churn over ever-new topics does not grow the trie.
    pub fn remove(&mut self, pattern: &Pattern, key: K) -> bool {
        let removed = remove_in(&mut self.root, pattern.as_bytes(), key, &mut self.nodes);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Clears `out`, then fills it with every key having at least one pattern
    /// that matches `topic`, each key once, in ascending order.
    ///
    /// Allocates nothing beyond growing `out`, so callers should reuse it.
    pub fn matches(&self, topic: &Topic, out: &mut Vec<K>) {
        out.clear();
        let mut contributors = 0usize;
        collect(&self.root, topic.as_bytes(), out, &mut contributors);
        // One node's keys are already sorted and unique; overlapping
        // patterns from several nodes need merging.
        if contributors > 1 {
            out.sort_unstable();
            out.dedup();
        }
    }

    /// Number of (pattern, key) pairs.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of trie nodes; 0 for an empty index.
    pub fn node_count(&self) -> usize {
        self.nodes
    }
}

/// Appends a matching node's keys.
#[inline]
fn emit<K: Copy>(node: &Node<K>, out: &mut Vec<K>, contributors: &mut usize) {
    if !node.keys.is_empty() {
        out.extend_from_slice(&node.keys);
        *contributors += 1;
    }
}

/// Walks `level` against the remaining topic bytes (non-empty, at a segment
/// start). Recursion depth is bounded by the segment count (<= 128).
fn collect<K: Copy>(level: &Level<K>, rest: &[u8], out: &mut Vec<K>, contributors: &mut usize) {
    let (seg, tail) = split_first(rest);
    if let Some(node) = &level.tail {
        // `>` swallows this segment and everything after it.
        emit(node, out, contributors);
    }
    if let Some(node) = &level.star {
        descend(node, tail, out, contributors);
    }
    if let Some(node) = level.literals.get(seg) {
        descend(node, tail, out, contributors);
    }
}

#[inline]
fn descend<K: Copy>(
    node: &Node<K>,
    tail: Option<&[u8]>,
    out: &mut Vec<K>,
    contributors: &mut usize,
) {
    match tail {
        None => emit(node, out, contributors),
        Some(t) => {
            if !node.next.is_empty() {
                collect(&node.next, t, out, contributors);
            }
        }
    }
}

fn remove_in<K: Ord>(level: &mut Level<K>, rest: &[u8], key: K, nodes: &mut usize) -> bool {
    let (seg, tail) = split_first(rest);
    let node: &mut Node<K> = match seg {
        b"*" => match level.star.as_deref_mut() {
            Some(n) => n,
            None => return false,
        },
        b">" => match level.tail.as_deref_mut() {
            Some(n) => n,
            None => return false,
        },
        _ => match level.literals.get_mut(seg) {
            Some(n) => n,
            None => return false,
        },
    };
    let removed = match tail {
        Some(t) => remove_in(&mut node.next, t, key, nodes),
        None => match node.keys.binary_search(&key) {
            Ok(i) => {
                node.keys.remove(i);
                shrink(&mut node.keys);
                true
            }
            Err(_) => false,
        },
    };
    if removed && node.is_empty() {
        *nodes -= 1;
        match seg {
            b"*" => level.star = None,
            b">" => level.tail = None,
            _ => {
                level.literals.remove(seg);
                shrink_map(&mut level.literals);
            }
        }
    }
    removed
}

/// Gives memory back after a burst of unsubscribes from one pattern.
fn shrink<K>(keys: &mut Vec<K>) {
    if keys.capacity() > 16 && keys.len() * 4 <= keys.capacity() {
        keys.shrink_to(keys.len() * 2);
    }
}

/// Same for a level that once held many literal children.
fn shrink_map<K: Eq + Hash, V>(map: &mut HashMap<K, V, SegmentHash>) {
    if map.capacity() > 16 && map.len() * 4 <= map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashSet};

    fn p(s: &str) -> Pattern {
        s.parse().unwrap()
    }

    fn t(s: &str) -> Topic {
        s.parse().unwrap()
    }

    fn hits(idx: &PatternIndex<u32>, topic: &str) -> Vec<u32> {
        let mut out = vec![999]; // must be cleared
        idx.matches(&t(topic), &mut out);
        out
    }

    #[test]
    fn literal_star_and_tail() {
        let mut idx = PatternIndex::new();
        assert!(idx.is_empty());
        assert!(idx.insert(&p("a.b"), 1));
        assert!(idx.insert(&p("a.*"), 2));
        assert!(idx.insert(&p("a.>"), 3));
        assert!(idx.insert(&p(">"), 4));
        assert!(idx.insert(&p("*"), 5));
        assert!(idx.insert(&p("*.b.c"), 6));
        assert_eq!(idx.len(), 6);

        assert_eq!(hits(&idx, "a.b"), [1, 2, 3, 4]);
        assert_eq!(hits(&idx, "a.c"), [2, 3, 4]);
        assert_eq!(hits(&idx, "a.b.c"), [3, 4, 6]);
        assert_eq!(hits(&idx, "x.b.c"), [4, 6]);
        // `a.>` does not match its parent `a`; `*` and `>` do.
        assert_eq!(hits(&idx, "a"), [4, 5]);
        assert_eq!(hits(&idx, "z"), [4, 5]);
        assert_eq!(hits(&idx, "z.z.z.z"), [4]);
    }

    #[test]
    fn no_match_leaves_out_empty() {
        let mut idx = PatternIndex::new();
        idx.insert(&p("a.b"), 1u32);
        assert_eq!(hits(&idx, "a"), Vec::<u32>::new());
        assert_eq!(hits(&idx, "a.b.c"), Vec::<u32>::new());
        assert_eq!(hits(&idx, "b.b"), Vec::<u32>::new());
    }

    #[test]
    fn overlapping_patterns_deliver_once() {
        let mut idx = PatternIndex::new();
        for pat in ["a.b", "a.*", "a.>", ">", "*.b"] {
            assert!(idx.insert(&p(pat), 7u32));
        }
        idx.insert(&p("a.b"), 3);
        idx.insert(&p(">"), 9);
        assert_eq!(hits(&idx, "a.b"), [3, 7, 9]);
        assert_eq!(hits(&idx, "q"), [7, 9]);
    }

    #[test]
    fn many_keys_on_one_node_come_out_sorted() {
        let mut idx = PatternIndex::new();
        for k in (0..5000u32).rev() {
            assert!(idx.insert(&p("a.b"), k));
        }
        let out = hits(&idx, "a.b");
        assert_eq!(out, (0..5000).collect::<Vec<_>>());
        for k in (0..5000).step_by(2) {
            assert!(idx.remove(&p("a.b"), k));
        }
        assert_eq!(hits(&idx, "a.b"), (1..5000).step_by(2).collect::<Vec<_>>());
    }

    #[test]
    fn duplicate_insert_and_absent_remove() {
        let mut idx = PatternIndex::new();
        assert!(idx.insert(&p("a.*"), 1u32));
        assert!(!idx.insert(&p("a.*"), 1));
        assert_eq!(idx.len(), 1);
        assert!(!idx.remove(&p("a.*"), 2));
        assert!(!idx.remove(&p("a.b"), 1));
        assert!(!idx.remove(&p("a"), 1));
        assert!(!idx.remove(&p("a.*.c"), 1));
        assert!(!idx.remove(&p(">"), 1));
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.node_count(), 2);
        assert!(idx.remove(&p("a.*"), 1));
        assert!(!idx.remove(&p("a.*"), 1));
        assert!(idx.is_empty());
    }

    #[test]
    fn remove_prunes_back_to_empty() {
        let mut idx = PatternIndex::<u32>::default();
        let start = idx.node_count();
        assert_eq!(start, 0);
        let pats = ["a.b.c", "a.b", "a.*.c", "a.>", ">", "*", "x.y.z.>", "a.b.c"];
        for (k, pat) in pats.iter().enumerate() {
            idx.insert(&p(pat), k as u32);
        }
        // a, a.b, a.b.c, a.*, a.*.c, a.>, >, *, x, x.y, x.y.z, x.y.z.>
        assert_eq!(idx.node_count(), 12);
        // Removing a leaf keeps shared prefixes alive.
        assert!(idx.remove(&p("x.y.z.>"), 6));
        assert_eq!(idx.node_count(), 8);
        assert!(idx.remove(&p("a.b"), 1));
        assert_eq!(idx.node_count(), 8); // a.b still leads to a.b.c
        for (k, pat) in pats.iter().enumerate() {
            idx.remove(&p(pat), k as u32);
        }
        assert!(idx.is_empty());
        assert_eq!(idx.node_count(), start);
        assert!(idx.root.is_empty());
    }

    #[test]
    fn churn_does_not_grow_the_trie() {
        let mut idx = PatternIndex::new();
        for i in 0..2000u32 {
            let pat = p(&format!("room.{i}.>"));
            idx.insert(&pat, i);
            assert_eq!(idx.node_count(), 3);
            idx.remove(&pat, i);
            assert_eq!(idx.node_count(), 0);
        }
        assert!(idx.root.literals.capacity() <= 16);
    }

    // --- property tests -------------------------------------------------

    /// Depth 1..=4 over {a,b,c,*} with an optional trailing `>`: a small
    /// alphabet so patterns overlap and collide.
    fn pattern_strategy() -> impl Strategy<Value = Pattern> {
        (
            prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "*"]), 0..4),
            prop::sample::select(vec!["a", "b", "c", "*", ">"]),
        )
            .prop_map(|(mut segs, last)| {
                segs.push(last);
                p(&segs.join("."))
            })
    }

    fn topic_strategy() -> impl Strategy<Value = Topic> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 1..6)
            .prop_map(|segs| t(&segs.join(".")))
    }

    fn naive(pairs: &HashSet<(Pattern, u8)>, topic: &Topic) -> Vec<u8> {
        let mut v: Vec<u8> = pairs
            .iter()
            .filter(|(pat, _)| pat.matches(topic))
            .map(|&(_, k)| k)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Each node is one distinct pattern prefix that some live pair passes through.
    fn expected_nodes(pairs: &HashSet<(Pattern, u8)>) -> usize {
        let mut prefixes = BTreeSet::new();
        for (pat, _) in pairs {
            let segs: Vec<&str> = pat.segments().collect();
            for n in 1..=segs.len() {
                prefixes.insert(segs[..n].join("."));
            }
        }
        prefixes.len()
    }

    proptest! {
        #[test]
        fn index_agrees_with_naive_matching(
            pairs in prop::collection::vec((pattern_strategy(), 0u8..8), 0..40),
            topics in prop::collection::vec(topic_strategy(), 1..20),
        ) {
            let mut idx = PatternIndex::new();
            let mut model = HashSet::new();
            for (pat, k) in &pairs {
                prop_assert_eq!(idx.insert(pat, *k), model.insert((pat.clone(), *k)));
            }
            prop_assert_eq!(idx.len(), model.len());
            let mut out = Vec::new();
            for topic in &topics {
                idx.matches(topic, &mut out);
                prop_assert_eq!(&out, &naive(&model, topic), "topic {}", topic);
            }
        }

        #[test]
        fn inserts_and_removes_agree_with_model(
            ops in prop::collection::vec((any::<bool>(), pattern_strategy(), 0u8..6), 0..80),
            topics in prop::collection::vec(topic_strategy(), 1..10),
        ) {
            let mut idx = PatternIndex::new();
            let mut model: HashSet<(Pattern, u8)> = HashSet::new();
            let mut out = Vec::new();
            for (insert, pat, k) in ops {
                let pair = (pat.clone(), k);
                if insert {
                    prop_assert_eq!(idx.insert(&pat, k), model.insert(pair));
                } else {
                    prop_assert_eq!(idx.remove(&pat, k), model.remove(&pair));
                }
                prop_assert_eq!(idx.len(), model.len());
                prop_assert_eq!(idx.is_empty(), model.is_empty());
                prop_assert_eq!(idx.node_count(), expected_nodes(&model));
            }
            for topic in &topics {
                idx.matches(topic, &mut out);
                prop_assert_eq!(&out, &naive(&model, topic));
            }
            for (pat, k) in model.drain() {
                prop_assert!(idx.remove(&pat, k));
            }
            prop_assert!(idx.is_empty());
            prop_assert_eq!(idx.node_count(), 0);
            for topic in &topics {
                idx.matches(topic, &mut out);
                prop_assert!(out.is_empty());
            }
        }
    }
}
