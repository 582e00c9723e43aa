//! End-to-end tests: the real server on loopback, driven over QUIC by the
//! client library (and by hand-made streams for the hostile cases).

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{id, user};
use ed25519_dalek::Signer;
use quicproquo_client::{Client, ClientError, random_message_id};
use quicproquo_core::error::ErrorKind;
use quicproquo_core::limits::{AUTH_VERSION, PAYLOAD_BYTES_MAX};
use quicproquo_core::node::{
    NodeConfig, Request, RequestBody, Response, auth_message, hybrid_key_message,
};
use quicproquo_core::types::{ChannelId, MessageId, Signature};
use quicproquo_proto::{decode_reply, encode_request};
use quicproquo_server::config::TransportLimits;
use quicproquo_server::testing::{InProcessServer, Setup};
use sha2::{Digest, Sha256};

fn kind(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorKind {
    match r {
        Err(ClientError::Service(e)) => e.kind,
        other => panic!("expected a service error, got {other:?}"),
    }
}

/// Sends raw bytes on a fresh stream and decodes the reply.
async fn raw(client: &Client, bytes: &[u8]) -> quicproquo_core::node::Reply {
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    send.finish().unwrap();
    let reply = recv.read_to_end(1 << 20).await.unwrap();
    decode_reply(&reply).unwrap()
}

#[tokio::test]
async fn every_method_works_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let (alice_sk, bob_sk) = (user(1), user(2));
    let (alice, bob) = (id(&alice_sk), id(&bob_sk));
    let a = server.login(&alice_sk).await;
    let b = server.login(&bob_sk).await;

    // KeyPackages: fingerprint, count, FIFO pop, last resort.
    let fp = a
        .upload_key_package(alice, b"kp-1".to_vec(), false)
        .await
        .unwrap();
    assert_eq!(fp, <[u8; 32]>::from(Sha256::digest(b"kp-1")));
    a.upload_key_package(alice, b"kp-2".to_vec(), false)
        .await
        .unwrap();
    a.upload_key_package(alice, b"kp-lr".to_vec(), true)
        .await
        .unwrap();
    assert_eq!(a.key_package_count(alice).await.unwrap(), (2, true));
    assert_eq!(
        b.fetch_key_package(alice).await.unwrap(),
        (b"kp-1".to_vec(), false)
    );
    assert_eq!(
        b.fetch_key_package(alice).await.unwrap(),
        (b"kp-2".to_vec(), false)
    );
    assert_eq!(
        b.fetch_key_package(alice).await.unwrap(),
        (b"kp-lr".to_vec(), true)
    );
    assert_eq!(a.key_package_count(alice).await.unwrap(), (0, true));

    // Hybrid key.
    let hk = vec![9u8; 1216];
    let sig = Signature(alice_sk.sign(&hybrid_key_message(&alice, &hk)).to_bytes());
    a.upload_hybrid_key(alice, hk.clone(), sig).await.unwrap();
    assert_eq!(b.fetch_hybrid_key(alice).await.unwrap(), (hk, sig));

    // Queues: enqueue, idempotent retry, fetch with cursor, fetchWait.
    let ch = ChannelId::try_from_slice(b"group-1").unwrap();
    let m1 = random_message_id();
    assert_eq!(a.enqueue(bob, ch, b"hello".to_vec(), m1).await.unwrap(), 1);
    assert_eq!(a.enqueue(bob, ch, b"hello".to_vec(), m1).await.unwrap(), 1);
    assert_eq!(
        a.enqueue(bob, ch, b"again".to_vec(), random_message_id())
            .await
            .unwrap(),
        2
    );
    let f = b.fetch(bob, ch, 0, 10).await.unwrap();
    assert_eq!(
        f.messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(f.messages[0].payload, b"hello");
    assert_eq!(f.next_seq, 3);
    let f = b.fetch(bob, ch, 2, 10).await.unwrap();
    assert!(f.messages.is_empty());

    let waiter = {
        let b = b.clone();
        tokio::spawn(async move { b.fetch_wait(bob, ch, 2, 10, 5_000).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.enqueue(bob, ch, b"wake".to_vec(), random_message_id())
        .await
        .unwrap();
    let woken = waiter.await.unwrap().unwrap();
    assert_eq!(woken.messages[0].seq, 3);
    assert_eq!(woken.messages[0].payload, b"wake");

    // A fetchWait with nothing to deliver returns empty at its deadline.
    let empty = b
        .fetch_wait(bob, ChannelId::DEFAULT, 0, 10, 200)
        .await
        .unwrap();
    assert!(empty.messages.is_empty());

    let stats = server.stop().await;
    assert!(stats.requests > 10);
}

#[tokio::test]
async fn typed_errors_come_back_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let (alice_sk, bob_sk) = (user(1), user(2));
    let (alice, bob) = (id(&alice_sk), id(&bob_sk));
    let anon = server.client().await;
    let a = server.login(&alice_sk).await;

    // Unauthenticated fetch; fetch of someone else's queue.
    assert_eq!(
        kind(anon.fetch(alice, ChannelId::DEFAULT, 0, 1).await),
        ErrorKind::Unauthenticated
    );
    assert_eq!(
        kind(a.fetch(bob, ChannelId::DEFAULT, 0, 1).await),
        ErrorKind::PermissionDenied
    );
    // Oversized payload.
    let big = vec![0u8; PAYLOAD_BYTES_MAX + 1];
    assert_eq!(
        kind(
            a.enqueue(bob, ChannelId::DEFAULT, big, random_message_id())
                .await
        ),
        ErrorKind::PayloadTooLarge
    );
    // Unknown authVersion.
    let bytes = encode_request(&Request {
        auth_version: AUTH_VERSION + 1,
        body: RequestBody::AuthChallenge,
    });
    assert_eq!(
        raw(&a, &bytes).await.unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    // Garbage bytes on a stream.
    let r = raw(&a, b"\x00\x01garbage that is not capnp at all").await;
    assert_eq!(r.unwrap_err().kind, ErrorKind::InvalidArgument);
    let r = raw(&a, b"").await;
    assert_eq!(r.unwrap_err().kind, ErrorKind::InvalidArgument);
    // The connection still works.
    a.enqueue(bob, ChannelId::DEFAULT, b"ok".to_vec(), random_message_id())
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn wrong_length_identity_key_is_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let a = server.login(&user(1)).await;
    let bytes = quicproquo_proto::testing::fetch_key_package_with_raw_key(&[7u8; 31]);
    let r = raw(&a, &bytes).await;
    let e = r.unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    assert!(e.message.contains("32"), "{}", e.message);
    server.stop().await;
}

#[tokio::test]
async fn replayed_auth_signature_fails_on_a_new_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let alice_sk = user(1);
    let alice = id(&alice_sk);
    // Authenticate by hand on connection 1, keeping the signature.
    let c1 = server.client().await;
    let Response::AuthChallenge { nonce } = c1.call(RequestBody::AuthChallenge).await.unwrap()
    else {
        panic!()
    };
    let sig = Signature(
        alice_sk
            .sign(&auth_message(&alice, &nonce, &c1.tls_exporter().unwrap()))
            .to_bytes(),
    );
    let auth = RequestBody::Authenticate {
        identity_key: alice,
        signature: sig,
    };
    c1.call(auth.clone()).await.unwrap();
    // Replay on connection 2, even after asking for a challenge there.
    let c2 = server.client().await;
    c2.call(RequestBody::AuthChallenge).await.unwrap();
    assert_eq!(
        kind(c2.call(auth.clone()).await),
        ErrorKind::Unauthenticated
    );
    // And the replayed identity got nothing.
    assert_eq!(
        kind(c2.key_package_count(alice).await),
        ErrorKind::Unauthenticated
    );
    server.stop().await;
}

#[tokio::test]
async fn unfinished_stream_times_out_and_server_is_unaffected() {
    let dir = tempfile::tempdir().unwrap();
    let limits = TransportLimits {
        request_timeout: Duration::from_millis(300),
        ..TransportLimits::default()
    };
    let server = InProcessServer::start_with(
        dir.path(),
        Setup {
            limits,
            ..Setup::default()
        },
    );
    let (alice_sk, bob_sk) = (user(1), user(2));
    let a = server.login(&alice_sk).await;
    let (mut send, mut recv) = a.connection().open_bi().await.unwrap();
    send.write_all(b"\x00\x00").await.unwrap();
    // Never finish. Meanwhile the server keeps serving.
    a.enqueue(
        id(&bob_sk),
        ChannelId::DEFAULT,
        b"x".to_vec(),
        random_message_id(),
    )
    .await
    .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), recv.read_to_end(1 << 16))
        .await
        .expect("server answers the stalled stream")
        .unwrap();
    assert_eq!(
        decode_reply(&reply).unwrap().unwrap_err().kind,
        ErrorKind::InvalidArgument
    );
    a.key_package_count(id(&alice_sk)).await.unwrap();
    server.stop().await;
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let ok =
        quicproquo_client::testing::connect_with_alpn(server.addr, &server.trust(), b"qpq/1").await;
    assert!(ok.is_ok());
    let bad =
        quicproquo_client::testing::connect_with_alpn(server.addr, &server.trust(), b"h3").await;
    assert!(bad.is_err());
    server.stop().await;
}

#[tokio::test]
async fn wrong_fingerprint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let trust = quicproquo_client::ServerTrust::Fingerprint([0; 32]);
    let r = Client::connect(&server.addr.to_string(), &trust).await;
    assert!(
        matches!(
            r,
            Err(ClientError::Trust(
                quicproquo_client::TrustError::FingerprintMismatch { .. }
            ))
        ),
        "{r:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn restart_keeps_key_packages_hybrid_keys_queues_and_seq_counters() {
    let dir = tempfile::tempdir().unwrap();
    let (alice_sk, bob_sk) = (user(1), user(2));
    let (alice, bob) = (id(&alice_sk), id(&bob_sk));
    let hk = vec![3u8; 64];
    let sig = Signature(alice_sk.sign(&hybrid_key_message(&alice, &hk)).to_bytes());
    {
        let server = InProcessServer::start(dir.path());
        let a = server.login(&alice_sk).await;
        let b = server.login(&bob_sk).await;
        a.upload_key_package(alice, b"kp".to_vec(), false)
            .await
            .unwrap();
        a.upload_hybrid_key(alice, hk.clone(), sig).await.unwrap();
        for p in [b"one", b"two"] {
            a.enqueue(bob, ChannelId::DEFAULT, p.to_vec(), random_message_id())
                .await
                .unwrap();
        }
        b.fetch(bob, ChannelId::DEFAULT, 2, 0).await.unwrap();
        drop((a, b));
        server.stop().await;
    }
    let server = InProcessServer::start(dir.path());
    let a = server.login(&alice_sk).await;
    let b = server.login(&bob_sk).await;
    assert_eq!(a.key_package_count(alice).await.unwrap(), (1, false));
    assert_eq!(b.fetch_hybrid_key(alice).await.unwrap(), (hk, sig));
    // The queue emptied before the restart, yet seq 3 comes next.
    let seq = a
        .enqueue(
            bob,
            ChannelId::DEFAULT,
            b"three".to_vec(),
            random_message_id(),
        )
        .await
        .unwrap();
    assert_eq!(seq, 3);
    server.stop().await;
}

#[tokio::test]
async fn concurrent_pops_never_return_the_same_package() {
    let dir = tempfile::tempdir().unwrap();
    // Room for 120 pops of one target at once; the rate limits have their
    // own tests.
    let node = NodeConfig {
        key_package_fetch_target_rate: quicproquo_core::node::RateConfig {
            burst: 1_000,
            per_sec: 100,
        },
        ..NodeConfig::default()
    };
    let server = InProcessServer::start_with(
        dir.path(),
        Setup {
            node,
            ..Setup::default()
        },
    );
    let owner_sk = user(1);
    let owner = id(&owner_sk);
    let o = server.login(&owner_sk).await;
    const PACKAGES: usize = 120;
    for i in 0..PACKAGES {
        o.upload_key_package(owner, format!("kp-{i}").into_bytes(), false)
            .await
            .unwrap();
    }
    // 12 fetchers x 10 pops each, all at once; each fetcher stays within its
    // per-pair burst.
    let mut tasks = Vec::new();
    for f in 0..12u8 {
        let c = Arc::new(server.login(&user(100 + f)).await);
        for _ in 0..10 {
            let c = c.clone();
            tasks.push(tokio::spawn(
                async move { c.fetch_key_package(owner).await },
            ));
        }
    }
    let mut seen = HashSet::new();
    for t in tasks {
        let (pkg, last_resort) = t.await.unwrap().unwrap();
        assert!(!last_resort);
        assert!(seen.insert(pkg), "a KeyPackage was handed out twice");
    }
    assert_eq!(seen.len(), PACKAGES);
    assert_eq!(o.key_package_count(owner).await.unwrap(), (0, false));
    server.stop().await;
}

#[tokio::test]
async fn messages_from_many_senders_keep_per_sender_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let bob_sk = user(2);
    let bob = id(&bob_sk);
    let mut tasks = Vec::new();
    for s in 0..8u8 {
        let c = server.login(&user(10 + s)).await;
        tasks.push(tokio::spawn(async move {
            for i in 0..25u32 {
                let mut m = [0u8; 16];
                m[0] = s;
                m[1..5].copy_from_slice(&i.to_be_bytes());
                c.enqueue(bob, ChannelId::DEFAULT, vec![s, i as u8], MessageId(m))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let b = server.login(&bob_sk).await;
    let mut cursor = 0;
    let mut last = [None::<u8>; 8];
    let mut total = 0;
    loop {
        let f = b.fetch(bob, ChannelId::DEFAULT, cursor, 50).await.unwrap();
        if f.messages.is_empty() {
            break;
        }
        for m in &f.messages {
            assert_eq!(m.seq, cursor + 1, "gap-free");
            cursor = m.seq;
            let (s, i) = (m.payload[0] as usize, m.payload[1]);
            assert!(
                last[s].is_none_or(|p| p + 1 == i),
                "sender {s} out of order"
            );
            last[s] = Some(i);
            total += 1;
        }
    }
    assert_eq!(total, 200);
    server.stop().await;
}

/// The service runs the machine's sweep on its timer: a message nobody
/// fetches is dropped once it is older than the message TTL, without any
/// request touching its queue (the sweep's counter says so).
#[tokio::test]
async fn the_service_sweeps_expired_messages_of_untouched_queues() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start_with(
        dir.path(),
        Setup {
            limits: TransportLimits {
                sweep_interval: Duration::from_millis(50),
                ..TransportLimits::default()
            },
            node: NodeConfig {
                message_ttl: Some(Duration::from_millis(100)),
                ..NodeConfig::default()
            },
            metrics: true,
            ..Setup::default()
        },
    );
    let (alice_sk, bob_sk) = (user(1), user(2));
    let a = server.login(&alice_sk).await;
    for _ in 0..3 {
        a.enqueue(
            id(&bob_sk),
            ChannelId::DEFAULT,
            b"never fetched".to_vec(),
            random_message_id(),
        )
        .await
        .unwrap();
    }
    let swept = || {
        let text = server.metrics().expect("metrics kept").encode();
        text.lines()
            .find_map(|l| l.strip_prefix("qpq_swept_messages_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    tokio::time::timeout(Duration::from_secs(30), async {
        while swept() < 3.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the sweep dropped the three expired messages");
    // Bob learns of them as a gap, as after any expiry.
    let b = server.login(&bob_sk).await;
    let fetched = b
        .fetch(id(&bob_sk), ChannelId::DEFAULT, 0, 10)
        .await
        .unwrap();
    assert!(fetched.messages.is_empty());
    assert_eq!(fetched.gap.map(|g| (g.from, g.to)), Some((1, 3)));
    server.stop().await;
}
