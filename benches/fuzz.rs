//! The long fuzz run: every target of `tests/fuzz/targets.rs` for
//! `FUZZ_SECONDS` each (60 by default), in rounds of 10,000 cases from fresh
//! seeds. Prints cases per second per target, and the seed of any failure
//! (replay it with `FUZZ_SEED=<seed> cargo test --test fuzz <target>`).
//! `FUZZ_TARGET` runs one target.

#[path = "../tests/fuzz/targets.rs"]
mod targets;

use std::time::{Duration, Instant};

fn main() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let only = std::env::var("FUZZ_TARGET").ok();
    let mut failed = false;
    println!(
        "{:<20} {:>10} {:>10} {:>8}",
        "target", "cases", "cases/s", "result"
    );
    for t in targets::TARGETS {
        if only.as_deref().is_some_and(|o| o != t.name) {
            continue;
        }
        let start = Instant::now();
        let mut cases = 0u64;
        let mut result = "ok".to_owned();
        while start.elapsed() < Duration::from_secs(seconds) {
            let seed: u64 = rand::random();
            let round = 10_000;
            let mut runner = targets::runner(round, seed);
            if let Err(e) = (t.run)(&mut runner) {
                eprintln!("{}: FUZZ_SEED={seed}: {e}", t.name);
                result = format!("FAILED (FUZZ_SEED={seed})");
                failed = true;
                break;
            }
            cases += u64::from(round);
        }
        let rate = cases as f64 / start.elapsed().as_secs_f64();
        println!("{:<20} {:>10} {:>10.0} {:>8}", t.name, cases, rate, result);
    }
    if failed {
        std::process::exit(1);
    }
}
