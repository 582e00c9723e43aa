//! Attack suite: hostile clients against a real `qpq-server` on loopback,
//! each attack beside an honest client whose every request must still
//! succeed while the attack runs.
//!
//! Every attack gets its own server, started as a child process (the
//! binary Cargo built for this test, on `127.0.0.1:0` with its own data
//! directory), so the server's memory can be measured apart from the
//! test's: a sampler reads the child's `VmRSS` from `/proc` every few
//! milliseconds, and each attack asserts that the peak stays under
//! [`RSS_BOUND_MIB`]. That is a bound on memory, not a timing assertion;
//! the only clocks here are the server's own timeouts (set short through
//! `QPQ_*` variables so the suite stays fast) and hang guards far beyond
//! them.
//!
//! The attacks (issue 7): a thousand streams at once; slow-loris streams
//! and an idle connection; frames declaring huge lengths, also stalled
//! just under the size limit; deeply nested and pointer-amplifying Cap'n
//! Proto messages; random garbage on streams and on the UDP port; wrong
//! ALPN; a flood of new connections; a client that never reads its
//! replies; replayed authentication; a challenge relayed to another
//! connection; KeyPackage draining by many fresh identities; enqueue spam
//! to one recipient; and (issue 23) QUIC Initials with a forged source
//! address.

mod common;

#[path = "../../../fuzz/src/hostile.rs"]
#[allow(dead_code)] // shared with the fuzz targets; only the request builders are used here
mod hostile;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{id, read_start_lines, user};
use ed25519_dalek::{Signer, SigningKey};
use quicproquo_client::{Client, ClientError, ServerTrust, random_message_id};
use quicproquo_core::Time;
use quicproquo_core::client::{ClientMachine, Command as ClientCommand, Effect, Event, Outcome};
use quicproquo_core::error::{ErrorKind, ServiceError};
use quicproquo_core::limits::AUTH_VERSION;
use quicproquo_core::node::{Reply, Request, RequestBody, Response, auth_message};
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, Signature};
use quicproquo_proto::{REQUEST_BYTES_MAX, decode_reply, encode_request};
use tokio::task::JoinSet;

/// The most resident memory a server may use during any attack. Generous:
/// an idle debug build of the server sits around 30 MiB; what matters is
/// that no attack makes memory grow with the attacker's effort.
const RSS_BOUND_MIB: u64 = 256;

/// A hang guard: far beyond every server timeout used here.
const GUARD: Duration = Duration::from_secs(30);

