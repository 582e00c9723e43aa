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

/// A fresh database on the test PostgreSQL server, as a connection string,
/// or `None` (with a note) if there is no server and none is required.
/// `QPQ_TEST_POSTGRES_URL` names the server (`postgres://user@host:port/db`,
/// a user that may create databases; `.ci/postgres.sh start` makes a
/// throwaway cluster and prints it); `QPQ_POSTGRES_TESTS=require` (set by
/// `.ci/run`) makes its absence a failure.
pub fn postgres_database() -> Option<String> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let Ok(url) = std::env::var("QPQ_TEST_POSTGRES_URL") else {
        if std::env::var("QPQ_POSTGRES_TESTS").as_deref() == Ok("require") {
            panic!("QPQ_POSTGRES_TESTS=require but QPQ_TEST_POSTGRES_URL is not set");
        }
        eprintln!("skipped: no QPQ_TEST_POSTGRES_URL (start one with `.ci/postgres.sh start`)");
        return None;
    };
    let name = format!(
        "qpq_test_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    // One statement each: a multi-statement string is one transaction,
    // where these cannot run.
    postgres_execute(
        &url,
        &[
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
        ],
    );
    // postgres://user@host:port/db -> the same with the new database.
    let base = url.rsplit_once('/').map_or(url.as_str(), |(base, _)| base);
    Some(format!("{base}/{name}"))
}

/// Runs `statements`, one at a time, on the PostgreSQL database at `url`
/// (on a thread of its own: callers may be inside a runtime). Panics on a
/// failure.
pub fn postgres_execute(url: &str, statements: &[String]) {
    let (url, statements) = (url.to_owned(), statements.to_vec());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
            tokio::spawn(connection);
            for sql in &statements {
                client
                    .batch_execute(sql)
                    .await
                    .unwrap_or_else(|e| panic!("{sql}: {e}"));
            }
        });
    })
    .join()
    .unwrap();
}
