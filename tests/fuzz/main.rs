//! The quick fuzz run (part of `scripts/test`): every target of
//! `targets.rs`, `FUZZ_CASES` cases each (1,000 by default) from a fresh
//! seed each run, printed on failure and taken from `FUZZ_SEED` to replay
//! one. `cargo bench --bench fuzz` runs the same targets for longer.

mod targets;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000)
}

fn seed() -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random)
}

fn run(name: &str) {
    let target = targets::TARGETS
        .iter()
        .find(|t| t.name == name)
        .expect("a target of that name");
    let seed = seed();
    let mut runner = targets::runner(cases(), seed);
    if let Err(e) = (target.run)(&mut runner) {
        panic!("{name} failed (replay with FUZZ_SEED={seed}): {e}");
    }
}

macro_rules! fuzz_tests {
    ($($name:ident),* $(,)?) => {$(
        #[test]
        fn $name() {
            run(stringify!($name));
        }
    )*
        /// Every target has its test here.
        #[test]
        fn every_target_is_run() {
            let here = [$(stringify!($name)),*];
            for t in targets::TARGETS {
                assert!(here.contains(&t.name), "{} has no test", t.name);
            }
        }
    };
}

fuzz_tests!(
    http1_head,
    event_envelope,
    event_bytes,
    paths_and_patterns,
    pattern_matching,
    identifiers,
    subscribe_body,
    subscribe_bytes,
    subscribe_query,
    token_claims,
    signed_tokens,
    jwks_documents,
    infisical_frames,
    infisical_bus_messages,
    infisical_webhooks,
    remembered_positions,
    nats_subjects,
    nats_messages,
    stream_sequences,
);
