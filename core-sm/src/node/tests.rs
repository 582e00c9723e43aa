//! Unit tests of the NodeService machine, one behaviour each, through a
//! small harness: `Harness` owns a machine over a `MemStore`, syncs after
//! every request (unless told not to) and returns the reply.

use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

use super::layout::{Fence, QueueMeta};
use super::*;
use crate::error::ErrorKind;
use crate::limits::DEFAULT_POOL;
use crate::testing::{EXPORTER, NodeWorld, identity};
use crate::types::{ChannelId, MessageId, QueueId, Signature};

type Harness = NodeWorld;

fn user(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn id(sk: &SigningKey) -> IdentityKey {
    identity(sk)
}

fn conn(n: u64) -> ConnectionId {
    ConnectionId(n)
}

fn ch(bytes: &[u8]) -> ChannelId {
    ChannelId::try_from_slice(bytes).unwrap()
}

fn mid(n: u8) -> MessageId {
    MessageId([n; 16])
}

fn kind(r: &Reply) -> ErrorKind {
    r.as_ref().unwrap_err().kind
}

/// The requests these tests make, on top of the world's.
impl NodeWorld {
    fn fresh() -> Self {
        Self::new(NodeConfig::default())
    }

    fn upload(&mut self, c: u64, owner: &SigningKey, pkg: &[u8], last_resort: bool) -> Reply {
        self.upload_to(c, owner, DEFAULT_POOL, pkg, last_resort)
    }

    fn upload_to(
        &mut self,
        c: u64,
        owner: &SigningKey,
        cipher_suite: u16,
        pkg: &[u8],
        last_resort: bool,
    ) -> Reply {
        self.call(
            c,
            RequestBody::UploadKeyPackage {
                identity_key: id(owner),
                package: pkg.to_vec(),
                last_resort,
                cipher_suite,
            },
        )
    }

    fn pop(&mut self, c: u64, target: &SigningKey) -> Reply {
        self.pop_from(c, target, DEFAULT_POOL)
    }

    fn pop_from(&mut self, c: u64, target: &SigningKey, cipher_suite: u16) -> Reply {
        self.call(
            c,
            RequestBody::FetchKeyPackage {
                identity_key: id(target),
                cipher_suite,
            },
        )
    }

    fn count_in(&mut self, c: u64, owner: &SigningKey, cipher_suite: u16) -> Reply {
        self.call(
            c,
            RequestBody::KeyPackageCount {
                identity_key: id(owner),
                cipher_suite,
            },
        )
    }

    fn enqueue(&mut self, c: u64, to: &SigningKey, channel: &[u8], payload: &[u8], m: u8) -> Reply {
        self.call(
            c,
            RequestBody::Enqueue {
                recipient_key: id(to),
                channel_id: ch(channel),
                payload: payload.to_vec(),
                message_id: mid(m),
            },
        )
    }

    fn fetch(
        &mut self,
        c: u64,
        owner: &SigningKey,
        channel: &[u8],
        after: u64,
        limit: u32,
    ) -> Reply {
        self.call(
            c,
            RequestBody::Fetch {
                recipient_key: id(owner),
                channel_id: ch(channel),
                after_seq: after,
                limit,
            },
        )
    }

    fn fetch_wait(&mut self, c: u64, owner: &SigningKey, after: u64, timeout_ms: u64) -> RequestId {
        self.send(
            c,
            RequestBody::FetchWait {
                recipient_key: id(owner),
                channel_id: ChannelId::DEFAULT,
                after_seq: after,
                limit: 10,
                timeout_ms,
            },
        )
    }
}

fn seqs(r: &Reply) -> Vec<u64> {
    match r {
        Ok(Response::Messages { messages, .. }) => messages.iter().map(|m| m.seq).collect(),
        other => panic!("not messages: {other:?}"),
    }
}

fn payloads(r: &Reply) -> Vec<Vec<u8>> {
    match r {
        Ok(Response::Messages { messages, .. }) => {
            messages.iter().map(|m| m.payload.clone()).collect()
        }
        other => panic!("not messages: {other:?}"),
    }
}

fn enqueued(r: &Reply) -> u64 {
    match r {
        Ok(Response::Enqueued { seq }) => *seq,
        other => panic!("not enqueued: {other:?}"),
    }
}

// ----- authentication --------------------------------------------------

#[test]
fn authentication_binds_identity() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.login(1, &alice);
    assert_eq!(h.upload(1, &alice, b"kp", false).map(|_| ()), Ok(()));
}

#[test]
fn every_method_refuses_unauthenticated_connections() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.open(1);
    let bodies = [
        RequestBody::UploadKeyPackage {
            identity_key: id(&alice),
            package: b"kp".to_vec(),
            last_resort: false,
            cipher_suite: 0,
        },
        RequestBody::FetchKeyPackage {
            identity_key: id(&alice),
            cipher_suite: 0,
        },
        RequestBody::KeyPackageCount {
            identity_key: id(&alice),
            cipher_suite: 0,
        },
        RequestBody::FetchHybridKey {
            identity_key: id(&alice),
        },
        RequestBody::Enqueue {
            recipient_key: id(&alice),
            channel_id: ChannelId::DEFAULT,
            payload: b"x".to_vec(),
            message_id: mid(1),
        },
        RequestBody::Fetch {
            recipient_key: id(&alice),
            channel_id: ChannelId::DEFAULT,
            after_seq: 0,
            limit: 1,
        },
        RequestBody::FetchWait {
            recipient_key: id(&alice),
            channel_id: ChannelId::DEFAULT,
            after_seq: 0,
            limit: 1,
            timeout_ms: 100,
        },
        RequestBody::EnqueueBatch {
            recipient_keys: vec![id(&alice)],
            channel_id: ChannelId::DEFAULT,
            payload: b"x".to_vec(),
            message_id: mid(1),
        },
        RequestBody::EnqueueMany {
            recipient_keys: vec![id(&alice)],
            channel_id: ChannelId::DEFAULT,
            messages: vec![Outgoing {
                payload: b"x".to_vec(),
                message_id: mid(1),
            }],
        },
    ];
    for body in bodies {
        let r = h.call(1, body.clone());
        assert_eq!(kind(&r), ErrorKind::Unauthenticated, "{}", body.method());
    }
    let sig = Signature([0; 64]);
    let r = h.call(
        1,
        RequestBody::UploadHybridKey {
            identity_key: id(&alice),
            hybrid_key: b"k".to_vec(),
            signature: sig,
        },
    );
    assert_eq!(kind(&r), ErrorKind::Unauthenticated);
}

#[test]
fn unknown_auth_version_is_refused() {
    let mut h = Harness::fresh();
    h.open(1);
    h.node.handle_request(
        h.now,
        conn(1),
        RequestId(99),
        Request {
            auth_version: 2,
            body: RequestBody::AuthChallenge,
        },
    );
    let replies = h.drain();
    assert_eq!(kind(&replies[0].1), ErrorKind::InvalidArgument);
}

#[test]
fn authenticate_without_challenge_is_refused() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.open(1);
    let sig = alice.sign(&auth_message(&id(&alice), &[0; 32], &EXPORTER));
    let r = h.call(
        1,
        RequestBody::Authenticate {
            identity_key: id(&alice),
            signature: Signature(sig.to_bytes()),
        },
    );
    assert_eq!(kind(&r), ErrorKind::Unauthenticated);
}

#[test]
fn wrong_signature_is_refused_and_burns_the_nonce() {
    let mut h = Harness::fresh();
    let alice = user(1);
    let mallory = user(2);
    h.open(1);
    let Ok(Response::AuthChallenge { nonce }) = h.call(1, RequestBody::AuthChallenge) else {
        panic!()
    };
    // Mallory signs a claim to be Alice.
    let bad = mallory.sign(&auth_message(&id(&alice), &nonce, &EXPORTER));
    let r = h.call(
        1,
        RequestBody::Authenticate {
            identity_key: id(&alice),
            signature: Signature(bad.to_bytes()),
        },
    );
    assert_eq!(kind(&r), ErrorKind::Unauthenticated);
    // Even the right signature over the same nonce is now refused.
    let good = alice.sign(&auth_message(&id(&alice), &nonce, &EXPORTER));
    let r = h.call(
        1,
        RequestBody::Authenticate {
            identity_key: id(&alice),
            signature: Signature(good.to_bytes()),
        },
    );
    assert_eq!(kind(&r), ErrorKind::Unauthenticated);
}

#[test]
fn signature_does_not_work_on_another_connection() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.open(1);
    let Ok(Response::AuthChallenge { nonce }) = h.call(1, RequestBody::AuthChallenge) else {
        panic!()
    };
    let sig = alice.sign(&auth_message(&id(&alice), &nonce, &EXPORTER));
    // Connection 2 has another TLS session, hence another exporter value.
    h.node
        .handle_connection_opened(h.now, conn(2), [0x22; 32])
        .unwrap();
    let _ = h.call(2, RequestBody::AuthChallenge);
    let r = h.call(
        2,
        RequestBody::Authenticate {
            identity_key: id(&alice),
            signature: Signature(sig.to_bytes()),
        },
    );
    assert_eq!(kind(&r), ErrorKind::Unauthenticated);
}

#[test]
fn nonces_differ_between_challenges() {
    let mut h = Harness::fresh();
    h.open(1);
    let a = h.call(1, RequestBody::AuthChallenge);
    let b = h.call(1, RequestBody::AuthChallenge);
    assert_ne!(a, b);
}

#[test]
fn second_authentication_on_a_connection_is_refused() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.login(1, &alice);
    assert_eq!(
        kind(&h.call(1, RequestBody::AuthChallenge)),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn connection_table_is_bounded() {
    let mut h = Harness::new(NodeConfig {
        connections_max: 2,
        ..NodeConfig::default()
    });
    h.open(1);
    h.open(2);
    let e = h
        .node
        .handle_connection_opened(h.now, conn(3), EXPORTER)
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    h.node.handle_connection_closed(h.now, conn(1));
    h.open(3);
}

// ----- KeyPackages ------------------------------------------------------

#[test]
fn upload_returns_sha256_fingerprint() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.login(1, &alice);
    let expected: [u8; 32] = Sha256::digest(b"package").into();
    assert_eq!(
        h.upload(1, &alice, b"package", false),
        Ok(Response::KeyPackageUploaded {
            fingerprint: expected
        })
    );
}

#[test]
fn pop_is_fifo_and_never_returns_same_package_twice() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.upload(1, &alice, b"kp1", false).unwrap();
    h.upload(1, &alice, b"kp2", false).unwrap();
    let first = h.pop(2, &alice);
    let second = h.pop(2, &alice);
    let pkg = |r: Reply| match r {
        Ok(Response::KeyPackage {
            package,
            last_resort: false,
        }) => package,
        other => panic!("{other:?}"),
    };
    assert_eq!(pkg(first), b"kp1");
    assert_eq!(pkg(second), b"kp2");
    assert_eq!(kind(&h.pop(2, &alice)), ErrorKind::NotFound);
}

