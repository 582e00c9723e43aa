//! Members on separate hosts: network namespaces joined by a bridge
//! (`common::lab`), `qpq-server` on host S, Alice on host A and Bob on
//! host B, each command run on its host through `ip netns exec`. Messages
//! go from host to host through the server; with S off the network they
//! wait in the sender's outbox and go out once it is back. With direct
//! links, A and B chat without the server, keep chatting with S off the
//! network, go through S when the link between them is cut, and a host C
//! whose user is in no group with them cannot connect.
//!
//! Needs root and iproute2. Without them the test prints why and passes;
//! `QPQ_NETNS_TESTS=require` (set by `.ci/run`) makes that a failure.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

mod common;

use common::Server;
use common::lab::{self, Lab};

const PASSWORD: &str = "correct horse battery staple";

struct User<'a> {
    lab: &'a Lab,
    host: &'static str,
    state: PathBuf,
    server: &'a Server,
}

impl User<'_> {
    fn output(&self, args: &[&str]) -> Output {
        self.lab
            .command(self.host, env!("CARGO_BIN_EXE_qpq"))
            .env("QPQ_STATE", &self.state)
            .env("QPQ_PASSWORD", PASSWORD)
            .env("QPQ_SERVER", &self.server.addr)
            .env("QPQ_SERVER_FINGERPRINT", &self.server.fingerprint)
            .env_remove("QPQ_SERVER_CA")
            .arg("--json")
            .args(args)
            .output()
            .expect("run qpq")
    }

    fn run(&self, args: &[&str]) -> Vec<Value> {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "qpq {args:?} on {} failed: {}",
            self.host,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON"))
            .collect()
    }

    fn key(&self) -> String {
        self.run(&["whoami"])[0]["identity_key"]
            .as_str()
            .expect("identity")
            .to_owned()
    }

    fn texts(&self) -> Vec<String> {
        self.run(&["recv"])
            .iter()
            .filter(|v| v["type"] == "message")
            .map(|v| v["text"].as_str().expect("text").to_owned())
            .collect()
    }
}

