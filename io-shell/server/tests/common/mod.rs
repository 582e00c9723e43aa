//! Shared by the server's integration tests: identities, and reading a
//! child `qpq-server`'s start lines (the attack and crash tests run the
//! binary; the others start `quicproquo_server::testing::InProcessServer`).

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::process::Child;

use ed25519_dalek::SigningKey;
use quicproquo_client::Client;
use quicproquo_core::types::{ChannelId, IdentityKey};

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

/// Everything in `owner`'s default queue after `after`, by seq, read
/// through `c` (authenticated as `owner`; acknowledging it on the way),
/// requiring consecutive seqs and each sender's messages in the order
/// sent. The payloads are the crash tests' own: a sender byte, then the
/// sender's message number (`u32`, big-endian), then anything.
pub async fn read_numbered_queue(
    c: &Client,
    owner: IdentityKey,
    after: u64,
) -> BTreeMap<u64, Vec<u8>> {
    let mut stored = BTreeMap::new();
    let mut last_per_sender: HashMap<u8, u32> = HashMap::new();
    let mut cursor = after;
    loop {
        let f = c
            .fetch(owner, ChannelId::DEFAULT, cursor, 1_000)
            .await
            .unwrap();
        if f.messages.is_empty() {
            return stored;
        }
        for m in f.messages {
            assert_eq!(m.seq, cursor + 1, "seqs are gap-free");
            cursor = m.seq;
            let s = m.payload[0];
            let i = u32::from_be_bytes(m.payload[1..5].try_into().unwrap());
            if let Some(prev) = last_per_sender.insert(s, i) {
                assert!(i > prev, "sender {s}: message {i} after {prev}");
            }
            stored.insert(m.seq, m.payload);
        }
    }
}
