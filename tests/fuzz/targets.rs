//! Property targets for everything herald parses from outside: generated and
//! mutated inputs, and what must hold for each. Shared by the quick run in
//! `tests/fuzz` (part of `scripts/test`) and the long run in `benches/fuzz`.
//!
//! The property is always the same: a clear error or a valid value, never a
//! panic; a value that parses again to itself; and the reference's verdict
//! where there is one (hyper for HTTP/1 heads, a naive matcher for path
//! patterns, the encoder for NATS subjects).

#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald::auth::{AuthConfig, ClaimRules, Verifier};
use herald::event::Event;
use herald::http::direct::{probe_head, Probe};
use herald::ident::{looks_like_role, EnvSlug, Principal, ProjectId};
use herald::path::{PathPattern, SecretPath, Seg, MAX_PATH_LEN, MAX_SEGMENTS};
use herald::request::{PathSemantics, SubscribeLimits, SubscribeRequest};
use herald::setting::Secret;
use herald::subject::{decode_subject, event_subject, Kind};
use http_body_util::BodyExt;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{json, Value};

/// One target: a name and how to run `cases` of it from `seed`.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&mut TestRunner) -> Result<(), String>,
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "http1_head",
        run: |r| report(r.run(&http_input(), |b| check_http1_head(&b))),
    },
    Target {
        name: "event_envelope",
        run: |r| report(r.run(&envelope_input(), |v| check_envelope(&v))),
    },
    Target {
        name: "event_bytes",
        run: |r| {
            report(r.run(&mutated(ENVELOPE_SEEDS, JSON_DICT), |b| {
                check_envelope_bytes(&b)
            }))
        },
    },
    Target {
        name: "paths_and_patterns",
        run: |r| report(r.run(&path_text(), |s| check_path(&s))),
    },
    Target {
        name: "pattern_matching",
        run: |r| {
            report(r.run(&(small_pattern(), small_path()), |(p, t)| {
                check_matching(&p, &t)
            }))
        },
    },
    Target {
        name: "identifiers",
        run: |r| report(r.run(&ident_text(), |s| check_identifiers(&s))),
    },
    Target {
        name: "subscribe_body",
        run: |r| report(r.run(&subscribe_input(), |v| check_subscribe_body(&v))),
    },
    Target {
        name: "subscribe_bytes",
        run: |r| {
            report(r.run(&mutated(SUBSCRIBE_SEEDS, JSON_DICT), |b| {
                check_subscribe_bytes(&b)
            }))
        },
    },
    Target {
        name: "subscribe_query",
        run: |r| report(r.run(&query_input(), |q| check_subscribe_query(&q))),
    },
    Target {
        name: "token_claims",
        run: |r| report(r.run(&claims_input(), |v| check_claims(&v))),
    },
    Target {
        name: "signed_tokens",
        run: |r| {
            report(r.run(&(claims_input(), byte_edits()), |(v, e)| {
                check_signed_token(&v, &e)
            }))
        },
    },
    Target {
        name: "infisical_frames",
        run: |r| report(r.run(&infisical_input(), |v| check_infisical_frames(&v))),
    },
    Target {
        name: "jwks_documents",
        run: |r| report(r.run(&mutated(JWKS_SEEDS, JWKS_DICT), |b| check_jwks(&b))),
    },
    Target {
        name: "infisical_bus_messages",
        run: |r| report(r.run(&mutated(BUS_SEEDS, BUS_DICT), |b| check_bus_message(&b))),
    },
    Target {
        name: "infisical_webhooks",
        run: |r| {
            report(r.run(
                &(
                    mutated(WEBHOOK_SEEDS, BUS_DICT),
                    mutated(SIGNATURE_SEEDS, SIGNATURE_DICT),
                ),
                |(b, h)| check_webhook(&b, &h),
            ))
        },
    },
    Target {
        name: "remembered_positions",
        run: |r| {
            report(r.run(&mutated(POSITION_SEEDS, POSITION_DICT), |b| {
                check_positions(&b)
            }))
        },
    },
    Target {
        name: "nats_subjects",
        run: |r| report(r.run(&subject_input(), |s| check_subject(&s))),
    },
    Target {
        name: "nats_messages",
        run: |r| report(r.run(&nats_message_input(), |m| check_nats_message(&m))),
    },
    Target {
        name: "stream_sequences",
        run: |r| {
            report(r.run(&proptest::collection::vec(any::<u64>(), 0..64), |v| {
                check_sequences(&v)
            }))
        },
    },
];

fn report<T: std::fmt::Debug>(
    r: Result<(), proptest::test_runner::TestError<T>>,
) -> Result<(), String> {
    r.map_err(|e| e.to_string())
}

/// A runner for `cases` cases from `seed` (printed on failure by the callers).
pub fn runner(cases: u32, seed: u64) -> TestRunner {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2_000,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
}

fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(msg)
}

// ---------------------------------------------------------------------------
// Mutation: seeds edited byte by byte, with tokens from a dictionary.

