//! Group delivery over QUIC: `enqueueBatch` (one stored payload, a seq per
//! recipient), the commit fence (`staleEpoch`), and `fetchWaitChannels`,
//! against the real server on loopback; and what `enqueueBatch` saves on
//! disk.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{id, user};
use quicproquo_client::{ClientError, random_message_id};
use quicproquo_core::error::ErrorKind;
use quicproquo_core::types::{ChannelId, IdentityKey};
use quicproquo_server::store::fjall_store::FjallStore;
use quicproquo_server::testing::InProcessServer;

/// A group envelope around an MLS PrivateMessage framing of a Commit made
/// in `epoch` (see `quicproquo_core::protocol::framing`).
fn commit(group: &[u8], epoch: u64, body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x01, 0x02, 0, 1, 0, 2, group.len() as u8];
    v.extend_from_slice(group);
    v.extend_from_slice(&epoch.to_be_bytes());
    v.push(3);
    v.extend_from_slice(body);
    v
}

#[tokio::test]
async fn enqueue_batch_fence_and_channel_wait_over_quic() {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let keys: Vec<_> = (1..=4).map(user).collect();
    let ids: Vec<IdentityKey> = keys.iter().map(id).collect();
    let alice = server.login(&keys[0]).await;
    let bob = server.login(&keys[1]).await;
    let g = ChannelId::try_from_slice(b"group-channel").unwrap();
    let h = ChannelId::try_from_slice(b"other-group").unwrap();

    // Bob waits on two channels; a batch on the second wakes him.
    let waiter = {
        let bob = bob.clone();
        let me = ids[1];
        tokio::spawn(async move {
            bob.fetch_wait_channels(me, vec![(g, 0), (h, 0)], 10, 5_000)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = random_message_id();
    let seqs = alice
        .enqueue_batch(ids[1..].to_vec(), h, b"to all".to_vec(), m)
        .await
        .unwrap();
    assert_eq!(seqs, vec![1, 1, 1]);
    let woken = waiter.await.unwrap().unwrap();
    assert_eq!(woken.len(), 1);
    assert_eq!(woken[0].channel_id, h);
    assert_eq!(woken[0].messages[0].payload, b"to all");
    // A retry is stored once per recipient.
    let again = alice
        .enqueue_batch(ids[1..].to_vec(), h, b"to all".to_vec(), m)
        .await
        .unwrap();
    assert_eq!(again, vec![1, 1, 1]);

    // The commit fence: the first Commit for epoch 4 wins; the second is
    // refused with the epoch the group is at, and stored nowhere.
    alice
        .enqueue_batch(
            ids[1..].to_vec(),
            g,
            commit(b"grp", 4, b"alice"),
            random_message_id(),
        )
        .await
        .unwrap();
    let refused = bob
        .enqueue_batch(
            vec![ids[0], ids[2]],
            g,
            commit(b"grp", 4, b"bob"),
            random_message_id(),
        )
        .await;
    match refused {
        Err(ClientError::Service(e)) => {
            assert_eq!(e.kind, ErrorKind::StaleEpoch { current_epoch: 5 });
        }
        other => panic!("expected staleEpoch, got {other:?}"),
    }
    let carol = server.login(&keys[2]).await;
    let f = carol.fetch(ids[2], g, 0, 10).await.unwrap();
    assert_eq!(f.messages.len(), 1);
    assert_eq!(f.messages[0].payload, commit(b"grp", 4, b"alice"));

    // Pending messages answer at once, channel by channel, and the cursors
    // acknowledge.
    let ready = carol
        .fetch_wait_channels(ids[2], vec![(g, 0), (h, 0)], 10, 5_000)
        .await
        .unwrap();
    assert_eq!(
        ready.iter().map(|c| c.channel_id).collect::<Vec<_>>(),
        vec![g, h]
    );
    let empty = carol
        .fetch_wait_channels(ids[2], vec![(g, 1), (h, 1)], 10, 100)
        .await
        .unwrap();
    assert!(empty.is_empty());
    assert!(
        carol
            .fetch(ids[2], h, 0, 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
    server.stop().await;
}

/// Bytes the database under `data_dir` occupies (journals and tables, as
/// the storage engine counts them; file sizes alone say little, journals
/// are allocated ahead).
fn disk_bytes(data_dir: &Path) -> u64 {
    FjallStore::open(&data_dir.join("qpq.db"))
        .unwrap()
        .disk_space_bytes()
        .unwrap()
}

/// Group messages sent in the storage comparison.
const GROUP_MESSAGES: usize = 40;
/// Members of the group (the sender is not among the recipients).
const GROUP_MEMBERS: u8 = 50;
/// Payload of each message.
const PAYLOAD_BYTES: usize = 1024;

/// The database bytes `GROUP_MESSAGES` messages to a `GROUP_MEMBERS`-member
/// group take, sent as one enqueue per recipient or as one enqueueBatch.
async fn stored_bytes(batched: bool) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let sender = server.login(&user(200)).await;
    let recipients: Vec<IdentityKey> = (1..GROUP_MEMBERS).map(|n| id(&user(n))).collect();
    let g = ChannelId::try_from_slice(b"the-group").unwrap();
    for i in 0..GROUP_MESSAGES {
        let payload = vec![i as u8; PAYLOAD_BYTES];
        let m = random_message_id();
        if batched {
            sender
                .enqueue_batch(recipients.clone(), g, payload, m)
                .await
                .unwrap();
        } else {
            for r in &recipients {
                sender.enqueue(*r, g, payload.clone(), m).await.unwrap();
            }
        }
    }
    server.stop().await;
    disk_bytes(dir.path())
}

#[tokio::test]
async fn enqueue_batch_stores_a_group_message_once() {
    let singles = stored_bytes(false).await;
    let batched = stored_bytes(true).await;
    println!(
        "{GROUP_MESSAGES} messages of {PAYLOAD_BYTES} B to {} recipients: \
         {singles} B on disk as single enqueues, {batched} B as enqueueBatch ({:.1}x less)",
        GROUP_MEMBERS - 1,
        singles as f64 / batched as f64
    );
    // 49 copies of each payload against one; either way each recipient
    // gets an entry, a retry record and new queue counters (about 400 B
    // in the journal), which bounds the saving for small payloads. 3.4x
    // measured for 1 KiB.
    assert!(
        batched * 2 < singles,
        "enqueueBatch stored {batched} B, single enqueues {singles} B"
    );
}

// The client machine's long-poll over all its channels goes through the
// library's `call`, which must give it the whole wait on top of the call
// timeout: a wait longer than `CALL_TIMEOUT` (15 s) with nothing arriving
// ends in an empty answer, not in a client-side timeout.
#[tokio::test]
async fn a_channel_wait_longer_than_the_call_timeout_is_not_cut_short() {
    use quicproquo_client::CALL_TIMEOUT;
    use quicproquo_core::node::{RequestBody, Response};

    let dir = tempfile::tempdir().unwrap();
    let server = InProcessServer::start(dir.path());
    let key = user(9);
    let client = server.login(&key).await;
    let wait = CALL_TIMEOUT + Duration::from_secs(1);
    let reply = quicproquo_client::call(
        &client,
        RequestBody::FetchWaitChannels {
            recipient_key: id(&key),
            cursors: vec![(ChannelId::DEFAULT, 0)],
            limit: 10,
            timeout_ms: wait.as_millis() as u64,
        },
    )
    .await
    .expect("the connection stays up");
    assert_eq!(
        reply,
        Ok(Response::ChannelMessages {
            channels: Vec::new()
        })
    );
    server.stop().await;
}
