//! Durability test: every acknowledged write is covered by a sync that ran
//! while the client waited for the reply.
//!
//! SIGKILL (`crash.rs`) keeps the page cache, so it cannot tell a server
//! that syncs from one that only hands its writes to the OS. This test
//! watches the syncs themselves instead: it runs the `qpq-server` binary
//! (fjall, `durability = "fsync"`) under `strace`, makes acknowledged
//! writes one after another (enqueues and KeyPackage uploads), records the
//! wall clock before each request leaves and after its reply arrives, and
//! then reads strace's log: for every write there must be a sync of the
//! database's journal that *started* after the request was sent — so after
//! the write it covers was made — and *returned* before the reply was
//! received. strace's `-ttt` timestamps and the test's `SystemTime` both
//! read CLOCK_REALTIME; a syscall's return is its entry timestamp plus the
//! time `-T` measured.
//!
//! It needs `strace` and permission to trace a child (ptrace). Without
//! them it says so on stderr with a line starting `SKIPPED:` and checks
//! nothing, unless `QPQ_STRACE_TESTS=require` (which `.ci/run` sets after
//! installing strace): then it fails.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

use common::{id, read_start_lines, user};
use quicproquo_client::{Client, ServerTrust};
use quicproquo_core::types::{ChannelId, MessageId};

/// Acknowledged writes made one after another (half enqueues, half
/// KeyPackage uploads); each needs a sync of its own.
const WRITES: u32 = 40;

