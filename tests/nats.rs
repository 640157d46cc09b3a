//! herald on NATS: real nats-server processes (single and 3-node clusters),
//! several real herald instances, real SSE clients.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::nats::{urls_env, NatsCluster, NatsServer};
use common::*;
use serde_json::{json, Value};

const HOUR: Duration = Duration::from_secs(3600);

fn on_nats(urls: &[String]) -> HeraldBuilder {
    HeraldBuilder::new()
        .env("NATS__URLS", &urls_env(urls))
        .env("NATS__PRESENCE_INTERVAL", "200ms")
        .env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "50")
}

async fn start_instance(b: HeraldBuilder) -> Herald {
    let h = b.start();
    h.wait_ready(200).await;
    h
}

/// Waits until every node of `servers` routes `subjects` (interest crosses the
/// cluster asynchronously after the subscribing node confirmed it).
async fn wait_interest(servers: &[&NatsServer], subjects: &[String]) {
    for s in servers {
        let what = format!("interest {subjects:?} never reached node {}", s.url());
        eventually(WAIT, what, || async {
            let v = s.monitor("/subsz?subs=1").await;
            let have: HashSet<String> = v["subscriptions_list"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|x| x["subject"].as_str().map(str::to_owned))
                .collect();
            subjects.iter().all(|x| have.contains(x)).then_some(())
        })
        .await;
    }
}

