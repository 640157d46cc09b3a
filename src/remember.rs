//! Where a stream left off, for clients that reconnect without
//! `Last-Event-ID` (Infisical's operator and CLI never send one).
//!
//! A stream of a remembered dialect is tracked by a [`Remember`]: about every
//! `save_every`, the id of the last event each tracked stream wrote (its
//! position) is saved under its [`Key`], the (identity, project, registration
//! set) it was opened for, and its last position when it ends. A new stream
//! of that key that sends no `Last-Event-ID` resumes from the earliest
//! position saved under the key within `window` ([`Entries`]: several
//! clients may share a key, and herald cannot tell which one is back, so
//! none misses anything; one may get again what it had). When the key's
//! positions were all saved earlier (and are still kept, up to
//! `forget_after`), the stream opens with `gap` (`window_passed`).
//!
//! The position saved is the one the stream had `margin` ago, not the last
//! it wrote: herald knows what it wrote, not what a client read, and a
//! connection that died without a reset swallows what is written into it
//! until the client notices. A resume repeats, rather than misses.
//!
//! Where positions live: in NATS mode a JetStream key-value bucket every
//! instance reads (so a client served by a killed instance is resumed by
//! another), embedded in this process's memory. Stored values are read as
//! untrusted: a value that is not positions makes the stream open with
//! `gap`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ident::{Principal, ProjectId};
use crate::interest::Interest;
use crate::metrics::Metrics;
use crate::protocol::Dialect;
use crate::setting::{self, Invalid};
use crate::stream::StreamHandle;

/// `[remember]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RememberConfig {
    /// The dialects whose streams are remembered (`infisical`, `native`).
    pub dialects: Vec<String>,
    /// A reconnect this soon after the last save resumes from it.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long a position is kept at all: a reconnect after `window` but
    /// within this is told `gap`; after it, the stream is a new one.
    #[serde(with = "humantime_serde")]
    pub forget_after: Duration,
    /// How often open streams' positions are saved.
    #[serde(with = "humantime_serde")]
    pub save_every: Duration,
    /// How far behind a stream's position the saved one is kept, so that
    /// what was written into a connection that had silently died (buffered
    /// by the kernel or a proxy; the operator notices after up to 2.5
    /// minutes) is sent again: a resume may repeat up to this much, never
    /// miss it. `0s`: the position as written.
    #[serde(with = "humantime_serde")]
    pub margin: Duration,
    /// The JetStream key-value bucket (NATS mode with replay).
    pub bucket: String,
    /// Most keys kept (in memory; in the bucket, its size bound): beyond
    /// it the longest unsaved are forgotten.
    pub max_entries: usize,
}

impl Default for RememberConfig {
    fn default() -> Self {
        Self {
            dialects: vec!["infisical".into()],
            window: Duration::from_secs(600),
            forget_after: Duration::from_secs(24 * 3600),
            save_every: Duration::from_secs(1),
            margin: Duration::from_secs(150),
            bucket: "HERALD_POSITIONS".into(),
            max_entries: 200_000,
        }
    }
}

impl RememberConfig {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        for d in &self.dialects {
            if dialect(d).is_none() {
                return Err(setting::invalid(
                    "remember.dialects",
                    format!("{d:?} is not a dialect (infisical, native)"),
                ));
            }
        }
        setting::duration(
            "remember.window",
            self.window,
            Duration::from_secs(1),
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "remember.forget_after",
            self.forget_after,
            self.window,
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "remember.save_every",
            self.save_every,
            Duration::from_millis(50),
            self.window,
        )?;
        setting::duration("remember.margin", self.margin, Duration::ZERO, self.window)?;
        let bucket_ok = !self.bucket.is_empty()
            && self.bucket.len() <= 64
            && self
                .bucket
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        if !bucket_ok {
            return Err(setting::invalid(
                "remember.bucket",
                "a bucket name is 1 to 64 letters, digits, '_' or '-'",
            ));
        }
        setting::at_least("remember.max_entries", self.max_entries, 1)
    }

    fn remembers(&self, d: Dialect) -> bool {
        self.dialects.iter().any(|n| dialect(n) == Some(d))
    }
}