#[test]
fn last_resort_is_served_and_kept_when_pool_is_empty() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.upload(1, &alice, b"old-lr", true).unwrap();
    h.upload(1, &alice, b"lr", true).unwrap();
    h.upload(1, &alice, b"kp1", false).unwrap();
    let lr = Ok(Response::KeyPackage {
        package: b"lr".to_vec(),
        last_resort: true,
    });
    assert_eq!(
        h.pop(2, &alice),
        Ok(Response::KeyPackage {
            package: b"kp1".to_vec(),
            last_resort: false
        })
    );
    assert_eq!(h.pop(2, &alice), lr);
    assert_eq!(h.pop(2, &alice), lr);
}

#[test]
fn each_cipher_suite_has_its_own_pool_and_last_resort() {
    const PQ: u16 = 0x004F;
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.upload(1, &alice, b"classic", false).unwrap();
    h.upload_to(1, &alice, PQ, b"pq-1", false).unwrap();
    h.upload_to(1, &alice, PQ, b"pq-2", false).unwrap();
    h.upload_to(1, &alice, PQ, b"pq-lr", true).unwrap();
    let counted = |count, has_last_resort| {
        Ok(Response::KeyPackageCount {
            count,
            has_last_resort,
        })
    };
    assert_eq!(h.count_in(1, &alice, DEFAULT_POOL), counted(1, false));
    assert_eq!(h.count_in(1, &alice, PQ), counted(2, true));
    assert_eq!(h.count_in(1, &alice, 0x0003), counted(0, false));
    let package = |p: &[u8], last_resort| {
        Ok(Response::KeyPackage {
            package: p.to_vec(),
            last_resort,
        })
    };
    assert_eq!(h.pop_from(2, &alice, PQ), package(b"pq-1", false));
    assert_eq!(h.pop(2, &alice), package(b"classic", false));
    // The default pool is empty and has no last resort: the PQ pool's is
    // not handed out for it.
    assert_eq!(
        h.pop(2, &alice).map_err(|e| e.kind),
        Err(ErrorKind::NotFound)
    );
    assert_eq!(h.pop_from(2, &alice, PQ), package(b"pq-2", false));
    assert_eq!(h.pop_from(2, &alice, PQ), package(b"pq-lr", true));
    // Across a restart too.
    h.upload_to(1, &alice, PQ, b"pq-3", false).unwrap();
    let mut h = h.crash_and_reopen(NodeConfig::default(), Time::ZERO);
    h.login(1, &alice);
    h.login(2, &bob);
    assert_eq!(h.count_in(1, &alice, PQ), counted(1, true));
    assert_eq!(h.pop_from(2, &alice, PQ), package(b"pq-3", false));
    // A pool the server does not keep is refused, before anything is read.
    for suite in [0x0008, 0x004C, 0xFFFF] {
        for reply in [
            h.upload_to(1, &alice, suite, b"x", false),
            h.pop_from(2, &alice, suite),
            h.count_in(1, &alice, suite),
        ] {
            let e = reply.expect_err("an unknown pool");
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
            assert!(e.message.contains("cipher suite"), "{e}");
        }
    }
}

#[test]
fn key_package_count_reports_pool_and_last_resort() {
    let mut h = Harness::fresh();
    let alice = user(1);
    h.login(1, &alice);
    let count = |h: &mut Harness| {
        h.call(
            1,
            RequestBody::KeyPackageCount {
                identity_key: id(&alice),
                cipher_suite: 0,
            },
        )
    };
    assert_eq!(
        count(&mut h),
        Ok(Response::KeyPackageCount {
            count: 0,
            has_last_resort: false
        })
    );
    h.upload(1, &alice, b"a", false).unwrap();
    h.upload(1, &alice, b"b", false).unwrap();
    h.upload(1, &alice, b"lr", true).unwrap();
    assert_eq!(
        count(&mut h),
        Ok(Response::KeyPackageCount {
            count: 2,
            has_last_resort: true
        })
    );
}

#[test]
fn key_package_validation_errors() {
    let mut h = Harness::new(NodeConfig {
        key_packages_per_identity_max: 2,
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    assert_eq!(
        kind(&h.upload(1, &alice, b"", false)),
        ErrorKind::InvalidArgument
    );
    let big = vec![0u8; limits::KEY_PACKAGE_BYTES_MAX + 1];
    assert_eq!(
        kind(&h.upload(1, &alice, &big, false)),
        ErrorKind::PayloadTooLarge
    );
    assert_eq!(
        kind(&h.upload(1, &bob, b"kp", false)),
        ErrorKind::PermissionDenied
    );
    h.upload(1, &alice, b"1", false).unwrap();
    h.upload(1, &alice, b"2", false).unwrap();
    assert_eq!(
        kind(&h.upload(1, &alice, b"3", false)),
        ErrorKind::QueueFull
    );
    // The last resort does not count against the pool.
    h.upload(1, &alice, b"lr", true).unwrap();
    let r = h.call(
        1,
        RequestBody::KeyPackageCount {
            identity_key: id(&bob),
            cipher_suite: 0,
        },
    );
    assert_eq!(kind(&r), ErrorKind::PermissionDenied);
}

#[test]
fn key_package_fetch_is_rate_limited_per_pair_and_per_target() {
    let mut h = Harness::new(NodeConfig {
        key_fetch_pair_rate: RateConfig {
            burst: 2,
            per_sec: 1,
        },
        key_package_fetch_target_rate: RateConfig {
            burst: 3,
            per_sec: 1,
        },
        ..NodeConfig::default()
    });
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    h.upload(1, &alice, b"lr", true).unwrap();
    h.pop(2, &alice).unwrap();
    h.pop(2, &alice).unwrap();
    let r = h.pop(2, &alice);
    assert!(matches!(
        kind(&r),
        ErrorKind::RateLimited { retry_after_ms } if retry_after_ms > 0
    ));
    // Carol has her own pair budget but the target's budget has one left.
    h.pop(3, &alice).unwrap();
    assert!(matches!(
        kind(&h.pop(3, &alice)),
        ErrorKind::RateLimited { .. }
    ));
    // Time refills the buckets.
    h.now = h.now.saturating_add(Duration::from_secs(2));
    h.pop(3, &alice).unwrap();
}

#[test]
fn popped_package_comes_back_only_if_the_pop_was_never_durable() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.upload(1, &alice, b"kp1", false).unwrap();
    h.set_auto_sync(false);
    let rid = h.send(
        2,
        RequestBody::FetchKeyPackage {
            identity_key: id(&alice),
            cipher_suite: 0,
        },
    );
    // Not durable, so not answered.
    assert!(h.drain().iter().all(|(r, _)| *r != rid));
    let now = h.now;
    let mut h2 = h.crash_and_reopen(NodeConfig::default(), now);
    h2.login(1, &alice);
    h2.login(2, &bob);
    assert_eq!(
        h2.pop(2, &alice),
        Ok(Response::KeyPackage {
            package: b"kp1".to_vec(),
            last_resort: false
        })
    );
    // That pop was durable: after another crash it is gone for good.
    let mut h3 = h2.crash_and_reopen(NodeConfig::default(), now);
    h3.login(2, &bob);
    assert_eq!(kind(&h3.pop(2, &alice)), ErrorKind::NotFound);
}

// ----- hybrid keys ------------------------------------------------------

#[test]
fn hybrid_key_upload_verifies_signature_and_fetch_returns_it() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let key = vec![5u8; 1216];
    let sig = Signature(
        alice
            .sign(&hybrid_key_message(&id(&alice), &key))
            .to_bytes(),
    );
    let fetch = |h: &mut Harness| {
        h.call(
            2,
            RequestBody::FetchHybridKey {
                identity_key: id(&alice),
            },
        )
    };
    assert_eq!(kind(&fetch(&mut h)), ErrorKind::NotFound);
    let upload = |h: &mut Harness, who: &SigningKey, key: Vec<u8>, sig| {
        h.call(
            1,
            RequestBody::UploadHybridKey {
                identity_key: id(who),
                hybrid_key: key,
                signature: sig,
            },
        )
    };
    assert_eq!(
        upload(&mut h, &alice, key.clone(), sig),
        Ok(Response::HybridKeyUploaded)
    );
    assert_eq!(
        fetch(&mut h),
        Ok(Response::HybridKey {
            hybrid_key: key.clone(),
            signature: sig
        })
    );
    // Not the owner, bad signature, empty, too large.
    assert_eq!(
        kind(&upload(&mut h, &bob, key.clone(), sig)),
        ErrorKind::PermissionDenied
    );
    let mut other = key.clone();
    other[0] ^= 1;
    assert_eq!(
        kind(&upload(&mut h, &alice, other, sig)),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(&upload(&mut h, &alice, vec![], sig)),
        ErrorKind::InvalidArgument
    );
    let huge = vec![0u8; limits::HYBRID_KEY_BYTES_MAX + 1];
    assert_eq!(
        kind(&upload(&mut h, &alice, huge, sig)),
        ErrorKind::PayloadTooLarge
    );
}

// ----- queues -----------------------------------------------------------

#[test]
fn enqueue_assigns_consecutive_seqs_per_queue() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"a", 1)), 1);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"b", 2)), 2);
    // Another channel is another queue with its own counter.
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"ch", b"c", 3)), 1);
}

#[test]
fn enqueue_retry_with_same_message_id_is_stored_once() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"a", 1)), 1);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"b", 2)), 2);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"a", 1)), 1);
    assert_eq!(seqs(&h.fetch(2, &bob, b"", 0, 10)), vec![1, 2]);
    // Still recognised after the message was acknowledged.
    h.fetch(2, &bob, b"", 2, 10).unwrap();
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"a", 1)), 1);
    assert!(seqs(&h.fetch(2, &bob, b"", 2, 10)).is_empty());
}

#[test]
fn two_senders_with_one_message_id_are_two_messages() {
    let mut h = Harness::fresh();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"from alice", 1)), 1);
    // Carol's message under the same id is hers, not a retry of Alice's.
    assert_eq!(enqueued(&h.enqueue(3, &bob, b"", b"from carol", 1)), 2);
    // Each one's retry is still recognised, as its own.
    assert_eq!(enqueued(&h.enqueue(3, &bob, b"", b"from carol", 1)), 2);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"from alice", 1)), 1);
    let r = h.fetch(2, &bob, b"", 0, 10);
    assert_eq!(
        payloads(&r),
        vec![b"from alice".to_vec(), b"from carol".to_vec()]
    );
    // The same holds in a batch to several recipients.
    let r = h.call(
        3,
        RequestBody::EnqueueBatch {
            recipient_keys: vec![id(&alice), id(&bob)],
            channel_id: ChannelId::DEFAULT,
            payload: b"carol to both".to_vec(),
            message_id: mid(7),
        },
    );
    assert!(matches!(r, Ok(Response::EnqueuedBatch { ref seqs }) if *seqs == vec![1, 3]));
    let r = h.call(
        1,
        RequestBody::EnqueueBatch {
            recipient_keys: vec![id(&bob)],
            channel_id: ChannelId::DEFAULT,
            payload: b"alice to bob".to_vec(),
            message_id: mid(7),
        },
    );
    assert!(matches!(r, Ok(Response::EnqueuedBatch { ref seqs }) if *seqs == vec![4]));
}

