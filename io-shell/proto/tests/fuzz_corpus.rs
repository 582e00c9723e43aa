//! Replays the committed corpora of the `request_decoder` and
//! `reply_decoder` fuzz targets through the targets' own bodies (the files
//! under `fuzz/src/` are compiled in here), so `cargo test` runs exactly
//! what the fuzzer runs, without a fuzzer. Also checks that the generated
//! seeds (an encoding of every method, response and error kind, and the
//! hostile messages) are in the corpus and fresh.

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;
#[path = "../../../fuzz/src/hostile.rs"]
mod hostile;
#[path = "../../../fuzz/src/reply_decoder.rs"]
mod reply_decoder;
#[path = "../../../fuzz/src/request_decoder.rs"]
mod request_decoder;

use quicproquo_core::node::{Request, RequestBody};
use quicproquo_proto::{decode_reply, decode_request};

fn dir(target: &str) -> std::path::PathBuf {
    corpus::dir(env!("CARGO_MANIFEST_DIR"), 2, target)
}

#[test]
fn request_decoder_corpus_replays() {
    let n = corpus::replay(&dir("request_decoder"), request_decoder::run);
    assert!(n >= request_decoder::seeds().len());
}

#[test]
fn reply_decoder_corpus_replays() {
    let n = corpus::replay(&dir("reply_decoder"), reply_decoder::run);
    assert!(n >= reply_decoder::seeds().len());
}

#[test]
fn request_seeds_are_in_the_corpus_and_the_valid_ones_decode() {
    let seeds = request_decoder::seeds();
    let named: Vec<(&str, Vec<u8>)> = seeds.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    corpus::check_seeds(&dir("request_decoder"), &named);
    for (name, bytes) in &seeds {
        let decoded = decode_request(bytes);
        if name.starts_with("hostile_deep_chain") {
            // The decoder never recurses: a chain of structs is just a
            // request whose fields are all defaults (authVersion 0, which
            // the server refuses).
            assert_eq!(
                decoded,
                Ok(Request {
                    auth_version: 0,
                    body: RequestBody::AuthChallenge
                }),
                "{name}"
            );
        } else {
            assert_eq!(
                decoded.is_ok(),
                !name.starts_with("hostile_"),
                "{name}: {decoded:?}"
            );
        }
    }
}

#[test]
fn reply_seeds_are_in_the_corpus_and_the_valid_ones_decode() {
    let seeds = reply_decoder::seeds();
    let named: Vec<(&str, Vec<u8>)> = seeds.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    corpus::check_seeds(&dir("reply_decoder"), &named);
    for (name, bytes) in &seeds {
        let decoded = decode_reply(bytes);
        // Two aliases of one blob cost no more than the message itself and
        // are accepted; every other hostile reply is refused.
        let valid = !name.starts_with("hostile_") || name.ends_with("_2");
        assert_eq!(decoded.is_ok(), valid, "{name}: {decoded:?}");
    }
}
