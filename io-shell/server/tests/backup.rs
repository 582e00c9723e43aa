//! `qpq-server backup` and `qpq-server restore`, through the binary and
//! real servers (child processes): a backup taken while clients write
//! holds every message acknowledged before it began and nothing half; it
//! restores into a fresh data directory to exactly its records and the
//! same certificate; a restore refuses to overwrite without `--force`, and
//! refuses every damaged or foreign file before it changes anything.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use common::{id, read_numbered_queue, read_start_lines, user};
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::limits::BACKUP_RECORDS_PER_CHUNK;
use quicproquo_core::store::Store;
use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
use quicproquo_server::backup::{self, Reader};
use quicproquo_server::store::{FjallStore, KeyOrder};
use tokio::sync::watch;
use tokio::task::JoinHandle;

type Records = Vec<(Vec<u8>, Vec<u8>)>;

/// A test's directories: two data directories, an empty config file and
/// room for backups, all under one temporary directory.
struct Dirs {
    root: tempfile::TempDir,
}

impl Dirs {
    fn new() -> Dirs {
        let root = tempfile::tempdir().unwrap();
        // An empty config file, so a developer's ./qpq-server.toml is not read.
        std::fs::write(root.path().join("none.toml"), "").unwrap();
        Dirs { root }
    }

    fn data(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    /// `qpq-server` with `args` on the data directory `data`.
    fn command(&self, data: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qpq-server"));
        c.args(args)
            .env("QPQ_LISTEN", "127.0.0.1:0")
            .env("QPQ_DATA_DIR", data)
            .env("QPQ_CONFIG", self.root.path().join("none.toml"))
            .env("QPQ_LOG", "warn")
            .env_remove("QPQ_STORAGE")
            .env_remove("QPQ_POSTGRES_URL");
        c
    }

    /// Runs `qpq-server args...` on `data` to its end.
    fn run(&self, data: &Path, args: &[&str]) -> Output {
        self.command(data, args).output().expect("run qpq-server")
    }

    fn start(&self, data: &Path) -> ChildServer {
        let mut child = self
            .command(data, &[])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qpq-server");
        let (addr, fingerprint) = read_start_lines(&mut child);
        ChildServer {
            trust: ServerTrust::fingerprint_hex(&fingerprint).unwrap(),
            child,
            addr,
            fingerprint,
        }
    }
}

struct ChildServer {
    child: Child,
    addr: String,
    trust: ServerTrust,
    fingerprint: String,
}

impl ChildServer {
    async fn login(&self, n: u8) -> Client {
        let mut c = Client::connect(&self.addr, &self.trust).await.unwrap();
        c.authenticate(&user(n)).await.unwrap();
        c
    }

