//! Rough durable-enqueue timing against a running qpq-server:
//! `quick_enqueue ADDR FINGERPRINT CLIENTS COUNT` (the load generator in
//! benches/ measures properly; this is a smoke figure).

use std::time::Instant;

use quicproquo_client::{Client, ServerTrust, random_message_id};
use quicproquo_core::types::{ChannelId, IdentityKey};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args[1].clone();
    let trust = ServerTrust::fingerprint_hex(&args[2]).unwrap();
    let clients: usize = args[3].parse().unwrap();
    let count: usize = args[4].parse().unwrap();
    let bob = IdentityKey([9; 32]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.clone();
        let trust = trust.clone();
        tasks.push(tokio::spawn(async move {
            let mut cl = Client::connect(&addr, &trust).await.unwrap();
            cl.authenticate(&ed25519_dalek::SigningKey::from_bytes(&[c as u8 + 1; 32]))
                .await
                .unwrap();
            let t = Instant::now();
            for _ in 0..count {
                cl.enqueue_once(bob, ChannelId::DEFAULT, vec![0; 1024], random_message_id())
                    .await
                    .unwrap();
            }
            t.elapsed()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let total = clients * count;
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{total} durable enqueues of 1 KiB by {clients} clients in {secs:.2} s: {:.0}/s, {:.2} ms mean latency",
        total as f64 / secs,
        secs * 1000.0 * clients as f64 / total as f64
    );
}