fn dialect(name: &str) -> Option<Dialect> {
    Dialect::ALL.into_iter().find(|d| d.name() == name)
}

/// What a set of streams is remembered under: a hash of the identity, the
/// project and the registrations (in any order, duplicates once).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Key(String);

impl Key {
    /// The key of `identity`'s streams of `interests` on `project`.
    pub fn new(identity: &Principal, project: &ProjectId, interests: &[Interest]) -> Key {
        let mut regs: Vec<String> = interests.iter().map(|i| i.to_string()).collect();
        regs.sort_unstable();
        regs.dedup();
        let mut h = Sha256::new();
        // Lengths first: no two different inputs hash the same bytes.
        for part in [identity.as_str(), project.as_str()]
            .into_iter()
            .chain(regs.iter().map(String::as_str))
        {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        Key(format!("p{hex}"))
    }

    /// The key as stored (a valid key-value key).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One stream's saved position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Saved {
    /// The stream (random, unique per stream).
    pub stream: u64,
    /// The id of the last event it wrote.
    pub seq: u64,
    /// When it was saved, in UNIX milliseconds.
    pub at_ms: u64,
}

/// Most streams one key keeps positions of: more at once (clients sharing
/// an identity and registrations) drop the furthest ahead, which never
/// makes a resume start later.
pub const STREAMS_PER_KEY: usize = 32;

/// How far in the future a saved time may be (clock skew between instances).
const FUTURE_SKEW_MS: u64 = 60_000;

/// Longest stored value read: [`STREAMS_PER_KEY`] lines of three u64s.
const MAX_VALUE: usize = STREAMS_PER_KEY * 61;

/// The positions saved under one key: every stream of that key that
/// saved within `forget_after`. Several streams share a key when several
/// clients share an identity and registrations (replicas of one app), and
/// herald cannot tell which of them reconnects: a reconnect resumes from
/// the earliest position saved within the window, so that none misses
/// anything (one may get again what it had).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entries(Vec<Saved>);

impl Entries {
    /// How many streams' positions these are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn encode(&self) -> Bytes {
        let mut out = String::new();
        for s in &self.0 {
            out.push_str(&format!("{:x} {} {}\n", s.stream, s.seq, s.at_ms));
        }
        Bytes::from(out)
    }

    /// A stored value; anything malformed is nothing remembered.
    pub fn decode(b: &[u8]) -> Entries {
        Self::parse(b).unwrap_or_default()
    }

    fn parse(b: &[u8]) -> Option<Entries> {
        if b.len() > MAX_VALUE {
            return None;
        }
        let text = std::str::from_utf8(b).ok()?;
        let digits = |t: &str, hex: bool| {
            !t.is_empty()
                && t.len() <= 20
                && t.bytes().all(|c| {
                    if hex {
                        c.is_ascii_hexdigit()
                    } else {
                        c.is_ascii_digit()
                    }
                })
        };
        let mut out = Vec::new();
        for line in text.split_terminator('\n') {
            let mut f = line.split(' ');
            let (Some(id), Some(seq), Some(at), None) = (f.next(), f.next(), f.next(), f.next())
            else {
                return None;
            };
            if !digits(id, true) || !digits(seq, false) || !digits(at, false) {
                return None;
            }
            out.push(Saved {
                stream: u64::from_str_radix(id, 16).ok()?,
                seq: seq.parse().ok()?,
                at_ms: at.parse().ok()?,
            });
            if out.len() > STREAMS_PER_KEY {
                return None;
            }
        }
        Some(Entries(out))
    }

