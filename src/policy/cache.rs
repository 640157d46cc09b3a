//! The decision cache for concrete requests (delivery and publish): bounded,
//! sharded, keyed by policy generation.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::event::EventType;
use crate::ident::{EnvSlug, ProjectId};
use crate::path::SecretPath;

use super::Action;

/// One delivery-time question.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct DecisionKey {
    pub(crate) generation: u64,
    pub(crate) sub: Arc<str>,
    pub(crate) project: ProjectId,
    pub(crate) ty: EventType,
    pub(crate) action: Action,
    pub(crate) env: EnvSlug,
    pub(crate) path: SecretPath,
}

const SHARDS: usize = 16;

/// Bounded, sharded cache of delivery-time decisions.
pub(crate) struct DecisionCache {
    shards: Vec<Mutex<HashMap<DecisionKey, bool>>>,
    hasher: RandomState,
    per_shard: usize,
}

impl DecisionCache {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            per_shard: (capacity / SHARDS).max(16),
        }
    }

    fn shard(&self, k: &DecisionKey) -> &Mutex<HashMap<DecisionKey, bool>> {
        let mut h = self.hasher.build_hasher();
        k.hash(&mut h);
        &self.shards[(std::hash::Hasher::finish(&h) as usize) % SHARDS]
    }

    pub(crate) fn get(&self, k: &DecisionKey) -> Option<bool> {
        self.shard(k).lock().get(k).copied()
    }

    pub(crate) fn put(&self, k: DecisionKey, v: bool) {
        let mut s = self.shard(&k).lock();
        // Full: start the shard over. Simple, bounded, and a refill costs one
        // casbin evaluation per distinct key.
        if s.len() >= self.per_shard {
            s.clear();
        }
        s.insert(k, v);
    }

    pub(crate) fn clear(&self) {
        for s in &self.shards {
            s.lock().clear();
        }
    }
}
