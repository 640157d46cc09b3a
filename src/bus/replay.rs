//! JetStream replay: one stream keeps every event for a while, so any instance
//! can resume any client.
//!
//! The stream captures `{prefix}.ev.>` and republishes every stored message to
//! `{prefix}.rp.>` with its stream sequence in the `Nats-Sequence` header:
//! instances listen there, so live events carry the same sequence (the SSE
//! `id`) on every instance, and a resume replays from the stream (batched
//! Direct Get where the stream allows it, which needs no consumer and is
//! served by any replica; else an ordered consumer, deleted once read) and
//! then continues live, with no duplicate at the seam. Publishes go through
//! JetStream and wait for its acknowledgement, with the event id as
//! `Nats-Msg-Id`, so a 202 means stored, and a retried publish is stored once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::StreamExt;

use crate::ident::ProjectId;
use crate::setting::{self, invalid, Invalid};
use crate::subject::{self, Kind};
use serde::{Deserialize, Serialize};

use super::{BusError, BusErrorKind};

/// One stored event read back.
pub struct StoredEvent {
    /// Stream sequence.
    pub seq: u64,
    /// Its subject (`{prefix}.ev.…`).
    pub subject: String,
    /// The CloudEvent JSON.
    pub payload: Bytes,
}

/// What a replay read found.
pub struct Fetched {
    /// Events after the resume point, in order.
    pub events: Vec<StoredEvent>,
    /// Whether events after the resume point were already gone (aged out).
    pub expired: bool,
    /// Whether the replay stopped at `max_events` before the end.
    pub truncated: bool,
    /// Whether the resume point is beyond anything the stream issued.
    pub unknown: bool,
    /// The stream's last sequence when it was read: live events up to it
    /// are the replay's.
    pub through: u64,
}

/// The replay stream.
pub struct Replay {
    client: Client,
    js: jetstream::Context,
    cfg: ReplayConfig,
    prefix: String,
    ready: AtomicBool,
    timeout: Duration,
    duplicate_acks: prometheus::IntCounter,
    /// At most `replay.max_concurrent_reads` reads at once (each holds a
    /// consumer on the server while it runs); the others wait, in order.
    reads: tokio::sync::Semaphore,
    /// Whether reads use Direct Get (the stream allows it, and it is asked for).
    direct: AtomicBool,
    waiting: prometheus::IntGauge,
    read_by: prometheus::IntCounterVec,
}

/// The metrics a [`Replay`] keeps.
pub struct ReplayMetrics {
    /// `herald_replay_duplicate_acks_total`.
    pub duplicate_acks: prometheus::IntCounter,
    /// `herald_replays_waiting`.
    pub waiting: prometheus::IntGauge,
    /// `herald_replay_reads_total{method}`.
    pub read_by: prometheus::IntCounterVec,
}

/// Counts a waiting read for as long as it waits.
struct Waiting<'a>(&'a prometheus::IntGauge);

impl<'a> Waiting<'a> {
    fn new(g: &'a prometheus::IntGauge) -> Self {
        g.inc();
        Self(g)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a Direct Get read ended.
enum DirectRead {
    /// Everything of the project up to the snapshot (or `max_events`).
    Complete,
    /// The replica that answered was behind: read on from `next`.
    Lagged { next: u64 },
}

/// Deletes a replay consumer: at once when the read is done, or, should
/// the read be cancelled (a time-out, shutdown), in a task of its own.
struct ConsumerCleanup {
    stream: Option<stream::Stream>,
    name: String,
}

impl ConsumerCleanup {
    async fn now(&mut self) {
        if let Some(s) = self.stream.take() {
            if let Err(e) = s.delete_consumer(&self.name).await {
                tracing::debug!(consumer = %self.name, error = %e, "could not delete a replay consumer; it expires by itself");
            }
        }
    }
}

impl Drop for ConsumerCleanup {
    fn drop(&mut self) {
        if let (Some(s), Ok(rt)) = (self.stream.take(), tokio::runtime::Handle::try_current()) {
            let name = std::mem::take(&mut self.name);
            rt.spawn(async move {
                let _ = s.delete_consumer(&name).await;
            });
        }
    }
}

/// Most messages one Direct Get request asks for.
const DIRECT_GET_BATCH: usize = 256;

/// The oldest nats-server replay runs on: 2.11.0 has the clustered dedupe
/// fix (nats-server #6486: before it, a publish retried across a leader
/// change could be acknowledged as a duplicate without being stored, a 202
/// for a lost event; no 2.10 release has it).
pub const MIN_SERVER_VERSION: (u64, u64, u64) = (2, 11, 0);

/// `major.minor.patch` of a server version string (`2.15.1`, `v2.12.0-RC.1`).
pub fn parse_version(v: &str) -> Option<(u64, u64, u64)> {
    let v = v.trim().trim_start_matches('v');
    let core = v.split(['-', '+']).next()?;
    let mut parts = core.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        parts.next()??,
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
    ))
}