// ============================================================== the attacks

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_streams_at_once() {
    let server = Server::start(&[]);
    let honest = Honest::start(&server, 1).await;
    let attacker_sk = user(50);
    let me = id(&attacker_sk);
    let attacker = server.login(&attacker_sk).await;
    let conn = attacker.connection().clone();
    let mut tasks = JoinSet::new();
    for i in 0..1_000u32 {
        let conn = conn.clone();
        tasks.spawn(async move {
            let mut mid = [0u8; 16];
            mid[..4].copy_from_slice(&i.to_be_bytes());
            let body = RequestBody::Enqueue {
                recipient_key: me,
                channel_id: ChannelId::DEFAULT,
                payload: i.to_be_bytes().to_vec(),
                message_id: MessageId(mid),
            };
            exchange(&conn, &request_bytes(body)).await
        });
    }
    // The server admits 128 streams at a time; the rest wait for credit.
    // Every one of them is answered, and each enqueue is stored once.
    let mut seqs = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        match r.expect("stream task") {
            Some(Ok(Response::Enqueued { seq })) => assert!(seqs.insert(seq), "seq {seq} twice"),
            other => panic!("stream answered {other:?}"),
        }
    }
    assert_eq!(seqs, (1..=1_000).collect::<HashSet<u64>>());
    honest.stop().await;
    server.finish("a thousand streams at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_streams_and_an_idle_connection_are_cut() {
    // One byte every 500 ms against a 1.5 s request timeout: the same
    // shape as one byte every few seconds against the default 10 s.
    let server = Server::start(&[
        ("QPQ_REQUEST_TIMEOUT_MS", "1500"),
        ("QPQ_IDLE_TIMEOUT_MS", "4000"),
        ("QPQ_FETCH_WAIT_TIMEOUT_MS_MAX", "2000"),
    ]);
    let honest = Honest::start(&server, 1).await;
    let idle = server.client().await;
    let request = request_bytes(RequestBody::AuthChallenge);
    let mut tasks = JoinSet::new();
    for _ in 0..4 {
        let conn = server.client().await.connection().clone();
        for _ in 0..25 {
            let conn = conn.clone();
            let request = request.clone();
            tasks.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
                let trickle = tokio::spawn(async move {
                    for b in request {
                        if send.write_all(&[b]).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    // Never finishes the stream.
                    std::future::pending::<()>().await;
                });
                let reply = tokio::time::timeout(GUARD, recv.read_to_end(64 * 1024)).await;
                trickle.abort();
                reply
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        let reply = r
            .expect("stream task")
            .expect("the server cuts a slow stream")
            .expect("the server answers a slow stream");
        let e = decode_reply(&reply)
            .expect("a well-formed reply")
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("not finished"), "{}", e.message);
    }
    // A connection that says nothing at all is closed at the idle timeout.
    let closed = tokio::time::timeout(GUARD, idle.connection().closed())
        .await
        .expect("the idle connection is closed");
    assert!(
        matches!(closed, quinn::ConnectionError::TimedOut),
        "{closed:?}"
    );
    honest.stop().await;
    server.finish("slow loris");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_declaring_huge_lengths_are_refused() {
    // The default request timeout: these streams do send, fast, and must
    // be refused for their size, not their pace.
    let server = Server::start(&[]);
    let honest = Honest::start(&server, 1).await;
    let conn = server.client().await.connection().clone();
    // A segment table declaring 2^32 - 1 words, in 16 bytes.
    let lie = hostile::lying_segment_table(u32::MAX, 1);
    let e = exchange(&conn, &lie).await.expect("answered").unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);

    // Frames declaring 1 GiB that then keep sending past the request
    // limit: read up to the limit, answered payloadTooLarge, stopped.
    let declared = hostile::lying_segment_table(1 << 27, 0);
    let mut tasks = JoinSet::new();
    for _ in 0..4 {
        let conn = server.client().await.connection().clone();
        for _ in 0..32 {
            let conn = conn.clone();
            let declared = declared.clone();
            tasks.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
                let writer = tokio::spawn(async move {
                    let _ = send.write_all(&declared).await;
                    let chunk = vec![0u8; 64 * 1024];
                    for _ in 0..32 {
                        if send.write_all(&chunk).await.is_err() {
                            return;
                        }
                    }
                    let _ = send.finish();
                });
                let reply = tokio::time::timeout(GUARD, recv.read_to_end(64 * 1024)).await;
                writer.abort();
                reply
            });
        }
    }
    // Refused for its size once read up to the limit, or earlier, when the
    // connection's other streams already hold its budget of request bytes.
    let mut too_large = 0;
    while let Some(r) = tasks.join_next().await {
        let reply = r.expect("task").expect("answered in time").expect("reply");
        let e = decode_reply(&reply).expect("well-formed").unwrap_err();
        match e.kind {
            ErrorKind::PayloadTooLarge => too_large += 1,
            ErrorKind::Unavailable => {}
            other => panic!("{other:?}: {}", e.message),
        }
    }
    assert!(too_large > 0, "no frame was read up to the size limit");
    honest.stop().await;
    server.finish("huge declared length");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_frames_stalled_under_the_limit_hold_bounded_memory() {
    // The other half of "a frame declaring a huge length": each stream
    // sends just under the request limit and then stalls, never finishing,
    // on every stream the connection may open, from several connections.
    let server = Server::start(&[("QPQ_REQUEST_TIMEOUT_MS", "3000")]);
    let honest = Honest::start(&server, 1).await;
    let body = vec![0u8; REQUEST_BYTES_MAX - 4096];
    let mut tasks = JoinSet::new();
    for _ in 0..3 {
        let conn = server.client().await.connection().clone();
        for _ in 0..128 {
            let conn = conn.clone();
            let body = body.clone();
            tasks.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
                let writer = tokio::spawn(async move {
                    let _ = send.write_all(&body).await;
                    std::future::pending::<()>().await;
                });
                let reply = tokio::time::timeout(GUARD, recv.read_to_end(64 * 1024)).await;
                writer.abort();
                reply
            });
        }
    }
    // A connection's streams share a budget of request bytes: the first
    // few fill it and are cut at the request timeout, the rest are refused
    // at once.
    let (mut timed_out, mut refused) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        let reply = r.expect("task").expect("ended in time").expect("reply");
        let e = decode_reply(&reply).expect("well-formed").unwrap_err();
        match e.kind {
            ErrorKind::InvalidArgument => timed_out += 1,
            ErrorKind::Unavailable => refused += 1,
            other => panic!("{other:?}: {}", e.message),
        }
    }
    assert!(
        timed_out > 0 && refused > 0,
        "{timed_out} cut, {refused} refused"
    );
    honest.stop().await;
    server.finish("stalled large frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_and_pointer_amplifying_messages_are_refused() {
    let server = Server::start(&[]);
    let honest = Honest::start(&server, 1).await;
    let mut messages = hostile::requests();
    // Four pointers aimed at one blob of almost the request limit.
    messages.push((
        "aliased_enqueue_1m".to_owned(),
        hostile::aliased_enqueue((REQUEST_BYTES_MAX - 1024) as u32),
    ));
    let mut tasks = JoinSet::new();
    for c in 0..4 {
        let conn = server.client().await.connection().clone();
        for (name, bytes) in messages.clone() {
            // Many copies of the small ones, a few of the large one.
            let copies = if bytes.len() > 100_000 { 4 } else { 25 };
            for _ in 0..copies {
                let conn = conn.clone();
                let (name, bytes) = (name.clone(), bytes.clone());
                tasks.spawn(async move { (c, name, exchange(&conn, &bytes).await) });
            }
        }
    }
    let mut refused_by_decoder = HashSet::new();
    while let Some(r) = tasks.join_next().await {
        let (_, name, reply) = r.expect("task");
        let e = reply
            .unwrap_or_else(|| panic!("{name}: no reply"))
            .unwrap_err();
        // Deep chains decode as a request with authVersion 0; everything
        // else fails to decode. Both are invalid arguments. A copy that
        // finds its connection's request budget spent is refused before
        // it is read.
        match e.kind {
            ErrorKind::InvalidArgument => {
                refused_by_decoder.insert(name);
            }
            ErrorKind::Unavailable => {}
            other => panic!("{name}: {other:?}: {}", e.message),
        }
    }
    assert_eq!(
        refused_by_decoder.len(),
        messages.len(),
        "every hostile message reached the decoder at least once"
    );
    honest.stop().await;
    server.finish("nested and amplified Cap'n Proto");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_garbage_on_streams_and_datagrams() {
    let server = Server::start(&[]);
    let honest = Honest::start(&server, 1).await;
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    // Random UDP datagrams at the QUIC port: dropped, nothing more.
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
    for _ in 0..2_000 {
        let len = 1 + rng.below(1_400) as usize;
        let datagram = rng.bytes(len);
        let _ = socket.send_to(&datagram, server.addr);
    }
    // Random bytes on streams, finished or reset half way.
    let mut tasks = JoinSet::new();
    for _ in 0..8 {
        let conn = server.login(&user(rng.below(200) as u8 + 30)).await;
        let conn = conn.connection().clone();
        for _ in 0..64 {
            let len = rng.below(8_192) as usize;
            let bytes = rng.bytes(len);
            let reset = rng.below(8) == 0;
            let conn = conn.clone();
            tasks.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
                if reset {
                    let _ = send.write_all(&bytes[..len / 2]).await;
                    let _ = send.reset(7u32.into());
                    return None;
                }
                send.write_all(&bytes).await.expect("write");
                send.finish().expect("finish");
                let reply = tokio::time::timeout(GUARD, recv.read_to_end(64 * 1024))
                    .await
                    .expect("answered in time")
                    .expect("a reply");
                Some(decode_reply(&reply).expect("a well-formed reply"))
            });
        }
    }
    let mut answered = 0;
    while let Some(r) = tasks.join_next().await {
        if let Some(reply) = r.expect("task") {
            let e = reply.expect_err("garbage is never a valid request");
            assert!(
                matches!(
                    e.kind,
                    ErrorKind::InvalidArgument | ErrorKind::PayloadTooLarge
                ),
                "{e}"
            );
            answered += 1;
        }
    }
    assert!(answered > 0);
    honest.stop().await;
    server.finish("random garbage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_alpn_is_refused_and_leaves_no_trace() {
    let server = Server::start(&[("QPQ_CONNECTIONS_PER_IP_MAX", "8")]);
    let honest = Honest::start_from(&server, 1, "127.0.0.2").await;
    let mut tasks = JoinSet::new();
    for i in 0..100 {
        let alpn: &'static [u8] = match i % 4 {
            0 => b"h3",
            1 => b"qpq/2",
            2 => b"qpq/1 ",
            _ => b"quicnprotochat/p2p/1",
        };
        let (addr, trust) = (server.addr, server.trust.clone());
        tasks.spawn(async move {
            quicproquo_client::testing::connect_with_alpn(addr, &trust, alpn).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.expect("task").is_err(), "a wrong ALPN was accepted");
    }
    // Every refused handshake gave its per-address slot back: the full
    // allowance of connections from 127.0.0.1 still opens.
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = server.client().await;
        c.authenticate(&user(60)).await.expect("authenticate");
        clients.push(c);
    }
    honest.stop().await;
    server.finish("wrong ALPN");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_is_capped_per_address() {
    let server = Server::start(&[
        ("QPQ_CONNECTIONS_PER_IP_MAX", "16"),
        ("QPQ_PENDING_HANDSHAKES_MAX", "32"),
    ]);
    // The honest client lives on another loopback address.
    let honest = Honest::start_from(&server, 1, "127.0.0.2").await;
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("endpoint");
    let mut tasks = JoinSet::new();
    for _ in 0..300 {
        let (endpoint, addr, trust) = (endpoint.clone(), server.addr, server.trust.clone());
        tasks
            .spawn(async move { Client::connect_with(&endpoint, addr, "localhost", &trust).await });
    }
    let mut connected = Vec::new();
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        match r.expect("task") {
            Ok(c) => connected.push(c),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(connected.len() + refused, 300);
    // A handshake from an address not yet proven counts against the
    // address once it completes; one that finds the address full is closed
    // then. So what counts is the connections that are served.
    let mut flood = Vec::new();
    for (n, mut c) in connected.into_iter().enumerate() {
        if c.authenticate(&user(100 + (n % 100) as u8)).await.is_ok() {
            flood.push(c);
        }
    }
    assert!(
        !flood.is_empty() && flood.len() <= 16,
        "{} connections from one address served",
        flood.len()
    );
    // While the flood holds its connections, a newcomer from another
    // address gets in and is served.
    let newcomer = server.login_from(&user(70), "127.0.0.3").await;
    newcomer
        .key_package_count(id(&user(70)))
        .await
        .expect("a newcomer is served during the flood");
    // Once the flood goes away, its address can connect again.
    for c in &flood {
        c.connection().close(0u32.into(), b"done");
    }
    drop(flood);
    endpoint.wait_idle().await;
    let again = tokio::time::timeout(GUARD, async {
        loop {
            match Client::connect(&server.addr.to_string(), &server.trust).await {
                Ok(c) => return c,
                // The server may not have seen every close yet.
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the flooding address can connect again");
    drop(again);
    honest.stop().await;
    server.finish("connection flood");
}

/// Handshakes from an address not yet proven do not count against it: 200
/// QUIC Initials sent from the victim's address (127.0.0.2) by a sender
/// that never answers — as Initials with a forged source address would
/// be — leave the victim, from that address, free to connect and be
/// served while they are pending. The server takes at most
/// `unvalidated_handshakes_max` of them and answers the rest, and then the
/// victim, with a QUIC Retry; the victim's retried Initial proves its
/// address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_initials_do_not_lock_their_source_address_out() {
    let server = Server::start(&[
        ("QPQ_CONNECTIONS_PER_IP_MAX", "4"),
        ("QPQ_UNVALIDATED_HANDSHAKES_MAX", "8"),
    ]);
    let forger = std::net::UdpSocket::bind("127.0.0.2:0").expect("forger's socket");
    let config =
        quicproquo_client::testing::quic_client_config(&server.trust, quicproquo_proto::ALPN)
            .expect("client config");
    // A sans-io QUIC client makes each handshake's first packet; what the
    // server answers is never read.
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = std::time::Instant::now();
    let mut buf = Vec::new();
    for _ in 0..200 {
        let (_, mut conn) = endpoint
            .connect(now, config.clone(), server.addr, "localhost")
            .expect("a handshake");
        buf.clear();
        let initial = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
        forger
            .send_to(&buf[..initial.size], server.addr)
            .expect("send the Initial");
    }
    // The forged handshakes stay pending for the handshake timeout (10 s);
    // the victim connects well inside it.
    let victim = tokio::time::timeout(GUARD, server.login_from(&user(80), "127.0.0.2"))
        .await
        .expect("the victim connects");
    victim
        .key_package_count(id(&user(80)))
        .await
        .expect("the victim is served");
    server.finish("forged initials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_replies() {
    let server = Server::start(&[("QPQ_REQUEST_TIMEOUT_MS", "2000")]);
    let honest = Honest::start(&server, 1).await;
    let attacker_sk = user(80);
    let me = id(&attacker_sk);
    let filler = server.login(&attacker_sk).await;
    // Four 1 MiB messages in the attacker's own queue: every fetch of it
    // is a 4 MiB reply.
    for i in 0..4u8 {
        filler
            .enqueue(
                me,
                ChannelId::DEFAULT,
                vec![i; 1024 * 1024 - 1024],
                MessageId([i; 16]),
            )
            .await
            .expect("fill the queue");
    }
    let fetch = request_bytes(RequestBody::Fetch {
        recipient_key: me,
        channel_id: ChannelId::DEFAULT,
        after_seq: 0,
        limit: 1_000,
    });
    let mut held = Vec::new();
    let mut tasks = JoinSet::new();
    for _ in 0..3 {
        let c = server.login(&attacker_sk).await;
        let conn = c.connection().clone();
        held.push(c);
        for _ in 0..128 {
            let conn = conn.clone();
            let fetch = fetch.clone();
            tasks.spawn(async move {
                let (mut send, recv) = conn.open_bi().await.expect("open stream");
                send.write_all(&fetch).await.expect("write");
                send.finish().expect("finish");
                // Keep the receive side open and never read it.
                tokio::time::sleep(Duration::from_secs(4)).await;
                drop(recv);
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("task");
    }
    // The server gave up on the unread replies; the queue is intact.
    let f = filler
        .fetch(me, ChannelId::DEFAULT, 0, 1)
        .await
        .expect("fetch after the attack");
    assert_eq!(f.messages.first().map(|m| m.seq), Some(1));
    drop(held);
    honest.stop().await;
    server.finish("never reads replies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_authentication_gains_nothing() {
    let server = Server::start(&[]);
    let honest = Honest::start(&server, 1).await;
    let victim_sk = user(90);
    let victim = id(&victim_sk);
    // The victim authenticates; the attacker captures the request bytes.
    let c1 = server.client().await;
    let Response::AuthChallenge { nonce } = c1.call(RequestBody::AuthChallenge).await.unwrap()
    else {
        panic!("challenge")
    };
    let sig = victim_sk.sign(&auth_message(&victim, &nonce, &c1.tls_exporter().unwrap()));
    let auth = RequestBody::Authenticate {
        identity_key: victim,
        signature: Signature(sig.to_bytes()),
    };
    let captured = request_bytes(auth.clone());
    assert_eq!(
        exchange(c1.connection(), &captured).await,
        Some(Ok(Response::Authenticated))
    );
    // Replayed on the same connection: already authenticated.
    let e = exchange(c1.connection(), &captured)
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidArgument);
    // Replayed on fresh connections, with and without a fresh challenge,
    // many times at once: never accepted.
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let c = server.client().await;
        if i % 2 == 0 {
            c.call(RequestBody::AuthChallenge).await.expect("challenge");
        }
        for _ in 0..5 {
            let conn = c.connection().clone();
            let captured = captured.clone();
            tasks.spawn(async move { exchange(&conn, &captured).await });
        }
        let conn = c.connection().clone();
        tasks.spawn(async move {
            // Whatever the replays did, this connection owns nothing.
            let count = request_bytes(RequestBody::KeyPackageCount {
                identity_key: victim,
                cipher_suite: 0,
            });
            exchange(&conn, &count).await
        });
    }
    while let Some(r) = tasks.join_next().await {
        let e = r
            .expect("task")
            .expect("answered")
            .expect_err("a replay was accepted");
        assert_eq!(e.kind, ErrorKind::Unauthenticated, "{}", e.message);
    }
    honest.stop().await;
    server.finish("replayed authentication");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_challenge_is_refused() {
    // An attacker holding connection A relays A's challenge to the victim,
    // who signs it on connection B, with B's TLS exporter value. The
    // signature is the victim's own over A's nonce, so only the exporter
    // in it can tell the server that it was made for another connection.
    let server = Server::start(&[]);
    let honest = Honest::start(&server, 1).await;
    let victim_sk = user(91);
    let victim = id(&victim_sk);
    let a = server.client().await;
    let b = server.client().await;
    let exporter_a = a.tls_exporter().unwrap();
    let exporter_b = b.tls_exporter().unwrap();
    assert_ne!(
        exporter_a, exporter_b,
        "two TLS sessions, two exporter values"
    );
    let refused = |reply: Option<Reply>, what: &str| {
        let e = reply
            .expect("answered")
            .expect_err(&format!("{what} logged in"));
        assert_eq!(e.kind, ErrorKind::Unauthenticated, "{what}: {}", e.message);
        assert!(
            e.message.contains("does not verify"),
            "{what}: {}",
            e.message
        );
    };

    // A's nonce under B's exporter, presented on A: the relay.
    let nonce_a = challenge(&a).await;
    let relayed = sign_in(&victim_sk, &nonce_a, &exporter_b);
    refused(
        exchange(a.connection(), &relayed).await,
        "A's nonce under B's exporter on A",
    );
    // The converse: B's nonce under A's exporter, presented on B.
    let nonce_b = challenge(&b).await;
    let relayed = sign_in(&victim_sk, &nonce_b, &exporter_a);
    refused(
        exchange(b.connection(), &relayed).await,
        "B's nonce under A's exporter on B",
    );
    // And B's outstanding nonce under A's own exporter, presented on A:
    // A's exporter is right there, but the nonce is not A's.
    let _ = challenge(&a).await;
    let nonce_b = challenge(&b).await;
    let foreign = sign_in(&victim_sk, &nonce_b, &exporter_a);
    refused(
        exchange(a.connection(), &foreign).await,
        "B's nonce under A's exporter on A",
    );
    // Neither connection owns the identity after the refusals.
    for (conn, name) in [(a.connection(), "A"), (b.connection(), "B")] {
        let e = exchange(conn, &key_package_count(victim))
            .await
            .expect("answered")
            .expect_err("an unauthenticated connection reads the count");
        assert_eq!(e.kind, ErrorKind::Unauthenticated, "{name}: {}", e.message);
    }

    // The control, on the same two connections: each connection's own
    // nonce under its own exporter logs in.
    for (c, exporter, name) in [(&a, exporter_a, "A"), (&b, exporter_b, "B")] {
        let nonce = challenge(c).await;
        assert_eq!(
            exchange(c.connection(), &sign_in(&victim_sk, &nonce, &exporter)).await,
            Some(Ok(Response::Authenticated)),
            "{name}'s own nonce and exporter"
        );
        let reply = exchange(c.connection(), &key_package_count(victim)).await;
        assert!(
            matches!(reply, Some(Ok(Response::KeyPackageCount { .. }))),
            "{name} owns the identity: {reply:?}"
        );
    }
    honest.stop().await;
    server.finish("relayed challenge");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_package_draining_leaves_the_victim_addable() {
    let server = Server::start(&[("QPQ_CONNECTIONS_PER_IP_MAX", "1000")]);
    let honest = Honest::start(&server, 1).await;
    // The victim registers five single-use KeyPackages and a last-resort
    // one, with the real client machine (real MLS KeyPackages).
    let mut victim = ClientMachine::generate([0xa1; 32]);
    let victim_key = victim.identity_key();
    let victim_conn = server.login(victim.signing_key()).await;
    let (_, outcome) = drive(
        &mut victim,
        &victim_conn,
        ClientCommand::Register { count: 5 },
    )
    .await;
    assert!(matches!(
        outcome,
        Ok(Outcome::Registered { uploaded: 12, .. })
    ));
    // 150 fresh identities each take one, 16 at a time.
    let mut handed = Vec::new();
    let mut rate_limited = 0;
    for batch in 0..10u32 {
        let mut tasks = JoinSet::new();
        for j in 0..15u32 {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(u64::from(batch * 15 + j) + 1_000).to_be_bytes());
            let sk = SigningKey::from_bytes(&seed);
            let (addr, trust) = (server.addr.to_string(), server.trust.clone());
            tasks.spawn(async move {
                let mut c = Client::connect(&addr, &trust).await.expect("connect");
                c.authenticate(&sk).await.expect("authenticate");
                let r = c.fetch_key_package(victim_key).await;
                c.connection().close(0u32.into(), b"bye");
                r
            });
        }
        while let Some(r) = tasks.join_next().await {
            match r.expect("task") {
                Ok(p) => handed.push(p),
                Err(ClientError::Service(ServiceError {
                    kind: ErrorKind::RateLimited { .. },
                    ..
                })) => rate_limited += 1,
                Err(e) => panic!("drain attempt: {e}"),
            }
        }
    }
    let single_use: Vec<&Vec<u8>> = handed
        .iter()
        .filter(|(_, lr)| !lr)
        .map(|(p, _)| p)
        .collect();
    let distinct: HashSet<&Vec<u8>> = single_use.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        single_use.len(),
        "a KeyPackage handed out twice"
    );
    assert_eq!(
        single_use.len(),
        5,
        "the five single-use packages are drained"
    );
    assert!(
        rate_limited > 0,
        "the per-target limit slowed the drain ({} handed out)",
        handed.len()
    );
    // An honest member can still add the victim: the last-resort package.
    let mut adder = ClientMachine::generate([0xa2; 32]);
    let adder_conn = server.login(adder.signing_key()).await;
    let (_, r) = drive(
        &mut adder,
        &adder_conn,
        ClientCommand::Register { count: 1 },
    )
    .await;
    r.expect("adder registers");
    let (_, r) = drive(
        &mut adder,
        &adder_conn,
        ClientCommand::CreateGroup {
            name: "after the drain".into(),
            pq: false,
        },
    )
    .await;
    r.expect("create group");
    let mut added = None;
    for _ in 0..100 {
        let (_, r) = drive(
            &mut adder,
            &adder_conn,
            ClientCommand::AddMember {
                group: "after the drain".into(),
                member: victim_key,
            },
        )
        .await;
        match r {
            Err(quicproquo_core::client::CommandError::Server(ServiceError {
                kind: ErrorKind::RateLimited { retry_after_ms },
                ..
            })) => tokio::time::sleep(Duration::from_millis(retry_after_ms.clamp(10, 1_000))).await,
            other => {
                added = Some(other);
                break;
            }
        }
    }
    let added = added.expect("the per-target limit refills");
    assert!(
        matches!(added, Ok(Outcome::MemberAdded { .. })),
        "{added:?}"
    );
    let (events, r) = drive(
        &mut victim,
        &victim_conn,
        ClientCommand::Receive { wait_ms: 0 },
    )
    .await;
    r.expect("victim receives");
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::Joined { group, .. } if group == "after the drain")),
        "{events:?}"
    );
    honest.stop().await;
    server.finish("KeyPackage draining");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_spam_to_one_recipient_is_refused_without_loss() {
    let server = Server::start(&[
        ("QPQ_QUEUE_DEPTH_MAX", "300"),
        ("QPQ_ENQUEUE_PER_SENDER_BURST", "150"),
        ("QPQ_ENQUEUE_PER_SENDER_PER_SEC", "50"),
    ]);
    let honest = Honest::start(&server, 1).await;
    let victim_sk = user(100);
    let victim = id(&victim_sk);
    let acked: Arc<std::sync::Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let refusals: Arc<std::sync::Mutex<HashMap<&'static str, u32>>> = Arc::default();
    let mut tasks = JoinSet::new();
    for s in 0..4u8 {
        let c = Arc::new(server.login(&user(110 + s)).await);
        for i in 0..250u32 {
            let (c, acked, refusals) = (c.clone(), acked.clone(), refusals.clone());
            tasks.spawn(async move {
                let mut mid = [s; 16];
                mid[1..5].copy_from_slice(&i.to_be_bytes());
                let payload = [&[s][..], &i.to_be_bytes()[..]].concat();
                match c
                    .enqueue(victim, ChannelId::DEFAULT, payload.clone(), MessageId(mid))
                    .await
                {
                    Ok(seq) => {
                        let prev = acked.lock().unwrap().insert(seq, payload);
                        assert!(prev.is_none(), "seq {seq} acknowledged twice");
                    }
                    Err(ClientError::Service(e)) => {
                        let what = match e.kind {
                            ErrorKind::RateLimited { .. } => "rateLimited",
                            ErrorKind::QueueFull => "queueFull",
                            other => panic!("spam answered {other:?}: {}", e.message),
                        };
                        *refusals.lock().unwrap().entry(what).or_default() += 1;
                    }
                    Err(e) => panic!("spam enqueue failed in transit: {e}"),
                }
            });
        }
    }
    while let Some(r) = tasks.join_next().await {
        r.expect("spam task");
    }
    let acked = acked.lock().unwrap().clone();
    let refusals = refusals.lock().unwrap().clone();
    assert!(refusals.contains_key("rateLimited"), "{refusals:?}");
    assert!(refusals.contains_key("queueFull"), "{refusals:?}");
    assert_eq!(acked.len(), 300, "the queue filled to its depth");
    // The victim finds every acknowledged message, once, in seq order.
    let v = server.login(&victim_sk).await;
    let mut cursor = 0;
    let mut stored = BTreeMap::new();
    loop {
        let f = v
            .fetch(victim, ChannelId::DEFAULT, cursor, 100)
            .await
            .expect("victim fetches");
        if f.messages.is_empty() {
            break;
        }
        for m in f.messages {
            assert_eq!(m.seq, cursor + 1, "gap-free");
            cursor = m.seq;
            stored.insert(m.seq, m.payload);
        }
    }
    assert_eq!(
        stored, acked,
        "what was acknowledged is exactly what is stored"
    );
    // Drained, the victim's queue takes messages again.
    let friend = server.login(&user(120)).await;
    friend
        .enqueue(
            victim,
            ChannelId::DEFAULT,
            b"hi".to_vec(),
            random_message_id(),
        )
        .await
        .expect("the drained queue takes an honest message");
    honest.stop().await;
    server.finish("enqueue spam");
}

// ============================================================== the harness

/// A `qpq-server` child process, its address and its memory sampler.
struct Server {
    child: Child,
    addr: SocketAddr,
    trust: ServerTrust,
    peak_rss_kib: Arc<AtomicU64>,
    sampling: Arc<AtomicBool>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts the server binary on an ephemeral loopback port with extra
    /// `QPQ_*` settings, and starts sampling its RSS.
    fn start(env: &[(&str, &str)]) -> Server {
        let dir = tempfile::tempdir().expect("data directory");
        let config = dir.path().join("none.toml");
        std::fs::write(&config, "").expect("empty config");
        let mut command = Command::new(env!("CARGO_BIN_EXE_qpq-server"));
        command
            .env("QPQ_LISTEN", "127.0.0.1:0")
            .env("QPQ_DATA_DIR", dir.path())
            .env("QPQ_CONFIG", &config)
            .env("QPQ_LOG", "error")
            .current_dir(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn qpq-server");
        let (addr, fingerprint) = read_start_lines(&mut child);
        let peak_rss_kib = Arc::new(AtomicU64::new(0));
        let sampling = Arc::new(AtomicBool::new(true));
        let pid = child.id();
        {
            let (peak, sampling) = (peak_rss_kib.clone(), sampling.clone());
            std::thread::spawn(move || {
                while sampling.load(Ordering::Relaxed) {
                    if let Some(kib) = rss_kib(pid) {
                        peak.fetch_max(kib, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        Server {
            child,
            addr: addr.parse().expect("address"),
            trust: ServerTrust::fingerprint_hex(&fingerprint).expect("fingerprint"),
            peak_rss_kib,
            sampling,
            _dir: dir,
        }
    }

    async fn client(&self) -> Client {
        Client::connect(&self.addr.to_string(), &self.trust)
            .await
            .expect("connect")
    }

    async fn login(&self, key: &SigningKey) -> Client {
        let mut c = self.client().await;
        c.authenticate(key).await.expect("authenticate");
        c
    }

    /// A client authenticated as `key`, connecting from loopback address
    /// `ip` (Linux routes all of 127.0.0.0/8 to loopback).
    async fn login_from(&self, key: &SigningKey, ip: &str) -> Client {
        let bind: SocketAddr = format!("{ip}:0").parse().expect("address");
        let endpoint = quinn::Endpoint::client(bind).expect("endpoint");
        let mut c = Client::connect_with(&endpoint, self.addr, "localhost", &self.trust)
            .await
            .expect("connect");
        c.authenticate(key).await.expect("authenticate");
        c
    }

    /// Checks the server survived, stops it, and checks its peak memory.
    fn finish(mut self, attack: &str) {
        assert!(
            self.child.try_wait().expect("child status").is_none(),
            "{attack}: the server died"
        );
        self.sampling.store(false, Ordering::Relaxed);
        let peak_mib = self.peak_rss_kib.load(Ordering::Relaxed) / 1024;
        self.child.kill().ok();
        self.child.wait().ok();
        eprintln!("attack `{attack}`: peak server RSS {peak_mib} MiB (bound {RSS_BOUND_MIB} MiB)");
        assert!(
            peak_mib < RSS_BOUND_MIB,
            "{attack}: the server's RSS reached {peak_mib} MiB, over the {RSS_BOUND_MIB} MiB bound"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.sampling.store(false, Ordering::Relaxed);
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

/// The resident set size of process `pid`, from `/proc/<pid>/status`.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// An honest sender and recipient exchanging messages in a loop while an
/// attack runs; every request must succeed.
struct Honest {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<u64>,
}

impl Honest {
    async fn start(server: &Server, seed: u8) -> Honest {
        let sender = server.login(&user(seed)).await;
        let recipient_sk = user(seed + 1);
        let recipient = server.login(&recipient_sk).await;
        Self::run(sender, recipient, id(&recipient_sk))
    }

    async fn start_from(server: &Server, seed: u8, ip: &str) -> Honest {
        let sender = server.login_from(&user(seed), ip).await;
        let recipient_sk = user(seed + 1);
        let recipient = server.login_from(&recipient_sk, ip).await;
        Self::run(sender, recipient, id(&recipient_sk))
    }

    fn run(sender: Client, recipient: Client, to: IdentityKey) -> Honest {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut rounds = 0u64;
            let mut cursor = 0;
            loop {
                let payload = format!("honest message {rounds}").into_bytes();
                let seq = sender
                    .enqueue(to, ChannelId::DEFAULT, payload.clone(), random_message_id())
                    .await
                    .unwrap_or_else(|e| panic!("honest enqueue {rounds} failed: {e}"));
                let f = recipient
                    .fetch(to, ChannelId::DEFAULT, cursor, 10)
                    .await
                    .unwrap_or_else(|e| panic!("honest fetch {rounds} failed: {e}"));
                let got = f.messages.last().expect("the honest message is there");
                assert_eq!((got.seq, &got.payload), (seq, &payload));
                cursor = seq;
                rounds += 1;
                if flag.load(Ordering::Relaxed) {
                    return rounds;
                }
            }
        });
        Honest { stop, task }
    }

    /// Stops the loop after its current round; it must have completed at
    /// least one round during the attack, all of them successfully.
    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let rounds = tokio::time::timeout(GUARD, self.task)
            .await
            .expect("the honest client is not stuck")
            .expect("every honest request succeeded");
        assert!(rounds >= 1);
        rounds
    }
}

/// Runs one client-machine command over `client`, answering its requests
/// through the real server.
async fn drive(
    m: &mut ClientMachine,
    client: &Client,
    command: ClientCommand,
) -> (
    Vec<Event>,
    Result<Outcome, quicproquo_core::client::CommandError>,
) {
    m.handle_command(Time::ZERO, command);
    let mut events = Vec::new();
    loop {
        match m.poll_effect().expect("the machine finishes its command") {
            Effect::Persist => {}
            Effect::Connect => m.handle_connected(Time::ZERO),
            Effect::Request { token, request } => {
                let reply = match client.call(request).await {
                    Ok(r) => Ok(r),
                    Err(ClientError::Service(e)) => Err(e),
                    Err(e) => Err(ServiceError::unavailable(e.to_string())),
                };
                m.handle_response(Time::ZERO, token, reply);
            }
            Effect::Event(e) => events.push(e),
            Effect::Done(outcome) => return (events, outcome),
            Effect::DirectSend { .. } | Effect::DirectAnswer { .. } => {
                unreachable!("no direct links here")
            }
        }
    }
}

/// A fresh challenge on `client`'s connection.
async fn challenge(client: &Client) -> [u8; 32] {
    match client.call(RequestBody::AuthChallenge).await {
        Ok(Response::AuthChallenge { nonce }) => nonce,
        other => panic!("authChallenge answered {other:?}"),
    }
}

/// An `authenticate` request as `key`, signed over `nonce` and `exporter`.
fn sign_in(key: &SigningKey, nonce: &[u8; 32], exporter: &[u8; 32]) -> Vec<u8> {
    let identity = id(key);
    let signature = key.sign(&auth_message(&identity, nonce, exporter));
    request_bytes(RequestBody::Authenticate {
        identity_key: identity,
        signature: Signature(signature.to_bytes()),
    })
}

/// A `keyPackageCount` request for `identity`: answered only to its owner.
fn key_package_count(identity: IdentityKey) -> Vec<u8> {
    request_bytes(RequestBody::KeyPackageCount {
        identity_key: identity,
        cipher_suite: 0,
    })
}

/// The bytes of a request with the supported authVersion.
fn request_bytes(body: RequestBody) -> Vec<u8> {
    encode_request(&Request {
        auth_version: AUTH_VERSION,
        body,
    })
}

/// Sends `bytes` on a fresh stream of `conn` and decodes the reply; `None`
/// if the stream failed instead.
async fn exchange(conn: &quinn::Connection, bytes: &[u8]) -> Option<Reply> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(bytes).await.ok()?;
    send.finish().ok()?;
    let reply = tokio::time::timeout(GUARD, recv.read_to_end(8 * 1024 * 1024))
        .await
        .ok()?
        .ok()?;
    Some(decode_reply(&reply).expect("a well-formed reply"))
}

/// A small deterministic generator for garbage.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}