/// The syscalls that make a file's written data durable, the ones fjall
/// uses: `fdatasync` for the group commit's syncs (`PersistMode::SyncData`),
/// `fsync` when it creates or seals a file.
const SYNC_SYSCALLS: &str = "fsync,fdatasync";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_is_covered_by_a_sync_before_its_reply() {
    if let Some(message) = strace_unusable() {
        assert!(
            std::env::var("QPQ_STRACE_TESTS").as_deref() != Ok("require"),
            "{message}"
        );
        eprintln!("SKIPPED: {message}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut server = TracedServer::start(dir.path());
    let alice_sk = user(1);
    let alice = id(&alice_sk);
    let bob = id(&user(2));
    let mut c = Client::connect(&server.addr, &server.trust).await.unwrap();
    c.authenticate(&alice_sk).await.unwrap();

    let mut writes = Vec::new();
    for i in 0..WRITES {
        let sent_us = now_us();
        let what = if i % 2 == 0 {
            let seq = c
                .enqueue(
                    bob,
                    ChannelId::DEFAULT,
                    vec![i as u8],
                    MessageId([i as u8; 16]),
                )
                .await
                .expect("enqueue");
            assert_eq!(seq, u64::from(i / 2 + 1));
            format!("enqueue {i} (seq {seq})")
        } else {
            c.upload_key_package(alice, vec![i as u8; 100], false)
                .await
                .expect("KeyPackage upload");
            format!("KeyPackage upload {i}")
        };
        let received_us = now_us();
        writes.push(Write {
            what,
            sent_us,
            received_us,
        });
    }
    c.close().await;
    let log = server.stop();

    let syncs = parse_syncs(&log);
    let journal: Vec<&SyncCall> = syncs.iter().filter(|s| s.is_journal()).collect();
    assert!(
        !journal.is_empty(),
        "no sync of the journal at all; the syncs traced: {syncs:#?}"
    );
    for w in &writes {
        let covered = journal
            .iter()
            .any(|s| s.succeeded && s.entered_us > w.sent_us && s.returned_us < w.received_us);
        assert!(
            covered,
            "{} was acknowledged with no sync of the journal between its request \
             (at {} µs) and its reply (at {} µs); the journal's syncs around it: {:#?}",
            w.what,
            w.sent_us,
            w.received_us,
            journal
                .iter()
                .filter(
                    |s| s.returned_us + 50_000 > w.sent_us && s.entered_us < w.received_us + 50_000
                )
                .collect::<Vec<_>>()
        );
    }
}

#[test]
fn the_log_parser_reads_padded_ids_split_calls_and_failures() {
    let log = "\
1174  1796592676.978707 fsync(9</tmp/d/server-key.tmp>) = 0 <0.004872>
28552 1796592538.124458 fdatasync(11</tmp/d/qpq.db/0.jnl>) = 0 <0.000472>
28549 1796592540.950573 fsync(11</tmp/d/qpq.db/0.jnl> <unfinished ...>
28547 1796592540.950603 --- SIGTERM {si_signo=SIGTERM, si_code=SI_USER, si_pid=1, si_uid=0} ---
28551 1796592540.950637 +++ exited with 0 +++
28549 1796592540.950934 <... fsync resumed>) = 0 <0.000343>
28550 1796592540.960000 fdatasync(12</tmp/d/qpq.db/1.jnl>) = -1 EIO (Input/output error) <0.0001>
";
    let got: Vec<(String, bool, u64, u64, bool)> = parse_syncs(log)
        .into_iter()
        .map(|s| {
            let journal = s.is_journal();
            (s.syscall, journal, s.entered_us, s.returned_us, s.succeeded)
        })
        .collect();
    assert_eq!(
        got,
        [
            ("fsync", false, 1796592676978707, 1796592676983579, true),
            ("fdatasync", true, 1796592538124458, 1796592538124930, true),
            ("fsync", true, 1796592540950573, 1796592540950916, true),
            ("fdatasync", true, 1796592540960000, 1796592540960100, false),
        ]
        .map(|(name, journal, entered, returned, ok)| (
            name.to_owned(),
            journal,
            entered,
            returned,
            ok
        ))
    );
}

/// One acknowledged write, as the client timed it (µs since the epoch).
struct Write {
    what: String,
    sent_us: u64,
    received_us: u64,
}

/// One completed sync syscall from strace's log.
#[derive(Debug)]
struct SyncCall {
    syscall: String,
    /// The file it synced, as strace's `-y` names the descriptor.
    path: String,
    entered_us: u64,
    returned_us: u64,
    succeeded: bool,
}

impl SyncCall {
    /// A sync of the write-ahead journal, where fjall puts every batch
    /// first (`<data_dir>/qpq.db/<n>.jnl`).
    fn is_journal(&self) -> bool {
        Path::new(&self.path)
            .parent()
            .is_some_and(|dir| dir.ends_with("qpq.db"))
            && self.path.ends_with(".jnl")
    }
}

/// `qpq-server` as a child of `strace`, which logs every sync syscall of
/// all its threads.
struct TracedServer {
    strace: Child,
    server_pid: u32,
    addr: String,
    trust: ServerTrust,
    log: PathBuf,
    stopped: bool,
}

impl TracedServer {
    fn start(dir: &Path) -> TracedServer {
        // An empty config file so a developer's ./qpq-server.toml is not read.
        let config = dir.join("none.toml");
        std::fs::write(&config, "").unwrap();
        let log = dir.join("strace.log");
        let mut strace = Command::new("strace")
            .args(["-f", "-ttt", "-T", "-y", "-e"])
            .arg(format!("trace={SYNC_SYSCALLS}"))
            .arg("-o")
            .arg(&log)
            .arg(env!("CARGO_BIN_EXE_qpq-server"))
            .env("QPQ_LISTEN", "127.0.0.1:0")
            .env("QPQ_DATA_DIR", dir)
            .env("QPQ_CONFIG", &config)
            .env("QPQ_DURABILITY", "fsync")
            .env("QPQ_LOG", "warn")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn strace");
        let (addr, fingerprint) = read_start_lines(&mut strace);
        let server_pid = child_of(strace.id()).expect("qpq-server runs under strace");
        TracedServer {
            strace,
            server_pid,
            addr,
            trust: ServerTrust::fingerprint_hex(&fingerprint).unwrap(),
            log,
            stopped: false,
        }
    }

    /// Stops the server with SIGTERM, waits for strace to finish its log
    /// and returns the log.
    fn stop(&mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.server_pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.strace.wait().unwrap();
        self.stopped = true;
        assert!(
            exit.success(),
            "qpq-server under strace exited with {exit:?}"
        );
        std::fs::read_to_string(&self.log).expect("strace's log")
    }
}

impl Drop for TracedServer {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = Command::new("kill")
                .args(["-KILL", &self.server_pid.to_string()])
                .status();
            let _ = self.strace.kill();
            let _ = self.strace.wait();
        }
    }
}

