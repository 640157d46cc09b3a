//! The decision cache for concrete requests (delivery and publish): bounded,
//! sharded, keyed by policy generation.
//!
//! Asked once per delivery per connection, so a lookup builds nothing: the
//! question is hashed once from borrowed parts (the hash picks the shard and
//! the slot), and an owned key is made only when a decision is stored.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use parking_lot::Mutex;

use crate::event::EventKey;
use crate::ident::Principal;

use super::Action;

/// One delivery-time or publish-time question, borrowed.
#[derive(Clone, Copy)]
pub(crate) struct Question<'a> {
    pub(crate) generation: u64,
    pub(crate) identity: &'a Principal,
    pub(crate) key: &'a EventKey,
    pub(crate) action: Action,
}

/// A stored question.
struct Entry {
    hash: u64,
    generation: u64,
    identity: Principal,
    key: EventKey,
    action: Action,
    allowed: bool,
}

impl Entry {
    fn answers(&self, hash: u64, q: &Question<'_>) -> bool {
        self.hash == hash
            && self.generation == q.generation
            && self.action == q.action
            && self.key.event_type == q.key.event_type
            && self.identity == *q.identity
            && self.key == *q.key
    }
}

const SHARDS: usize = 16;

/// Bounded, sharded cache of delivery-time decisions.
pub(crate) struct DecisionCache {
    shards: Vec<Mutex<HashTable<Entry>>>,
    /// Seeded per process: keys carry client-chosen strings.
    hasher: foldhash::quality::RandomState,
    per_shard: usize,
}

impl DecisionCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashTable::new())).collect(),
            hasher: foldhash::quality::RandomState::default(),
            per_shard: (capacity / SHARDS).max(16),
        }
    }

    fn hash(&self, q: &Question<'_>) -> u64 {
        self.hasher.hash_one((
            q.generation,
            q.identity.as_str(),
            q.key.project.as_str(),
            q.key.event_type,
            q.action,
            q.key.env.as_str(),
            q.key.path.as_str(),
        ))
    }

    fn shard(&self, hash: u64) -> &Mutex<HashTable<Entry>> {
        // Bits the table itself does not use for slots or tags.
        &self.shards[(hash >> 32) as usize % SHARDS]
    }

    pub(crate) fn get(&self, q: &Question<'_>) -> Option<bool> {
        let hash = self.hash(q);
        self.shard(hash)
            .lock()
            .find(hash, |e| e.answers(hash, q))
            .map(|e| e.allowed)
    }

    pub(crate) fn put(&self, q: &Question<'_>, allowed: bool) {
        let hash = self.hash(q);
        let mut s = self.shard(hash).lock();
        if let Some(e) = s.find_mut(hash, |e| e.answers(hash, q)) {
            e.allowed = allowed;
            return;
        }
        // Full: start the shard over. Simple, bounded, and a refill costs one
        // casbin evaluation per distinct key.
        if s.len() >= self.per_shard {
            s.clear();
        }
        let entry = Entry {
            hash,
            generation: q.generation,
            identity: q.identity.clone(),
            key: q.key.clone(),
            action: q.action,
            allowed,
        };
        s.insert_unique(hash, entry, |e| e.hash);
    }

    pub(crate) fn clear(&self) {
        for s in &self.shards {
            s.lock().clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::ident::{EnvSlug, ProjectId};
    use crate::path::SecretPath;

    fn key(path: &str) -> EventKey {
        EventKey {
            project: ProjectId::parse("p1").unwrap(),
            event_type: EventType::parse("secret:created").unwrap(),
            env: EnvSlug::parse("prod").unwrap(),
            path: SecretPath::parse(path).unwrap(),
        }
    }

    #[test]
    fn answers_only_the_same_question() {
        let c = DecisionCache::new(64);
        let alice = Principal::parse("alice").unwrap();
        let other = Principal::parse("bob").unwrap();
        let k = key("/a");
        let q = Question {
            generation: 1,
            identity: &alice,
            key: &k,
            action: Action::Subscribe,
        };
        assert_eq!(c.get(&q), None);
        c.put(&q, true);
        assert_eq!(c.get(&q), Some(true));
        assert_eq!(
            c.get(&Question {
                identity: &other,
                ..q
            }),
            None
        );
        assert_eq!(c.get(&Question { generation: 2, ..q }), None);
        assert_eq!(
            c.get(&Question {
                action: Action::Publish,
                ..q
            }),
            None
        );
        c.put(&q, false);
        assert_eq!(c.get(&q), Some(false));
        // Bounded: many distinct questions never grow it past its capacity.
        let keys: Vec<EventKey> = (0..10_000).map(|i| key(&format!("/p{i}"))).collect();
        for k in &keys {
            c.put(&Question { key: k, ..q }, true);
        }
        let stored: usize = c.shards.iter().map(|s| s.lock().len()).sum();
        assert!(stored <= 16 * SHARDS, "{stored} entries");
    }
}