    /// Where a reconnect of this key starts, at `now_ms`: the earliest
    /// position saved within the window; `gap` too when a position kept
    /// longer is earlier still (a client of the key that was away longer
    /// than the window may be the one back). A position saved in the
    /// future (beyond a minute of clock skew) is not one. 0 is one: before
    /// anything retained (a stream opened on an empty replay stream).
    fn recall(&self, now_ms: u64, window: u64, forget: u64) -> Recall {
        let valid = self.0.iter().filter(|s| {
            s.at_ms <= now_ms.saturating_add(FUTURE_SKEW_MS)
                && now_ms.saturating_sub(s.at_ms) <= forget
        });
        let (mut within, mut before) = (None::<u64>, None::<u64>);
        for s in valid {
            let slot = if now_ms.saturating_sub(s.at_ms) <= window {
                &mut within
            } else {
                &mut before
            };
            *slot = Some(slot.map_or(s.seq, |m| m.min(s.seq)));
        }
        match (within, before) {
            (Some(w), Some(b)) if b < w => Recall::ResumeAfterGap(w),
            (Some(w), _) => Recall::Resume(w),
            (None, Some(_)) => Recall::WindowPassed,
            (None, None) => Recall::New,
        }
    }

    /// These entries with `mine` saved: forgotten ones dropped, and beyond
    /// [`STREAMS_PER_KEY`] the oldest outside the window, then the one
    /// furthest ahead (never the earliest: a resume never starts later).
    fn with(mut self, mine: Saved, window: u64, forget: u64) -> Entries {
        let now = mine.at_ms;
        self.0
            .retain(|s| s.stream != mine.stream && now.saturating_sub(s.at_ms) <= forget);
        self.0.push(mine);
        while self.0.len() > STREAMS_PER_KEY {
            let stale = self
                .0
                .iter()
                .enumerate()
                .filter(|(_, s)| now.saturating_sub(s.at_ms) > window)
                .min_by_key(|(_, s)| s.at_ms)
                .map(|(i, _)| i);
            let drop = stale.or_else(|| {
                self.0
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, s)| s.seq)
                    .map(|(i, _)| i)
            });
            match drop {
                Some(i) => {
                    self.0.swap_remove(i);
                }
                None => break,
            }
        }
        self
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// What a stream opened without `Last-Event-ID` starts from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recall {
    /// Resume after this id.
    Resume(u64),
    /// Resume after this id, but tell it `gap` first: a client of the key
    /// may have been away longer than the window.
    ResumeAfterGap(u64),
    /// It was here longer ago than the window: tell it `gap`.
    WindowPassed,
    /// Nothing remembered: a new stream.
    New,
    /// The positions could not be read: it may have missed events.
    Unavailable,
}

impl Recall {
    fn label(self) -> &'static str {
        match self {
            Recall::Resume(_) => "resumed",
            Recall::ResumeAfterGap(_) => "resumed_after_gap",
            Recall::WindowPassed => "window_passed",
            Recall::New => "new",
            Recall::Unavailable => "unavailable",
        }
    }
}

/// Where positions are kept.
enum Store {
    /// This process's memory (embedded mode).
    Local(Mutex<HashMap<Key, Entries>>),
    /// A JetStream key-value bucket.
    Kv(Box<Bucket>),
}

/// A JetStream key-value bucket, opened (or created) on first use.
struct Bucket {
    js: jetstream::Context,
    replicas: usize,
    timeout: Duration,
    store: tokio::sync::OnceCell<jetstream::kv::Store>,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// One stream being tracked: its positions over the last `margin`
/// (sampled), so that the one saved is from `margin` ago.
struct Tracked {
    key: Key,
    stream: u64,
    handle: Arc<StreamHandle>,
    /// (when, position), oldest first; the first is the newest older than
    /// `margin` (or the stream's start).
    history: std::collections::VecDeque<(Instant, u64)>,
    /// The position last saved, once one was.
    saved: Option<u64>,
    saved_at: Instant,
    /// What it saves while its first resume is still held: where it
    /// resumes from (its position is where it will be once written).
    floor: Option<u64>,
}

/// How many samples a stream's history keeps over its margin.
const SAMPLES_PER_MARGIN: u32 = 8;

impl Tracked {
    /// Takes a sample of the position now; returns the position to save
    /// (as of `margin` ago).
    fn sample(&mut self, now: Instant, margin: Duration) -> u64 {
        if !self.handle.is_paused() {
            self.floor = None;
        }
        let at = match self.floor {
            Some(f) => f.min(self.handle.position()),
            None => self.handle.position(),
        };
        let spacing = margin / SAMPLES_PER_MARGIN;
        let due = match self.history.back() {
            Some((_, p)) if *p == at => false,
            // Within one spacing of the last sample: skipped (the older
            // position stands for the time: a resume starts earlier, never
            // later).
            Some((t, _)) => now.duration_since(*t) >= spacing,
            None => true,
        };
        if due {
            self.history.push_back((now, at));
        }
        // Drop samples made redundant: keep the newest older than margin.
        while self.history.len() > 1
            && self
                .history
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= margin)
        {
            self.history.pop_front();
        }
        match self.history.front() {
            Some((t, p)) if now.duration_since(*t) >= margin => *p,
            // Younger than the margin: where it started.
            Some((_, p)) => *p,
            None => at,
        }
    }
}

