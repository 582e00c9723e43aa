//! Crash test: a child `qpq-server` process takes enqueues from concurrent
//! clients and is killed with SIGKILL mid-stream. After a restart on the
//! same data directory, every enqueue that was acknowledged is there, in
//! order, exactly once.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{id, read_numbered_queue, read_start_lines, user};
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::types::{ChannelId, MessageId};

struct ChildServer {
    child: Child,
    addr: String,
    trust: ServerTrust,
}

fn start_child(data_dir: &Path) -> ChildServer {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qpq-server"))
        .env("QPQ_LISTEN", "127.0.0.1:0")
        .env("QPQ_DATA_DIR", data_dir)
        .env("QPQ_CONFIG", data_dir.join("none.toml"))
        .env("QPQ_LOG", "warn")
        .current_dir(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qpq-server");
    let (addr, fingerprint) = read_start_lines(&mut child);
    ChildServer {
        child,
        addr,
        trust: ServerTrust::fingerprint_hex(&fingerprint).unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_enqueues_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // An empty config file so a developer's ./qpq-server.toml is not read.
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    let mut server = start_child(dir.path());
    let bob_sk = user(2);
    let bob = id(&bob_sk);

    // seq -> payload for every acknowledged enqueue.
    let acked: Arc<Mutex<HashMap<u64, Vec<u8>>>> = Arc::default();
    let mut senders = Vec::new();
    for s in 0..4u8 {
        let mut c = Client::connect(&server.addr, &server.trust).await.unwrap();
        c.authenticate(&user(10 + s)).await.unwrap();
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            for i in 0u32.. {
                let mut m = [0u8; 16];
                m[0] = s;
                m[1..5].copy_from_slice(&i.to_be_bytes());
                let payload = [&[s][..], &i.to_be_bytes()[..]].concat();
                match c
                    .enqueue(bob, ChannelId::DEFAULT, payload.clone(), MessageId(m))
                    .await
                {
                    Ok(seq) => {
                        let prev = acked.lock().unwrap().insert(seq, payload);
                        assert!(prev.is_none(), "seq {seq} acknowledged twice");
                    }
                    Err(_) => return i,
                }
            }
            unreachable!()
        }));
    }
    // Let traffic run, then kill the server without warning.
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if acked.lock().unwrap().len() >= 400 {
            break;
        }
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().unwrap();
    for t in senders {
        t.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 400);

    let mut server = start_child(dir.path());
    let mut b = Client::connect(&server.addr, &server.trust).await.unwrap();
    b.authenticate(&bob_sk).await.unwrap();
    let stored = read_numbered_queue(&b, bob, 0).await;
    for (seq, payload) in &acked {
        assert_eq!(
            stored.get(seq),
            Some(payload),
            "acknowledged seq {seq} lost or changed"
        );
    }
    let mut payloads: Vec<_> = stored.values().collect();
    payloads.sort();
    payloads.dedup();
    assert_eq!(payloads.len(), stored.len(), "a message is stored twice");
    server.child.kill().ok();
    server.child.wait().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_keeps_acknowledged_data() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    let mut server = start_child(dir.path());
    let bob_sk = user(2);
    let bob = id(&bob_sk);
    let mut a = Client::connect(&server.addr, &server.trust).await.unwrap();
    a.authenticate(&user(1)).await.unwrap();
    for i in 0..20u8 {
        a.enqueue(bob, ChannelId::DEFAULT, vec![i], MessageId([i; 16]))
            .await
            .unwrap();
    }
    // A long-poll in flight while the signal arrives.
    let mut b = Client::connect(&server.addr, &server.trust).await.unwrap();
    b.authenticate(&bob_sk).await.unwrap();
    let waiting = tokio::spawn(async move {
        b.fetch_wait(
            bob,
            ChannelId::try_from_slice(b"idle").unwrap(),
            0,
            1,
            20_000,
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let pid = server.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || server.child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "qpq-server exited with {exit:?}");
    // The waiting call ends (answered or cut by the close), never hangs.
    let _ = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("long-poll ends at shutdown");

    let mut server = start_child(dir.path());
    let mut b = Client::connect(&server.addr, &server.trust).await.unwrap();
    b.authenticate(&bob_sk).await.unwrap();
    let f = b.fetch(bob, ChannelId::DEFAULT, 0, 100).await.unwrap();
    let payloads: Vec<u8> = f.messages.iter().map(|m| m.payload[0]).collect();
    assert_eq!(payloads, (0..20).collect::<Vec<u8>>());
    server.child.kill().ok();
    server.child.wait().ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_certificate_is_served_instead_of_a_generated_one() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("none.toml"), "").unwrap();
    // An operator's certificate, made elsewhere.
    let certs = tempfile::tempdir().unwrap();
    let made = quicproquo_server::tls::load_or_generate(certs.path()).unwrap();
    let cert = certs
        .path()
        .join(quicproquo_server::tls::GENERATED_CERT_FILE);
    let key = certs
        .path()
        .join(quicproquo_server::tls::GENERATED_KEY_FILE);
    let mut child = Command::new(env!("CARGO_BIN_EXE_qpq-server"))
        .env("QPQ_LISTEN", "127.0.0.1:0")
        .env("QPQ_DATA_DIR", dir.path().join("data"))
        .env("QPQ_CONFIG", dir.path().join("none.toml"))
        .env("QPQ_TLS_CERT", &cert)
        .env("QPQ_TLS_KEY", &key)
        .env("QPQ_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, fp) = read_start_lines(&mut child);
    assert_eq!(fp, quicproquo_core::types::hex(&made.fingerprint()));
    // No certificate was generated in the data directory.
    assert!(
        !dir.path()
            .join("data")
            .join(quicproquo_server::tls::GENERATED_CERT_FILE)
            .exists()
    );
    let trust = ServerTrust::fingerprint_hex(&fp).unwrap();
    let mut c = Client::connect(&addr, &trust).await.unwrap();
    c.authenticate(&user(1)).await.unwrap();
    child.kill().ok();
    child.wait().ok();
}