#[derive(Clone, Debug)]
pub enum Edit {
    Set(usize, u8),
    Insert(usize, usize),
    Delete(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(i, t)| Edit::Insert(i, t)),
        (any::<usize>(), 1usize..16).prop_map(|(i, n)| Edit::Delete(i, n)),
        (any::<usize>(), 1usize..32).prop_map(|(i, n)| Edit::Duplicate(i, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn byte_edits() -> impl Strategy<Value = Vec<Edit>> {
    proptest::collection::vec(edit(), 1..4)
}

fn apply(seed: &[u8], edits: &[Edit], dict: &[&[u8]]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for e in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match *e {
            Edit::Set(i, v) if !b.is_empty() => {
                let i = i % b.len();
                b[i] = v;
            }
            Edit::Set(..) => b.push(0),
            Edit::Insert(i, t) => {
                let i = at(i, b.len());
                let tok = dict[t % dict.len()];
                b.splice(i..i, tok.iter().copied());
            }
            Edit::Delete(i, n) => {
                let i = at(i, b.len()).min(b.len());
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Edit::Duplicate(i, n) => {
                let i = at(i, b.len()).min(b.len());
                let end = (i + n).min(b.len());
                let piece = b[i..end].to_vec();
                b.splice(end..end, piece);
            }
            Edit::Truncate(i) => {
                let i = at(i, b.len());
                b.truncate(i);
            }
        }
    }
    b
}

/// A seed with up to a few edits (sometimes none: the seeds themselves).
fn mutated(
    seeds: &'static [&'static [u8]],
    dict: &'static [&'static [u8]],
) -> impl Strategy<Value = Vec<u8>> {
    (0..seeds.len(), proptest::collection::vec(edit(), 0..6))
        .prop_map(move |(s, edits)| apply(seeds[s], &edits, dict))
}

// ---------------------------------------------------------------------------
// HTTP/1 heads: the direct reader against hyper, as herald configures it.

const SUB: &str = "/api/v1/events/subscribe/project-events";

const HTTP_SEEDS: &[&[u8]] = &[
    b"POST /api/v1/events/subscribe/project-events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /api/v1/events/subscribe/project-events HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n",
    b"GET /api/v1/events/subscribe/project-events?projectId=p&event=secret:created HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n",
    b"GET /api/v1/events/subscribe/project-events HTTP/1.0\r\n\r\n",
    b"POST /api/v1/events/subscribe/project-events HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    b"POST /api/v1/events/subscribe/project-events HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"GET /api/v1/events/subscribe/project-events HTTP/1.1\r\nHost: x\r\nX-A: b\r\n c\r\n\r\n",
    b"GET /api/v1/events/subscribe/project-events HTTP/1.1\nHost: x\n\n",
];

const HTTP_DICT: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\r",
    b" ",
    b"\t",
    b":",
    b"\0",
    b"\x7f",
    b"\xff",
    b"\xc3\xa9",
    b"Content-Length: ",
    b"Content-Length: 3\r\n",
    b"Content-Length: +3\r\n",
    b"Content-Length: 3, 3\r\n",
    b"Content-Length: 03\r\n",
    b"Content-Length: 99999999999999999999\r\n",
    b"Content-Length:\r\n",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Host: x\r\n",
    b"Host: \r\n",
    b"Host: y\r\n",
    b"\r\n x",
    b"Expect: 100-continue\r\n",
    b"Upgrade: h2c\r\n",
    b"Connection: close\r\n",
    b"HTTP/1.0",
    b"HTTP/1.1",
    b"HTTP/2.0",
    b"HTTP/1.1 ",
    b"?a=b",
    b"%00",
    b"#frag",
    b"http://x",
    b"GET ",
    b"POST ",
    b"0",
    b"9",
];

/// Header lines, well formed and not: the cases RFC 9112 6.3 and RFC 9110
/// 8.6 name (lengths, signs, lists, both framings, folding, odd bytes).
const HEADER_LINES: &[&[u8]] = &[
    b"Host: x",
    b"Host: y",
    b"Host:",
    b"Content-Type: application/json",
    b"Content-Length: 3",
    b"Content-Length: 0",
    b"Content-Length: +3",
    b"Content-Length: -3",
    b"Content-Length: 3, 3",
    b"Content-Length: 3,3",
    b"Content-Length: 03",
    b"Content-Length:  3 ",
    b"Content-Length: 3\t",
    b"Content-Length: 0x3",
    b"Content-Length: 3 3",
    b"Content-Length: 99999999999999999999",
    b"Content-Length:",
    b"Content-Length : 3",
    b"content-length: 3",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding : chunked",
    b" Host: x",
    b"\tX-A: b",
    b"X-A: b\r\n c",
    b"Expect: 100-continue",
    b"Upgrade: h2c",
    b"Connection: close",
    b"Connection: keep-alive, Upgrade",
    b"X-Bin: \x01",
    b"X-Hi: \xff\xfe",
    b"X-Nul: a\x00b",
    b"X-Empty:",
    b"Authorization: Bearer t",
    b"Last-Event-ID: 5",
    b"Bad Header: x",
    b": x",
    b"X-A",
];

/// A head built from parts (with the seeds and their edits beside it).
fn http_input() -> impl Strategy<Value = Vec<u8>> {
    let line_end = || prop_oneof![16 => Just("\r\n"), 1 => Just("\n"), 1 => Just("\r")];
    let built = (
        prop_oneof![4 => Just("GET"), 8 => Just("POST"), 1 => Just("PUT"), 1 => Just("get"), 1 => Just("POST  ")],
        prop_oneof![
            4 => Just(SUB.to_owned()),
            2 => Just(format!("{SUB}?projectId=p&event=secret:created")),
            1 => Just(format!("http://x{SUB}")),
            1 => Just("/".to_owned()),
            1 => "[ -~]{0,6}".prop_map(|s| format!("{SUB}{s}")),
        ],
        prop_oneof![8 => Just("HTTP/1.1"), 3 => Just("HTTP/1.0"), 1 => Just("HTTP/1.2"), 1 => Just("http/1.1")],
        proptest::collection::vec((0..HEADER_LINES.len(), line_end()), 0..4),
        line_end(),
        prop_oneof![
            Just(b"abc".to_vec()),
            Just(Vec::new()),
            Just(b"3\r\nabc\r\n0\r\n\r\n".to_vec()),
            proptest::collection::vec(any::<u8>(), 0..8),
        ],
    )
        .prop_map(|(m, target, version, headers, eol, body)| {
            let mut b = format!("{m} {target} {version}\r\n").into_bytes();
            for (h, end) in headers {
                b.extend_from_slice(HEADER_LINES[h]);
                b.extend_from_slice(end.as_bytes());
            }
            b.extend_from_slice(eol.as_bytes());
            b.extend_from_slice(&body);
            b
        });
    prop_oneof![1 => mutated(HTTP_SEEDS, HTTP_DICT), 3 => built]
}

/// What hyper made of the first request on a connection that sent `bytes`.
#[derive(Debug)]
struct Served {
    parts: http::request::Parts,
    body: Option<Bytes>,
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
}

fn hyper_serves(bytes: &[u8]) -> Option<Served> {
    RUNTIME.with(|rt| rt.block_on(hyper_first_request(bytes)))
}