/// Reads `s` until `n` sentinels (paths under /apps/db/sentinel) arrived; returns
/// the other paths seen. NATS orders messages per publisher only, so a test with
/// several publishers needs one sentinel from each.
async fn until_sentinels(s: &mut SseClient, n: usize) -> Vec<String> {
    let mut seen = Vec::new();
    let mut sentinels = 0;
    while sentinels < n {
        let ev = s.next_event().await;
        let p = ev.json()["secretpath"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if p.starts_with("/apps/db/sentinel") {
            sentinels += 1;
        } else {
            seen.push(p);
        }
    }
    seen
}

fn body(project: &str, env: Option<&str>, path: &str) -> Value {
    let mut cond = json!({"secretPath": path});
    if let Some(e) = env {
        cond["environmentSlug"] = e.into();
    }
    json!({"projectId": project, "register": [
        {"event": "secret:created", "conditions": cond},
        {"event": "secret:deleted", "conditions": {"secretPath": "/apps/db/sentinel"}}]})
}

#[tokio::test]
async fn events_cross_instances_exactly_once() {
    let cluster = NatsCluster::start().await;
    let mut instances = Vec::new();
    for node in &cluster.nodes {
        instances.push(start_instance(on_nats(&[node.url()])).await);
    }
    // On every instance: a reader of everything in p1 (with overlapping
    // registrations) and a service that may only see prod /apps/db.
    let mut readers = Vec::new();
    let mut narrow = Vec::new();
    for h in &instances {
        let mut b = body("p1", None, "/");
        b["register"]
            .as_array_mut()
            .unwrap()
            .push(json!({"event": "secret:created", "conditions": {"secretPath": "/apps"}}));
        readers.push(h.subscribe(&token_for("reader", HOUR), &b).await);
        narrow.push(
            h.subscribe(&token_for("prod-db", HOUR), &body("p1", Some("prod"), "/"))
                .await,
        );
    }
    let mut subjects = Vec::new();
    for h in &instances {
        subjects.extend(h.nats_subjects().await);
    }
    let nodes: Vec<&NatsServer> = cluster.nodes.iter().collect();
    wait_interest(&nodes, &subjects).await;

    // Through each instance's API ...
    let w = token_for("writer", HOUR);
    for (i, h) in instances.iter().enumerate() {
        h.publish(
            &w,
            &event("secret:created", "p1", "prod", &format!("/apps/db/api{i}")),
        )
        .await;
        h.publish(
            &w,
            &event("secret:created", "p1", "dev", &format!("/apps/db/dev{i}")),
        )
        .await;
    }
    // ... and directly on NATS, following the documented subject scheme.
    let direct = async_nats::connect(cluster.nodes[0].url()).await.unwrap();
    let ev = event("secret:created", "p1", "prod", "/apps/db/direct");
    direct
        .publish(
            "herald.ev.p1.prod.secret:created.apps.db.direct.~",
            ev.to_string().into(),
        )
        .await
        .unwrap();
    let internal = event("secret:created", "p1", "prod", "/internal/k");
    direct
        .publish(
            "herald.ev.p1.prod.secret:created.internal.k.~",
            internal.to_string().into(),
        )
        .await
        .unwrap();
    let sentinel = event("secret:deleted", "p1", "prod", "/apps/db/sentinel/direct");
    direct
        .publish(
            "herald.ev.p1.prod.secret:deleted.apps.db.sentinel.direct.~",
            sentinel.to_string().into(),
        )
        .await
        .unwrap();
    direct.flush().await.unwrap();
    for (i, h) in instances.iter().enumerate() {
        let path = format!("/apps/db/sentinel/{i}");
        h.publish(&w, &event("secret:deleted", "p1", "prod", &path))
            .await;
    }

    let mut want_all: Vec<String> = (0..3)
        .flat_map(|i| [format!("/apps/db/api{i}"), format!("/apps/db/dev{i}")])
        .collect();
    want_all.push("/apps/db/direct".into());
    want_all.sort();
    let want_prod: Vec<String> = {
        let mut v: Vec<String> = (0..3).map(|i| format!("/apps/db/api{i}")).collect();
        v.push("/apps/db/direct".into());
        v.sort();
        v
    };
    for (i, s) in readers.iter_mut().enumerate() {
        let mut got = until_sentinels(s, 4).await;
        got.sort();
        assert_eq!(
            got, want_all,
            "reader on instance {i}: everything but /internal, once each"
        );
    }
    for (i, s) in narrow.iter_mut().enumerate() {
        let mut got = until_sentinels(s, 4).await;
        got.sort();
        assert_eq!(got, want_prod, "prod-db on instance {i}");
    }
}

#[tokio::test]
async fn interest_follows_the_streams() {
    let nats = NatsServer::start();
    let h = start_instance(on_nats(&[nats.url()])).await;
    let t = token_for("reader", HOUR);
    let p1 = h.subscribe(&t, &body("p1", Some("prod"), "/apps")).await;
    let mut p2 = h.subscribe(&t, &body("p2", None, "/")).await;
    let subjects = h.nats_subjects().await;
    assert_eq!(
        subjects,
        vec!["herald.ev.p1.>".to_owned(), "herald.ev.p2.>".to_owned()],
        "one per project"
    );
    assert!(
        !subjects
            .iter()
            .any(|s| s.contains(".ev.>") || s == "herald.>"),
        "never a firehose: {subjects:?}"
    );
    let on_server = nats.subscribed_subjects().await;
    assert!(
        on_server.contains(&"herald.ev.p1.>".to_owned()),
        "{on_server:?}"
    );
    // A second stream with the same registrations shares the subscriptions.
    let before = h.metric("herald_nats_subscriptions").await;
    let twin = h.subscribe(&t, &body("p1", Some("prod"), "/apps")).await;
    assert_eq!(h.metric("herald_nats_subscriptions").await, before);
    drop(twin);
    drop(p1);
    // Both p1 streams gone: the p1 subscriptions go, on herald and on the server.
    h.wait_metric("herald_connections", 1.0).await;
    eventually(WAIT, "p1 interest stayed on the server", || async {
        let on_server = nats.subscribed_subjects().await;
        (!on_server.iter().any(|s| s.starts_with("herald.ev.p1."))).then_some(())
    })
    .await;
    assert!(!h
        .nats_subjects()
        .await
        .iter()
        .any(|s| s.starts_with("herald.ev.p1.")));
    // Traffic for p1 no longer reaches this instance at all.
    let received = h
        .metric("herald_events_received_total{source=\"nats\"}")
        .await;
    let w = token_for("writer", HOUR);
    for i in 0..5 {
        h.publish(
            &w,
            &event("secret:created", "p1", "prod", &format!("/apps/{i}")),
        )
        .await;
    }
    h.publish(
        &w,
        &event("secret:deleted", "p2", "prod", "/apps/db/sentinel"),
    )
    .await;
    assert!(p2.paths_until("/apps/db/sentinel").await.is_empty());
    assert_eq!(
        h.metric("herald_events_received_total{source=\"nats\"}")
            .await,
        received + 1.0,
        "only the p2 sentinel arrived"
    );
}

#[tokio::test]
async fn hostile_subjects_cannot_widen_or_cross() {
    let nats = NatsServer::start();
    let h = start_instance(
        on_nats(&[nats.url()]).env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "20"),
    )
    .await;
    let t = token_for("reader", HOUR);
    let paths = ["/a.b", "/a", "/%2A", "/*", "/ü n", "/x>"];
    let mut streams = Vec::new();
    for p in paths {
        streams.push(h.subscribe(&t, &body("p1", None, p)).await);
    }
    let other_project = h.subscribe(&t, &body("p1x", None, "/")).await;
    let w = token_for("writer", HOUR);
    let published = [
        "/a/b", "/a.b", "/a.b/c", "/%2A", "/*", "/*/deep", "/ü n", "/ü", "/x>", "/x", "/a",
    ];
    for p in published {
        h.publish(&w, &event("secret:created", "p1", "prod", p))
            .await;
    }
    // A direct publish whose envelope names another project than its subject.
    let direct = async_nats::connect(nats.url()).await.unwrap();
    let lying = event("secret:created", "p1x", "prod", "/a");
    direct
        .publish(
            "herald.ev.p1.prod.secret:created.a.~",
            lying.to_string().into(),
        )
        .await
        .unwrap();
    direct
        .publish(
            "herald.ev.p1.prod.secret:created.not-terminated",
            "{}".into(),
        )
        .await
        .unwrap();
    direct.flush().await.unwrap();
    h.publish(
        &w,
        &event("secret:deleted", "p1", "prod", "/apps/db/sentinel"),
    )
    .await;
    h.publish(
        &w,
        &event("secret:deleted", "p1x", "prod", "/apps/db/sentinel"),
    )
    .await;
    let want: [&[&str]; 6] = [
        &["/a.b", "/a.b/c"],
        &["/a/b", "/a"],
        &["/%2A"],
        // A subscription's `*` is a one-segment glob, whatever the published paths contain.
        &["/a.b", "/%2A", "/*", "/ü n", "/ü", "/x>", "/x", "/a"],
        &["/ü n"],
        &["/x>"],
    ];
    for (i, s) in streams.iter_mut().enumerate() {
        assert_eq!(
            s.paths_until("/apps/db/sentinel").await,
            want[i],
            "stream for {}",
            paths[i]
        );
    }
    let mut other = other_project;
    assert!(
        other.paths_until("/apps/db/sentinel").await.is_empty(),
        "nothing crossed into p1x"
    );
    assert_eq!(
        h.metric("herald_events_rejected_total{reason=\"subject_mismatch\"}")
            .await,
        1.0
    );
    // A subject outside the scheme is dropped and counted, never delivered.
    assert_eq!(
        h.metric("herald_events_rejected_total{reason=\"bad_subject\"}")
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_dead_cluster_node_does_not_stop_the_others() {
    let mut cluster = NatsCluster::start().await;
    let urls: Vec<String> = cluster.urls();
    let mut instances = Vec::new();
    for node in &cluster.nodes {
        instances.push(start_instance(on_nats(&[node.url()])).await);
    }
    let mut streams = Vec::new();
    for h in &instances {
        streams.push(
            h.subscribe(&token_for("reader", HOUR), &body("p1", None, "/"))
                .await,
        );
    }
    let mut subjects = Vec::new();
    for h in &instances {
        subjects.extend(h.nats_subjects().await);
    }
    wait_interest(&cluster.nodes.iter().collect::<Vec<_>>(), &subjects).await;
    let w = token_for("writer", HOUR);
    instances[0]
        .publish(&w, &event("secret:created", "p1", "prod", "/before"))
        .await;
    cluster.nodes[1].kill();
    for i in 0..20 {
        instances[0]
            .publish(
                &w,
                &event("secret:created", "p1", "prod", &format!("/during/{i}")),
            )
            .await;
    }
    // The same publisher as the events: NATS keeps one publisher's order.
    instances[0]
        .publish(
            &w,
            &event("secret:deleted", "p1", "prod", "/apps/db/sentinel"),
        )
        .await;
    let mut want = vec!["/before".to_owned()];
    want.extend((0..20).map(|i| format!("/during/{i}")));
    for i in [0, 2] {
        assert_eq!(
            streams[i].paths_until("/apps/db/sentinel").await,
            want,
            "instance {i}"
        );
    }
    // The instance whose node died fails over to the nodes the cluster
    // advertised: ready again, its stream told about the gap, events flowing.
    instances[1].wait_ready(200).await;
    // Whatever of the outage window it got, it is told it may have missed some.
    loop {
        let ev = streams[1].next_event().await;
        if ev.event.as_deref() == Some("gap") {
            assert_eq!(ev.json()["reason"], "bus_reconnected");
            break;
        }
    }
    instances[1]
        .publish(&w, &event("secret:created", "p1", "prod", "/after"))
        .await;
    instances[1]
        .publish(
            &w,
            &event("secret:deleted", "p1", "prod", "/apps/db/sentinel"),
        )
        .await;
    for i in [0, 2] {
        assert_eq!(
            streams[i].paths_until("/apps/db/sentinel").await,
            vec!["/after"],
            "instance {i}"
        );
    }
    // Instance 1 may still hold part of the outage window before /after.
    while streams[1].next_event().await.json()["secretpath"] != "/after" {}
    assert_eq!(
        streams[1].paths_until("/apps/db/sentinel").await,
        Vec::<String>::new()
    );
    // An instance given a dead node first starts on a live one.
    let roaming = start_instance(on_nats(&[urls[1].clone(), urls[0].clone()])).await;
    let (status, _) = roaming.admin_json("/readyz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_restarted_server_brings_readiness_back_and_gap_to_streams() {
    let mut nats = NatsServer::start_restartable();
    let h = start_instance(on_nats(&[nats.url()])).await;
    let mut s = h
        .subscribe(&token_for("reader", HOUR), &body("p1", None, "/"))
        .await;
    assert_eq!(h.metric("herald_nats_connected").await, 1.0);
    nats.kill();
    h.wait_ready(503).await;
    assert_eq!(h.metric("herald_nats_connected").await, 0.0);
    // While the bus is down a publish is refused with 503, never accepted and lost.
    let r = h
        .publish_raw(
            &token_for("writer", HOUR),
            &event("secret:created", "p1", "prod", "/lost"),
        )
        .await;
    assert_eq!(r.status(), 503);
    nats.restart();
    h.wait_ready(200).await;
    let gap = s.next_event().await;
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert_eq!(gap.json()["reason"], "bus_reconnected");
    // Subscriptions were restored: events flow again.
    let w = token_for("writer", HOUR);
    h.publish(&w, &event("secret:created", "p1", "prod", "/after"))
        .await;
    h.publish(
        &w,
        &event("secret:deleted", "p1", "prod", "/apps/db/sentinel"),
    )
    .await;
    assert_eq!(s.paths_until("/apps/db/sentinel").await, vec!["/after"]);
}

/// Waits until `h` sees `n` streams in total across the cluster.
async fn wait_cluster_streams(h: &Herald, n: u64) {
    eventually(
        WAIT,
        format!("the cluster view never reached {n} streams"),
        || async {
            let (_, v) = h.admin_json("/admin/cluster").await;
            let total: u64 = v["instances"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|i| i["connections"].as_u64())
                .sum();
            (total == n).then_some(())
        },
    )
    .await
}

/// Waits until `h`'s cluster view satisfies `pred`, returning it.
async fn wait_cluster(h: &Herald, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(WAIT, what, || async {
        let (_, v) = h.admin_json("/admin/cluster").await;
        pred(&v).then_some(v)
    })
    .await
}

#[tokio::test]
async fn the_identity_stream_limit_is_cluster_wide() {
    let nats = NatsServer::start();
    let mut instances = Vec::new();
    for _ in 0..3 {
        instances.push(
            start_instance(
                on_nats(&[nats.url()]).env("LIMITS__CONNECTIONS_PER_IDENTITY_PROJECT", "5"),
            )
            .await,
        );
    }
    for h in &instances {
        wait_cluster_streams(h, 0).await;
        wait_cluster(h, "instances never saw each other", |v| {
            v["instances"].as_array().map(Vec::len) == Some(3)
        })
        .await;
    }
    let t = token_for("reader", HOUR);
    let mut open = Vec::new();
    for (i, n) in [(0, 2), (1, 2), (2, 1)] {
        for _ in 0..n {
            open.push(instances[i].subscribe(&t, &body("p1", None, "/")).await);
        }
    }
    for h in &instances {
        wait_cluster_streams(h, 5).await;
    }
    for h in &instances {
        let r = h.subscribe_raw(Some(&t), &body("p1", None, "/")).await;
        assert_eq!(
            r.status(),
            429,
            "the 6th stream is refused on every instance"
        );
    }
    // Another identity is not affected, and closing one frees a slot everywhere.
    let _other = instances[2]
        .subscribe(&token_for("dev-subscriber", HOUR), &body("p1", None, "/"))
        .await;
    for h in &instances {
        wait_cluster_streams(h, 6).await;
    }
    drop(open.pop());
    for h in &instances {
        wait_cluster_streams(h, 5).await; // 4 of reader's + dev-subscriber's
    }
    let _again = instances[0].subscribe(&t, &body("p1", None, "/")).await;
}

#[tokio::test]
async fn cluster_view_flags_policy_drift() {
    let nats = NatsServer::start();
    let a = start_instance(on_nats(&[nats.url()])).await;
    let b = start_instance(on_nats(&[nats.url()])).await;
    let v = wait_cluster(&a, "a never saw b", |v| {
        v["instances"].as_array().map(Vec::len) == Some(2)
    })
    .await;
    assert_eq!(v["policy_drift"], false);
    let other = start_instance(
        on_nats(&[nats.url()]).policy("p, someone, *, *, subscribe, *, /**, allow\n"),
    )
    .await;
    let v = wait_cluster(&a, "drift never flagged", |v| v["policy_drift"] == true).await;
    assert_eq!(v["distinct_policy_fingerprints"], 2);
    a.wait_metric("herald_cluster_policy_fingerprints", 2.0)
        .await;
    a.wait_metric("herald_cluster_instances", 3.0).await;
    drop((b, other));
}