impl Replay {
    /// The replay stream of `cfg`, reached through `client`; call
    /// [`ensure_stream`](Self::ensure_stream) before use.
    pub fn new(
        client: Client,
        cfg: ReplayConfig,
        prefix: &str,
        timeout: Duration,
        metrics: ReplayMetrics,
    ) -> Self {
        for m in ["direct", "consumer", "none"] {
            metrics.read_by.with_label_values(&[m]);
        }
        Self {
            js: jetstream::new(client.clone()),
            client,
            reads: tokio::sync::Semaphore::new(cfg.max_concurrent_reads),
            direct: AtomicBool::new(false),
            cfg,
            prefix: prefix.to_owned(),
            ready: AtomicBool::new(false),
            timeout,
            duplicate_acks: metrics.duplicate_acks,
            waiting: metrics.waiting,
            read_by: metrics.read_by,
        }
    }

    /// Refuses servers older than [`MIN_SERVER_VERSION`].
    fn check_server_version(&self) -> Result<(), BusError> {
        let version = self.client.server_info().version;
        if version.is_empty() {
            return Err(
                BusError::new(BusErrorKind::NotConnected).doing("reading the server's version")
            );
        }
        let (a, b, c) = MIN_SERVER_VERSION;
        match parse_version(&version) {
            Some(v) if v >= MIN_SERVER_VERSION => Ok(()),
            _ => Err(BusError::new(BusErrorKind::ReplayNotReady).doing(format!(
                "replay needs nats-server {a}.{b}.{c} or newer (exact JetStream dedupe); this server is {version:?}"
            ))),
        }
    }