async fn hyper_first_request(bytes: &[u8]) -> Option<Served> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let seen: Arc<Mutex<Option<Served>>> = Arc::default();
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let record = seen.clone();
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.ok().map(|c| c.to_bytes());
            let mut slot = record.lock().unwrap();
            if slot.is_none() {
                *slot = Some(Served { parts, body });
            }
            Ok::<_, std::convert::Infallible>(http::Response::new(
                http_body_util::Empty::<Bytes>::new(),
            ))
        }
    });
    let opts = herald::http::ServeOptions {
        header_read_timeout: Duration::from_secs(5),
        body_read_timeout: Duration::from_secs(5),
        max_body_bytes: 1 << 16,
    };
    let conn = tokio::spawn(async move {
        let mut builder = herald::http::connection_builder(&opts);
        // The reference reads a request that ends with the client's sending
        // side (herald's listener does not: a client that half-closes is gone).
        builder.http1().half_close(true);
        let _ = builder
            .serve_connection(hyper_util::rt::TokioIo::new(server), service)
            .await;
    });
    let _ = client.write_all(bytes).await;
    let _ = client.shutdown().await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut sink)).await;
    conn.abort();
    let _ = conn.await;
    let out = seen.lock().unwrap().take();
    out
}

/// Whatever the direct reader serves itself, hyper serves the same way: the
/// same method, target, version and headers, and the same body.
pub fn check_http1_head(bytes: &[u8]) -> Result<(), TestCaseError> {
    let Probe::Serve(parts, head_len, declared) = probe_head(bytes) else {
        return Ok(()); // hyper decides, and answers for itself
    };
    let available = bytes.len().saturating_sub(head_len) as u64;
    let hyper = hyper_serves(bytes);
    let Some(h) = hyper else {
        return Err(fail(format!(
            "the direct reader serves a request hyper refuses: {:?}",
            String::from_utf8_lossy(bytes)
        )));
    };
    let same = parts.method == h.parts.method
        && parts.uri == h.parts.uri
        && parts.version == h.parts.version
        && parts.headers == h.parts.headers;
    if !same {
        return Err(fail(format!(
            "the two readers disagree on {:?}: direct {:?}, hyper {:?}",
            String::from_utf8_lossy(bytes),
            parts,
            h.parts
        )));
    }
    if available >= declared {
        let want = &bytes[head_len..head_len + declared as usize];
        if h.body.as_deref() != Some(want) {
            return Err(fail(format!(
                "the two readers disagree on the body of {:?}: direct {want:?}, hyper {:?}",
                String::from_utf8_lossy(bytes),
                h.body
            )));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Event envelopes (the publish API and every NATS message).

const ENVELOPE_SEEDS: &[&[u8]] = &[
    br#"{"specversion":"1.0","source":"/s","type":"secret:created","projectid":"p1","environment":"prod","secretpath":"/apps/db","data":{"secretKeys":["K"]}}"#,
    br#"{"specversion":"1.0","id":"e-1","source":"/s","type":"secret:update","projectid":"p1","environment":"prod","secretpath":"/","time":"2026-01-01T00:00:00Z","datacontenttype":"application/json","ext1":"x","n":1,"b":true}"#,
];

const JSON_DICT: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\\u0000",
    b"\\ud800",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"1e999",
    b"-1",
    b"18446744073709551616",
    b"0.5",
    b"\"/..\"",
    b"\"/a//b\"",
    b"\"**\"",
    b"\xff",
    b"\xc3\xa9",
    b"\"role:admin\"",
];

/// Any JSON value, small.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::from),
        "[/a*.]{0,10}".prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 8, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An attribute value that is often right and sometimes wrong.
fn attribute(good: &'static [&'static str]) -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        4 => proptest::sample::select(good).prop_map(|s| Some(Value::from(s))),
        1 => Just(None),
        2 => json_value().prop_map(Some),
    ]
}

fn envelope_input() -> impl Strategy<Value = Value> {
    (
        (
            attribute(&["1.0"]),
            attribute(&["e-1", "x"]),
            attribute(&["/s", "urn:x"]),
            attribute(&["secret:created", "secret:delete", "secret:import-mutation"]),
            attribute(&["p1", "p-2_x"]),
        ),
        (
            attribute(&["prod", "dev"]),
            attribute(&["/", "/apps/db", "/a/*/b"]),
            attribute(&["2026-01-01T00:00:00Z", "2026-01-01T00:00:00.5+01:00"]),
            attribute(&["application/json"]),
            prop_oneof![Just(None), json_value().prop_map(Some)],
        ),
        proptest::collection::btree_map("[a-zA-Z0-9_]{0,22}", json_value(), 0..3),
    )
        .prop_map(
            |((spec, id, source, ty, project), (env, path, time, dct, data), ext)| {
                let mut m = serde_json::Map::new();
                for (k, v) in [
                    ("specversion", spec),
                    ("id", id),
                    ("source", source),
                    ("type", ty),
                    ("projectid", project),
                    ("environment", env),
                    ("secretpath", path),
                    ("time", time),
                    ("datacontenttype", dct),
                    ("data", data),
                ] {
                    if let Some(v) = v {
                        m.insert(k.to_owned(), v);
                    }
                }
                for (k, v) in ext {
                    m.insert(k, v);
                }
                Value::Object(m)
            },
        )
}

const MAX_EVENT: usize = 64 * 1024;

