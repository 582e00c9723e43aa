//! Shared by the server's integration tests: identities, and reading a
//! child `qpq-server`'s start lines (the attack and crash tests run the
//! binary; the others start `quicproquo_server::testing::InProcessServer`).

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::Child;

use ed25519_dalek::SigningKey;
use quicproquo_core::types::IdentityKey;

/// A deterministic identity.
pub fn user(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Its public identity key.
pub fn id(sk: &SigningKey) -> IdentityKey {
    IdentityKey(sk.verifying_key().to_bytes())
}

/// Reads what a child `qpq-server`, started with its stdout piped, prints
/// at start: the address it listens on and its certificate's SHA-256
/// fingerprint in hex. Panics if the server exits first.
pub fn read_start_lines(child: &mut Child) -> (String, String) {
    let stdout = child.stdout.take().expect("stdout piped");
    let mut lines = BufReader::new(stdout).lines();
    let (mut addr, mut fingerprint) = (None, None);
    loop {
        let line = lines.next().expect("server exited early").expect("read");
        if let Some(rest) = line.strip_prefix("qpq-server listening on ") {
            addr = rest.split_whitespace().next().map(str::to_owned);
        }
        if let Some(rest) = line.strip_prefix("certificate SHA-256 fingerprint: ") {
            fingerprint = Some(rest.trim().to_owned());
        }
        if let (Some(addr), Some(fingerprint)) = (&addr, &fingerprint) {
            return (addr.clone(), fingerprint.clone());
        }
    }
}