    /// Whether the stream exists with the configuration herald needs.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Creates the stream, or checks an existing one captures and republishes
    /// what herald needs.
    pub async fn ensure_stream(&self) -> Result<(), BusError> {
        self.check_server_version()?;
        let capture = subject::kind_filter(&self.prefix, Kind::Events);
        let republish = subject::kind_filter(&self.prefix, Kind::Republished);
        let config = stream::Config {
            name: self.cfg.stream.clone(),
            subjects: vec![capture.clone()],
            max_age: self.cfg.max_age,
            max_bytes: self.cfg.max_bytes,
            num_replicas: self.cfg.replicas,
            duplicate_window: self.cfg.duplicate_window,
            allow_direct: true,
            republish: Some(stream::Republish {
                source: capture.clone(),
                destination: republish.clone(),
                headers_only: false,
            }),
            ..Default::default()
        };
        let doing = || format!("creating or opening stream {}", self.cfg.stream);
        let mut s = tokio::time::timeout(self.timeout, self.js.get_or_create_stream(config))
            .await
            .map_err(|_| BusError::new(BusErrorKind::Timeout).doing(doing()))?
            .map_err(|e| BusError::with_source(BusErrorKind::Replay, e).doing(doing()))?;
        let info = s
            .info()
            .await
            .map_err(|e| BusError::with_source(BusErrorKind::Replay, e).doing(doing()))?;
        let ok_subjects = info.config.subjects.contains(&capture);
        let ok_republish =
            info.config.republish.as_ref().is_some_and(|r| {
                r.source == capture && r.destination == republish && !r.headers_only
            });
        if !ok_subjects || !ok_republish {
            return Err(BusError::new(BusErrorKind::ReplayNotReady).doing(format!(
                "stream {} exists but does not capture {capture} and republish it to {republish}; fix or delete it",
                self.cfg.stream
            )));
        }
        let direct = self.cfg.read_method == ReadMethod::Direct;
        if direct && !info.config.allow_direct {
            tracing::info!(
                stream = %self.cfg.stream,
                "the stream does not allow direct gets; resumes read it with consumers (set allow_direct on it to change that)"
            );
        }
        self.direct
            .store(direct && info.config.allow_direct, Ordering::Release);
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    /// Stores one event and waits for JetStream's acknowledgement; returns
    /// its sequence and whether the id was stored before.
    pub async fn publish(
        &self,
        subject: String,
        id: &str,
        payload: Bytes,
    ) -> Result<(u64, bool), BusError> {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id);
        let store = async {
            let ack = self
                .js
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| BusError::with_source(BusErrorKind::Publish, e))?;
            ack.await
                .map_err(|e| BusError::with_source(BusErrorKind::Publish, e))
        };
        let ack = tokio::time::timeout(self.timeout, store)
            .await
            .map_err(|_| BusError::new(BusErrorKind::Timeout).doing("storing an event"))??;
        if ack.duplicate {
            // The id was stored before (a retried publish): the earlier
            // sequence is the event's. Sequence 0 would mean nothing is stored.
            self.duplicate_acks.inc();
            if ack.sequence == 0 {
                return Err(BusError::new(BusErrorKind::Publish)
                    .doing("storing an event: a duplicate acknowledgement without a sequence"));
            }
        }
        Ok((ack.sequence, ack.duplicate))
    }

    /// The sequence of the newest event stored.
    pub async fn last_sequence(&self) -> Result<u64, BusError> {
        // Getting the stream reads its state: one request.
        let info = async {
            let stream = self.js.get_stream(&self.cfg.stream).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                stream.cached_info().state.last_sequence,
            )
        };
        match tokio::time::timeout(self.timeout, info).await {
            Ok(Ok(seq)) => Ok(seq),
            Ok(Err(e)) => Err(BusError::with_source(BusErrorKind::Replay, e)),
            Err(_) => Err(BusError::new(BusErrorKind::Timeout).doing("reading the stream's state")),
        }
    }

    /// Reads the events of `project` stored after sequence `after`, once
    /// one of the `replay.max_concurrent_reads` slots is free (reads are
    /// served in the order they asked).
    /// `None` when, its turn come, the read is no longer `wanted` (the
    /// stream ended, or a newer resume superseded it).
    pub async fn fetch(
        &self,
        project: &ProjectId,
        after: u64,
        wanted: &(dyn Fn() -> bool + Sync),
    ) -> Result<Option<Fetched>, BusError> {
        let permit = {
            let _waiting = Waiting::new(&self.waiting);
            self.reads.acquire().await
        };
        let _permit = permit.map_err(|_| BusError::new(BusErrorKind::Replay).doing("closing"))?;
        if !wanted() {
            return Ok(None);
        }
        // Each Direct Get batch has its own time-out; the whole read is
        // bounded by what the longest resume needs.
        let batches = (self.cfg.max_events / DIRECT_GET_BATCH).min(1000) as u32 + 1;
        let limit = self.timeout.saturating_mul(4 + batches);
        tokio::time::timeout(limit, self.read(project, after))
            .await
            .map_err(|_| BusError::new(BusErrorKind::Timeout).doing("reading a replay"))?
            .map(Some)
    }

    async fn read(&self, project: &ProjectId, after: u64) -> Result<Fetched, BusError> {
        let unavailable = |e: Box<dyn std::error::Error + Send + Sync>| {
            BusError::with_source(BusErrorKind::Replay, e)
        };
        // Getting the stream reads its state: one request, not two.
        let stream = self
            .js
            .get_stream(&self.cfg.stream)
            .await
            .map_err(|e| unavailable(e.into()))?;
        let state = stream.cached_info().state.clone();
        let mut fetched = Fetched {
            events: Vec::new(),
            expired: after.saturating_add(1) < state.first_sequence,
            truncated: false,
            unknown: after > state.last_sequence,
            through: state.last_sequence,
        };
        if after >= state.last_sequence || state.messages == 0 {
            self.read_by.with_label_values(&["none"]).inc();
            return Ok(fetched);
        }
        let start = after.saturating_add(1).max(state.first_sequence);
        let filter = subject::project_subject(&self.prefix, Kind::Events, project);
        let mut start = start;
        if self.direct.load(Ordering::Acquire) {
            self.read_by.with_label_values(&["direct"]).inc();
            match self
                .read_direct(&stream, &filter, start, &state, &mut fetched)
                .await
                .map_err(unavailable)?
            {
                DirectRead::Complete => return Ok(fetched),
                // The replica that answered lagged behind the leader: the
                // rest is read from the leader.
                DirectRead::Lagged { next } => {
                    tracing::debug!(
                        next,
                        "a direct get replica lagged; reading the rest with a consumer"
                    );
                    start = next;
                }
            }
        }
        self.read_by.with_label_values(&["consumer"]).inc();
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| unavailable(e.into()))?;
        // Done with it when the read is: left to expire, a consumer would
        // count against the stream's consumer limit for another 30 s.
        let mut cleanup = ConsumerCleanup {
            stream: Some(stream),
            name: consumer.cached_info().name.clone(),
        };
        let read = self.read_consumer(consumer, &state, &mut fetched).await;
        cleanup.now().await;
        read.map_err(unavailable)?;
        Ok(fetched)
    }

    /// Reads with batched Direct Get requests: `{"seq", "next_by_subj",
    /// "batch"}`, answered by the stored messages (their sequence and
    /// subject in headers) and an end-of-batch status (204) carrying how
    /// many more match; 404 when none does.
    async fn read_direct(
        &self,
        stream: &stream::Stream,
        filter: &str,
        start: u64,
        state: &stream::State,
        fetched: &mut Fetched,
    ) -> Result<DirectRead, Box<dyn std::error::Error + Send + Sync>> {
        let api = format!("$JS.API.DIRECT.GET.{}", self.cfg.stream);
        let mut next = start;
        loop {
            let want = (self.cfg.max_events - fetched.events.len()).min(DIRECT_GET_BATCH);
            let inbox = self.client.new_inbox();
            let mut replies = self.client.subscribe(inbox.clone()).await?;
            let request =
                serde_json::json!({"seq": next, "next_by_subj": filter, "batch": want}).to_string();
            self.client
                .publish_with_reply(api.clone(), inbox, request.into())
                .await?;
            let mut more = 0u64;
            let mut past_snapshot = false;
            loop {
                let reply = tokio::time::timeout(self.timeout, replies.next())
                    .await
                    .map_err(|_| "a direct get timed out")?
                    .ok_or("a direct get's replies ended")?;
                let headers = reply.headers.as_ref();
                match reply.status.map(|s| s.as_u16()) {
                    None => {}
                    // End of batch: how many more match.
                    Some(204) => {
                        more = headers
                            .and_then(|h| h.get_last("Nats-Num-Pending"))
                            .and_then(|v| v.as_str().trim().parse().ok())
                            .ok_or("a direct get's end of batch without Nats-Num-Pending")?;
                        break;
                    }
                    Some(404) => break,
                    Some(code) => return Err(format!("a direct get answered {code}").into()),
                }
                // The server appends its headers after the stored message's
                // own (which a producer chose): the last value is the server's.
                let headers = headers.ok_or("a direct get reply without headers")?;
                let seq: u64 = headers
                    .get_last(async_nats::header::NATS_SEQUENCE)
                    .and_then(|v| v.as_str().trim().parse().ok())
                    .ok_or("a direct get reply without its sequence")?;
                if seq < next {
                    return Err("a direct get reply went backwards".into());
                }
                let subject = headers
                    .get_last(async_nats::header::NATS_SUBJECT)
                    .ok_or("a direct get reply without its subject")?
                    .as_str()
                    .to_owned();
                if seq > state.last_sequence {
                    past_snapshot = true; // live delivery covers it
                    break;
                }
                next = seq.saturating_add(1);
                fetched.events.push(StoredEvent {
                    seq,
                    subject,
                    payload: reply.payload,
                });
            }
            if past_snapshot || next > state.last_sequence {
                return Ok(DirectRead::Complete);
            }
            if more == 0 {
                return self.confirm_with_leader(stream, filter, next, state).await;
            }
            if fetched.events.len() >= self.cfg.max_events {
                fetched.truncated = true;
                return Ok(DirectRead::Complete);
            }
        }
    }

    /// A direct get may be answered by a replica a little behind the
    /// leader, whose "nothing more" would hide the newest events: the
    /// leader says whether anything of the project lies between `next` and
    /// the snapshot (one message get, no consumer).
    async fn confirm_with_leader(
        &self,
        stream: &stream::Stream,
        filter: &str,
        next: u64,
        state: &stream::State,
    ) -> Result<DirectRead, Box<dyn std::error::Error + Send + Sync>> {
        let found = stream
            .raw_message_builder()
            .sequence(next)
            .next_by_subject(filter)
            .send()
            .await;
        match found {
            Ok(m) if m.sequence <= state.last_sequence => Ok(DirectRead::Lagged { next }),
            Ok(_) => Ok(DirectRead::Complete),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(DirectRead::Complete)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn read_consumer(
        &self,
        consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
        state: &stream::State,
        fetched: &mut Fetched,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        if consumer.cached_info().num_pending == 0 {
            return Ok(()); // nothing of this project after the resume point
        }
        let mut messages = consumer.messages().await?;
        while let Some(m) = messages.next().await {
            let m = m?;
            let info = m.info()?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            if seq > state.last_sequence {
                break; // live delivery covers everything after the snapshot
            }
            fetched.events.push(StoredEvent {
                seq,
                subject: m.subject.to_string(),
                payload: m.payload.clone(),
            });
            if fetched.events.len() >= self.cfg.max_events {
                fetched.truncated = pending > 0;
                break;
            }
            if pending == 0 || seq >= state.last_sequence {
                break;
            }
        }
        Ok(())
    }
}
/// How a resume reads the replay stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadMethod {
    /// Batched Direct Get (`$JS.API.DIRECT.GET`, nats-server 2.11+) where
    /// the stream allows it (herald creates it so): no consumer, served by
    /// any replica; otherwise a consumer.
    Direct,
    /// Always an ordered consumer, created and deleted per read.
    Consumer,
}