/// An accepted event is canonical: one line of JSON, within the limit, its
/// attributes valid, and accepted again unchanged.
pub fn check_envelope(v: &Value) -> Result<(), TestCaseError> {
    let Ok(ev) = Event::from_json(v.clone(), MAX_EVENT) else {
        return Ok(());
    };
    if ev.json.len() > MAX_EVENT || ev.json.contains(['\n', '\r']) {
        return Err(fail(format!("not one line within the limit: {}", ev.json)));
    }
    let back: Value = serde_json::from_str(&ev.json).map_err(|e| fail(e.to_string()))?;
    let again = Event::from_json(back.clone(), MAX_EVENT)
        .map_err(|e| fail(format!("the canonical form is refused ({e}): {}", ev.json)))?;
    if again.json != ev.json || again.key != ev.key || again.id != ev.id {
        return Err(fail(format!(
            "not a fixed point: {} vs {}",
            ev.json, again.json
        )));
    }
    let attr = |k: &str| {
        back.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let consistent = attr("specversion") == "1.0"
        && attr("type") == ev.key.event_type.name()
        && attr("projectid") == ev.key.project.as_str()
        && attr("environment") == ev.key.env.as_str()
        && attr("secretpath") == ev.key.path.as_str();
    if !consistent {
        return Err(fail(format!(
            "attributes disagree with the key: {}",
            ev.json
        )));
    }
    Ok(())
}

pub fn check_envelope_bytes(b: &[u8]) -> Result<(), TestCaseError> {
    match serde_json::from_slice::<Value>(b) {
        Ok(v) => check_envelope(&v),
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Secret paths and patterns.

fn path_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[/a*. é\u{7f}\n]{0,40}",
        "(/[a*.]{1,3}){0,34}",
        (1usize..40, 1usize..40).prop_map(|(n, len)| format!("/{}", "a".repeat(len)).repeat(n)),
        Just(format!("/{}", "a".repeat(MAX_PATH_LEN - 1))),
        Just(format!("/{}", "a".repeat(MAX_PATH_LEN))),
        Just("/a".repeat(MAX_SEGMENTS)),
        Just("/a".repeat(MAX_SEGMENTS + 1)),
    ]
}

/// What parses is within the bounds, and parses again to itself.
pub fn check_path(s: &str) -> Result<(), TestCaseError> {
    if let Ok(p) = SecretPath::parse(s) {
        let ok = p.as_str() == s
            && s.len() <= MAX_PATH_LEN
            && p.segments().count() <= MAX_SEGMENTS
            && p.segments()
                .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
            && !s.chars().any(char::is_control);
        if !ok {
            return Err(fail(format!("accepted a path out of bounds: {s:?}")));
        }
    }
    for (how, parsed) in [
        ("exact", PathPattern::parse_exact(s)),
        ("subscription", PathPattern::parse_subscription(s)),
    ] {
        let Ok(p) = parsed else { continue };
        let again = PathPattern::parse_rendered(p.as_str()).map_err(|e| {
            fail(format!(
                "{how} pattern {s:?} renders {:?}, refused: {e}",
                p.as_str()
            ))
        })?;
        if again != p {
            return Err(fail(format!("{how} pattern {s:?} is not a fixed point")));
        }
    }
    Ok(())
}

fn small_pattern() -> impl Strategy<Value = String> {
    proptest::collection::vec(
        prop_oneof![Just("*".to_owned()), Just("**".to_owned()), "[ab*]{1,3}"],
        0..5,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

fn small_path() -> impl Strategy<Value = String> {
    proptest::collection::vec("[ab]{1,3}", 0..6).prop_map(|segs| format!("/{}", segs.join("/")))
}

/// The naive reference: every way of splitting tried.
fn seq_reference(pat: &[Seg], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        Some((Seg::AnyDeep, rest)) => (0..=path.len()).any(|i| seq_reference(rest, &path[i..])),
        Some((seg, rest)) => {
            let Some((first, tail)) = path.split_first() else {
                return false;
            };
            let one = match seg {
                Seg::Lit(l) => &**l == *first,
                Seg::Any => true,
                Seg::Glob(g) => glob_reference(g.as_bytes(), first.as_bytes()),
                Seg::AnyDeep => unreachable!(),
            };
            one && seq_reference(rest, tail)
        }
    }
}

fn glob_reference(g: &[u8], t: &[u8]) -> bool {
    match g.split_first() {
        None => t.is_empty(),
        Some((b'*', rest)) => (0..=t.len()).any(|i| glob_reference(rest, &t[i..])),
        Some((c, rest)) => t.first() == Some(c) && glob_reference(rest, &t[1..]),
    }
}

/// Matching agrees with the reference; `covers` is never wrong when it says
/// yes, and `overlaps` never misses a path both match.
pub fn check_matching(pattern: &str, path: &str) -> Result<(), TestCaseError> {
    let (Ok(p), Ok(t)) = (PathPattern::parse_exact(pattern), SecretPath::parse(path)) else {
        return Ok(());
    };
    let segs: Vec<&str> = t.segments().collect();
    let want = seq_reference(p.segs(), &segs);
    if p.matches(&t) != want {
        return Err(fail(format!("{pattern} on {path}: matcher says {}", !want)));
    }
    // `path` read as a pattern of its own (its folder and below).
    let folder = PathPattern::parse_subscription(path)
        .map_err(|e| fail(format!("{path} as a subscription: {e}")))?;
    if p.covers(&folder) && !p.matches(&t) {
        return Err(fail(format!("{pattern} covers {folder:?} but not {path}")));
    }
    if p.matches(&t) && !(p.overlaps(&folder) && folder.overlaps(&p)) {
        return Err(fail(format!(
            "{pattern} and {folder:?} both match {path}; no overlap seen"
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Identifiers.

fn ident_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_\\- .:,é\t\n]{0,12}",
        "(role|roles|Role|ROLE)[:_/\\-a-z]{0,6}",
        (0usize..300).prop_map(|n| "a".repeat(n)),
        "\\PC{0,16}",
    ]
}

pub fn check_identifiers(s: &str) -> Result<(), TestCaseError> {
    let shape = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ProjectId::parse(s).is_ok() != shape || EnvSlug::parse(s).is_ok() != shape {
        return Err(fail(format!(
            "identifier verdict on {s:?} is not the documented shape"
        )));
    }
    if let Ok(p) = Principal::parse(s) {
        let ok = !looks_like_role(s)
            && p.as_str() == s
            && !s
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == ',');
        if !ok {
            return Err(fail(format!("accepted identity {s:?}")));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Subscribe requests: JSON bodies and query strings.

const SUBSCRIBE_SEEDS: &[&[u8]] = &[
    br#"{"projectId":"p1","register":[{"event":"secret:created","conditions":{"environmentSlug":"prod","secretPath":"/apps/**"}}]}"#,
    br#"{"projectId":"p1","register":[{"event":"secret:update"},{"event":"secret:delete","conditions":{"secretPath":"/a/db-*"}},{"event":"secret:created","conditions":null}]}"#,
];

const LIMITS: SubscribeLimits = SubscribeLimits {
    max_registrations: 10,
    max_registration_bytes: 4096,
};

fn registration() -> impl Strategy<Value = Value> {
    (
        attribute(&["secret:created", "secret:update", "secret:import-mutation"]),
        prop_oneof![
            Just(None),
            (
                attribute(&["prod", "*"]),
                attribute(&["/", "/apps", "/a/**/b", "/a/*-x"]),
            )
                .prop_map(|(e, p)| {
                    let mut m = serde_json::Map::new();
                    if let Some(e) = e {
                        m.insert("environmentSlug".into(), e);
                    }
                    if let Some(p) = p {
                        m.insert("secretPath".into(), p);
                    }
                    Some(Value::Object(m))
                }),
            json_value().prop_map(Some),
        ],
    )
        .prop_map(|(event, conditions)| {
            let mut m = serde_json::Map::new();
            if let Some(e) = event {
                m.insert("event".into(), e);
            }
            if let Some(c) = conditions {
                m.insert("conditions".into(), c);
            }
            Value::Object(m)
        })
}

fn subscribe_input() -> impl Strategy<Value = Value> {
    (
        attribute(&["p1", "x_y-z"]),
        prop_oneof![
            4 => proptest::collection::vec(registration(), 0..13).prop_map(|r| Some(Value::from(r))),
            1 => json_value().prop_map(Some),
            1 => Just(None),
        ],
        proptest::option::of(("[a-zA-Z]{1,10}", json_value())),
    )
        .prop_map(|(project, register, extra)| {
            let mut m = serde_json::Map::new();
            if let Some(p) = project {
                m.insert("projectId".into(), p);
            }
            if let Some(r) = register {
                m.insert("register".into(), r);
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
}

/// An accepted request is within its limits, without repeats, and every
/// pattern in it is one herald can read back.
fn check_request(r: &SubscribeRequest) -> Result<(), TestCaseError> {
    let n = r.interests.len();
    if n == 0 || n > LIMITS.max_registrations {
        return Err(fail(format!("{n} registrations accepted")));
    }
    for (i, a) in r.interests.iter().enumerate() {
        if r.interests[..i].contains(a) {
            return Err(fail(format!("a repeated registration: {a:?}")));
        }
        if PathPattern::parse_rendered(a.path.as_str()).as_ref() != Ok(&a.path) {
            return Err(fail(format!(
                "pattern {:?} does not read back",
                a.path.as_str()
            )));
        }
    }
    let mut distinct: Vec<&str> = r.interests.iter().map(|i| i.path.as_str()).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let bytes: usize = distinct.iter().map(|p| p.len()).sum();
    if bytes > LIMITS.max_registration_bytes {
        return Err(fail(format!("{bytes} pattern bytes accepted")));
    }
    Ok(())
}

/// ... and an accepted body has the documented shape: objects, never a
/// struct spelled as an array.
pub fn check_subscribe_body(v: &Value) -> Result<(), TestCaseError> {
    check_subscribe_bytes(v.to_string().as_bytes())?;
    if SubscribeRequest::from_json(v.to_string().as_bytes(), PathSemantics::Exact, LIMITS).is_ok() {
        let registrations = v.get("register").and_then(Value::as_array);
        let shaped = v.is_object()
            && registrations.is_some_and(|r| {
                r.iter().all(|r| {
                    r.is_object()
                        && r.get("conditions")
                            .is_none_or(|c| c.is_object() || c.is_null())
                })
            });
        if !shaped {
            return Err(fail(format!("accepted a body of another shape: {v}")));
        }
    }
    Ok(())
}

pub fn check_subscribe_bytes(b: &[u8]) -> Result<(), TestCaseError> {
    for semantics in [PathSemantics::FolderAndBelow, PathSemantics::Exact] {
        match SubscribeRequest::from_json(b, semantics, LIMITS) {
            Ok(r) => check_request(&r)?,
            Err(e) if e.field.is_empty() => {
                return Err(fail(format!("a refusal that names no field: {e}")))
            }
            Err(_) => {}
        }
    }
    Ok(())
}

fn query_input() -> impl Strategy<Value = Vec<(String, String)>> {
    let key = prop_oneof![
        Just("projectId".to_owned()),
        Just("event".to_owned()),
        Just("register".to_owned()),
        Just("environmentSlug".to_owned()),
        Just("secretPath".to_owned()),
        Just("lastEventId".to_owned()),
        "[a-zA-Z]{0,6}",
    ];
    let value = prop_oneof![
        Just("p1".to_owned()),
        Just("secret:created".to_owned()),
        Just("/apps".to_owned()),
        registration().prop_map(|v| v.to_string()),
        proptest::collection::vec(registration(), 0..12).prop_map(|v| Value::from(v).to_string()),
        "\\PC{0,12}",
    ];
    proptest::collection::vec((key, value), 0..14)
}

pub fn check_subscribe_query(q: &[(String, String)]) -> Result<(), TestCaseError> {
    match SubscribeRequest::from_query(q, PathSemantics::FolderAndBelow, LIMITS) {
        Ok(r) => check_request(&r),
        Err(e) if e.field.is_empty() => Err(fail(format!("a refusal that names no field: {e}"))),
        Err(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------
// Tokens.

const NOW: u64 = 1_800_000_000;

fn numeric() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        3 => (NOW - 100..NOW + 100).prop_map(|n| Some(Value::from(n))),
        1 => Just(None),
        1 => Just(Some(Value::from(u64::MAX))),
        1 => Just(Some(json!(NOW as f64 + 0.5))),
        1 => Just(Some(Value::from((NOW + 50).to_string()))),
        1 => Just(Some(Value::from(-1))),
        1 => json_value().prop_map(Some),
    ]
}

fn claims_input() -> impl Strategy<Value = Value> {
    (
        (numeric(), numeric(), numeric()),
        attribute(&["alice", "role:admin", "Roles", "a b", ""]),
        prop_oneof![
            attribute(&["aud"]),
            Just(Some(json!(["x", "aud"]))),
            Just(Some(json!([1, "aud"]))),
        ],
        prop_oneof![attribute(&["iss"]), Just(Some(json!(["iss"])))],
    )
        .prop_map(|((exp, nbf, iat), sub, aud, iss)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("exp", exp),
                ("nbf", nbf),
                ("iat", iat),
                ("sub", sub),
                ("aud", aud),
                ("iss", iss),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

const RULES_LEEWAY: u64 = 5;

/// An accepted token's claims have RFC 7519's types and the configured values.
fn claims_hold(v: &Value, now: u64) -> Result<(), String> {
    let int = |k: &str| v.get(k).map(|x| x.as_u64());
    let exp = int("exp").flatten().ok_or("exp is not an integer")?;
    if exp.saturating_add(RULES_LEEWAY) <= now {
        return Err("expired".into());
    }
    for k in ["nbf", "iat"] {
        match int(k) {
            None => {}
            Some(Some(t)) if t <= now + RULES_LEEWAY => {}
            Some(_) => return Err(format!("{k} is wrong")),
        }
    }
    if v.get("iss") != Some(&json!("iss")) {
        return Err("iss is not the issuer".into());
    }
    let aud_ok = match v.get("aud") {
        Some(Value::String(a)) => a == "aud",
        Some(Value::Array(a)) => a.iter().all(Value::is_string) && a.contains(&json!("aud")),
        _ => false,
    };
    if !aud_ok {
        return Err("aud is wrong".into());
    }
    let sub = v
        .get("sub")
        .and_then(Value::as_str)
        .ok_or("sub is not a string")?;
    if Principal::parse(sub).is_err() {
        return Err("sub is not an identity".into());
    }
    Ok(())
}

pub fn check_claims(v: &Value) -> Result<(), TestCaseError> {
    let rules = ClaimRules {
        issuer: Some("iss".into()),
        audience: Some("aud".into()),
        leeway: RULES_LEEWAY,
        ..ClaimRules::default()
    };
    if rules.check(v, NOW).is_ok() {
        claims_hold(v, NOW).map_err(|e| fail(format!("accepted {v}: {e}")))?;
    }
    Ok(())
}

const TOKEN_SECRET: &str = "fuzz-secret-that-is-at-least-32-bytes-long";

thread_local! {
    static VERIFIER: Verifier = Verifier::from_config(&AuthConfig {
        hs_secret: Some(Secret::new(TOKEN_SECRET)),
        issuer: Some("iss".into()),
        audience: Some("aud".into()),
        leeway: Duration::from_secs(RULES_LEEWAY),
        ..AuthConfig::default()
    })
    .expect("a verifier");
}

/// A signed token, then edited: the intact token is judged by its claims;
/// an edited one is refused, or verifies to the intact token's identity.
pub fn check_signed_token(claims: &Value, edits: &[Edit]) -> Result<(), TestCaseError> {
    let now = herald::auth::unix_now();
    // Times relative to now: the generator's are around NOW.
    let mut claims = claims.clone();
    for k in ["exp", "nbf", "iat"] {
        if let Some(n) = claims.get(k).and_then(Value::as_u64) {
            if (NOW - 100..NOW + 100).contains(&n) {
                claims[k] = Value::from(now + 100 + n - NOW - 100);
            }
        }
    }
    let key = jsonwebtoken::EncodingKey::from_secret(TOKEN_SECRET.as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &key,
    )
    .map_err(|e| fail(e.to_string()))?;
    let intact = VERIFIER.with(|v| {
        futures_util::FutureExt::now_or_never(v.verify(&token)).expect("configured keys never wait")
    });
    if intact.is_ok() {
        claims_hold(&claims, herald::auth::unix_now())
            .map_err(|e| fail(format!("accepted {claims}: {e}")))?;
    }
    let edited = apply(
        token.as_bytes(),
        edits,
        &[b".", b"=", b"A", b"_", b"-", b"e30"],
    );
    let Ok(edited) = String::from_utf8(edited) else {
        return Ok(());
    };
    if edited == token {
        return Ok(());
    }
    if let Ok(caller) = VERIFIER.with(|v| {
        futures_util::FutureExt::now_or_never(v.verify(&edited))
            .expect("configured keys never wait")
    }) {
        match &intact {
            Ok(i) if i.identity == caller.identity && i.expires_at == caller.expires_at => {}
            _ => {
                return Err(fail(format!(
                    "an edited token verifies to {:?}: {edited}",
                    caller.identity
                )))
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// NATS subjects: what a producer outside herald may publish on.

fn subject_input() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        Just("p1".to_owned()),
        Just("prod".to_owned()),
        Just("secret:created".to_owned()),
        Just("~".to_owned()),
        Just("%2E".to_owned()),
        Just("%7E".to_owned()),
        Just("%".to_owned()),
        Just("%zz".to_owned()),
        Just("%C3%A9".to_owned()),
        Just("%FF".to_owned()),
        Just("%2F".to_owned()),
        Just("".to_owned()),
        "[a-z*>%0-9A-F]{1,4}",
        "\\PC{1,3}",
    ];
    let kinds: &'static [&'static str] = &["herald.ev", "herald.rp", "herald", "x.ev"];
    (
        proptest::sample::select(kinds),
        proptest::collection::vec(token, 0..8),
    )
        .prop_map(|(k, toks)| {
            let mut s = k.to_owned();
            for t in toks {
                s.push('.');
                s.push_str(&t);
            }
            s
        })
}

/// A subject that decodes is the one the encoder makes for its key: there
/// is one spelling of every event's subject, and nothing else decodes.
pub fn check_subject(s: &str) -> Result<(), TestCaseError> {
    for kind in [Kind::Events, Kind::Republished] {
        let Some(key) = decode_subject("herald", kind, s) else {
            continue;
        };
        let canonical = event_subject("herald", &key);
        let expected = match kind {
            Kind::Events => canonical,
            Kind::Republished => canonical.replacen("herald.ev.", "herald.rp.", 1),
        };
        if expected != s {
            return Err(fail(format!(
                "{s:?} decodes to {key}, which encodes as {expected:?}"
            )));
        }
    }
    Ok(())
}

/// A message as NATS delivers it: a subject (valid, then mutated), and a
/// payload (a valid envelope that agrees with it, then mutated).
fn nats_message_input() -> impl Strategy<Value = (Vec<u8>, Vec<u8>)> {
    let subjects: &'static [&'static [u8]] = &[
        b"herald.ev.p1.prod.secret:created.apps.db.~",
        b"herald.ev.p1.prod.secret:created.~",
        b"herald.rp.p1.prod.secret:updated.a.%2E.~",
    ];
    let dict: &'static [&'static [u8]] = &[
        b".",
        b"~",
        b"%",
        b"%2E",
        b"%FF",
        b"\xff",
        b"\0",
        b"*",
        b">",
        b"p1",
        b"secret:deleted",
    ];
    (mutated(subjects, dict), mutated(ENVELOPE_SEEDS, JSON_DICT))
}

/// Whatever decodes is an event whose subject is the one herald would
/// publish it on; nothing panics, whatever the bytes.
pub fn check_nats_message((subject, payload): &(Vec<u8>, Vec<u8>)) -> Result<(), TestCaseError> {
    use herald::bus::nats::decode_message;
    // The client library refuses a subject that is not UTF-8 before herald
    // sees it; herald sees every other byte string.
    let Ok(subject) = std::str::from_utf8(subject) else {
        return Ok(());
    };
    for kind in [Kind::Events, Kind::Republished] {
        if let Ok(ev) = decode_message("herald", kind, subject, payload, MAX_EVENT) {
            let canonical = event_subject("herald", &ev.key);
            let expected = match kind {
                Kind::Events => canonical,
                Kind::Republished => canonical.replacen("herald.ev.", "herald.rp.", 1),
            };
            if expected != subject {
                return Err(fail(format!(
                    "{subject:?} accepted for an event of {expected:?}"
                )));
            }
            check_envelope(&serde_json::from_str(&ev.json).map_err(|e| fail(e.to_string()))?)?;
        }
    }
    Ok(())
}

/// A subscription's sequence guard admits a strictly increasing sequence
/// and nothing that repeats or goes back (within its re-anchoring window).
pub fn check_sequences(seqs: &[u64]) -> Result<(), TestCaseError> {
    let mut guard = herald::bus::nats::SequenceGuard::default();
    let mut last = 0u64;
    for &s in seqs {
        let admitted = guard.admit(s).is_ok();
        if admitted != (s > last) {
            return Err(fail(format!("{s} after {last}: admitted {admitted}")));
        }
        if admitted {
            last = s;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Key sets, as a provider (or whoever answers in its place) serves them.

const JWKS_SEEDS: &[&[u8]] = &[
    br#"{"keys":[{"kty":"RSA","kid":"r1","use":"sig","alg":"RS256","n":"1KJdOc-wdrkHz2-lMJlCcTu1p2ta6ZtdnLndxg5a71PbenBFEMQMRGQ4-ttYm1zca6PFkZ1Fqlb-oF3KlIdbTE30Ux4M7mrbaGdnd2p-xvkXIDiSzkY1i8sJqzvRFfSzv92hoyf4Goo85dIWMJlw11_7NFLYfoLa2tQCb_ph7TCCQeWQYVnFhVCWTZHrqn2T2ICcJOhFiWkth6axsTclewvJEEKuyICBWmBN6gHHPpXodzslz2oNpN3ZoYTzhiB7jm0eVnI1YRGVDQ8ov_ILonwI7m71bCM8Ydr-FHTN5rirKG37CJdL_4gIpQ0WNuTMOml8WNtBVEc6hw7g6gscXw","e":"AQAB"},{"kty":"EC","kid":"e1","crv":"P-256","x":"Tt-7zrjJc8P-9Pr893AHxQCtmoVijBc1I8s2xUisjco","y":"L_g-KCeXhaua9Xmw3cQQ9KtxWkdhmcDPfkAcn7n9Gd0"},{"kty":"OKP","kid":"d1","crv":"Ed25519","x":"eth8IynUsceqrV1eSonNn0bd5V4Y0yGt5SEl1WCLCq4","alg":"EdDSA"}]}"#,
    br#"{"keys":[]}"#,
    br#"{"keys":[{"kty":"oct","k":"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}"#,
];

const JWKS_DICT: &[&[u8]] = &[
    b"\"kty\":\"RSA\"",
    b"\"kty\":\"EC\"",
    b"\"kty\":\"OKP\"",
    b"\"kty\":\"oct\"",
    b"\"crv\":\"P-384\"",
    b"\"crv\":\"X25519\"",
    b"\"use\":\"enc\"",
    b"\"alg\":\"HS256\"",
    b"\"alg\":\"none\"",
    b"\"key_ops\":[\"sign\"]",
    b"\"d\":\"AQAB\"",
    b"\"kid\":\"r1\"",
    b"\"n\":\"AQAB\"",
    b"\"e\":\"\"",
    b"\"x\":\"\"",
    b",",
    b"{",
    b"}",
    b"[",
    b"]",
    b"null",
    b"\\u0000",
];

/// A key set never panics herald, never yields more than MAX_KEYS keys,
/// never a symmetric key, and never two keys of one kid and type.
pub fn check_jwks(bytes: &[u8]) -> Result<(), TestCaseError> {
    use herald::auth::keys::{parse_set, MAX_KEYS};
    let Ok(set) = parse_set(bytes) else {
        return Ok(());
    };
    if set.keys.is_empty() || set.keys.len() > MAX_KEYS {
        return Err(fail(format!("{} keys", set.keys.len())));
    }
    for (i, k) in set.keys.iter().enumerate() {
        if k.family == jsonwebtoken::AlgorithmFamily::Hmac {
            return Err(fail("a symmetric key from a set".into()));
        }
        if set.keys[..i]
            .iter()
            .any(|o| o.kid == k.kid && o.family == k.family)
        {
            return Err(fail(format!("kid {:?} twice", k.kid)));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The infisical dialect: whatever a publisher puts in secretKeys and paths,
// every frame reads as Infisical's clients read one.

fn infisical_input() -> impl Strategy<Value = Value> {
    (
        prop_oneof![
            Just("secret:created"),
            Just("secret:updated"),
            Just("secret:deleted"),
            Just("secret:import-mutation")
        ],
        prop_oneof![
            Just("/".to_owned()),
            "(/[a-z\\u{e9}\"\\\\ ]{1,12}){1,6}",
            Just(format!("/{}", "d".repeat(200)))
        ],
        proptest::collection::vec(
            prop_oneof![
                ".{0,12}",
                Just(String::new()),
                Just("K".repeat(1500)),
                Just("\\\"\u{0}\n\r".to_owned())
            ],
            0..150,
        ),
    )
        .prop_map(|(ty, path, keys)| {
            json!({"specversion": "1.0", "id": "e", "source": "/s", "type": ty,
                   "projectid": "p1", "environment": "prod", "secretpath": path,
                   "data": {"secretKeys": keys}})
        })
}

pub fn check_infisical_frames(v: &Value) -> Result<(), TestCaseError> {
    let Ok(ev) = Event::from_json(v.clone(), MAX_EVENT) else {
        return Ok(());
    };
    let bytes = herald::protocol::Dialect::Infisical.encode_event(9, &ev);
    if bytes.len() > MAX_EVENT + 1024 {
        return Err(fail(format!(
            "{} bytes for a {}-byte event",
            bytes.len(),
            ev.json.len()
        )));
    }
    let text = std::str::from_utf8(&bytes).map_err(|e| fail(e.to_string()))?;
    let Some(frame) = text.strip_suffix("\n\n") else {
        return Err(fail(format!("not one frame: {text:?}")));
    };
    let mut data = None;
    for line in frame.split('\n') {
        if line.len() >= 64 * 1024 || line.contains('\r') {
            return Err(fail(format!(
                "a line the clients refuse: {} bytes",
                line.len()
            )));
        }
        match line.split_once(": ") {
            Some(("id", "9")) => {}
            Some(("event", name)) if name == ev.key.event_type.api_name() => {}
            Some(("data", d)) if data.is_none() => data = Some(d),
            _ => return Err(fail(format!("unexpected line {line:?}"))),
        }
    }
    let d: Value = serde_json::from_str(data.unwrap_or_default())
        .map_err(|e| fail(format!("the CLI cannot decode it: {e}")))?;
    let payload = &d["data"]["payload"];
    let items = match payload {
        Value::Array(a) => a.clone(),
        Value::Object(_) => vec![payload.clone()],
        _ => return Err(fail(format!("payload {payload}"))),
    };
    if items.is_empty()
        || items
            .iter()
            .any(|i| i["environment"] != "prod" || i["secretPath"] != ev.key.path.as_str())
    {
        return Err(fail(format!("items {payload}")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Ingest: whatever arrives on Infisical's Redis channel or at the webhook
// receiver is an event herald takes or a reason, never a panic.

const BUS_SEEDS: &[&[u8]] = &[
    br#"{"type":"project-events","timestamp":"2025-01-01T00:00:00.000Z","sourceContainer":"container-a","payload":{"type":"secret:update","environment":"prod","secretPath":"/apps","projectId":"p1","secretKeys":["A","B"]}}"#,
    br#"{"type":"secret.mutation","timestamp":"t","sourceContainer":"c","payload":{"type":"secret:delete","projectId":"p1","environment":"dev","secretPath":"/","secretKey":"K"}}"#,
    br#"{"type":"secret.created","timestamp":"t","sourceContainer":"c","payload":{"projectId":"p1","environment":"dev"}}"#,
    br#"{"type":"secret-manager","source":"x","data":{"event":"secret:update","payload":[{"secretKey":"K","secretPath":"/","environment":"dev"}]}}"#,
];

const BUS_DICT: &[&[u8]] = &[
    b"\"secret:import-mutation\"",
    b"\"secret:create\"",
    b"\"secretKeys\":[]",
    b"\"secretKeys\":[1]",
    b"\"secretPath\":\"a//b\"",
    b"\"projectId\":\"\"",
    b"\"workspaceId\":\"p2\"",
    b"\"timestamp\":1",
    b"\"payload\":null",
    b"\\u0000",
    b"null",
    b",",
    b"{",
    b"}",
    b"[",
    b"]",
];

pub fn check_bus_message(bytes: &[u8]) -> Result<(), TestCaseError> {
    use herald::ingest::redis::decode;
    let Ok(events) = decode(bytes, 256 * 1024, 64 * 1024) else {
        return Ok(());
    };
    if events.len() != 1 {
        return Err(fail(format!("{} events from one message", events.len())));
    }
    let again = decode(bytes, 256 * 1024, 64 * 1024).map_err(|d| fail(format!("{d:?}")))?;
    let stamped = serde_json::from_slice::<Value>(bytes)
        .ok()
        .is_some_and(|v| v["timestamp"].is_string());
    if stamped && again[0].id != events[0].id {
        return Err(fail("one message, two ids".into()));
    }
    if events[0].json.len() > 64 * 1024 {
        return Err(fail("an event over the limit".into()));
    }
    Ok(())
}

const WEBHOOK_SEEDS: &[&[u8]] = &[
    br#"{"event":"secrets.modified","project":{"workspaceId":"p1","projectId":"p1","projectName":"P","environment":"prod","environmentName":"Production","secretPath":"/apps","changedBy":"u","changedByActorType":"user"},"timestamp":1700000000000}"#,
    br#"{"event":"test","project":{"projectId":"p1","environment":"prod"},"timestamp":1700000000000}"#,
    br#"{"event":"secrets.rotation-failed","project":{"projectId":"p1","environment":"prod"},"timestamp":1700000000000}"#,
];

const SIGNATURE_SEEDS: &[&[u8]] = &[
    b"t=1700000000000;0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    b"t=1;",
];

const SIGNATURE_DICT: &[&[u8]] = &[
    b"t=",
    b";",
    b"ff",
    b"-",
    b"99999999999999999999",
    b" ",
    b"\xc3\xa9",
];

pub fn check_webhook(body: &[u8], header: &[u8]) -> Result<(), TestCaseError> {
    use herald::ingest::webhook::{event_of, Signature};
    let sig = Signature::parse(header).unwrap_or(Signature {
        timestamp: 1_700_000_000_000,
        mac: [0; 32],
    });
    match event_of(body, &sig, 64 * 1024) {
        Ok(Some(e)) => {
            let v: Value = serde_json::from_slice(body).map_err(|e| fail(e.to_string()))?;
            if v["timestamp"].as_u64() != Some(sig.timestamp) {
                return Err(fail(
                    "taken with another timestamp than the signed one".into(),
                ));
            }
            if e.key.event_type.name() != "secret:updated" {
                return Err(fail(format!("a webhook became {}", e.key.event_type)));
            }
            Ok(())
        }
        Ok(None) | Err(_) => Ok(()),
    }
}

const POSITION_SEEDS: &[&[u8]] = &[
    b"abc 42 1700000000000\n1 7 1700000000001\n",
    b"",
    b"ffffffffffffffff 18446744073709551615 1\n",
];

const POSITION_DICT: &[&[u8]] = &[
    b" ",
    b"\n",
    b"-",
    b"g",
    b"18446744073709551616",
    b"0",
    b"\t",
];

pub fn check_positions(bytes: &[u8]) -> Result<(), TestCaseError> {
    use herald::remember::{Entries, STREAMS_PER_KEY};
    let e = Entries::decode(bytes);
    if e.len() > STREAMS_PER_KEY {
        return Err(fail(format!("{} positions for one key", e.len())));
    }
    Ok(())
}
