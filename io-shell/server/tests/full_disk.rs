//! Full-disk test: `qpq-server` keeps its data on a small tmpfs, and
//! concurrent clients enqueue until the disk is full.
//!
//! With space kept in reserve (`storage_reserve_bytes`), writes that add
//! data are refused `unavailable` ("disk is full") and never acknowledged
//! and then lost; reads, acknowledgements and KeyPackage pops go on; an
//! error line names the database and ENOSPC; and once space is freed (a
//! filler file put on the tmpfs first is deleted) the refused writes go
//! through when retried. Without the reserve the storage engine itself meets
//! ENOSPC, after which it takes no more writes: the server then stops with
//! a nonzero status, and once space is freed a restart opens the store. In
//! both cases a restart finds every acknowledged message exactly once, in
//! order.
//!
//! Mounting needs root. Without it (or without tmpfs) the tests say so on
//! stderr with a line starting `SKIPPED:` and check nothing, unless
//! `QPQ_FULL_DISK_TESTS=require` (which `.ci/run` sets): then they fail.
//! The tmpfs is unmounted when a test ends, however it ends.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{id, read_numbered_queue, read_start_lines, user};
use ed25519_dalek::{Signer, SigningKey};
use quicproquo_client::{Client, ClientError, ServerTrust};
use quicproquo_core::error::ErrorKind;
use quicproquo_core::limits::HYBRID_KEY_BYTES_MAX;
use quicproquo_core::node::hybrid_key_message;
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId, Signature};