/// The hosts, `qpq-server` on host `s` (port 7000, `config` as its
/// `qpq-server.toml`) and a directory for everyone's files; `None` (the
/// test skips, saying why) where namespaces cannot be made.
fn lab_with_server(hosts: &[&str], config: &str) -> Option<(Lab, tempfile::TempDir, Server)> {
    let lab = match Lab::new(hosts) {
        Ok(lab) => lab,
        Err(why) => {
            assert!(!lab::required(), "QPQ_NETNS_TESTS=require: {why}");
            eprintln!("SKIPPED: network namespaces cannot be made here ({why})");
            return None;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("{}:7000", lab.addr("s"));
    let server = Server::start_as(
        lab.command("s", common::server_binary()),
        dir.path(),
        &listen,
        config,
    );
    Some((lab, dir, server))
}

#[test]
fn members_on_two_hosts_chat_through_a_server_on_a_third() {
    let Some((lab, dir, server)) = lab_with_server(&["a", "b", "s"], "") else {
        return;
    };
    let user = |host: &'static str| User {
        lab: &lab,
        host,
        state: dir.path().join(format!("{host}.bin")),
        server: &server,
    };
    let (alice, bob) = (user("a"), user("b"));
    for u in [&alice, &bob] {
        u.run(&["init"]);
        u.run(&["register", "--count", "2"]);
    }
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", &bob.key()]);
    assert!(
        bob.run(&["recv"])
            .iter()
            .any(|v| v["type"] == "joined" && v["group"] == "team")
    );
    alice.run(&["send", "team", "from host a"]);
    assert_eq!(bob.texts(), vec!["from host a"]);
    bob.run(&["send", "team", "from host b"]);
    assert_eq!(alice.texts(), vec!["from host b"]);

    // S off the network: Alice's message waits in her outbox...
    lab.unplug("s");
    let sent = alice.run(&["send", "team", "while s was away"]);
    assert!(
        sent.iter()
            .any(|v| v["type"] == "sent" && v["delivered"] == 0 && v["undelivered"] == 1),
        "{sent:?}"
    );
    // ... and goes out with her next command once S is back.
    lab.plug("s");
    alice.run(&["recv"]);
    assert_eq!(bob.texts(), vec!["while s was away"]);
}

/// A `qpq daemon` with direct links on a host, its events read as they
/// come.
struct Daemon {
    child: Child,
    stdin: ChildStdin,
    events: mpsc::Receiver<Value>,
    /// Every event seen so far.
    seen: Vec<Value>,
}

/// Longest wait for one expected event: a reconnect to the server after
/// it was off the network may wait out a doubling pause.
const PATIENCE: Duration = Duration::from_secs(90);

impl Daemon {
    fn start(user: &User<'_>, listen: &str, peer: &str) -> Daemon {
        let mut child = user
            .lab
            .command(user.host, env!("CARGO_BIN_EXE_qpq"))
            .env("QPQ_STATE", &user.state)
            .env("QPQ_PASSWORD", PASSWORD)
            .env("QPQ_SERVER", &user.server.addr)
            .env("QPQ_SERVER_FINGERPRINT", &user.server.fingerprint)
            .env_remove("QPQ_SERVER_CA")
            .args(["--json", "daemon", "--direct-listen", listen])
            .args(["--direct-peer", peer])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start qpq daemon");
        let stdout = child.stdout.take().unwrap();
        let stdin = child.stdin.take().unwrap();
        let (tx, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        Daemon {
            child,
            stdin,
            events,
            seen: Vec::new(),
        }
    }

    /// Waits for an event `want` accepts; panics after [`PATIENCE`].
    fn wait_for(&mut self, what: &str, want: impl Fn(&Value) -> bool) {
        let until = Instant::now() + PATIENCE;
        if self.seen.iter().any(&want) {
            return;
        }
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => {
                    let hit = want(&v);
                    self.seen.push(v);
                    if hit {
                        return;
                    }
                }
                Err(_) => panic!("no {what} within {PATIENCE:?}; seen: {:?}", self.seen),
            }
        }
    }

    /// The texts of the messages shown so far, in order.
    fn texts(&self) -> Vec<String> {
        self.seen
            .iter()
            .filter(|v| v["type"] == "message")
            .map(|v| v["text"].as_str().expect("text").to_owned())
            .collect()
    }

    /// Waits until the messages shown are exactly `texts`.
    fn wait_texts(&mut self, texts: &[&str]) {
        let last = texts.last().expect("a text").to_string();
        self.wait_for(&format!("message {last:?}"), |v| {
            v["type"] == "message" && v["text"] == last.as_str()
        });
        assert_eq!(self.texts(), texts, "every message once, in order");
    }

    fn link(&mut self, peer: &str, up: bool) {
        let what = format!("direct link up={up}");
        let peer = peer.to_owned();
        // The latest news about the peer must be the wanted state.
        let until = Instant::now() + PATIENCE;
        loop {
            let last = self
                .seen
                .iter()
                .rev()
                .find(|v| v["type"] == "direct_link" && v["peer"] == peer.as_str());
            if last.is_some_and(|v| v["up"] == up) {
                return;
            }
            let left = until.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(v) => self.seen.push(v),
                Err(_) => panic!("no {what} within {PATIENCE:?}; seen: {:?}", self.seen),
            }
        }
    }

    fn stop(mut self) {
        let _ = writeln!(self.stdin, r#"{{"id": 1, "method": "shutdown"}}"#);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Enqueues the server counted, read from its metrics inside host S.
fn enqueues(lab: &Lab) -> u64 {
    let out = lab
        .command("s", "bash")
        .args([
            "-c",
            "exec 3<>/dev/tcp/127.0.0.1/9464; printf 'GET /metrics HTTP/1.0\\r\\n\\r\\n' >&3; cat <&3",
        ])
        .output()
        .expect("read the server's metrics");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.starts_with("qpq_requests_total{method=\"enqueue"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn members_chat_directly_keep_chatting_without_the_server_and_fall_back_to_it() {
    let config = "metrics_listen = \"127.0.0.1:9464\"\n";
    let Some((lab, dir, server)) = lab_with_server(&["a", "b", "s", "c"], config) else {
        return;
    };
    let user = |host: &'static str| User {
        lab: &lab,
        host,
        state: dir.path().join(format!("{host}.bin")),
        server: &server,
    };
    let (alice, bob) = (user("a"), user("b"));
    for u in [&alice, &bob] {
        u.run(&["init"]);
        u.run(&["register", "--count", "2"]);
    }
    let (alice_key, bob_key) = (alice.key(), bob.key());
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", &bob_key]);
    bob.run(&["recv"]);

    let direct = |host: &str| format!("{}:7444", lab.addr(host));
    let mut a = Daemon::start(&alice, &direct("a"), &format!("{bob_key}={}", direct("b")));
    let mut b = Daemon::start(&bob, &direct("b"), &format!("{alice_key}={}", direct("a")));
    a.link(&bob_key, true);
    b.link(&alice_key, true);

    // Directly: the server stores nothing for them.
    let before = enqueues(&lab);
    alice.run(&["send", "team", "direct 1"]);
    alice.run(&["send", "team", "direct 2"]);
    bob.run(&["send", "team", "direct from bob"]);
    b.wait_texts(&["direct 1", "direct 2"]);
    a.wait_texts(&["direct from bob"]);
    assert_eq!(enqueues(&lab), before, "no enqueue for a direct message");

    // S off the network: they keep chatting directly.
    lab.unplug("s");
    alice.run(&["send", "team", "while s is away"]);
    bob.run(&["send", "team", "still here"]);
    b.wait_texts(&["direct 1", "direct 2", "while s is away"]);
    a.wait_texts(&["direct from bob", "still here"]);
    lab.plug("s");

    // The link between A and B cut, S back: through the server, each
    // message once and in order.
    lab.cut("a", "b");
    alice.run(&["send", "team", "through s 1"]);
    alice.run(&["send", "team", "through s 2"]);
    a.link(&bob_key, false);
    b.wait_texts(&[
        "direct 1",
        "direct 2",
        "while s is away",
        "through s 1",
        "through s 2",
    ]);
    assert!(enqueues(&lab) > before, "the server carried them");

    // Mended: direct again.
    lab.mend("a", "b");
    a.link(&bob_key, true);
    let before = enqueues(&lab);
    alice.run(&["send", "team", "direct again"]);
    b.wait_texts(&[
        "direct 1",
        "direct 2",
        "while s is away",
        "through s 1",
        "through s 2",
        "direct again",
    ]);
    assert_eq!(enqueues(&lab), before, "no enqueue for a direct message");

    // Someone in no group with Alice cannot reach her directly: a probe on
    // host C, of an identity of its own, that admits Alice is refused by
    // Alice's side.
    let probe = lab
        .command("c", std::env::current_exe().unwrap())
        .args(["--exact", "probe", "--nocapture", "--test-threads", "1"])
        .env("QPQ_PROBE_PEER", &alice_key)
        .env("QPQ_PROBE_ADDR", direct("a"))
        .output()
        .expect("run the probe");
    let said = String::from_utf8_lossy(&probe.stdout);
    assert!(probe.status.success(), "probe: {said}");
    assert!(said.contains("PROBE: refused"), "probe: {said}");
    assert_eq!(a.texts(), ["direct from bob", "still here"]);
    a.stop();
    b.stop();
    // Nothing is shown a second time: no server copy of a message taken
    // directly is left to show.
    assert_eq!(alice.texts(), Vec::<String>::new());
    assert_eq!(bob.texts(), Vec::<String>::new());
}

/// Run by the test above inside host C (a no-op otherwise): a direct
/// endpoint of a fresh identity connects to the peer named in
/// `QPQ_PROBE_PEER` at `QPQ_PROBE_ADDR` and tries to send; prints
/// `PROBE: refused` if the peer would not have it.
#[test]
fn probe() {
    let (Ok(peer), Ok(addr)) = (
        std::env::var("QPQ_PROBE_PEER"),
        std::env::var("QPQ_PROBE_ADDR"),
    ) else {
        return;
    };
    use quicproquo_core::protocol::DirectMessage;
    use quicproquo_core::types::{ChannelId, IdentityKey, MessageId};
    use quicproquo_p2p::{Ack, Endpoint};
    let peer = IdentityKey::from_hex(&peer).expect("peer key");
    let addr: std::net::SocketAddr = addr.parse().expect("address");
    let key = ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = runtime.block_on(async {
        let any = std::sync::Arc::new(|_: &IdentityKey| true);
        let me = Endpoint::bind("0.0.0.0:0".parse().unwrap(), &key, any).unwrap();
        let link = match me.connect(addr, peer).await {
            Ok(link) => link,
            Err(e) => return format!("refused ({e})"),
        };
        let message = DirectMessage {
            channel: ChannelId::try_from_slice(&[1; 16]).unwrap(),
            message_id: MessageId([2; 16]),
            after_seq: 0,
            payload: vec![1, 2, 3],
        };
        match link.send(&message).await {
            Ok(Ack::Taken) => "taken".to_owned(),
            Ok(Ack::Refused) => "answered refused".to_owned(),
            Err(e) => format!("refused ({e})"),
        }
    });
    println!("PROBE: {outcome}");
}