/// Remembered positions and the streams whose positions are saved.
pub struct Remember {
    cfg: RememberConfig,
    store: Store,
    tracked: Mutex<HashMap<u64, Tracked>>,
    /// Positions to save on the next round (streams that ended, saves
    /// that failed).
    pending: Mutex<Vec<(Key, u64, u64)>>,
    /// Wakes the saver early (a new stream's first position).
    wake: tokio::sync::Notify,
    metrics: Arc<Metrics>,
}

/// The longest a new stream waits for its remembered position.
const RECALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Most saves in flight at once on a key-value bucket.
const CONCURRENT_SAVES: usize = 64;

/// Attempts at a compare-and-set save before it is counted as failed.
const SAVE_ATTEMPTS: usize = 4;

impl Remember {
    /// Positions in this process's memory.
    pub fn in_memory(cfg: RememberConfig, metrics: Arc<Metrics>) -> Self {
        Self::with_store(cfg, Store::Local(Mutex::new(HashMap::new())), metrics)
    }

    /// Positions in JetStream bucket `cfg.bucket`, with `replicas`.
    pub fn in_bucket(
        cfg: RememberConfig,
        client: async_nats::Client,
        replicas: usize,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        let store = Store::Kv(Box::new(Bucket {
            js: jetstream::new(client),
            replicas,
            timeout,
            store: tokio::sync::OnceCell::new(),
        }));
        Self::with_store(cfg, store, metrics)
    }

    fn with_store(cfg: RememberConfig, store: Store, metrics: Arc<Metrics>) -> Self {
        Self {
            cfg,
            store,
            tracked: Mutex::new(HashMap::new()),
            pending: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            metrics,
        }
    }

    /// Whether streams of `dialect` are remembered.
    pub fn remembers(&self, dialect: Dialect) -> bool {
        self.cfg.remembers(dialect)
    }

    /// Where a stream of `key` opened without `Last-Event-ID` starts.
    pub async fn recall(&self, key: &Key) -> Recall {
        let r = match self.load(key).await {
            Ok(entries) => entries.recall(
                now_ms(),
                millis(self.cfg.window),
                millis(self.cfg.forget_after),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read remembered positions");
                Recall::Unavailable
            }
        };
        self.metrics
            .position_recalls
            .with_label_values(&[r.label()])
            .inc();
        r
    }

    /// Saves `handle`'s position under `key` while the returned guard
    /// lives, and once more when it is dropped.
    pub fn track(self: &Arc<Self>, key: Key, handle: &Arc<StreamHandle>) -> TrackGuard {
        self.track_from(key, handle, None)
    }

