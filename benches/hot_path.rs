//! Micro-benchmarks of the delivery hot path: subject encoding, path matching,
//! SSE framing, router dispatch, and the delivery-time permission decision
//! (cache hit vs. a raw casbin evaluation).
//!
//! Run: `cargo bench --bench hot_path`

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, Criterion};

use herald::delivery::Delivery;
use herald::event::{Event, EventKey, EventType};
use herald::ident::{EnvSlug, Principal, ProjectId};
use herald::interest::Interest;
use herald::metrics::Metrics;
use herald::path::{PathPattern, SecretPath};
use herald::policy::{Action, Authorizer, PolicySet, PolicySource};
use herald::protocol::Dialect;
use herald::router::Router;
use herald::stream::{new_stream, Item, SseStream, StreamSettings, Subscriber};
use herald::subject;

fn ids() -> (ProjectId, EnvSlug, EventType, SecretPath) {
    (
        ProjectId::parse("6b1c2f0e-3d7a-4c1e-9f2a-0a1b2c3d4e5f").unwrap(),
        EnvSlug::parse("prod").unwrap(),
        EventType::parse("secret:updated").unwrap(),
        SecretPath::parse("/apps/db/primary").unwrap(),
    )
}

fn key() -> EventKey {
    let (project, env, event_type, path) = ids();
    EventKey {
        project,
        event_type,
        env,
        path,
    }
}

const EVENT_JSON: &str = r#"{"specversion":"1.0","id":"0d6f1c7e-8a43-4d7b-9b0e-2f4c1a9e7d11","source":"/secrets-manager","type":"secret:updated","projectid":"6b1c2f0e-3d7a-4c1e-9f2a-0a1b2c3d4e5f","environment":"prod","secretpath":"/apps/db/primary","time":"2026-11-25T09:00:00Z","data":{"secretKeys":["DB_PASSWORD","DB_USER"]}}"#;

fn subjects(c: &mut Criterion) {
    let k = key();
    let path = k.path.clone();
    c.bench_function("subject/encode_event_subject", |b| {
        b.iter(|| subject::event_subject("herald", black_box(&k)))
    });
    let s = subject::event_subject("herald", &k);
    c.bench_function("subject/decode_event_subject", |b| {
        b.iter(|| subject::decode_event_subject("herald", black_box(&s)))
    });
    let pat = PathPattern::parse_subscription("/apps/**/primary").unwrap();
    c.bench_function("path/match_deep_glob", |b| {
        b.iter(|| black_box(&pat).matches(black_box(&path)))
    });
    let event = Event::from_json(serde_json::from_str(EVENT_JSON).unwrap(), 65536).unwrap();
    c.bench_function("sse/event_frame", |b| {
        b.iter(|| Dialect::Native.encode_event(black_box(1_795_597_873_575_111), black_box(&event)))
    });
}

fn shipped_policy() -> PolicySource {
    PolicySource::shipped()
}

/// The shipped policy plus `n` generated rules for other identities and projects.
fn big_policy(n: usize) -> PolicySource {
    let mut s = shipped_policy();
    let mut text = s.policy.clone();
    for i in 0..n {
        text.push_str(&format!(
            "p, svc-{i}, proj-{}, secret:*, subscribe, env-{}, /apps/svc-{i}/**, allow\n",
            i % 500,
            i % 7
        ));
    }
    s.policy = text;
    s
}

fn decisions(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let k = key();
    let sub = Principal::parse("dev-subscriber").unwrap();
    for (name, src) in [
        ("shipped", shipped_policy()),
        ("10k_lines", big_policy(10_000)),
    ] {
        let set = rt.block_on(PolicySet::compile(&src, 1)).unwrap();
        c.bench_function(&format!("policy/{name}/raw_casbin_enforce"), |b| {
            b.iter(|| set.decide(black_box(&sub), black_box(&k), Action::Subscribe))
        });
        let auth = rt
            .block_on(Authorizer::new(&src, 100_000, Arc::new(Metrics::new())))
            .unwrap();
        assert!(auth.may_receive(&sub, &k));
        c.bench_function(&format!("policy/{name}/cached_decision"), |b| {
            b.iter(|| auth.may_receive(black_box(&sub), black_box(&k)))
        });
    }
}

/// Writes out every ready item of a stream, like hyper would (taking each
/// event's bytes in the stream's dialect).
fn drain(s: &mut SseStream, cx: &mut Context<'_>) -> usize {
    let mut n = 0;
    while let Poll::Ready(Some(item)) = s.poll_item(cx) {
        if let Item::Event(d) = item {
            black_box(d.encoded(s.dialect()).frame());
        }
        n += 1;
    }
    n
}

fn router(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let metrics = Arc::new(Metrics::new());
    let auth = Arc::new(
        rt.block_on(Authorizer::new(&shipped_policy(), 100_000, metrics.clone()))
            .unwrap(),
    );
    let router = Arc::new(Router::new(auth.clone(), metrics.clone()));
    let (p, e, t, _) = ids();
    let settings = StreamSettings {
        dialect: Dialect::Native,
        queue_frames: 1024,
        heartbeat: Duration::from_secs(3600),
        retry: Duration::from_secs(3),
        expires_in: Duration::from_secs(3600),
        max_lifetime: None,
        close_timeout: Duration::from_secs(10),
        starts_at_head: false,
    };
    // 10,000 connections over 1,000 distinct interests, 2 identities.
    let subscriber = Principal::parse("dev-subscriber").unwrap();
    let admin = Principal::parse("dev-admin").unwrap();
    let mut streams = Vec::new();
    for i in 0..10_000u64 {
        let interest = Interest {
            event_type: t,
            env: Some(e.clone()),
            path: PathPattern::parse_subscription(&format!("/apps/svc-{}", i % 1000)).unwrap(),
        };
        let identity = if i % 2 == 0 {
            subscriber.clone()
        } else {
            admin.clone()
        };
        let (conn, mut stream) = new_stream(
            Subscriber {
                id: router.next_conn_id(),
                identity,
                project: p.clone(),
                interests: vec![interest],
            },
            &settings,
            None,
            auth.clone(),
            metrics.clone(),
        );
        let reg = router.add(conn);
        stream.hold(Box::new(reg));
        streams.push(stream);
    }
    let waker = futures_util::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    for s in &mut streams {
        drain(s, &mut cx); // the retry: preamble
    }
    let event = Event::from_json(
        serde_json::from_str::<serde_json::Value>(EVENT_JSON)
            .map(|mut v| {
                v["secretpath"] = "/apps/svc-7/db".into();
                v
            })
            .unwrap(),
        65536,
    )
    .unwrap();
    let mut seq = 1;
    c.bench_function("router/dispatch_10k_conns_1k_interests_10_match", |b| {
        b.iter(|| {
            seq += 1;
            let d = Arc::new(Delivery::new(seq, event.clone()));
            let stats = router.dispatch(&d);
            debug_assert_eq!(stats.queued, 10);
            for i in (7..10_000).step_by(1000) {
                drain(&mut streams[i], &mut cx);
            }
            stats
        })
    });
}

criterion_group!(benches, subjects, decisions, router);
criterion_main!(benches);