/// Enqueues `x` to `to`'s default queue on connection `c` under message id
/// `i` (big-endian) followed by bytes `fill`.
fn numbered(h: &mut Harness, c: u64, to: &SigningKey, fill: u8, i: u64) -> Reply {
    let mut m = [fill; 16];
    m[..8].copy_from_slice(&i.to_be_bytes());
    h.call(
        c,
        RequestBody::Enqueue {
            recipient_key: id(to),
            channel_id: ChannelId::DEFAULT,
            payload: b"x".to_vec(),
            message_id: MessageId(m),
        },
    )
}

/// Rewrites queue `q` as format 3 stored it (every record under the long
/// queue key, six counters), with the store's version 3. Returns its
/// counters as format 3 read them.
fn as_format_3(h: &mut Harness, q: &QueueId) -> QueueMeta {
    let store = h.node.store_mut();
    let bytes = store.get(&layout::queue_meta_key(q)).unwrap().unwrap();
    let meta = QueueMeta::decode(&bytes).unwrap();
    let long = QueueMeta::decode(&bytes[..48]).unwrap();
    let mut b = Batch::new();
    for seq in meta.head..meta.next_seq {
        let from = layout::message_key(q, &meta, seq);
        let record = store.get(&from).unwrap().expect("entry");
        b.delete(from);
        b.put(layout::message_key(q, &long, seq), record);
    }
    let window = limits::DEDUP_WINDOW_PER_QUEUE;
    for seq in meta.next_seq.saturating_sub(window).max(1)..meta.next_seq {
        let ring = layout::dedup_ring_key(q, &meta, seq);
        let Some(record) = store.get(&ring).unwrap() else {
            continue;
        };
        let dedup = layout::decode_dedup_ring(q, &meta, seq, &record).unwrap();
        let seq_record = store.get(&dedup).unwrap().expect("dedup record");
        b.delete(ring);
        b.delete(dedup);
        b.put(layout::dedup_ring_key(q, &long, seq), record.clone());
        b.put(
            layout::decode_dedup_ring(q, &long, seq, &record).unwrap(),
            seq_record,
        );
    }
    b.put(layout::queue_meta_key(q), bytes[..48].to_vec());
    b.delete(layout::queue_next_key());
    b.put(layout::version_key(), layout::encode_version(3));
    store.write(b).unwrap();
    store.sync();
    long
}

/// Whether any record of `q` is under the long queue key, its counters
/// aside.
fn has_long_records(h: &Harness, q: &QueueId) -> bool {
    let meta_key = layout::queue_meta_key(q);
    let recipient = q.recipient_key.as_bytes();
    h.node
        .store()
        .iter()
        .any(|(k, _)| k != meta_key.as_slice() && k.len() > 33 && &k[1..33] == recipient)
}

/// A store of format 3 kept every record of a queue under the long queue
/// key. Opened by this version, its messages are read, acknowledged and
/// recognised as retries where they are; the queue gets its short id with
/// its next message, and its long records go as they are acknowledged and
/// leave the dedup window.
#[test]
fn a_format_3_queue_is_read_where_it_is_and_moves_to_short_keys() {
    let config = NodeConfig {
        queue_depth_max: 100_000,
        ..NodeConfig::default()
    };
    let mut h = Harness::new(config.clone());
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    for m in 1..=3 {
        assert_eq!(enqueued(&h.enqueue(1, &bob, b"", &[m], m)), u64::from(m));
    }
    assert_eq!(enqueued(&h.enqueue(1, &carol, b"", b"c", 1)), 1);
    let q = QueueId {
        recipient_key: id(&bob),
        channel_id: ChannelId::DEFAULT,
    };
    let carols = QueueId {
        recipient_key: id(&carol),
        channel_id: ChannelId::DEFAULT,
    };
    as_format_3(&mut h, &q);
    as_format_3(&mut h, &carols);
    assert!(has_long_records(&h, &q));
    let now = h.now;
    let mut h = h.crash_and_reopen(config, now);
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    // Read where they are; a retry across the upgrade is stored once.
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"", 1, 10)),
        vec![vec![2], vec![3]]
    );
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", &[3], 3)), 3);
    // The next message gives the queue its short id (the first one:
    // nothing had one before).
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"new", 4)), 4);
    let meta = h.node.queue_meta(&q).unwrap();
    assert_eq!((meta.qid, meta.short_from), (1, 4));
    assert!(
        h.node
            .store()
            .get(&layout::message_key(&q, &meta, 4))
            .unwrap()
            .is_some_and(|_| layout::message_key(&q, &meta, 4).len() == 17)
    );
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"", 1, 10)),
        vec![vec![2], vec![3], b"new".to_vec()]
    );
    // Retries on both sides of the switch are recognised.
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", &[2], 2)), 2);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"new", 4)), 4);
    // A queue only read keeps its long keys; its first message moves it.
    assert_eq!(
        payloads(&h.fetch(3, &carol, b"", 0, 10)),
        vec![b"c".to_vec()]
    );
    assert_eq!(h.node.queue_meta(&carols).unwrap().qid, 0);
    assert_eq!(enqueued(&h.enqueue(1, &carol, b"", b"c", 1)), 1);
    assert_eq!(enqueued(&h.enqueue(1, &carol, b"", b"d", 2)), 2);
    assert_eq!(h.node.queue_meta(&carols).unwrap().qid, 2);
    // Acknowledged, and past the dedup window: no long record is left.
    let window = limits::DEDUP_WINDOW_PER_QUEUE;
    for i in 0..window {
        assert_eq!(enqueued(&numbered(&mut h, 1, &bob, 0xee, i)), i + 5);
    }
    h.fetch(2, &bob, b"", window + 4, 0).unwrap();
    assert!(!has_long_records(&h, &q));
    assert_eq!(h.node.queue_meta(&q).unwrap().depth(), 0);
    // The upgrade is written: a format-3 server would refuse this store.
    assert_eq!(
        h.node.store().get(&layout::version_key()),
        Ok(Some(layout::encode_version(FORMAT_VERSION)))
    );
}

/// A store written before format 3 keyed its dedup records by queue and id
/// alone. Opened by this version, those records still recognise a retry
/// (a sender that retries across the upgrade is stored once) until they
/// leave the dedup window, where they are deleted like new ones.
#[test]
fn format_2_dedup_records_are_read_and_age_out_after_the_upgrade() {
    let mut h = Harness::new(NodeConfig {
        queue_depth_max: 100_000,
        ..NodeConfig::default()
    });
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"a", 1)), 1);
    // Rewrite the store as format 2 wrote it.
    let q = QueueId {
        recipient_key: id(&bob),
        channel_id: ChannelId::DEFAULT,
    };
    let long = as_format_3(&mut h, &q);
    let store = h.node.store_mut();
    let dedup = layout::long_dedup_key(&q, &id(&alice), &mid(1));
    let seq = store.get(&dedup).unwrap().expect("dedup record");
    let meta = store.get(&layout::queue_meta_key(&q)).unwrap().unwrap();
    let mut b = Batch::new();
    b.delete(dedup);
    b.put(layout::legacy_dedup_key(&q, &mid(1)), seq);
    b.put(layout::dedup_ring_key(&q, &long, 1), mid(1).0.to_vec());
    b.put(layout::queue_meta_key(&q), meta[..40].to_vec());
    b.put(layout::version_key(), layout::encode_version(2));
    store.write(b).unwrap();
    store.sync();
    let mut h = h.crash_and_reopen(
        NodeConfig {
            queue_depth_max: 100_000,
            ..NodeConfig::default()
        },
        Time::ZERO,
    );
    h.login(1, &alice);
    h.login(3, &carol);
    // The retry across the upgrade is recognised. A format-2 record names
    // no sender, so until it leaves the window it answers any sender.
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"a", 1)), 1);
    assert_eq!(enqueued(&h.enqueue(3, &bob, b"", b"c", 1)), 1);
    // New messages are recognised per sender.
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"b", 2)), 2);
    assert_eq!(enqueued(&h.enqueue(3, &bob, b"", b"d", 2)), 3);
    let window = limits::DEDUP_WINDOW_PER_QUEUE;
    for i in 0..window {
        assert_eq!(enqueued(&numbered(&mut h, 1, &bob, 0xee, i)), i + 4);
    }
    // The format-2 record left the window and was deleted with its ring
    // record; the id is new again.
    let store = h.node.store();
    assert_eq!(store.get(&layout::legacy_dedup_key(&q, &mid(1))), Ok(None));
    assert_eq!(store.get(&layout::dedup_ring_key(&q, &long, 1)), Ok(None));
    assert_eq!(
        enqueued(&h.enqueue(1, &bob, b"", b"a", 1)),
        window + 4,
        "a new message"
    );
}

#[test]
fn dedup_window_forgets_old_ids_and_stays_bounded() {
    let mut h = Harness::new(NodeConfig {
        queue_depth_max: 100_000,
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    let window = limits::DEDUP_WINDOW_PER_QUEUE;
    for i in 0..=window {
        assert_eq!(enqueued(&numbered(&mut h, 1, &bob, 0, i)), i + 1);
    }
    // The first id has left the window: a "retry" is a new message.
    let r = h.call(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"x".to_vec(),
            message_id: MessageId([0; 16]),
        },
    );
    assert_eq!(enqueued(&r), window + 2);
    // Dedup and ring records are bounded by the window (2 records each),
    // plus messages, queue meta, the version record.
    let records = h.node.store().len() as u64;
    assert!(records <= (window + 2) + 2 * window + 2 + 2, "{records}");
}

#[test]
fn fetch_acknowledges_up_to_cursor_and_keeps_the_rest() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    for (i, p) in [b"a", b"b", b"c"].iter().enumerate() {
        h.enqueue(1, &bob, b"", *p, i as u8).unwrap();
    }
    let r = h.fetch(2, &bob, b"", 0, 2);
    assert_eq!(seqs(&r), vec![1, 2]);
    assert_eq!(payloads(&r), vec![b"a".to_vec(), b"b".to_vec()]);
    // A lost response loses nothing: the same cursor gets the same data.
    assert_eq!(h.fetch(2, &bob, b"", 0, 2), r);
    let r = h.fetch(2, &bob, b"", 2, 10);
    assert_eq!(seqs(&r), vec![3]);
    assert!(matches!(r, Ok(Response::Messages { next_seq: 4, .. })));
    // Acknowledged messages are gone even for an older cursor.
    assert_eq!(seqs(&h.fetch(2, &bob, b"", 0, 10)), vec![3]);
    // limit 0 only acknowledges.
    assert!(seqs(&h.fetch(2, &bob, b"", 3, 0)).is_empty());
    assert!(seqs(&h.fetch(2, &bob, b"", 0, 10)).is_empty());
}

