//! A client that behaves like a browser's EventSource: it keeps its last
//! event id, honours `retry:`, and reconnects (through the load balancer)
//! with `Last-Event-ID` whenever its stream ends, until told to stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde_json::Value;
use tokio::sync::watch;

/// What one client saw.
#[derive(Default, Debug, Clone)]
pub struct Seen {
    /// (id, secret path) of every event frame, duplicates included, in order.
    pub events: Vec<(u64, String)>,
    /// Control events (`reconnect`, `gap`, `error`) with their `data`.
    pub controls: Vec<(String, Value)>,
    /// When each of `events` arrived.
    pub arrived: Vec<Instant>,
    /// Connections made.
    pub connects: usize,
    /// Streams opened (answered 200: the server had its interest in place).
    pub opened: usize,
    /// When each connection's first event arrived.
    pub first_event_after_connect: Vec<Instant>,
}

impl Seen {
    /// Event paths after dropping repeated ids, and the number of repeats.
    pub fn deduped(&self) -> (Vec<(u64, String)>, usize) {
        let mut out: Vec<(u64, String)> = Vec::new();
        let mut dups = 0;
        let mut ids = std::collections::HashSet::new();
        for (id, p) in &self.events {
            if ids.insert(*id) {
                out.push((*id, p.clone()));
            } else {
                dups += 1;
            }
        }
        (out, dups)
    }
}

pub struct EventSource {
    pub seen: Arc<Mutex<Seen>>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    /// Pauses reading when set (a slow client).
    pub paused: Arc<std::sync::atomic::AtomicBool>,
}

impl EventSource {
    /// Starts a client that POSTs `body` to `url` with `token`.
    pub fn start(url: String, token: String, body: Value) -> EventSource {
        Self::resume(url, token, body, None)
    }

    /// Starts a client that resumes after `last_id`, as a page reload with a kept id would.
    pub fn resume(url: String, token: String, body: Value, last_id: Option<u64>) -> EventSource {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let (stop, mut stopped) = watch::channel(false);
        let paused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = seen.clone();
        let p = paused.clone();
        let task = tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut last_id: Option<u64> = last_id;
            let mut retry = Duration::from_millis(300);
            while !*stopped.borrow() {
                let mut req = http.post(&url).bearer_auth(&token).json(&body);
                if let Some(id) = last_id {
                    req = req.header("last-event-id", id.to_string());
                }
                s.lock().connects += 1;
                let resp = match req.send().await {
                    Ok(r) if r.status() == 200 => {
                        s.lock().opened += 1;
                        r
                    }
                    _ => {
                        tokio::select! {
                            _ = tokio::time::sleep(retry) => continue,
                            _ = stopped.changed() => return,
                        }
                    }
                };
                let mut stream = resp.bytes_stream();
                let mut parser = super::Parser::lenient();
                let mut first = true;
                loop {
                    while p.load(std::sync::atomic::Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    let chunk = tokio::select! {
                        c = stream.next() => c,
                        _ = stopped.changed() => return,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    parser.push(&chunk);
                    while let Some(ev) = parser.next() {
                        if let Some(ms) = ev.retry {
                            retry = Duration::from_millis(ms);
                        }
                        let json = ev.json();
                        let id = ev.id.as_deref().and_then(|i| i.parse::<u64>().ok());
                        match (id, ev.event) {
                            (Some(id), Some(_)) => {
                                last_id = Some(id);
                                let mut g = s.lock();
                                if first {
                                    g.first_event_after_connect.push(Instant::now());
                                    first = false;
                                }
                                g.events.push((
                                    id,
                                    json["secretpath"].as_str().unwrap_or_default().to_owned(),
                                ));
                                g.arrived.push(Instant::now());
                            }
                            (None, Some(kind)) => s.lock().controls.push((kind, json)),
                            _ => {}
                        }
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = stopped.changed() => return,
                }
            }
        });
        EventSource {
            seen,
            stop,
            task,
            paused,
        }
    }

    /// Waits until the client has had `n` streams opened (the first: it
    /// receives what is published from now on).
    pub async fn wait_opened(&self, n: usize, within: Duration) -> bool {
        super::within(within, || async {
            (self.seen.lock().opened >= n).then_some(())
        })
        .await
        .is_some()
    }

    /// Waits until the client holds `want` distinct events; `false` if it
    /// did not within `within` (the caller says what that means).
    pub async fn wait_for(&self, want: usize, within: Duration) -> bool {
        super::within(within, || async {
            (self.seen.lock().deduped().0.len() >= want).then_some(())
        })
        .await
        .is_some()
    }

    pub async fn stop(self) -> Seen {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        let s = self.seen.lock().clone();
        s
    }
}