    /// Stops it with SIGTERM and waits for a clean exit. A request first:
    /// the server takes SIGTERM as a clean stop once it serves, and it
    /// prints its start lines just before.
    async fn stop(mut self) {
        Client::connect(&self.addr, &self.trust).await.unwrap();
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
        let exit = tokio::task::spawn_blocking(move || self.child.wait().unwrap())
            .await
            .unwrap();
        assert!(exit.success(), "qpq-server exited with {exit:?}");
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Asserts `out` succeeded and returns its stdout.
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "qpq-server failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Asserts `out` failed and returns its stderr.
fn refused(out: &Output) -> String {
    assert!(
        !out.status.success(),
        "qpq-server succeeded: {}",
        text(&out.stdout)
    );
    text(&out.stderr)
}

/// Every record of the database at `db` (opened, so no server may hold it).
fn db_records(db: &Path) -> Records {
    let store = FjallStore::open(db).unwrap();
    let mut out = Vec::new();
    let mut walk = KeyOrder::new(1_000, |after, n| store.scan(&[], after, n));
    while let Some(chunk) = walk.next_chunk().unwrap() {
        out.extend(chunk);
    }
    out
}

/// The header and every record of the backup file at `path`, checked.
fn backup_records(path: &Path) -> (backup::Header, Records) {
    let input = BufReader::new(File::open(path).unwrap());
    let (mut reader, header) = Reader::open(input).unwrap();
    let mut out = Vec::new();
    while let Some(record) = reader.next_record().unwrap() {
        out.push(record);
    }
    (header, out)
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

/// The names in a directory, sorted.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Clients writing to two queues in the background: each of `SENDERS`
/// sends numbered messages one after another with `enqueueBatch` to both
/// bob and carol, and records each acknowledgement with the phase the test
/// was in when it came back.
struct Load {
    acks: Arc<Mutex<Vec<Ack>>>,
    count: watch::Receiver<usize>,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Debug, Clone)]
struct Ack {
    payload: Vec<u8>,
    seqs: Vec<u64>,
    phase: u8,
}

const SENDERS: u8 = 3;
/// Messages each sender sends at most (the queues hold 10,000).
const MESSAGES_PER_SENDER_MAX: u32 = 2_000;

fn bob() -> IdentityKey {
    id(&user(2))
}

fn carol() -> IdentityKey {
    id(&user(3))
}

impl Load {
    async fn start(server: &ChildServer) -> Load {
        let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
        let (count_tx, count) = watch::channel(0usize);
        let count_tx = Arc::new(count_tx);
        let phase = Arc::new(AtomicU8::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for s in 0..SENDERS {
            let c = server.login(10 + s).await;
            let (acks, count_tx, phase, stop) =
                (acks.clone(), count_tx.clone(), phase.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                for i in 0..MESSAGES_PER_SENDER_MAX {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let mut payload = vec![s];
                    payload.extend_from_slice(&i.to_be_bytes());
                    payload.resize(200, 0xab);
                    let mut m = [0u8; 16];
                    m[0] = s;
                    m[1..5].copy_from_slice(&i.to_be_bytes());
                    let seqs = c
                        .enqueue_batch(
                            vec![bob(), carol()],
                            ChannelId::DEFAULT,
                            payload.clone(),
                            MessageId(m),
                        )
                        .await
                        .expect("enqueue under load");
                    // Read after the acknowledgement came back.
                    let phase = phase.load(Ordering::SeqCst);
                    acks.lock().unwrap().push(Ack {
                        payload,
                        seqs,
                        phase,
                    });
                    count_tx.send_modify(|n| *n += 1);
                }
            }));
        }
        Load {
            acks,
            count,
            phase,
            stop,
            tasks,
        }
    }

    /// Waits until `n` acknowledgements came back in total.
    async fn until(&mut self, n: usize) {
        self.count.wait_for(|c| *c >= n).await.unwrap();
    }

    fn acked(&self) -> usize {
        *self.count.borrow()
    }

    fn set_phase(&self, phase: u8) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    async fn finish(self) -> Vec<Ack> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.acks.lock().unwrap().clone()
    }
}

/// Reads bob's and carol's queues on a restored server and checks them
/// against the acknowledgements: each queue gap-free from seq 1 with its
/// next seq right after its last message (counters agree with messages),
/// both holding the same messages (each `enqueueBatch` whole or not at
/// all), each sender's messages a prefix of what it sent, and every
/// acknowledgement of a phase in `must` there, at its seqs. Returns how
/// many messages bob's queue holds.
async fn check_restored(server: &ChildServer, acks: &[Ack], must: &[u8]) -> usize {
    let mut queues = Vec::new();
    for (n, key) in [(2, bob()), (3, carol())] {
        let c = server.login(n).await;
        let stored = read_numbered_queue(&c, key, 0).await;
        let last = stored.keys().last().copied().unwrap_or(0);
        assert_eq!(
            stored.keys().copied().collect::<Vec<_>>(),
            (1..=last).collect::<Vec<_>>(),
            "a queue starts at seq 1 without gaps"
        );
        let next = c.fetch(key, ChannelId::DEFAULT, last, 1).await.unwrap();
        assert_eq!(
            next.next_seq,
            last + 1,
            "the queue's counter agrees with its messages"
        );
        queues.push(stored);
    }
    // Messages by sender and number (the payload's first five bytes).
    let payloads = |q: &BTreeMap<u64, Vec<u8>>| {
        q.values()
            .map(|p| (p[0], u32::from_be_bytes(p[1..5].try_into().unwrap())))
            .collect::<BTreeSet<_>>()
    };
    assert_eq!(
        payloads(&queues[0]),
        payloads(&queues[1]),
        "an enqueueBatch is in both queues or in neither"
    );
    for s in 0..SENDERS {
        let mut sent: Vec<u32> = queues[0]
            .values()
            .filter(|p| p[0] == s)
            .map(|p| u32::from_be_bytes(p[1..5].try_into().unwrap()))
            .collect();
        sent.sort_unstable();
        let prefix: Vec<u32> = (0..sent.len() as u32).collect();
        assert_eq!(
            sent, prefix,
            "sender {s}: what is there is what it sent first"
        );
    }
    let mut required = 0;
    for ack in acks.iter().filter(|a| must.contains(&a.phase)) {
        required += 1;
        for (queue, seq) in queues.iter().zip(&ack.seqs) {
            assert_eq!(
                queue.get(seq),
                Some(&ack.payload),
                "acknowledged before the backup began, missing at seq {seq}"
            );
        }
    }
    assert!(required > 0, "nothing was acknowledged before the backup");
    // A message acknowledged after the snapshot is wholly absent, its
    // dedup record included: sent again, it is stored anew at the end.
    let held: BTreeSet<&Vec<u8>> = queues[0].values().collect();
    let mut tails = [queues[0].len() as u64, queues[1].len() as u64];
    for ack in acks.iter().filter(|a| !held.contains(&a.payload)).take(10) {
        let s = ack.payload[0];
        let mut m = [0u8; 16];
        m[..5].copy_from_slice(&ack.payload[..5]);
        let c = server.login(10 + s).await;
        let seqs = c
            .enqueue_batch(
                vec![bob(), carol()],
                ChannelId::DEFAULT,
                ack.payload.clone(),
                MessageId(m),
            )
            .await
            .unwrap();
        tails = [tails[0] + 1, tails[1] + 1];
        assert_eq!(
            seqs, tails,
            "a message absent from the backup was half there"
        );
    }
    queues[0].len()
}

/// Enqueues `count` messages of `bytes` each to dave (user 4), eight at a
/// time, so a backup has megabytes to stream before it reaches the
/// queues under load.
async fn prefill(server: &ChildServer, count: u32, bytes: usize) {
    let c = server.login(9).await;
    let dave = id(&user(4));
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..8u32 {
        let c = c.clone();
        tasks.spawn(async move {
            for i in (lane..count).step_by(8) {
                let mut m = [0xdd; 16];
                m[..4].copy_from_slice(&i.to_be_bytes());
                c.enqueue(dave, ChannelId::DEFAULT, vec![i as u8; bytes], MessageId(m))
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// (a) `qpq-server backup` runs against a running server while clients
/// keep enqueueing. The backup restores into a fresh data directory to
/// exactly its records; the restored server has the same certificate and
/// every message acknowledged before the backup began, in order, and no
/// enqueue half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_under_write_load_restores_every_acknowledged_message() {
    let dirs = Dirs::new();
    let (a, b, dest) = (dirs.data("a"), dirs.data("b"), dirs.file("a.qpqbak"));
    let server = dirs.start(&a);
    prefill(&server, 100, 16 * 1024).await;
    let mut load = Load::start(&server).await;
    load.until(150).await;
    load.set_phase(1);
    let out = {
        let mut c = dirs.command(&a, &["backup", dest.to_str().unwrap()]);
        tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap()
    };
    load.set_phase(2);
    let summary = ok(&out);
    let during = load
        .acks
        .lock()
        .unwrap()
        .iter()
        .filter(|a| a.phase == 1)
        .count();
    eprintln!(
        "backup under load: {} ({during} enqueues acknowledged while it ran)",
        summary.trim()
    );
    assert!(summary.contains("from the running server"), "{summary}");
    let after = load.acked() + 50;
    load.until(after).await;
    let acks = load.finish().await;
    assert_eq!(mode(&dest), 0o600);
    let fingerprint = server.fingerprint.clone();
    server.stop().await;

    ok(&dirs.run(&b, &["restore", dest.to_str().unwrap()]));
    let (header, records) = backup_records(&dest);
    assert_eq!(
        db_records(&b.join("qpq.db")),
        records,
        "the restored records are the backup's"
    );
    let names: Vec<String> = header.files.iter().map(|f| f.display_name()).collect();
    assert!(names.contains(&"server-key.pem".to_owned()), "{names:?}");
    assert_eq!(mode(&b.join("server-key.pem")), 0o600);

    let restored = dirs.start(&b);
    assert_eq!(
        restored.fingerprint, fingerprint,
        "clients' pinned fingerprint survives"
    );
    let held = check_restored(&restored, &acks, &[0]).await;
    assert!(
        held <= acks.len(),
        "{held} messages, {} acknowledged",
        acks.len()
    );
    restored.stop().await;
}

/// A backup stream held up half-way (the server blocked writing to a
/// reader that waits) while clients enqueue hundreds of messages: what it
/// holds is the database at the instant of the request — everything
/// acknowledged before, nothing acknowledged after but the few requests in
/// flight at that instant, and no enqueue half.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_stream_held_up_half_way_holds_the_instant_it_began() {
    let dirs = Dirs::new();
    let (a, b, dest) = (dirs.data("a"), dirs.data("b"), dirs.file("held.qpqbak"));
    let server = dirs.start(&a);
    // More records ahead of the queues under load than the server reads
    // from its snapshot at once (dave's queue was numbered first, so its
    // records come first), and megabytes of them, more than the socket and
    // the server's buffer hold: the server is mid-stream while we wait,
    // and reads the queues under load only after the writes.
    prefill(&server, BACKUP_RECORDS_PER_CHUNK as u32 + 500, 4 * 1024).await;
    let mut load = Load::start(&server).await;
    load.until(100).await;
    load.set_phase(1);
    let socket = a.join(backup::ADMIN_SOCKET_NAME);
    let mut stream = tokio::task::spawn_blocking(move || backup::admin::request_backup(&socket))
        .await
        .unwrap()
        .unwrap()
        .expect("the running server answers on its admin socket");
    // The server has taken its snapshot: it answered with the backup's magic.
    load.set_phase(2);
    // One backup at a time: another request meanwhile is refused.
    let socket = a.join(backup::ADMIN_SOCKET_NAME);
    let second = tokio::task::spawn_blocking(move || backup::admin::request_backup(&socket))
        .await
        .unwrap();
    match second {
        Err(e) => assert!(e.to_string().contains("already running"), "{e}"),
        Ok(_) => panic!("a second backup streamed while one was held up"),
    }
    let before = load.acked();
    load.until(before + 300).await;
    let bytes = tokio::task::spawn_blocking(move || {
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        bytes
    })
    .await
    .unwrap();
    let acks = load.finish().await;
    server.stop().await;
    std::fs::write(&dest, &bytes).unwrap();

    ok(&dirs.run(&b, &["restore", dest.to_str().unwrap()]));
    let restored = dirs.start(&b);
    let held = check_restored(&restored, &acks, &[0]).await;
    let by_then = acks.iter().filter(|a| a.phase < 2).count();
    assert!(
        held <= by_then + usize::from(SENDERS),
        "{held} messages restored, but only {by_then} were acknowledged when the snapshot was \
         taken (plus at most one in flight per sender)"
    );
    assert!(acks.len() >= by_then + 300);
    restored.stop().await;
}

/// (b) A stopped server is backed up from its database; the restore has
/// its messages, its certificate and key (mode 0600), and its fingerprint.
/// DEST is never overwritten without --force, nor put in the data
/// directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_backed_up_from_its_database() {
    let dirs = Dirs::new();
    let (a, b, dest) = (dirs.data("a"), dirs.data("b"), dirs.file("stopped.qpqbak"));
    let server = dirs.start(&a);
    let alice = server.login(1).await;
    for i in 0..20u32 {
        let mut payload = vec![1];
        payload.extend_from_slice(&i.to_be_bytes());
        alice
            .enqueue(bob(), ChannelId::DEFAULT, payload, MessageId([i as u8; 16]))
            .await
            .unwrap();
    }
    let fingerprint = server.fingerprint.clone();
    server.stop().await;
    assert!(
        !a.join(backup::ADMIN_SOCKET_NAME).exists(),
        "a clean stop removes the admin socket"
    );

    let summary = ok(&dirs.run(&a, &["backup", dest.to_str().unwrap()]));
    assert!(summary.contains("from the database"), "{summary}");
    assert!(summary.contains("TLS private key"), "{summary}");
    assert_eq!(mode(&dest), 0o600);
    let written = std::fs::read(&dest).unwrap();
    // Never over an existing file without --force; with it, replaced.
    let e = refused(&dirs.run(&a, &["backup", dest.to_str().unwrap()]));
    assert!(e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(&dest).unwrap(), written);
    ok(&dirs.run(&a, &["backup", "--force", dest.to_str().unwrap()]));
    let inside = a.join("inside.qpqbak");
    let e = refused(&dirs.run(&a, &["backup", inside.to_str().unwrap()]));
    assert!(e.contains("data directory"), "{e}");
    assert!(!inside.exists());
    let leftovers: Vec<String> = listing(dirs.root.path())
        .into_iter()
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let summary = ok(&dirs.run(&b, &["restore", dest.to_str().unwrap()]));
    assert!(summary.contains("read back and compared"), "{summary}");
    assert_eq!(db_records(&b.join("qpq.db")), backup_records(&dest).1);
    assert_eq!(
        std::fs::read(b.join("server-key.pem")).unwrap(),
        std::fs::read(a.join("server-key.pem")).unwrap()
    );
    assert_eq!(mode(&b.join("server-key.pem")), 0o600);
    let restored = dirs.start(&b);
    assert_eq!(restored.fingerprint, fingerprint);
    let c = restored.login(2).await;
    let stored = read_numbered_queue(&c, bob(), 0).await;
    assert_eq!(stored.len(), 20);
    restored.stop().await;
}

/// (c) A restore refuses a data directory that holds a database (and one
/// a running server holds, even with --force); with --force it keeps the
/// old database and the files it replaces aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_over_a_database_needs_force_and_keeps_the_old_one_aside() {
    let dirs = Dirs::new();
    let (a, b, dest) = (dirs.data("a"), dirs.data("b"), dirs.file("c.qpqbak"));
    let server = dirs.start(&a);
    server
        .login(1)
        .await
        .enqueue(
            bob(),
            ChannelId::DEFAULT,
            vec![1, 0, 0, 0, 0],
            MessageId([1; 16]),
        )
        .await
        .unwrap();
    let fingerprint = server.fingerprint.clone();
    server.stop().await;
    ok(&dirs.run(&a, &["backup", dest.to_str().unwrap()]));

    // B: another server's directory, with its own database and key.
    let other = dirs.start(&b);
    let e = refused(&dirs.run(&b, &["restore", "--force", dest.to_str().unwrap()]));
    assert!(e.contains("is running"), "{e}");
    other.stop().await;
    let before = listing(&b);
    let old_key = std::fs::read(b.join("server-key.pem")).unwrap();
    let old_records = db_records(&b.join("qpq.db"));
    let e = refused(&dirs.run(&b, &["restore", dest.to_str().unwrap()]));
    assert!(
        e.contains("already holds a database") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(listing(&b), before, "a refused restore changes nothing");
    assert_eq!(db_records(&b.join("qpq.db")), old_records);

    let summary = ok(&dirs.run(&b, &["restore", "--force", dest.to_str().unwrap()]));
    assert!(summary.contains("kept aside"), "{summary}");
    let names = listing(&b);
    let aside = |prefix: &str| {
        names
            .iter()
            .find(|n| n.starts_with(&format!("{prefix}.before-restore-")))
            .map(|n| b.join(n))
            .unwrap_or_else(|| panic!("no {prefix} kept aside in {names:?}"))
    };
    assert_eq!(
        db_records(&aside("qpq.db")),
        old_records,
        "the old database, aside"
    );
    assert_eq!(std::fs::read(aside("server-key.pem")).unwrap(), old_key);
    assert!(
        !names.iter().any(|n| n.ends_with(".restoring")),
        "{names:?}"
    );
    assert_eq!(db_records(&b.join("qpq.db")), backup_records(&dest).1);
    let restored = dirs.start(&b);
    assert_eq!(restored.fingerprint, fingerprint);
    restored.stop().await;
}

/// (d) Truncated, bit-flipped, foreign and newer files are refused with a
/// clear error before anything changes, even with --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_or_foreign_backup_is_refused_and_changes_nothing() {
    let dirs = Dirs::new();
    let (a, b, dest) = (dirs.data("a"), dirs.data("b"), dirs.file("good.qpqbak"));
    let server = dirs.start(&a);
    server
        .login(1)
        .await
        .enqueue(bob(), ChannelId::DEFAULT, vec![7; 64], MessageId([7; 16]))
        .await
        .unwrap();
    server.stop().await;
    ok(&dirs.run(&a, &["backup", dest.to_str().unwrap()]));
    let good = std::fs::read(&dest).unwrap();
    let other = dirs.start(&b);
    other.stop().await;
    let before = listing(&b);
    let old_key = std::fs::read(b.join("server-key.pem")).unwrap();
    let old_records = db_records(&b.join("qpq.db"));

    let mut flipped = good.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x10;
    let mut foreign = good.clone();
    foreign[..8].copy_from_slice(b"PK\x03\x04zip!");
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&2u32.to_be_bytes());
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("half", good[..good.len() / 2].to_vec(), "checksum mismatch"),
        (
            "last byte cut",
            good[..good.len() - 1].to_vec(),
            "checksum mismatch",
        ),
        ("bit flipped", flipped, "checksum mismatch"),
        ("wrong magic", foreign, "not a qpq-server backup"),
        ("newer version", newer, "newer qpq-server"),
        ("empty", Vec::new(), "checksum mismatch"),
    ];
    for (what, bytes, says) in cases {
        let bad = dirs.file("bad.qpqbak");
        std::fs::write(&bad, &bytes).unwrap();
        let e = refused(&dirs.run(&b, &["restore", "--force", bad.to_str().unwrap()]));
        assert!(e.contains(says), "{what}: {e}");
        assert!(!e.contains("panicked"), "{what}: {e}");
        assert_eq!(listing(&b), before, "{what}: the data directory changed");
        assert_eq!(std::fs::read(b.join("server-key.pem")).unwrap(), old_key);
    }
    let missing = refused(&dirs.run(&b, &["restore", dirs.file("nowhere").to_str().unwrap()]));
    assert!(missing.contains("nowhere"), "{missing}");
    assert_eq!(db_records(&b.join("qpq.db")), old_records);
}

/// (e) With storage = "postgres" there is nothing of qpq-server's to back
/// up or restore: both refuse at once, pointing to PostgreSQL's tools,
/// without connecting anywhere.
#[test]
fn postgres_storage_refuses_backup_and_restore() {
    let dirs = Dirs::new();
    let data = dirs.data("pg");
    let dest = dirs.file("pg.qpqbak");
    let run = |args: &[&str]| {
        dirs.command(&data, args)
            .env("QPQ_STORAGE", "postgres")
            .env("QPQ_POSTGRES_URL", "postgres://nobody@127.0.0.1:1/nothing")
            .output()
            .unwrap()
    };
    let e = refused(&run(&["backup", dest.to_str().unwrap()]));
    assert!(e.contains("pg_dump") && e.contains("postgres"), "{e}");
    assert!(!dest.exists());
    let e = refused(&run(&["restore", dest.to_str().unwrap()]));
    assert!(e.contains("pg_restore"), "{e}");
    assert!(!data.exists(), "nothing was created");
}