#[test]
fn seq_is_never_reused_after_the_queue_empties() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"", b"a", 1).unwrap();
    h.fetch(2, &bob, b"", 1, 10).unwrap();
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"b", 2)), 2);
}

#[test]
fn fetch_of_someone_elses_queue_returns_and_deletes_nothing() {
    let mut h = Harness::fresh();
    let (alice, bob, mallory) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &mallory);
    h.enqueue(1, &bob, b"", b"secret", 1).unwrap();
    assert_eq!(
        kind(&h.fetch(3, &bob, b"", 1, 10)),
        ErrorKind::PermissionDenied
    );
    let rid = h.fetch_wait(3, &bob, 1, 1_000);
    let replies = h.drain();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, rid);
    assert_eq!(kind(&replies[0].1), ErrorKind::PermissionDenied);
    assert_eq!(seqs(&h.fetch(2, &bob, b"", 0, 10)), vec![1]);
}

#[test]
fn fetch_with_cursor_beyond_last_seq_is_invalid_and_changes_nothing() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"", b"a", 1).unwrap();
    assert_eq!(
        kind(&h.fetch(2, &bob, b"", 5, 10)),
        ErrorKind::InvalidArgument
    );
    assert_eq!(seqs(&h.fetch(2, &bob, b"", 0, 10)), vec![1]);
}

#[test]
fn enqueue_validation_errors() {
    let mut h = Harness::new(NodeConfig {
        queue_depth_max: 2,
        queue_bytes_max: 10,
        ..NodeConfig::default()
    });
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    assert_eq!(
        kind(&h.enqueue(1, &bob, b"", b"", 1)),
        ErrorKind::InvalidArgument
    );
    let big = vec![0u8; limits::PAYLOAD_BYTES_MAX + 1];
    assert_eq!(
        kind(&h.enqueue(1, &bob, b"", &big, 1)),
        ErrorKind::PayloadTooLarge
    );
    h.enqueue(1, &bob, b"", b"1", 1).unwrap();
    h.enqueue(1, &bob, b"", b"2", 2).unwrap();
    assert_eq!(
        kind(&h.enqueue(1, &bob, b"", b"3", 3)),
        ErrorKind::QueueFull
    );
    // A retry of a stored message still answers, even when full.
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"1", 1)), 1);
    // Byte limit.
    h.enqueue(1, &carol, b"", b"123456", 4).unwrap();
    assert_eq!(
        kind(&h.enqueue(1, &carol, b"", b"12345", 5)),
        ErrorKind::QueueFull
    );
    h.enqueue(1, &carol, b"", b"1234", 6).unwrap();
}

#[test]
fn acknowledging_frees_queue_capacity() {
    let mut h = Harness::new(NodeConfig {
        queue_depth_max: 1,
        queue_bytes_max: 4,
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"", b"abcd", 1).unwrap();
    assert_eq!(
        kind(&h.enqueue(1, &bob, b"", b"e", 2)),
        ErrorKind::QueueFull
    );
    h.fetch(2, &bob, b"", 1, 0).unwrap();
    h.enqueue(1, &bob, b"", b"efgh", 2).unwrap();
}

#[test]
fn enqueue_is_rate_limited_per_sender() {
    let mut h = Harness::new(NodeConfig {
        enqueue_rate: RateConfig {
            burst: 2,
            per_sec: 1,
        },
        ..NodeConfig::default()
    });
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(3, &carol);
    h.enqueue(1, &bob, b"", b"1", 1).unwrap();
    h.enqueue(1, &bob, b"", b"2", 2).unwrap();
    assert!(matches!(
        kind(&h.enqueue(1, &bob, b"", b"3", 3)),
        ErrorKind::RateLimited { .. }
    ));
    // A retry is not a new message and is answered anyway.
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"1", 1)), 1);
    // Another sender is not affected.
    h.enqueue(3, &bob, b"", b"3", 3).unwrap();
}

#[test]
fn fetch_respects_the_reply_byte_budget_but_returns_at_least_one() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let big = vec![1u8; limits::PAYLOAD_BYTES_MAX];
    for i in 0..6 {
        h.enqueue(1, &bob, b"", &big, i).unwrap();
    }
    let n = seqs(&h.fetch(2, &bob, b"", 0, 100)).len();
    assert_eq!(
        n,
        limits::FETCH_RESPONSE_BYTES_MAX / limits::PAYLOAD_BYTES_MAX
    );
}

// ----- long poll --------------------------------------------------------

#[test]
fn fetch_wait_returns_at_once_when_messages_are_pending() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"", b"a", 1).unwrap();
    let rid = h.fetch_wait(2, &bob, 0, 5_000);
    let replies = h.drain();
    assert_eq!(replies[0].0, rid);
    assert_eq!(seqs(&replies[0].1), vec![1]);
    assert_eq!(h.node.waiter_count(), 0);
}

#[test]
fn fetch_wait_is_woken_by_enqueue() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let rid = h.fetch_wait(2, &bob, 0, 5_000);
    assert!(h.drain().is_empty());
    assert_eq!(h.node.waiter_count(), 1);
    assert_eq!(
        h.node.poll_timeout(),
        Some(h.now.saturating_add(Duration::from_secs(5)))
    );
    // An enqueue to another queue does not wake it.
    h.enqueue(1, &alice, b"", b"x", 9).unwrap();
    assert_eq!(h.node.waiter_count(), 1);
    let eid = h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"hi".to_vec(),
            message_id: mid(1),
        },
    );
    let replies = h.drain();
    let woken = replies.iter().find(|(r, _)| *r == rid).unwrap();
    assert_eq!(payloads(&woken.1), vec![b"hi".to_vec()]);
    assert!(replies.iter().any(|(r, _)| *r == eid));
    assert_eq!(h.node.waiter_count(), 0);
    assert_eq!(h.node.poll_timeout(), None);
}

#[test]
fn fetch_wait_expires_at_its_deadline_with_an_empty_reply() {
    let mut h = Harness::fresh();
    let bob = user(2);
    h.login(2, &bob);
    let rid = h.fetch_wait(2, &bob, 0, 1_000);
    let deadline = h.node.poll_timeout().unwrap();
    // A spurious early timeout does nothing.
    h.node.handle_timeout(h.now);
    assert!(h.drain().is_empty());
    h.now = deadline;
    h.node.handle_timeout(h.now);
    let replies = h.drain();
    assert_eq!(replies[0].0, rid);
    assert!(seqs(&replies[0].1).is_empty());
    assert_eq!(h.node.waiter_count(), 0);
}

#[test]
fn shutdown_answers_parked_long_polls_and_parks_no_more() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let parked = h.fetch_wait(2, &bob, 0, 20_000);
    assert!(h.drain().is_empty());
    h.node.handle_shutdown(h.now);
    let replies = h.drain();
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].0, parked);
    assert!(seqs(&replies[0].1).is_empty());
    assert_eq!(h.node.waiter_count(), 0);
    // A fetchWait that arrives now is answered at once, even if empty...
    let late = h.fetch_wait(2, &bob, 0, 20_000);
    let replies = h.drain();
    assert_eq!(replies[0].0, late);
    assert!(seqs(&replies[0].1).is_empty());
    assert_eq!(h.node.poll_timeout(), None);
    // ...and every other request is served as before.
    let seq = enqueued(&h.enqueue(1, &bob, b"", b"hi", 1));
    let late = h.fetch_wait(2, &bob, 0, 20_000);
    let replies = h.drain();
    assert_eq!(replies[0].0, late);
    assert_eq!(seqs(&replies[0].1), vec![seq]);
}

#[test]
fn fetch_wait_timeout_is_clamped() {
    let mut h = Harness::fresh();
    let bob = user(2);
    h.login(2, &bob);
    h.fetch_wait(2, &bob, 0, u64::MAX);
    let max = Duration::from_millis(limits::FETCH_WAIT_TIMEOUT_MS_MAX);
    assert_eq!(h.node.poll_timeout(), Some(h.now.saturating_add(max)));
}

#[test]
fn fetch_wait_needs_a_limit() {
    let mut h = Harness::fresh();
    let bob = user(2);
    h.login(2, &bob);
    let r = h.call(
        2,
        RequestBody::FetchWait {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            after_seq: 0,
            limit: 0,
            timeout_ms: 10,
        },
    );
    assert_eq!(kind(&r), ErrorKind::InvalidArgument);
}

#[test]
fn closing_a_connection_drops_its_waiters() {
    let mut h = Harness::fresh();
    let bob = user(2);
    h.login(2, &bob);
    h.fetch_wait(2, &bob, 0, 1_000);
    h.node.handle_connection_closed(h.now, conn(2));
    assert_eq!(h.node.waiter_count(), 0);
    assert_eq!(h.node.poll_timeout(), None);
}

#[test]
fn waiters_are_bounded_per_connection_and_in_total() {
    let mut h = Harness::new(NodeConfig {
        waiters_per_connection_max: 2,
        waiters_max: 3,
        ..NodeConfig::default()
    });
    let (bob, carol) = (user(2), user(3));
    h.login(2, &bob);
    h.login(3, &carol);
    h.fetch_wait(2, &bob, 0, 1_000);
    h.fetch_wait(2, &bob, 0, 1_000);
    h.fetch_wait(2, &bob, 0, 1_000);
    let replies = h.drain();
    assert!(matches!(kind(&replies[0].1), ErrorKind::RateLimited { .. }));
    let w = |h: &mut Harness| {
        h.send(
            3,
            RequestBody::FetchWait {
                recipient_key: id(&carol),
                channel_id: ChannelId::DEFAULT,
                after_seq: 0,
                limit: 1,
                timeout_ms: 1_000,
            },
        )
    };
    w(&mut h);
    w(&mut h);
    let replies = h.drain();
    assert_eq!(kind(&replies[0].1), ErrorKind::Unavailable);
    assert_eq!(h.node.waiter_count(), 3);
}

// ----- durability -------------------------------------------------------