/// Size of the tmpfs the data directory lives on.
const TMPFS_BYTES: u64 = 16 << 20;
/// A file put on the tmpfs before the server starts, deleted to free space.
const FILLER_BYTES: usize = 4 << 20;
/// Space the server keeps free in the first test.
const RESERVE_BYTES: u64 = 2 << 20;
/// Payload of each enqueue: incompressible, so the journal grows by it.
const PAYLOAD_BYTES: usize = 4 << 10;
/// Clients enqueueing at once.
const SENDERS: u8 = 4;
/// How long any phase may take before the test calls it a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_keeps_reads_and_recovers_when_space_is_freed() {
    let Some(disk) = SmallDisk::mount_or_skip() else {
        return;
    };
    let mut server = Server::start(&disk, RESERVE_BYTES, "first");
    let (alice_sk, bob_sk) = (user(1), user(2));
    let (alice, bob) = (id(&alice_sk), id(&bob_sk));
    let a = server.login(&alice_sk).await;
    a.upload_key_package(alice, vec![1; 200], false)
        .await
        .unwrap();
    // As large as allowed: tmpfs counts free space in 4 KiB pages, so once
    // an enqueue of PAYLOAD_BYTES is refused, so is any write of more than
    // a page.
    let hybrid_key = vec![7u8; HYBRID_KEY_BYTES_MAX];
    let signature = Signature(
        alice_sk
            .sign(&hybrid_key_message(&alice, &hybrid_key))
            .to_bytes(),
    );
    a.upload_hybrid_key(alice, hybrid_key.clone(), signature)
        .await
        .unwrap();

    // Fill the disk: every sender enqueues until it is refused.
    let (mut acked, ends) = load(&server, bob).await;
    assert!(
        acked.len() > 500,
        "only {} enqueues fit before the disk was full",
        acked.len()
    );
    for end in &ends {
        assert!(
            is_disk_full(&end.error),
            "sender {} ended with {:?}",
            end.sender,
            end.error
        );
    }

    // Writes that add data stay refused.
    let big_package = vec![2; 2 * PAYLOAD_BYTES];
    disk_full(
        a.upload_key_package(alice, big_package.clone(), false)
            .await,
    );
    disk_full(
        a.upload_hybrid_key(alice, hybrid_key.clone(), signature)
            .await,
    );
    for end in &ends {
        disk_full(end.retry(bob).await);
    }
    // Reads are answered.
    let b = server.login(&bob_sk).await;
    let first = b.fetch(bob, ChannelId::DEFAULT, 0, 10).await.unwrap();
    assert_eq!(first.messages.len(), 10);
    for m in &first.messages {
        assert_eq!(Some(&m.payload), acked.get(&m.seq), "seq {}", m.seq);
    }
    assert_eq!(a.key_package_count(alice).await.unwrap(), (1, false));
    assert_eq!(
        b.fetch_hybrid_key(alice).await.unwrap(),
        (hybrid_key.clone(), signature)
    );
    // And so are acknowledgements, which drain the disk, and a pop.
    const ACKED_UP_TO: u64 = 3;
    let after = b
        .fetch(bob, ChannelId::DEFAULT, ACKED_UP_TO, 1)
        .await
        .unwrap();
    assert_eq!(after.messages[0].seq, ACKED_UP_TO + 1);
    assert!(
        !b.fetch_key_package(alice).await.unwrap().1,
        "a single-use one"
    );
    assert!(server.is_running(), "the server is still up");

    // Free space: each sender's refused message goes through when it
    // retries, and new writes do too.
    disk.free_filler();
    for end in &ends {
        let seq = end
            .retry(bob)
            .await
            .expect("a refused enqueue goes through once space is freed");
        assert!(
            acked.insert(seq, end.payload.clone()).is_none(),
            "seq {seq} twice"
        );
    }
    let seq = a
        .enqueue(
            bob,
            ChannelId::DEFAULT,
            payload(SENDERS, 0),
            message_id(SENDERS, 0),
        )
        .await
        .expect("an enqueue after space was freed");
    acked.insert(seq, payload(SENDERS, 0));
    a.upload_key_package(alice, big_package, false)
        .await
        .expect("an upload after space was freed");
    let log = server.stop_and_log();
    for needle in [
        "disk full",
        "ENOSPC",
        "writes resume",
        &disk.db().display().to_string(),
    ] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }

    // Everything acknowledged is there after a restart, once and in order,
    // and nothing that was refused.
    let acked: BTreeMap<u64, Vec<u8>> = acked
        .into_iter()
        .filter(|(seq, _)| *seq > ACKED_UP_TO)
        .collect();
    let server = Server::start(&disk, RESERVE_BYTES, "restart");
    let stored = server.read_queue(&bob_sk, ACKED_UP_TO).await;
    assert_eq!(
        stored.keys().collect::<Vec<_>>(),
        acked.keys().collect::<Vec<_>>(),
        "the stored seqs are not the acknowledged ones"
    );
    assert!(
        stored == acked,
        "a stored payload is not the one acknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_meets_enospc_stops_the_server_and_a_restart_recovers() {
    let Some(disk) = SmallDisk::mount_or_skip() else {
        return;
    };
    // No reserve: the storage engine itself runs out of space.
    let mut server = Server::start(&disk, 0, "first");
    let bob_sk = user(2);
    let bob = id(&bob_sk);
    let (acked, ends) = load(&server, bob).await;
    assert!(acked.len() > 500, "only {} enqueues fit", acked.len());
    for end in &ends {
        // Refused by the failed engine, or cut off as the server stops.
        assert_eq!(end.error.kind(), ErrorKind::Unavailable, "{:?}", end.error);
    }

    let status = server.wait_exit().await;
    assert!(
        !status.success(),
        "the server must stop with a failure status, so a supervisor restarts it: {status:?}"
    );
    let log = server.log();
    for needle in [
        "ENOSPC",
        "stopped after a storage failure",
        &disk.db().display().to_string(),
    ] {
        assert!(log.contains(needle), "the log lacks {needle:?}:\n{log}");
    }

    // Once space is freed a restart opens the store: every acknowledged
    // message is there, once and in order, and new writes succeed.
    disk.free_filler();
    let server = Server::start(&disk, 0, "restart");
    let stored = server.read_queue(&bob_sk, 0).await;
    for (seq, payload) in &acked {
        assert_eq!(
            stored.get(seq),
            Some(payload),
            "acknowledged seq {seq} lost"
        );
    }
    let a = server.login(&user(1)).await;
    let seq = a
        .enqueue(
            bob,
            ChannelId::DEFAULT,
            payload(SENDERS, 0),
            message_id(SENDERS, 0),
        )
        .await
        .expect("an enqueue after the restart");
    assert_eq!(seq, stored.len() as u64 + 1);
}

/// Requires the refusal of a write that adds data on a full disk.
fn disk_full<T: std::fmt::Debug>(r: Result<T, ClientError>) {
    match r {
        Err(e) if is_disk_full(&e) => {}
        other => panic!("expected `unavailable` saying the disk is full, got {other:?}"),
    }
}

