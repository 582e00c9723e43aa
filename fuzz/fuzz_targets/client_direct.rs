//! cargo-fuzz entry point; the body is [`quicproquo_fuzz::client_payloads::run_direct`],
//! which `cargo test` also runs over the committed corpus.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    quicproquo_fuzz::client_payloads::run_direct(data);
});