#[test]
fn replies_wait_for_sync_in_fsync_mode() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.set_auto_sync(false);
    let rid = h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"a".to_vec(),
            message_id: mid(1),
        },
    );
    let mut syncs = Vec::new();
    while let Some(out) = h.node.poll_output() {
        match out {
            Output::Sync { lsn } => syncs.push(lsn),
            Output::Reply { .. } => panic!("reply before durability"),
        }
    }
    assert_eq!(syncs.len(), 1);
    // A read that follows an unsynced write waits too.
    let rid2 = h.send(
        1,
        RequestBody::FetchHybridKey {
            identity_key: id(&bob),
        },
    );
    assert!(h.node.poll_output().is_none());
    assert_eq!(h.node.held_reply_count(), 2);
    let lsn = h.node.store_mut().sync();
    h.node.handle_synced(h.now, lsn);
    let order: Vec<_> = std::iter::from_fn(|| h.node.poll_output())
        .map(|o| match o {
            Output::Reply { request_id, .. } => request_id,
            Output::Sync { .. } => panic!("sync after sync"),
        })
        .collect();
    assert_eq!(order, vec![rid, rid2]);
}

#[test]
fn a_rolled_back_turn_answers_every_reply_it_made_unavailable() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.set_auto_sync(false);
    // Settle the login's writes first: what is durable stays.
    let lsn = h.node.store_mut().sync();
    h.node.handle_synced(h.now, lsn);
    while h.node.poll_output().is_some() {}
    let kept = h.node.store().last_lsn();
    // A read-only request is ready at once; an enqueue is held for its
    // write; the turn is then rolled back by a shared store.
    let read = h.send(
        1,
        RequestBody::KeyPackageCount {
            identity_key: id(&alice),
            cipher_suite: 0,
        },
    );
    let write = h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"a".to_vec(),
            message_id: mid(1),
        },
    );
    h.node
        .handle_turn_aborted(h.now, kept, "it conflicted with a concurrent request");
    let mut answered = Vec::new();
    while let Some(out) = h.node.poll_output() {
        if let Output::Reply {
            request_id, reply, ..
        } = out
        {
            let e = reply.expect_err("rolled back");
            assert_eq!(e.kind, ErrorKind::Unavailable);
            assert!(e.message.contains("rolled this request back"), "{e:?}");
            answered.push(request_id);
        }
    }
    assert_eq!(answered, vec![read, write]);
    assert_eq!(h.node.held_reply_count(), 0);
    // A later sync (covering the rolled-back batch) releases nothing more.
    let lsn = h.node.store_mut().sync();
    h.node.handle_synced(h.now, lsn);
    assert!(std::iter::from_fn(|| h.node.poll_output()).all(|o| matches!(o, Output::Sync { .. })));
}

#[test]
fn buffered_mode_replies_before_the_sync() {
    let mut h = Harness::new(NodeConfig {
        durability: Durability::Buffered,
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.set_auto_sync(false);
    h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"a".to_vec(),
            message_id: mid(1),
        },
    );
    let outputs: Vec<_> = std::iter::from_fn(|| h.node.poll_output()).collect();
    assert!(matches!(outputs[0], Output::Reply { .. }));
    // The disk is still kept up to date behind the reply.
    assert!(matches!(outputs[1], Output::Sync { .. }));
    assert_eq!(outputs.len(), 2);
}

#[test]
fn sync_failure_turns_held_replies_into_unavailable_and_stops_writes() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.set_auto_sync(false);
    h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"a".to_vec(),
            message_id: mid(1),
        },
    );
    h.drain();
    h.node.handle_sync_failed(h.now, "disk on fire");
    let replies = h.drain();
    assert_eq!(kind(&replies[0].1), ErrorKind::Unavailable);
    assert_eq!(
        kind(&h.enqueue(1, &bob, b"", b"b", 2)),
        ErrorKind::Unavailable
    );
}

// Found by the `node_sequence` fuzz target: a long-poll parked before a
// sync failure expired afterwards and was answered with a successful read
// of writes that never became durable.
#[test]
fn sync_failure_answers_parked_long_polls_unavailable() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let rid = h.fetch_wait(2, &bob, 0, 1_000);
    assert!(h.drain().is_empty());
    h.node.handle_sync_failed(h.now, "disk on fire");
    let replies = h.drain();
    let parked = replies.iter().find(|(r, _)| *r == rid).expect("answered");
    assert_eq!(kind(&parked.1), ErrorKind::Unavailable);
    assert_eq!(h.node.waiter_count(), 0);
    assert_eq!(h.node.poll_timeout(), None);
}

// ----- a full disk --------------------------------------------------------

fn disk_full(r: Reply) {
    let e = r.expect_err("refused for lack of space");
    assert_eq!(e.kind, ErrorKind::Unavailable, "{e:?}");
    assert!(e.message.contains("disk is full"), "{e:?}");
}

#[test]
fn a_full_disk_refuses_what_adds_data_and_the_machine_keeps_serving() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.upload(1, &alice, b"kp1", false).unwrap();
    h.upload(1, &alice, b"kp2", false).unwrap();
    let key = vec![5u8; 64];
    let sig = Signature(
        alice
            .sign(&hybrid_key_message(&id(&alice), &key))
            .to_bytes(),
    );
    let upload_hybrid = |h: &mut Harness| {
        h.call(
            1,
            RequestBody::UploadHybridKey {
                identity_key: id(&alice),
                hybrid_key: key.clone(),
                signature: sig,
            },
        )
    };
    upload_hybrid(&mut h).unwrap();
    h.enqueue(1, &bob, b"", b"a", 1).unwrap();
    h.enqueue(1, &bob, b"", b"b", 2).unwrap();

    h.node.store_mut().set_full(true);
    disk_full(h.enqueue(1, &bob, b"", b"c", 3));
    disk_full(batch(&mut h, 1, &[&bob, &alice], b"", b"d", 4));
    disk_full(h.upload(1, &alice, b"kp3", false));
    disk_full(upload_hybrid(&mut h));
    assert_eq!(h.node.failure(), None);
    // Reads are answered.
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"", 0, 10)),
        vec![b"a".to_vec(), b"b".to_vec()]
    );
    assert_eq!(
        h.call(
            1,
            RequestBody::KeyPackageCount {
                identity_key: id(&alice),
                cipher_suite: 0,
            }
        ),
        Ok(Response::KeyPackageCount {
            count: 2,
            has_last_resort: false
        })
    );
    assert_eq!(
        h.call(
            2,
            RequestBody::FetchHybridKey {
                identity_key: id(&alice)
            }
        ),
        Ok(Response::HybridKey {
            hybrid_key: key.clone(),
            signature: sig
        })
    );
    // What only removes still goes through: an acknowledgement, a pop.
    assert_eq!(seqs(&h.fetch(2, &bob, b"", 1, 10)), vec![2]);
    assert!(h.pop(2, &alice).is_ok());

    // With space again the refused writes succeed when retried, at the
    // seqs they would have had: a refusal took nothing.
    h.node.store_mut().set_full(false);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"c", 3)), 3);
    assert_eq!(
        batch_seqs(&batch(&mut h, 1, &[&bob, &alice], b"", b"d", 4)),
        vec![4, 1]
    );
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"", 1, 10)),
        vec![b"b".to_vec(), b"c".to_vec(), b"d".to_vec()]
    );
    assert!(h.upload(1, &alice, b"kp3", false).is_ok());
}

#[test]
fn a_write_refused_for_space_leaves_held_replies_and_long_polls_alone() {
    let mut h = Harness::fresh();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    let parked = h.fetch_wait(3, &carol, 0, 10_000);
    h.set_auto_sync(false);
    let first = h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"a".to_vec(),
            message_id: mid(1),
        },
    );
    assert!(h.drain().is_empty(), "held until synced");
    h.node.store_mut().set_full(true);
    let second = h.send(
        1,
        RequestBody::Enqueue {
            recipient_key: id(&bob),
            channel_id: ChannelId::DEFAULT,
            payload: b"b".to_vec(),
            message_id: mid(2),
        },
    );
    assert!(h.drain().is_empty(), "both wait for the first write's sync");
    assert_eq!(h.node.waiter_count(), 1);
    h.sync();
    let replies = h.drain();
    let reply = |rid| {
        replies
            .iter()
            .find(|(r, _)| *r == rid)
            .map(|(_, x)| x.clone())
    };
    assert_eq!(reply(first), Some(Ok(Response::Enqueued { seq: 1 })));
    disk_full(reply(second).expect("answered"));
    assert_eq!(reply(parked), None, "the long-poll still waits");
    h.node.store_mut().set_full(false);
    h.set_auto_sync(true);
    assert_eq!(enqueued(&h.enqueue(1, &carol, b"", b"c", 3)), 1);
    let woken = h.drain();
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].0, parked);
    assert_eq!(payloads(&woken[0].1), vec![b"c".to_vec()]);
}

#[test]
fn restart_keeps_seq_counters_and_refuses_newer_format() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.enqueue(1, &bob, b"", b"a", 1).unwrap();
    let mut h = h.crash_and_reopen(NodeConfig::default(), Time::ZERO);
    h.login(1, &alice);
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"", b"b", 2)), 2);
    let mut store = h.into_node().into_store();
    let mut b = Batch::new();
    b.put(
        layout::version_key(),
        layout::encode_version(FORMAT_VERSION + 1),
    );
    store.write(b).unwrap();
    let err = NodeService::new(NodeConfig::default(), [3; 32], store).unwrap_err();
    assert_eq!(
        err,
        OpenError::NewerFormat {
            found: FORMAT_VERSION + 1,
            supported: FORMAT_VERSION
        }
    );
}

// ----- enqueueBatch ------------------------------------------------------

fn batch(
    h: &mut Harness,
    c: u64,
    to: &[&SigningKey],
    channel: &[u8],
    payload: &[u8],
    m: u8,
) -> Reply {
    h.call(
        c,
        RequestBody::EnqueueBatch {
            recipient_keys: to.iter().map(|k| id(k)).collect(),
            channel_id: ch(channel),
            payload: payload.to_vec(),
            message_id: mid(m),
        },
    )
}

fn batch_seqs(r: &Reply) -> Vec<u64> {
    match r {
        Ok(Response::EnqueuedBatch { seqs }) => seqs.clone(),
        other => panic!("not a batch answer: {other:?}"),
    }
}

/// Store records holding `needle` somewhere in their value.
fn copies(h: &Harness, needle: &[u8]) -> usize {
    h.node
        .store()
        .iter()
        .filter(|(_, v)| v.windows(needle.len()).any(|w| w == needle))
        .count()
}