    /// [`track`](Self::track) a stream held for a resume from `floor`:
    /// until the resume is written, `floor` is its position.
    pub fn track_from(
        self: &Arc<Self>,
        key: Key,
        handle: &Arc<StreamHandle>,
        floor: Option<u64>,
    ) -> TrackGuard {
        let stream = rand::random::<u64>();
        let now = Instant::now();
        let start = floor.map_or(handle.position(), |f| f.min(handle.position()));
        self.tracked.lock().insert(
            handle.id,
            Tracked {
                key,
                stream,
                handle: handle.clone(),
                history: [(now, start)].into_iter().collect(),
                saved: None,
                saved_at: now,
                floor,
            },
        );
        // Its first position is saved now, not at the next round.
        self.wake.notify_one();
        TrackGuard {
            remember: self.clone(),
            stream: handle.id,
        }
    }

    /// Saves every position that moved, about every `save_every`, until
    /// `stop` resolves; then once more.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tick = tokio::time::interval(self.cfg.save_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            tokio::select! {
                _ = &mut stop => break,
                _ = self.save_moved() => {}
            }
        }
        self.save_moved().await;
    }

    /// Saves the positions that moved since they were last saved (and,
    /// every quarter window, those that did not: a saved position counts
    /// for a window), the last positions of streams that ended, and the
    /// saves that failed before. One write per key.
    pub async fn save_moved(&self) {
        let mut batch = std::mem::take(&mut *self.pending.lock());
        let refresh = self.cfg.window / 4;
        let now = Instant::now();
        for t in self.tracked.lock().values_mut() {
            let at = t.sample(now, self.cfg.margin);
            let due = t.saved != Some(at) || now.duration_since(t.saved_at) >= refresh;
            if due {
                t.saved = Some(at);
                t.saved_at = now;
                batch.push((t.key.clone(), t.stream, at));
            }
        }
        if batch.is_empty() {
            return;
        }
        let at_ms = now_ms();
        let mut by_key: HashMap<Key, Vec<Saved>> = HashMap::new();
        for (key, stream, seq) in batch {
            let e = by_key.entry(key).or_default();
            // The later save of one stream wins.
            e.retain(|s| s.stream != stream);
            e.push(Saved { stream, seq, at_ms });
        }
        let (window, forget) = (millis(self.cfg.window), millis(self.cfg.forget_after));
        match &self.store {
            Store::Local(map) => {
                let mut map = map.lock();
                if map.len() >= self.cfg.max_entries {
                    forget_oldest(&mut map, self.cfg.max_entries);
                }
                for (key, saves) in by_key {
                    let mut e = map.remove(&key).unwrap_or_default();
                    for s in saves {
                        e = e.with(s, window, forget);
                    }
                    map.insert(key, e);
                    self.count_save("ok");
                }
            }
            Store::Kv(b) => {
                let bucket = match self.bucket().await {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot open the positions bucket; positions saved later");
                        self.count_save("error");
                        self.requeue(by_key);
                        return;
                    }
                };
                let timeout = b.timeout;
                let failed: Vec<(Key, Vec<Saved>)> = futures_util::stream::iter(by_key)
                    .map(|(key, saves)| {
                        let bucket = bucket.clone();
                        async move {
                            let save = save_entry(&bucket, &key, &saves, window, forget);
                            let ok =
                                matches!(tokio::time::timeout(timeout, save).await, Ok(Ok(())));
                            (key, saves, ok)
                        }
                    })
                    .buffer_unordered(CONCURRENT_SAVES)
                    .filter_map(|(key, saves, ok)| {
                        self.count_save(if ok { "ok" } else { "error" });
                        async move { (!ok).then_some((key, saves)) }
                    })
                    .collect()
                    .await;
                self.requeue(failed);
            }
        }
    }

    fn count_save(&self, result: &str) {
        self.metrics
            .position_saves
            .with_label_values(&[result])
            .inc();
    }

    /// Saves that failed, tried again next round (unless a newer one of
    /// the same stream comes first: the later wins there).
    fn requeue(&self, saves: impl IntoIterator<Item = (Key, Vec<Saved>)>) {
        let mut again: Vec<(Key, u64, u64)> = saves
            .into_iter()
            .flat_map(|(k, v)| v.into_iter().map(move |s| (k.clone(), s.stream, s.seq)))
            .collect();
        let mut pending = self.pending.lock();
        again.append(&mut pending);
        *pending = again;
    }

    async fn load(&self, key: &Key) -> Result<Entries, Failure> {
        match &self.store {
            Store::Local(map) => Ok(map.lock().get(key).cloned().unwrap_or_default()),
            Store::Kv(b) => {
                let bucket = self.bucket().await?;
                // A stream waits for this before its response head.
                let wait = b.timeout.min(RECALL_TIMEOUT);
                let value = tokio::time::timeout(wait, bucket.get(key.as_str()))
                    .await
                    .map_err(|_| "the positions bucket did not answer in time")??;
                match value {
                    None => Ok(Entries::default()),
                    Some(v) => {
                        Entries::parse(&v).ok_or_else(|| "a stored position is not one".into())
                    }
                }
            }
        }
    }

    async fn bucket(&self) -> Result<jetstream::kv::Store, Failure> {
        let Store::Kv(b) = &self.store else {
            return Err("not a bucket".into());
        };
        let Bucket {
            js,
            replicas,
            timeout,
            store,
        } = &**b;
        let store = store
            .get_or_try_init(|| async {
                let config = jetstream::kv::Config {
                    bucket: self.cfg.bucket.clone(),
                    description: "herald: where streams without Last-Event-ID left off".into(),
                    history: 1,
                    max_age: self.cfg.forget_after,
                    max_value_size: MAX_VALUE as i32,
                    max_bytes: i64::try_from(self.cfg.max_entries.saturating_mul(MAX_VALUE + 64))
                        .unwrap_or(i64::MAX),
                    num_replicas: *replicas,
                    ..Default::default()
                };
                let open = async {
                    match js.get_key_value(&self.cfg.bucket).await {
                        Ok(s) => Ok(s),
                        Err(_) => js.create_key_value(config).await.map_err(Failure::from),
                    }
                };
                tokio::time::timeout(*timeout, open)
                    .await
                    .map_err(|_| Failure::from("JetStream did not answer in time"))?
            })
            .await?;
        Ok(store.clone())
    }
}