/// `[replay]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReplayConfig {
    /// Keep events in a JetStream stream, so any instance can resume any client.
    pub enabled: bool,
    /// Stream name.
    pub stream: String,
    /// Oldest event kept.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Most bytes kept.
    pub max_bytes: i64,
    /// Stream replicas (3 in a 3-node cluster).
    pub replicas: usize,
    /// Publishes with the same event id within this window are stored once.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Most events replayed to one resuming stream; beyond that it gets `gap`.
    pub max_events: usize,
    /// Most replay reads at once on this instance; the others wait in order.
    pub max_concurrent_reads: usize,
    /// How a resume reads the stream.
    pub read_method: ReadMethod,
}

impl Default for ReplayConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            stream: "HERALD_EVENTS".into(),
            max_age: Duration::from_secs(24 * 3600),
            max_bytes: 1 << 30,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            max_events: 100_000,
            max_concurrent_reads: 32,
            read_method: ReadMethod::Direct,
        }
    }
}

impl ReplayConfig {
    /// Checks what serde cannot; `nats_configured` says whether `[nats]` has URLs.
    pub fn validate(&self, nats_configured: bool) -> Result<(), Invalid> {
        setting::duration(
            "replay.max_age",
            self.max_age,
            Duration::from_secs(1),
            setting::MAX_DURATION,
        )?;
        setting::duration(
            "replay.duplicate_window",
            self.duplicate_window,
            Duration::ZERO,
            setting::MAX_DURATION,
        )?;
        if !self.enabled {
            return Ok(());
        }
        if !nats_configured {
            return Err(invalid("replay.enabled", "needs NATS: set nats.urls"));
        }
        if self.stream.is_empty()
            || !self
                .stream
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid("replay.stream", "must be A-Z a-z 0-9 _ -"));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(invalid("replay.replicas", "must be between 1 and 5"));
        }
        if self.max_bytes < 1024 * 1024 {
            return Err(invalid("replay.max_bytes", "must be at least 1 MiB"));
        }
        setting::at_least("replay.max_events", self.max_events, 1)?;
        if !(1..=4096).contains(&self.max_concurrent_reads) {
            return Err(invalid(
                "replay.max_concurrent_reads",
                "must be between 1 and 4096",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_are_read_and_compared() {
        assert_eq!(parse_version("2.15.1"), Some((2, 15, 1)));
        assert_eq!(parse_version("v2.12.0-RC.1"), Some((2, 12, 0)));
        assert_eq!(parse_version("2.11"), Some((2, 11, 0)));
        assert_eq!(parse_version("garbage"), None);
        assert!(parse_version("2.10.29").unwrap() < MIN_SERVER_VERSION);
        assert!(parse_version("2.11.0").unwrap() >= MIN_SERVER_VERSION);
    }
}