#[test]
fn enqueue_batch_stores_the_payload_once_and_gives_each_recipient_a_seq() {
    let mut h = Harness::fresh();
    let (alice, bob, carol, dave) = (user(1), user(2), user(3), user(4));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    h.enqueue(1, &bob, b"g", b"earlier", 1).unwrap();
    let payload = b"the one shared payload".repeat(10);
    let r = batch(&mut h, 1, &[&bob, &carol, &dave], b"g", &payload, 2);
    assert_eq!(batch_seqs(&r), vec![2, 1, 1]);
    assert_eq!(copies(&h, &payload), 1);
    // Each recipient reads it in its own queue, in order.
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"g", 0, 10)),
        vec![b"earlier".to_vec(), payload.clone()]
    );
    assert_eq!(
        payloads(&h.fetch(3, &carol, b"g", 0, 10)),
        vec![payload.clone()]
    );
    // Acknowledged by some: still there for the others.
    h.fetch(2, &bob, b"g", 2, 0).unwrap();
    h.fetch(3, &carol, b"g", 1, 0).unwrap();
    assert_eq!(copies(&h, &payload), 1);
    h.login(4, &dave);
    assert_eq!(seqs(&h.fetch(4, &dave, b"g", 0, 10)), vec![1]);
    // The last acknowledgement drops the payload and its count.
    h.fetch(4, &dave, b"g", 1, 0).unwrap();
    assert_eq!(copies(&h, &payload), 0);
    let left: Vec<u8> = h.node.store().iter().map(|(k, _)| k[0]).collect();
    assert!(
        !left.contains(&0x15) && !left.contains(&0x16),
        "shared payload records left: {left:x?}"
    );
}

#[test]
fn enqueue_batch_retries_are_stored_once_per_recipient() {
    let mut h = Harness::fresh();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    // Bob already has the message (say, sent to him alone first).
    assert_eq!(enqueued(&h.enqueue(1, &bob, b"g", b"m", 7)), 1);
    let r = batch(&mut h, 1, &[&bob, &carol], b"g", b"m", 7);
    assert_eq!(batch_seqs(&r), vec![1, 1]);
    // A full retry changes nothing and answers the same seqs.
    let again = batch(&mut h, 1, &[&bob, &carol], b"g", b"m", 7);
    assert_eq!(batch_seqs(&again), vec![1, 1]);
    assert_eq!(seqs(&h.fetch(2, &bob, b"g", 0, 10)), vec![1]);
    // One new entry is stored inline, not as a shared payload.
    assert!(!h.node.store().iter().any(|(k, _)| k[0] == 0x15));
}

#[test]
fn enqueue_batch_is_all_or_nothing_and_validates_recipients() {
    let mut h = Harness::new(NodeConfig {
        queue_depth_max: 1,
        ..NodeConfig::default()
    });
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(3, &carol);
    h.enqueue(1, &bob, b"g", b"fills bob", 1).unwrap();
    let r = batch(&mut h, 1, &[&carol, &bob], b"g", b"x", 2);
    assert_eq!(kind(&r), ErrorKind::QueueFull);
    assert!(r.unwrap_err().message.contains("recipient #1"));
    // Carol got nothing from the refused batch.
    assert_eq!(seqs(&h.fetch(3, &carol, b"g", 0, 10)), Vec::<u64>::new());
    assert_eq!(
        kind(&batch(&mut h, 1, &[], b"g", b"x", 3)),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(&batch(&mut h, 1, &[&carol, &carol], b"g", b"x", 3)),
        ErrorKind::InvalidArgument
    );
    let many: Vec<SigningKey> = (0..=limits::ENQUEUE_BATCH_RECIPIENTS_MAX)
        .map(|i| {
            SigningKey::from_bytes(&[
                (i % 250) as u8,
                (i / 250) as u8,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
                9,
            ])
        })
        .collect();
    let refs: Vec<&SigningKey> = many.iter().collect();
    assert_eq!(
        kind(&batch(&mut h, 1, &refs, b"g", b"x", 3)),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(&batch(&mut h, 1, &[&carol], b"g", b"", 3)),
        ErrorKind::InvalidArgument
    );
}

#[test]
fn enqueue_batch_wakes_every_recipients_waiter_and_survives_a_crash() {
    let mut h = Harness::fresh();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    let wb = h.fetch_wait(2, &bob, 0, 1_000);
    let wc = h.send(
        3,
        RequestBody::FetchWait {
            recipient_key: id(&carol),
            channel_id: ChannelId::DEFAULT,
            after_seq: 0,
            limit: 10,
            timeout_ms: 1_000,
        },
    );
    assert!(h.drain().is_empty());
    let rid = h.send(
        1,
        RequestBody::EnqueueBatch {
            recipient_keys: vec![id(&bob), id(&carol)],
            channel_id: ChannelId::DEFAULT,
            payload: b"hello both".to_vec(),
            message_id: mid(1),
        },
    );
    let replies = h.drain();
    let woken: Vec<RequestId> = replies.iter().map(|(r, _)| *r).collect();
    assert!(woken.contains(&wb) && woken.contains(&wc) && woken.contains(&rid));
    let mut h = h.crash_and_reopen(NodeConfig::default(), Time::ZERO);
    h.login(1, &alice);
    h.login(2, &bob);
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"", 0, 10)),
        vec![b"hello both".to_vec()]
    );
    // The blob counter survived: a new batch does not reuse the old one.
    let r = batch(&mut h, 1, &[&bob, &carol], b"", b"second", 2);
    assert_eq!(batch_seqs(&r), vec![2, 2]);
    h.fetch(2, &bob, b"", 2, 0).unwrap();
    h.login(3, &carol);
    assert_eq!(
        payloads(&h.fetch(3, &carol, b"", 0, 10)),
        vec![b"hello both".to_vec(), b"second".to_vec()]
    );
}

// ----- enqueueMany -------------------------------------------------------

/// An `enqueueMany` of `(payload, message id)`s to `to`.
fn many(
    h: &mut Harness,
    c: u64,
    to: &[&SigningKey],
    channel: &[u8],
    messages: &[(&[u8], u8)],
) -> Reply {
    h.call(
        c,
        RequestBody::EnqueueMany {
            recipient_keys: to.iter().map(|k| id(k)).collect(),
            channel_id: ch(channel),
            messages: messages
                .iter()
                .map(|(payload, m)| Outgoing {
                    payload: payload.to_vec(),
                    message_id: mid(*m),
                })
                .collect(),
        },
    )
}

#[test]
fn enqueue_many_appends_in_order_and_answers_message_by_message() {
    let mut h = Harness::fresh();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    h.enqueue(1, &bob, b"g", b"earlier", 1).unwrap();
    let shared = b"shared by both".repeat(10);
    let r = many(
        &mut h,
        1,
        &[&bob, &carol],
        b"g",
        &[(b"one", 2), (&shared, 3), (b"three", 4)],
    );
    // Message by message, each in recipient order.
    assert_eq!(batch_seqs(&r), vec![2, 1, 3, 2, 4, 3]);
    // Several recipients share one copy of each payload.
    assert_eq!(copies(&h, &shared), 1);
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"g", 0, 10)),
        vec![
            b"earlier".to_vec(),
            b"one".to_vec(),
            shared.clone(),
            b"three".to_vec()
        ]
    );
    assert_eq!(
        payloads(&h.fetch(3, &carol, b"g", 0, 10)),
        vec![b"one".to_vec(), shared.clone(), b"three".to_vec()]
    );
    // A retry, with one more message behind it: the stored ones keep their
    // seqs, only the new one is appended.
    let again = many(
        &mut h,
        1,
        &[&bob, &carol],
        b"g",
        &[(b"one", 2), (&shared, 3), (b"three", 4), (b"four", 5)],
    );
    assert_eq!(batch_seqs(&again), vec![2, 1, 3, 2, 4, 3, 5, 4]);
    assert_eq!(seqs(&h.fetch(3, &carol, b"g", 0, 10)), vec![1, 2, 3, 4]);
    // Acknowledged by everyone, the shared payload goes.
    h.fetch(2, &bob, b"g", 5, 0).unwrap();
    h.fetch(3, &carol, b"g", 4, 0).unwrap();
    assert_eq!(copies(&h, &shared), 0);
    // What was stored survives a crash.
    let (alice, bob) = (user(1), user(2));
    many(&mut h, 1, &[&bob], b"g", &[(b"five", 6), (b"six", 7)]).unwrap();
    let mut h = h.crash_and_reopen(NodeConfig::default(), Time::ZERO);
    h.login(1, &alice);
    h.login(2, &bob);
    assert_eq!(
        payloads(&h.fetch(2, &bob, b"g", 5, 10)),
        vec![b"five".to_vec(), b"six".to_vec()]
    );
}

#[test]
fn enqueue_many_is_all_or_nothing_and_checks_its_limits() {
    let mut h = Harness::new(NodeConfig {
        queue_depth_max: 3,
        ..NodeConfig::default()
    });
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    h.login(3, &carol);
    h.enqueue(1, &bob, b"g", b"x", 1).unwrap();
    // Bob has room for two more, not three: nothing is stored for anyone.
    let r = many(
        &mut h,
        1,
        &[&carol, &bob],
        b"g",
        &[(b"a", 2), (b"b", 3), (b"c", 4)],
    );
    assert_eq!(kind(&r), ErrorKind::QueueFull);
    assert!(r.unwrap_err().message.contains("recipient #1"));
    assert_eq!(seqs(&h.fetch(3, &carol, b"g", 0, 10)), Vec::<u64>::new());
    assert_eq!(seqs(&h.fetch(2, &bob, b"g", 0, 10)), vec![1]);
    // An empty or oversized payload anywhere refuses the whole request.
    let r = many(&mut h, 1, &[&carol], b"g", &[(b"a", 2), (b"", 3)]);
    assert_eq!(kind(&r), ErrorKind::InvalidArgument);
    assert!(r.unwrap_err().message.contains("message #1"));
    let big = vec![7u8; limits::PAYLOAD_BYTES_MAX + 1];
    let r = many(&mut h, 1, &[&carol], b"g", &[(b"a", 2), (&big, 3)]);
    assert_eq!(kind(&r), ErrorKind::PayloadTooLarge);
    // So are payloads that pass one by one but not together.
    let half = vec![7u8; limits::ENQUEUE_MANY_BYTES_MAX / 2 + 1];
    let r = many(&mut h, 1, &[&carol], b"g", &[(&half, 2), (&half, 3)]);
    assert_eq!(kind(&r), ErrorKind::PayloadTooLarge);
    // No messages, an id twice, too many messages, too many entries.
    assert_eq!(
        kind(&many(&mut h, 1, &[&carol], b"g", &[])),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        kind(&many(&mut h, 1, &[&carol], b"g", &[(b"a", 2), (b"b", 2)])),
        ErrorKind::InvalidArgument
    );
    let ids: Vec<u8> = (0..=limits::ENQUEUE_MANY_MESSAGES_MAX as u8).collect();
    let messages: Vec<(&[u8], u8)> = ids.iter().map(|m| (&b"m"[..], *m)).collect();
    assert_eq!(
        kind(&many(&mut h, 1, &[&carol], b"g", &messages)),
        ErrorKind::InvalidArgument
    );
    let recipients: Vec<SigningKey> = (0..100u8).map(|i| user(100 + i)).collect();
    let refs: Vec<&SigningKey> = recipients.iter().collect();
    let r = many(
        &mut h,
        1,
        &refs,
        b"g",
        &messages[..limits::ENQUEUE_MANY_MESSAGES_MAX],
    );
    assert_eq!(kind(&r), ErrorKind::InvalidArgument);
    assert!(r.unwrap_err().message.contains("queue entries"));
    // Nothing refused was stored.
    assert_eq!(seqs(&h.fetch(3, &carol, b"g", 0, 10)), Vec::<u64>::new());
}