/// Why strace cannot be used here, if it cannot: missing, or not allowed
/// to trace a child.
fn strace_unusable() -> Option<String> {
    match Command::new("strace")
        .args(["-f", "-o", "/dev/null", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
    {
        Err(e) => Some(format!(
            "the durability test needs strace ({e}; apt-get install strace)"
        )),
        Ok(o) if !o.status.success() => Some(format!(
            "the durability test needs strace to trace a child, which failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Ok(_) => None,
    }
}

/// The one child process of `parent`, found by its parent pid in `/proc`.
fn child_of(parent: u32) -> Option<u32> {
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
        let after_comm = &stat[stat.rfind(')')? + 1..];
        let ppid: u32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent).then_some(pid)
    })
}

/// The completed sync syscalls in a log of `strace -f -ttt -T -y`. A call
/// another thread interrupted is logged in two lines, `name(args
/// <unfinished ...>` and `<... name resumed>) = ret <time>`, joined here by
/// thread id.
fn parse_syncs(log: &str) -> Vec<SyncCall> {
    let mut unfinished: HashMap<&str, (String, u64, String)> = HashMap::new();
    let mut syncs = Vec::new();
    for line in log.lines() {
        // `tid timestamp call...`; strace pads the thread id with spaces.
        let Some((tid, rest)) = line.trim_start().split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Some(ts) = micros(ts) else { continue };
        let rest = rest.trim_start();
        let (syscall, entered_us, path, result) = if let Some(resumed) = rest.strip_prefix("<... ")
        {
            let Some((syscall, result)) = resumed.split_once(" resumed>") else {
                continue;
            };
            let Some((name, entered_us, path)) = unfinished.remove(tid) else {
                continue;
            };
            assert_eq!(name, syscall, "resumed another call: {line}");
            (name, entered_us, path, result)
        } else {
            let Some((syscall, args)) = rest.split_once('(') else {
                continue; // signals, exits
            };
            let path = args
                .split_once('<')
                .and_then(|(_, p)| p.split_once('>'))
                .map_or_else(String::new, |(p, _)| p.to_owned());
            if args.ends_with("<unfinished ...>") {
                unfinished.insert(tid, (syscall.to_owned(), ts, path));
                continue;
            }
            (syscall.to_owned(), ts, path, args)
        };
        // `... = 0 <0.000472>`
        let Some((_, outcome)) = result.rsplit_once(" = ") else {
            continue;
        };
        let mut outcome = outcome.split_whitespace();
        let succeeded = outcome.next() == Some("0");
        let Some(took_us) = outcome
            .last()
            .and_then(|t| t.strip_prefix('<')?.strip_suffix('>'))
            .and_then(micros)
        else {
            continue;
        };
        syncs.push(SyncCall {
            syscall,
            path,
            entered_us,
            returned_us: entered_us + took_us,
            succeeded,
        });
    }
    syncs
}

/// `seconds.micros` as microseconds.
fn micros(s: &str) -> Option<u64> {
    let (secs, frac) = s.split_once('.')?;
    let frac = format!("{frac:0<6}");
    Some(secs.parse::<u64>().ok()? * 1_000_000 + frac.get(..6)?.parse::<u64>().ok()?)
}

/// The wall clock (CLOCK_REALTIME, as strace's `-ttt`) in microseconds.
fn now_us() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    u64::try_from(since.as_micros()).unwrap()
}
