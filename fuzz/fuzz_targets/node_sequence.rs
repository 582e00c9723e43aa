//! cargo-fuzz entry point; the body is [`quicproquo_fuzz::node_sequence::run`], which
//! `cargo test` also runs over the committed corpus.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    quicproquo_fuzz::node_sequence::run(data);
});