#[test]
fn enqueue_many_takes_a_rate_token_per_new_message() {
    let mut h = Harness::new(NodeConfig {
        enqueue_rate: RateConfig {
            burst: 3,
            per_sec: 1,
        },
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    many(&mut h, 1, &[&bob], b"g", &[(b"a", 1), (b"b", 2)]).unwrap();
    // One token left: two new messages are refused, a retry costs nothing.
    let r = many(&mut h, 1, &[&bob], b"g", &[(b"a", 1), (b"c", 3), (b"d", 4)]);
    assert!(matches!(kind(&r), ErrorKind::RateLimited { .. }), "{r:?}");
    many(&mut h, 1, &[&bob], b"g", &[(b"a", 1), (b"b", 2), (b"c", 3)]).unwrap();
}

#[test]
fn enqueue_many_passes_commits_through_the_fence_in_order() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let c5 = mls(b"grp", 5, 3, b"commit for 5");
    let app6 = mls(b"grp", 6, 1, b"app in 6");
    let c6 = mls(b"grp", 6, 3, b"commit for 6");
    // Two Commits in a row in one request: the second meets the fence the
    // first moved.
    let r = many(&mut h, 1, &[&bob], b"g", &[(&c5, 1), (&app6, 2), (&c6, 3)]);
    assert_eq!(batch_seqs(&r), vec![1, 2, 3]);
    // A second Commit for an epoch already taken refuses the whole request.
    let late = mls(b"grp", 7, 3, b"commit for 7");
    let lost = mls(b"grp", 7, 3, b"another commit for 7");
    let r = many(
        &mut h,
        1,
        &[&bob],
        b"g",
        &[(b"app", 4), (&late, 5), (&lost, 6)],
    );
    assert_eq!(stale(&r), 8);
    assert_eq!(seqs(&h.fetch(2, &bob, b"g", 0, 10)), vec![1, 2, 3]);
}

// ----- the commit fence ----------------------------------------------------

/// A group envelope around an MLS PrivateMessage header of `content_type`.
fn mls(group: &[u8], epoch: u64, content_type: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x01, 0x02, 0, 1, 0, 2, group.len() as u8];
    v.extend_from_slice(group);
    v.extend_from_slice(&epoch.to_be_bytes());
    v.push(content_type);
    v.extend_from_slice(body);
    v
}

fn stale(r: &Reply) -> u64 {
    match kind(r) {
        ErrorKind::StaleEpoch { current_epoch } => current_epoch,
        other => panic!("not staleEpoch: {other:?}"),
    }
}

#[test]
fn the_first_commit_per_epoch_wins_and_later_ones_learn_the_epoch() {
    let mut h = Harness::fresh();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    let a = mls(b"grp", 5, 3, b"alice's commit");
    let b = mls(b"grp", 5, 3, b"bob's commit");
    // Alice's commit goes to bob and carol one enqueue at a time: the same
    // bytes pass for the second recipient and on a retry.
    h.enqueue(1, &bob, b"g", &a, 1).unwrap();
    h.enqueue(1, &carol, b"g", &a, 2).unwrap();
    assert_eq!(enqueued(&h.enqueue(1, &carol, b"g", &a, 2)), 1);
    // Bob's commit for the same epoch is refused, as a batch too.
    assert_eq!(stale(&h.enqueue(2, &alice, b"g", &b, 4)), 6);
    assert_eq!(stale(&batch(&mut h, 2, &[&alice, &carol], b"g", &b, 5)), 6);
    // An older epoch too; application messages and proposals never are.
    assert_eq!(
        stale(&h.enqueue(2, &alice, b"g", &mls(b"grp", 2, 3, b"old"), 6)),
        6
    );
    h.enqueue(2, &alice, b"g", &mls(b"grp", 5, 1, b"app"), 7)
        .unwrap();
    h.enqueue(2, &alice, b"g", &mls(b"grp", 4, 2, b"proposal"), 8)
        .unwrap();
    // Bob retries on epoch 6 and wins it.
    let b6 = batch(
        &mut h,
        2,
        &[&alice, &carol],
        b"g",
        &mls(b"grp", 6, 3, b"bob again"),
        9,
    );
    assert_eq!(batch_seqs(&b6).len(), 2);
    assert_eq!(
        stale(&h.enqueue(1, &bob, b"g", &mls(b"grp", 6, 3, b"late"), 10)),
        7
    );
    // A copy of an accepted Commit that reaches its last recipient after
    // the group moved on still passes (the fence remembers it); any other
    // bytes for that epoch do not.
    h.enqueue(1, &bob, b"g", &a, 11).unwrap();
    assert_eq!(
        stale(&h.enqueue(1, &bob, b"g", &mls(b"grp", 5, 3, b"forged"), 12)),
        7
    );
    // Nothing refused was stored.
    h.login(3, &carol);
    assert_eq!(
        payloads(&h.fetch(3, &carol, b"g", 0, 10)),
        vec![a, mls(b"grp", 6, 3, b"bob again")]
    );
}

#[test]
fn fences_are_per_group_and_channel_and_survive_a_restart() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.enqueue(1, &bob, b"g", &mls(b"grp", 3, 3, b"c"), 1)
        .unwrap();
    // Another channel, another group on the same channel: their own fences.
    h.enqueue(1, &bob, b"h", &mls(b"grp", 3, 3, b"c2"), 2)
        .unwrap();
    h.enqueue(1, &bob, b"g", &mls(b"other", 0, 3, b"c3"), 3)
        .unwrap();
    // A later epoch than the fence knows is accepted (the group's history
    // may predate the fence).
    h.enqueue(1, &bob, b"g", &mls(b"grp", 9, 3, b"c4"), 4)
        .unwrap();
    let mut h = h.crash_and_reopen(NodeConfig::default(), Time::ZERO);
    h.login(1, &alice);
    assert_eq!(
        stale(&h.enqueue(1, &bob, b"g", &mls(b"grp", 9, 3, b"x"), 5)),
        10
    );
    // Bytes that are not a group envelope are never looked at.
    h.enqueue(1, &bob, b"g", &[0x01, 0x01, 0, 1, 0, 2], 6)
        .unwrap();
    h.enqueue(1, &bob, b"g", b"opaque", 7).unwrap();
}

// ----- fetchWaitChannels ----------------------------------------------------

fn wait_channels(
    h: &mut Harness,
    c: u64,
    owner: &SigningKey,
    cursors: &[(&[u8], u64)],
    timeout_ms: u64,
) -> RequestId {
    h.send(
        c,
        RequestBody::FetchWaitChannels {
            recipient_key: id(owner),
            cursors: cursors.iter().map(|(c, s)| (ch(c), *s)).collect(),
            limit: 10,
            timeout_ms,
        },
    )
}

fn channel_seqs(r: &Reply) -> Vec<(Vec<u8>, Vec<u64>)> {
    match r {
        Ok(Response::ChannelMessages { channels }) => channels
            .iter()
            .map(|c| {
                (
                    c.channel_id.as_bytes().to_vec(),
                    c.messages.iter().map(|m| m.seq).collect(),
                )
            })
            .collect(),
        other => panic!("not channel messages: {other:?}"),
    }
}

#[test]
fn fetch_wait_channels_answers_pending_channels_at_once_and_acknowledges() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    for (m, channel) in [(1, b"a"), (2, b"a"), (3, b"c")] {
        h.enqueue(1, &bob, channel, b"x", m).unwrap();
    }
    let rid = wait_channels(&mut h, 2, &bob, &[(b"a", 1), (b"b", 0), (b"c", 0)], 1_000);
    let replies = h.drain();
    assert_eq!(replies[0].0, rid);
    assert_eq!(
        channel_seqs(&replies[0].1),
        vec![(b"a".to_vec(), vec![2]), (b"c".to_vec(), vec![1])]
    );
    // The cursor acknowledged seq 1 of channel a.
    assert_eq!(seqs(&h.fetch(2, &bob, b"a", 0, 10)), vec![2]);
    assert_eq!(h.node.waiter_count(), 0);
}

#[test]
fn fetch_wait_channels_is_woken_by_any_of_its_channels_and_expires_empty() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    let rid = wait_channels(&mut h, 2, &bob, &[(b"a", 0), (b"b", 0)], 1_000);
    assert!(h.drain().is_empty());
    h.enqueue(1, &bob, b"b", b"x", 1).unwrap();
    let replies = h.drain();
    let _ = replies;
    // `enqueue` drained the woken reply with its own; look again.
    assert_eq!(h.node.waiter_count(), 0);
    assert_eq!(h.node.poll_timeout(), None);
    let rid2 = wait_channels(&mut h, 2, &bob, &[(b"a", 0), (b"b", 1)], 1_000);
    assert!(h.drain().is_empty());
    let deadline = h.node.poll_timeout().unwrap();
    h.now = deadline;
    h.node.handle_timeout(h.now);
    let replies = h.drain();
    assert_eq!(replies[0].0, rid2);
    assert!(channel_seqs(&replies[0].1).is_empty());
    assert_ne!(rid, rid2);
    // Closing the connection drops a waiter on several queues entirely.
    wait_channels(&mut h, 2, &bob, &[(b"a", 0), (b"b", 1)], 1_000);
    assert_eq!(h.node.waiter_count(), 1);
    h.node.handle_connection_closed(h.now, conn(2));
    assert_eq!(h.node.waiter_count(), 0);
    h.enqueue(1, &bob, b"a", b"y", 2).unwrap();
}

#[test]
fn fetch_wait_channels_refusals_change_nothing() {
    let mut h = Harness::fresh();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"a", b"x", 1).unwrap();
    let refuse = |h: &mut Harness, cursors: &[(&[u8], u64)], who: u64, owner: &SigningKey| {
        wait_channels(h, who, owner, cursors, 1_000);
        let replies = h.drain();
        kind(&replies[0].1)
    };
    // A cursor beyond the queue: nothing acknowledged on the other channel.
    assert_eq!(
        refuse(&mut h, &[(b"a", 1), (b"b", 5)], 2, &bob),
        ErrorKind::InvalidArgument
    );
    assert_eq!(
        refuse(&mut h, &[(b"a", 1), (b"a", 1)], 2, &bob),
        ErrorKind::InvalidArgument
    );
    assert_eq!(refuse(&mut h, &[], 2, &bob), ErrorKind::InvalidArgument);
    assert_eq!(
        refuse(&mut h, &[(b"a", 1)], 1, &bob),
        ErrorKind::PermissionDenied
    );
    assert_eq!(seqs(&h.fetch(2, &bob, b"a", 0, 10)), vec![1]);
}