fn is_disk_full(e: &ClientError) -> bool {
    matches!(e, ClientError::Service(e)
        if e.kind == ErrorKind::Unavailable && e.message.contains("disk is full"))
}

/// Message `i` of sender `s`.
fn message_id(s: u8, i: u32) -> MessageId {
    let mut m = [0u8; 16];
    m[0] = s;
    m[1..5].copy_from_slice(&i.to_be_bytes());
    MessageId(m)
}

/// The payload of message `i` of sender `s`: both, then noise.
fn payload(s: u8, i: u32) -> Vec<u8> {
    let mut p = vec![s];
    p.extend_from_slice(&i.to_be_bytes());
    let mut x = (u64::from(s) << 32 | u64::from(i)).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    p.extend((p.len()..PAYLOAD_BYTES).map(|_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x as u8
    }));
    p
}

/// How a sender of [`load`] ended: the message it was refused, the error
/// and its connection.
struct End {
    sender: u8,
    index: u32,
    payload: Vec<u8>,
    error: ClientError,
    client: Client,
}

impl End {
    /// The refused enqueue again, from the same sender.
    async fn retry(&self, to: IdentityKey) -> Result<u64, ClientError> {
        let id = message_id(self.sender, self.index);
        self.client
            .enqueue(to, ChannelId::DEFAULT, self.payload.clone(), id)
            .await
    }
}

/// [`SENDERS`] clients, each on its own connection, enqueue to `to` until
/// each is refused. Returns every acknowledged enqueue (seq -> payload)
/// and how each sender ended.
async fn load(server: &Server, to: IdentityKey) -> (BTreeMap<u64, Vec<u8>>, Vec<End>) {
    let acked: Arc<Mutex<BTreeMap<u64, Vec<u8>>>> = Arc::default();
    let mut senders = Vec::new();
    for sender in 0..SENDERS {
        let client = server.login(&user(10 + sender)).await;
        let acked = acked.clone();
        senders.push(tokio::spawn(async move {
            for index in 0u32.. {
                let payload = payload(sender, index);
                let id = message_id(sender, index);
                match client
                    .enqueue(to, ChannelId::DEFAULT, payload.clone(), id)
                    .await
                {
                    Ok(seq) => {
                        let prev = acked.lock().unwrap().insert(seq, payload);
                        assert!(prev.is_none(), "seq {seq} acknowledged twice");
                    }
                    Err(error) => {
                        return End {
                            sender,
                            index,
                            payload,
                            error,
                            client,
                        };
                    }
                }
            }
            unreachable!("the disk never filled")
        }));
    }
    let ends = tokio::time::timeout(HANG_GUARD, async {
        let mut ends = Vec::new();
        for t in senders {
            ends.push(t.await.expect("sender task"));
        }
        ends
    })
    .await
    .expect("the senders hang");
    let acked = acked.lock().unwrap().clone();
    (acked, ends)
}

/// A size-limited tmpfs holding a filler file and the data directory,
/// unmounted on drop.
struct SmallDisk {
    /// Holds the mount point, the config file and the servers' logs (off
    /// the tmpfs, so they take none of its space).
    dir: tempfile::TempDir,
    mounted: bool,
}

impl SmallDisk {
    /// Mounts the tmpfs and puts the filler on it, or says why it cannot
    /// mount and returns `None` (a failure under
    /// `QPQ_FULL_DISK_TESTS=require`).
    fn mount_or_skip() -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnt")).unwrap();
        std::fs::write(dir.path().join("none.toml"), "").unwrap();
        let mut disk = SmallDisk {
            dir,
            mounted: false,
        };
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={TMPFS_BYTES},mode=0700"))
            .arg("tmpfs")
            .arg(disk.mount_point())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output();
        let why = match mounted {
            Ok(out) if out.status.success() => None,
            Ok(out) => Some(String::from_utf8_lossy(&out.stderr).trim().to_owned()),
            Err(e) => Some(format!("cannot run mount: {e}")),
        };
        if let Some(why) = why {
            let message = format!("cannot mount a {TMPFS_BYTES}-byte tmpfs (needs root): {why}");
            assert!(
                std::env::var("QPQ_FULL_DISK_TESTS").as_deref() != Ok("require"),
                "{message}"
            );
            eprintln!("SKIPPED: {message}");
            return None;
        }
        disk.mounted = true;
        std::fs::write(disk.filler(), vec![0xA5; FILLER_BYTES]).unwrap();
        Some(disk)
    }

    fn mount_point(&self) -> PathBuf {
        self.dir.path().join("mnt")
    }

    fn filler(&self) -> PathBuf {
        self.mount_point().join("filler")
    }

    fn data_dir(&self) -> PathBuf {
        self.mount_point().join("data")
    }

    fn db(&self) -> PathBuf {
        self.data_dir().join("qpq.db")
    }

    /// Deletes the filler file, which frees its space at once.
    fn free_filler(&self) {
        std::fs::remove_file(self.filler()).unwrap();
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        if self.mounted {
            let point = self.mount_point();
            let unmounted = Command::new("umount")
                .arg(&point)
                .status()
                .is_ok_and(|s| s.success());
            if !unmounted {
                // Still busy: detach it now; it goes once unused.
                let _ = Command::new("umount").arg("-l").arg(&point).status();
            }
        }
    }
}

