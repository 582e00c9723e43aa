//! Replays the committed corpora of the `node_sequence`,
//! `client_payloads` and `client_direct` fuzz targets through the targets' own bodies (the
//! files under `fuzz/src/` are compiled in here), so `cargo test` runs
//! exactly what the fuzzer runs, checkers included, without a fuzzer.

#[path = "../../fuzz/src/client_payloads.rs"]
mod client_payloads;
#[path = "../../fuzz/src/corpus.rs"]
mod corpus;
#[path = "../../fuzz/src/node_sequence.rs"]
mod node_sequence;

use quicproquo_core::client::Event;

fn dir(target: &str) -> std::path::PathBuf {
    corpus::dir(env!("CARGO_MANIFEST_DIR"), 1, target)
}

#[test]
fn node_sequence_corpus_replays_and_covers_the_machine() {
    let mut total = node_sequence::Stats::default();
    let n = corpus::replay(&dir("node_sequence"), |data| {
        let s = node_sequence::run(data);
        for (m, k) in s.ok {
            *total.ok.entry(m).or_default() += k;
        }
        for (m, k) in s.errors {
            *total.errors.entry(m).or_default() += k;
        }
        total.reopens += s.reopens;
        total.audited += s.audited;
    });
    assert!(n >= 5, "a handful of sequences at least, found {n}");
    // The corpus is only worth replaying if it reaches the interesting
    // paths: every method succeeding and refusing, crashes, and the audit
    // finding acknowledged messages after one.
    for method in [
        "authChallenge",
        "authenticate",
        "uploadKeyPackage",
        "fetchKeyPackage",
        "keyPackageCount",
        "enqueue",
        "fetch",
        "fetchWait",
        "enqueueBatch",
        "fetchWaitChannels",
        "enqueueMany",
    ] {
        assert!(
            total.ok.contains_key(method),
            "no {method} succeeds: {total:?}"
        );
        assert!(
            total.errors.contains_key(method),
            "no {method} is refused: {total:?}"
        );
    }
    assert!(
        total.audited > 0,
        "no acknowledged message audited: {total:?}"
    );
    assert!(
        total.reopens > n as u32,
        "no crash besides the audits: {total:?}"
    );
}

#[test]
fn client_payloads_corpus_replays() {
    let n = corpus::replay(&dir("client_payloads"), |data| {
        client_payloads::run(data);
    });
    assert!(n >= client_payloads::seeds().len());
}

#[test]
fn client_payloads_seeds_show_exactly_what_they_should() {
    let seeds = client_payloads::seeds();
    let named: Vec<(&str, Vec<u8>)> = seeds.iter().map(|(n, b, _, _)| (*n, b.clone())).collect();
    corpus::check_seeds(&dir("client_payloads"), &named);
    for (name, bytes, texts, joins) in seeds {
        let events = client_payloads::run(&bytes);
        let shown: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(shown, texts, "{name}: {events:?}");
        let joined = events.iter().any(|e| matches!(e, Event::Joined { .. }));
        assert_eq!(joined, joins, "{name}: {events:?}");
    }
}

#[test]
fn client_direct_corpus_replays() {
    let n = corpus::replay(&dir("client_direct"), |data| {
        client_payloads::run_direct(data);
    });
    assert!(n >= client_payloads::direct_seeds().len());
}

#[test]
fn client_direct_seeds_show_exactly_what_they_should() {
    let seeds = client_payloads::direct_seeds();
    let named: Vec<(&str, Vec<u8>)> = seeds.iter().map(|(n, b, _)| (*n, b.clone())).collect();
    corpus::check_seeds(&dir("client_direct"), &named);
    for (name, bytes, texts) in seeds {
        let events = client_payloads::run_direct(&bytes);
        let shown: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::Message { text, .. } => Some(text.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(shown, texts, "{name}: {events:?}");
    }
}

/// A mutation sweep of the `client_direct` seeds without a fuzzer: each
/// run flips, inserts, cuts or splices bytes of a seed (a fixed
/// generator, so a failure replays) and runs the target's body.
/// `QPQ_FUZZ_DIRECT_RUNS` sets how many (default 200).
#[test]
fn client_direct_holds_under_mutated_seeds() {
    let runs: u64 = std::env::var("QPQ_FUZZ_DIRECT_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seeds: Vec<Vec<u8>> = client_payloads::direct_seeds()
        .into_iter()
        .map(|(_, b, _)| b)
        .collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for run in 0..runs {
        let mut data = seeds[(next() % seeds.len() as u64) as usize].clone();
        for _ in 0..1 + next() % 4 {
            let at = (next() as usize) % (data.len() + 1);
            match next() % 4 {
                0 if at < data.len() => data[at] ^= 1 << (next() % 8),
                1 => data.insert(at, next() as u8),
                2 => data.truncate(at),
                _ => {
                    let other = &seeds[(next() % seeds.len() as u64) as usize];
                    let from = (next() as usize) % (other.len() + 1);
                    data.splice(at..at, other[from..].iter().copied());
                }
            }
        }
        let result = std::panic::catch_unwind(|| client_payloads::run_direct(&data));
        if let Err(panic) = result {
            eprintln!("mutated run {run} failed on {data:?}");
            std::panic::resume_unwind(panic);
        }
    }
}