// ----- message TTL -------------------------------------------------------

fn gap_of(r: &Reply) -> Option<Gap> {
    match r {
        Ok(Response::Messages { gap, .. }) => *gap,
        other => panic!("not messages: {other:?}"),
    }
}

fn with_ttl() -> Harness {
    Harness::new(NodeConfig {
        message_ttl: Some(Duration::from_secs(60)),
        ..NodeConfig::default()
    })
}

/// Runs sweep steps until a round ends; what they did together, and the
/// steps it took.
fn sweep_round(h: &mut Harness) -> (Swept, usize) {
    let mut total = Swept::default();
    for step in 1..=1_000 {
        let s = h.node.handle_sweep(h.now);
        assert!(
            s.queues <= limits::SWEEP_RECORDS_PER_STEP
                && s.fences <= limits::SWEEP_RECORDS_PER_STEP
                && s.expired <= 2 * limits::TTL_EXPIRY_PER_REQUEST_MAX,
            "one step did too much: {s:?}"
        );
        total.queues += s.queues;
        total.fences += s.fences;
        total.expired += s.expired;
        total.fences_deleted += s.fences_deleted;
        if s.round_done {
            return (total, step);
        }
    }
    panic!("the sweep never finished a round");
}

#[test]
fn the_sweep_drops_expired_messages_of_queues_nobody_touches() {
    let mut h = with_ttl();
    let alice = user(1);
    h.login(1, &alice);
    // More queues than one step looks at, each with a message; then
    // nobody reads or writes them.
    let queues = limits::SWEEP_RECORDS_PER_STEP + 44;
    for i in 0..queues {
        let ch = (i as u16).to_be_bytes();
        h.enqueue(1, &user(2), &ch, b"forgotten", 1).unwrap();
    }
    let before = h.node.store().len();
    // Within the TTL the sweep drops nothing and writes nothing.
    let (swept, _) = sweep_round(&mut h);
    assert_eq!((swept.queues, swept.expired), (queues, 0));
    assert_eq!(h.node.store().len(), before);
    h.now = h.now.saturating_add(Duration::from_secs(61));
    let (swept, steps) = sweep_round(&mut h);
    assert_eq!(swept.expired, queues as u64);
    assert!(steps >= 2, "a round of {queues} queues took one step");
    // Every entry went; each queue keeps its counters (which say what
    // expired) and its dedup records.
    assert_eq!(h.node.store().len(), before - queues);
    let bob = user(2);
    h.login(2, &bob);
    let r = h.fetch(2, &bob, &[0, 7], 0, 10);
    assert_eq!(gap_of(&r), Some(Gap { from: 1, to: 1 }));
}

#[test]
fn the_sweep_deletes_fences_idle_past_their_ttl() {
    let mut h = Harness::new(NodeConfig {
        fence_ttl: Some(Duration::from_secs(3_600)),
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"", &mls(b"old", 1, 3, b"commit"), 1)
        .unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(1_800));
    h.enqueue(1, &bob, b"", &mls(b"new", 1, 3, b"commit"), 2)
        .unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(1_801));
    // Only the fence idle for over an hour goes.
    let (swept, _) = sweep_round(&mut h);
    assert_eq!((swept.fences, swept.fences_deleted), (2, 1));
    let (swept, _) = sweep_round(&mut h);
    assert_eq!((swept.fences, swept.fences_deleted), (1, 0));
    // The group whose fence went starts over with its next Commit; the
    // other still refuses a second Commit for its epoch.
    h.enqueue(1, &bob, b"", &mls(b"old", 1, 3, b"other commit"), 3)
        .unwrap();
    let r = h.enqueue(1, &bob, b"", &mls(b"new", 1, 3, b"other commit"), 4);
    assert_eq!(stale(&r), 2);
}

#[test]
fn the_sweep_stamps_fences_written_before_they_carried_a_time() {
    let mut h = Harness::new(NodeConfig {
        fence_ttl: Some(Duration::from_secs(3_600)),
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.enqueue(1, &bob, b"", &mls(b"grp", 1, 3, b"commit"), 1)
        .unwrap();
    // Rewrite the fence as format 2 wrote it: no time.
    let key = layout::fence_key(&ChannelId::DEFAULT, &Sha256::digest(b"grp").into());
    let store = h.node.store_mut();
    let mut fence = Fence::decode(&store.get(&key).unwrap().unwrap()).unwrap();
    fence.touched_ms = None;
    let mut b = Batch::new();
    b.put(key.clone(), fence.encode());
    store.write(b).unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(7_200));
    // Its idle time counts from the first sweep that sees it.
    let (swept, _) = sweep_round(&mut h);
    assert_eq!(swept.fences_deleted, 0);
    let stamped = Fence::decode(&h.node.store().get(&key).unwrap().unwrap()).unwrap();
    assert_eq!(stamped.touched_ms, Some(stamp_ms(h.now)));
    h.now = h.now.saturating_add(Duration::from_secs(3_601));
    assert_eq!(sweep_round(&mut h).0.fences_deleted, 1);
    assert_eq!(h.node.store().get(&key), Ok(None));
}

#[test]
fn without_ttls_the_sweep_drops_nothing_and_counts_what_is_queued() {
    let mut h = Harness::new(NodeConfig {
        fence_ttl: None,
        ..NodeConfig::default()
    });
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    let commit = mls(b"grp", 1, 3, b"commit");
    h.enqueue(1, &bob, b"", &commit, 1).unwrap();
    h.enqueue(1, &bob, b"other", b"hello", 2).unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(365 * 24 * 3_600));
    let s = h.node.handle_sweep(h.now);
    assert_eq!(
        s,
        Swept {
            queues: 2,
            queued_messages: 2,
            queued_bytes: (commit.len() + b"hello".len()) as u64,
            round_done: true,
            ..Swept::default()
        }
    );
}

#[test]
fn expired_messages_are_dropped_and_the_next_fetch_reports_the_gap() {
    let mut h = with_ttl();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    for m in 1..=3 {
        h.enqueue(1, &bob, b"", b"old", m).unwrap();
    }
    h.now = h.now.saturating_add(Duration::from_secs(30));
    h.enqueue(1, &bob, b"", b"newer", 4).unwrap();
    // 61 s after the first three: they go, the fourth stays.
    h.now = h.now.saturating_add(Duration::from_secs(31));
    let r = h.fetch(2, &bob, b"", 0, 10);
    assert_eq!(gap_of(&r), Some(Gap { from: 1, to: 3 }));
    assert_eq!(payloads(&r), vec![b"newer".to_vec()]);
    // A cursor past the gap hears of it no more.
    let r = h.fetch(2, &bob, b"", 3, 10);
    assert_eq!(gap_of(&r), None);
    assert_eq!(seqs(&r), vec![4]);
    // Expired room is free again: depth counts only what is left.
    h.now = h.now.saturating_add(Duration::from_secs(60));
    let r = h.fetch(2, &bob, b"", 3, 10);
    assert_eq!(gap_of(&r), Some(Gap { from: 4, to: 4 }));
    assert!(seqs(&r).is_empty());
}

#[test]
fn a_gap_answers_a_long_poll_at_once() {
    let mut h = with_ttl();
    let (alice, bob) = (user(1), user(2));
    h.login(1, &alice);
    h.login(2, &bob);
    h.enqueue(1, &bob, b"g", b"old", 1).unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(61));
    let rid = h.send(
        2,
        RequestBody::FetchWait {
            recipient_key: id(&bob),
            channel_id: ch(b"g"),
            after_seq: 0,
            limit: 10,
            timeout_ms: 1_000,
        },
    );
    let replies = h.drain();
    assert_eq!(replies[0].0, rid);
    assert_eq!(gap_of(&replies[0].1), Some(Gap { from: 1, to: 1 }));
    // The same through fetchWaitChannels, on a channel with only a gap.
    h.enqueue(1, &bob, b"h", b"old", 2).unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(61));
    wait_channels(&mut h, 2, &bob, &[(b"g", 1), (b"h", 0)], 1_000);
    let replies = h.drain();
    match &replies[0].1 {
        Ok(Response::ChannelMessages { channels }) => {
            assert_eq!(channels.len(), 1);
            assert_eq!(channels[0].channel_id, ch(b"h"));
            assert!(channels[0].messages.is_empty());
            assert_eq!(channels[0].gap, Some(Gap { from: 1, to: 1 }));
        }
        other => panic!("not channel messages: {other:?}"),
    }
}

#[test]
fn expiry_releases_shared_payloads_and_survives_a_restart() {
    let mut h = with_ttl();
    let (alice, bob, carol) = (user(1), user(2), user(3));
    h.login(1, &alice);
    h.login(2, &bob);
    let payload = b"shared and then expired".repeat(4);
    batch(&mut h, 1, &[&bob, &carol], b"g", &payload, 1).unwrap();
    assert_eq!(copies(&h, &payload), 1);
    // The stamps are on disk: a restart at a later clock expires them.
    let mut h = h.crash_and_reopen(
        NodeConfig {
            message_ttl: Some(Duration::from_secs(60)),
            ..NodeConfig::default()
        },
        Time::from_millis(1_000).saturating_add(Duration::from_secs(120)),
    );
    h.login(2, &bob);
    h.login(3, &carol);
    // Bob's reference goes; the payload stays for carol's.
    assert_eq!(
        gap_of(&h.fetch(2, &bob, b"g", 0, 10)),
        Some(Gap { from: 1, to: 1 })
    );
    assert_eq!(copies(&h, &payload), 1);
    // Carol's expiry is the last reference: the payload is gone.
    assert_eq!(
        gap_of(&h.fetch(3, &carol, b"g", 0, 10)),
        Some(Gap { from: 1, to: 1 })
    );
    assert_eq!(copies(&h, &payload), 0);
    assert!(
        !h.node
            .store()
            .iter()
            .any(|(k, _)| k[0] == 0x15 || k[0] == 0x16)
    );
}

#[test]
fn an_enqueue_batch_expiring_two_references_to_one_payload_counts_both() {
    let mut h = with_ttl();
    let (alice, bob, carol, dave) = (user(1), user(2), user(3), user(4));
    h.login(1, &alice);
    let payload = b"one payload, three references".to_vec();
    batch(&mut h, 1, &[&bob, &carol, &dave], b"g", &payload, 1).unwrap();
    h.now = h.now.saturating_add(Duration::from_secs(61));
    // This batch expires bob's and carol's references in one write.
    batch(&mut h, 1, &[&bob, &carol], b"g", b"new", 2).unwrap();
    h.login(4, &dave);
    assert_eq!(
        gap_of(&h.fetch(4, &dave, b"g", 0, 10)),
        Some(Gap { from: 1, to: 1 })
    );
    assert_eq!(
        copies(&h, &payload),
        0,
        "a reference was lost: the payload leaked"
    );
}