/// A `qpq-server` child process on the small disk; killed on drop.
struct Server {
    state: State,
    pid: u32,
    addr: String,
    trust: ServerTrust,
    log: PathBuf,
}

/// Where a [`Server`]'s process is.
enum State {
    Running(Child),
    /// A blocking wait holds it (not reaped yet, so its pid is still ours).
    Waiting,
    Exited,
}

impl Server {
    /// Starts `qpq-server` over the disk's data directory, keeping
    /// `reserve_bytes` free; its stderr goes to the log `<name>.log`.
    fn start(disk: &SmallDisk, reserve_bytes: u64, name: &str) -> Server {
        let log = disk.dir.path().join(format!("{name}.log"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_qpq-server"))
            .env("QPQ_LISTEN", "127.0.0.1:0")
            .env("QPQ_DATA_DIR", disk.data_dir())
            .env("QPQ_CONFIG", disk.dir.path().join("none.toml"))
            .env("QPQ_STORAGE_RESERVE_BYTES", reserve_bytes.to_string())
            .env("QPQ_LOG", "info,fjall=warn,lsm_tree=warn")
            .current_dir(disk.dir.path())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn qpq-server");
        let pid = child.id();
        let (addr, fingerprint) = read_start_lines(&mut child);
        Server {
            state: State::Running(child),
            pid,
            addr,
            trust: ServerTrust::fingerprint_hex(&fingerprint).unwrap(),
            log,
        }
    }

    async fn login(&self, key: &SigningKey) -> Client {
        Client::connect_as(&self.addr, &self.trust, key)
            .await
            .expect("connect and authenticate")
    }

    fn is_running(&mut self) -> bool {
        match &mut self.state {
            State::Running(child) => child.try_wait().unwrap().is_none(),
            _ => false,
        }
    }

    /// Waits for the server to exit by itself.
    async fn wait_exit(&mut self) -> ExitStatus {
        let State::Running(mut child) = std::mem::replace(&mut self.state, State::Waiting) else {
            panic!("not running");
        };
        let waited = tokio::task::spawn_blocking(move || child.wait());
        let Ok(status) = tokio::time::timeout(HANG_GUARD, waited).await else {
            panic!("the server did not stop; its log:\n{}", self.log());
        };
        let status = status.unwrap().unwrap();
        self.state = State::Exited;
        status
    }

    /// Stops the server with SIGTERM, requires a clean exit and returns
    /// its log.
    fn stop_and_log(&mut self) -> String {
        let State::Running(mut child) = std::mem::replace(&mut self.state, State::Exited) else {
            panic!("not running");
        };
        let status = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = child.wait().unwrap();
        assert!(exit.success(), "qpq-server exited with {exit:?}");
        self.log()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }

    /// Everything in `owner`'s default queue after `after`, by seq
    /// (acknowledging it on the way), requiring consecutive seqs and each
    /// sender's messages in the order sent.
    async fn read_queue(&self, owner: &SigningKey, after: u64) -> BTreeMap<u64, Vec<u8>> {
        let c = self.login(owner).await;
        read_numbered_queue(&c, id(owner), after).await
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match &mut self.state {
            State::Running(child) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            State::Waiting => {
                // The wait timed out: end the process, so that the wait
                // returns and the tmpfs can be unmounted.
                let _ = Command::new("kill")
                    .args(["-KILL", &self.pid.to_string()])
                    .status();
            }
            State::Exited => {}
        }
    }
}