/// Saves `saved` into the entries of `key`, compare-and-set (streams of
/// one key on other instances save into the same value).
async fn save_entry(
    bucket: &jetstream::kv::Store,
    key: &Key,
    saves: &[Saved],
    window: u64,
    forget: u64,
) -> Result<(), Failure> {
    for _ in 0..SAVE_ATTEMPTS {
        let current = bucket.entry(key.as_str()).await?;
        let (entries, revision) = match current {
            Some(e) if e.operation == jetstream::kv::Operation::Put => {
                (Entries::decode(&e.value), Some(e.revision))
            }
            Some(e) => (Entries::default(), Some(e.revision)),
            None => (Entries::default(), None),
        };
        let value = saves
            .iter()
            .fold(entries, |e, s| e.with(*s, window, forget))
            .encode();
        let done = match revision {
            Some(r) => bucket.update(key.as_str(), value, r).await.is_ok(),
            None => bucket.create(key.as_str(), value).await.is_ok(),
        };
        if done {
            return Ok(());
        }
    }
    Err("the positions of this key kept changing".into())
}

/// Forgets the tenth of `map` saved longest ago, so that it holds fewer
/// than `max` keys.
fn forget_oldest(map: &mut HashMap<Key, Entries>, max: usize) {
    let newest = |e: &Entries| e.0.iter().map(|s| s.at_ms).max().unwrap_or(0);
    let mut ages: Vec<u64> = map.values().map(newest).collect();
    let drop = (map.len() + 1)
        .saturating_sub(max)
        .max(max / 10)
        .min(ages.len());
    if drop == 0 {
        return;
    }
    let (_, cut, _) = ages.select_nth_unstable(drop - 1);
    let cut = *cut;
    let mut left = drop;
    map.retain(|_, e| {
        if left > 0 && newest(e) <= cut {
            left -= 1;
            false
        } else {
            true
        }
    });
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Keeps a stream tracked; when dropped (the stream ended), its last
/// position is saved on the next round.
pub struct TrackGuard {
    remember: Arc<Remember>,
    stream: u64,
}

impl Drop for TrackGuard {
    fn drop(&mut self) {
        let Some(t) = self.remember.tracked.lock().remove(&self.stream) else {
            return;
        };
        let mut t = t;
        let at = t.sample(Instant::now(), self.remember.cfg.margin);
        self.remember.pending.lock().push((t.key, t.stream, at));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::{PathSemantics, SubscribeLimits, SubscribeRequest};

    fn interests(body: &str) -> (ProjectId, Vec<Interest>) {
        let limits = SubscribeLimits {
            max_registrations: 10,
            max_registration_bytes: 4096,
        };
        let r = SubscribeRequest::from_json(body.as_bytes(), PathSemantics::Exact, limits).unwrap();
        (r.project, r.interests)
    }

    #[test]
    fn keys_name_identity_project_and_the_set_of_registrations() {
        let who = Principal::parse("machine:a").unwrap();
        let (p, a) = interests(
            r#"{"projectId":"p1","register":[{"event":"secret:created"},{"event":"secret:deleted","conditions":{"environmentSlug":"prod"}}]}"#,
        );
        let (_, b) = interests(
            r#"{"projectId":"p1","register":[{"event":"secret:deleted","conditions":{"environmentSlug":"prod"}},{"event":"secret:created"},{"event":"secret:created"}]}"#,
        );
        let (_, c) = interests(r#"{"projectId":"p1","register":[{"event":"secret:created"}]}"#);
        assert_eq!(
            Key::new(&who, &p, &a),
            Key::new(&who, &p, &b),
            "order and repeats do not matter"
        );
        assert_ne!(Key::new(&who, &p, &a), Key::new(&who, &p, &c));
        let other = Principal::parse("machine:b").unwrap();
        assert_ne!(Key::new(&who, &p, &a), Key::new(&other, &p, &a));
        let k = Key::new(&who, &p, &a);
        assert_eq!(k.as_str().len(), 33);
        assert!(k.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
    }

    #[test]
    fn stored_values_are_read_as_untrusted() {
        let s = |stream, seq, at_ms| Saved { stream, seq, at_ms };
        let e = Entries(vec![
            s(0xabc, 42, 1_700_000_000_000),
            s(u64::MAX, u64::MAX, u64::MAX),
        ]);
        assert_eq!(Entries::decode(&e.encode()), e);
        for bad in [
            &b"1 42"[..],
            b"1 42 ",
            b"g 1 2\n",
            b"1 -1 5\n",
            b"1 +1 5\n",
            b"1 1 5 6\n",
            b"1 18446744073709551616 1\n",
            b"1 \xff 1\n",
            b"1\t5 6\n",
            b"1  5 6\n",
        ] {
            assert_eq!(Entries::decode(bad), Entries::default(), "{bad:?}");
        }
        assert_eq!(Entries::decode(&vec![b'1'; 1 << 20]), Entries::default());
        let many: String = (0..STREAMS_PER_KEY + 1)
            .map(|i| format!("{i} 1 1\n"))
            .collect();
        assert_eq!(Entries::decode(many.as_bytes()), Entries::default());
    }

    #[test]
    fn a_reconnect_starts_from_the_earliest_stream_of_its_key() {
        let (window, forget) = (10_000, 100_000);
        let now = 1_000_000;
        let s = |stream, seq, at_ms| Saved { stream, seq, at_ms };
        let e = Entries::default()
            .with(s(1, 50, now - 2_000), window, forget)
            .with(s(2, 90, now), window, forget)
            .with(s(1, 60, now), window, forget);
        assert_eq!(e.0.len(), 2, "one entry per stream");
        assert_eq!(e.recall(now, window, forget), Recall::Resume(60));
        // Saved before the window only: told; after forget_after: new.
        assert_eq!(e.recall(now + 20_000, window, forget), Recall::WindowPassed);
        assert_eq!(e.recall(now + 200_000, window, forget), Recall::New);
        assert_eq!(Entries::default().recall(now, window, forget), Recall::New);
        // A client of the key away longer than the window, earlier still:
        // resumed from the earliest in the window, and told.
        let away = e.clone().with(s(3, 10, now - 50_000), window, forget);
        assert_eq!(away.recall(now, window, forget), Recall::ResumeAfterGap(60));
        // Saved in the future: not a position.
        let planted = Entries(vec![s(5, 7, now + 3_600_000)]);
        assert_eq!(planted.recall(now, window, forget), Recall::New);
        // Full: the stream furthest ahead goes, never the earliest.
        let mut full = Entries::default();
        for i in 0..40u64 {
            full = full.with(s(i, 1000 - i, now), window, forget);
        }
        assert_eq!(full.0.len(), STREAMS_PER_KEY);
        assert_eq!(full.recall(now, window, forget), Recall::Resume(961));
        assert!(full.encode().len() <= MAX_VALUE);
        // A stale entry goes before a live one.
        let mut mixed = Entries(vec![s(99, 1, now - 50_000)]);
        for i in 0..STREAMS_PER_KEY as u64 {
            mixed = mixed.with(s(i, 500, now), window, forget);
        }
        assert!(mixed.0.iter().all(|x| x.stream != 99));
    }

    #[tokio::test]
    async fn a_stream_held_for_its_resume_saves_where_it_resumes_from() {
        let (handle, mut stream) = crate::stream::test_stream().await;
        let generation = handle.pause();
        stream.start_after(500); // where the bus stood when it opened
        let now = Instant::now();
        let mut t = Tracked {
            key: Key("p".into()),
            stream: 1,
            handle: handle.clone(),
            history: [(now, 40)].into_iter().collect(),
            saved: None,
            saved_at: now,
            floor: Some(40),
        };
        assert_eq!(t.sample(now, Duration::ZERO), 40, "held: its resume point");
        stream.apply_resume(crate::stream::Resumed::nothing(generation, 40, None));
        assert_eq!(t.sample(now, Duration::ZERO), 500, "resumed: its position");
    }

    #[tokio::test]
    async fn the_saved_position_is_the_one_of_a_margin_ago() {
        let (handle, mut stream) = crate::stream::test_stream().await;
        stream.start_after(100);
        let t0 = Instant::now();
        let margin = Duration::from_secs(80);
        let mut t = Tracked {
            key: Key("p".into()),
            stream: 1,
            handle: handle.clone(),
            history: [(t0, handle.position())].into_iter().collect(),
            saved: None,
            saved_at: t0,
            floor: None,
        };
        let at = |secs| t0 + Duration::from_secs(secs);
        assert_eq!(t.sample(at(0), margin), 100, "young: where it started");
        stream.start_after(200);
        assert_eq!(t.sample(at(20), margin), 100);
        stream.start_after(300);
        assert_eq!(t.sample(at(40), margin), 100);
        assert_eq!(
            t.sample(at(100), margin),
            200,
            "what it had written 80 s ago"
        );
        assert_eq!(t.sample(at(125), margin), 300);
        assert!(t.history.len() <= SAMPLES_PER_MARGIN as usize + 2);
        // Without a margin: what it wrote.
        stream.start_after(400);
        assert_eq!(t.sample(at(126), Duration::ZERO), 400);
    }

    #[test]
    fn config_is_checked() {
        let ok = RememberConfig::default();
        ok.validate().unwrap();
        assert!(ok.remembers(Dialect::Infisical) && !ok.remembers(Dialect::Native));
        let bad = |f: &dyn Fn(&mut RememberConfig)| {
            let mut c = RememberConfig::default();
            f(&mut c);
            c.validate().unwrap_err().to_string()
        };
        assert!(bad(&|c| c.dialects = vec!["sse".into()]).contains("remember.dialects"));
        assert!(bad(&|c| c.forget_after = Duration::from_secs(1)).contains("remember.forget_after"));
        assert!(bad(&|c| c.bucket = "a.b".into()).contains("remember.bucket"));
        assert!(bad(&|c| c.save_every = Duration::ZERO).contains("remember.save_every"));
    }
}
