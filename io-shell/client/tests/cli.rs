//! End to end through the `qpq` binary: a real `qpq-server` process and three
//! users with separate state files, each command its own process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use quicproquo_client::state_file::{self, KdfParams};
use quicproquo_client::state_ops;
use quicproquo_client::{Client, ClientError, ServerTrust, TrustError};
use quicproquo_core::client::{ClientMachine, STATE_VERSION};
use serde_json::Value;

mod common;

use common::Server;

const PASSWORD: &str = "correct horse battery staple";

fn start_server(dir: &Path) -> Server {
    Server::start(dir)
}

/// One line of `--json` output: a JSON object with a string `type`.
fn typed_object(line: &str) -> Value {
    let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert!(v["type"].is_string(), "no \"type\": {line}");
    v
}

struct User<'a> {
    state: PathBuf,
    server: &'a Server,
}

impl User<'_> {
    /// `qpq` for this user, with human-readable output.
    fn plain(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_qpq"));
        c.env("QPQ_STATE", &self.state)
            .env("QPQ_PASSWORD", PASSWORD)
            .env("QPQ_SERVER", &self.server.addr)
            .env("QPQ_SERVER_FINGERPRINT", &self.server.fingerprint)
            .env_remove("QPQ_SERVER_CA");
        c
    }

    /// `qpq --json` for this user.
    fn cmd(&self) -> Command {
        let mut c = self.plain();
        c.arg("--json");
        c
    }

    fn run(&self, args: &[&str]) -> Vec<Value> {
        let out: Output = self.cmd().args(args).output().expect("run qpq");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "qpq {args:?} failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout.lines().map(typed_object).collect()
    }

    /// The message of the one `error` object a failing `qpq --json` prints.
    fn fail(&self, args: &[&str], env: &[(&str, &str)]) -> String {
        let out = self
            .cmd()
            .args(args)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "qpq {args:?} succeeded:\n{stdout}");
        let lines: Vec<Value> = stdout.lines().map(typed_object).collect();
        assert_eq!(lines.len(), 1, "{stdout}");
        assert_eq!(lines[0]["type"], "error", "{stdout}");
        lines[0]["message"].as_str().unwrap().to_owned()
    }

    fn key(&self) -> String {
        self.run(&["whoami"])[0]["identity_key"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Human-readable output of a command that succeeds.
    fn text(&self, args: &[&str]) -> String {
        let out = self.plain().args(args).output().expect("run qpq");
        assert!(out.status.success(), "qpq {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The machine in this user's state file (between commands).
    fn machine(&self) -> ClientMachine {
        let plain = state_file::load(&self.state, PASSWORD.as_bytes()).unwrap();
        ClientMachine::restore(&plain, [7; 32]).unwrap()
    }

    /// (sender, text) of every message a `recv` shows.
    fn recv(&self) -> Vec<(String, String)> {
        self.recv_in("team")
    }

    /// (sender, text) of every message a `recv` shows, all in `group`.
    fn recv_in(&self, group: &str) -> Vec<(String, String)> {
        self.run(&["recv"])
            .into_iter()
            .filter(|v| v["type"] == "message")
            .map(|v| {
                assert_eq!(v["group"], group);
                (
                    v["sender"].as_str().unwrap().to_owned(),
                    v["text"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    }
}

#[test]
fn three_users_chat_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let user = |name: &str| User {
        state: dir.path().join(format!("{name}.bin")),
        server: &server,
    };
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));
    for u in [&alice, &bob, &carol] {
        let init = u.run(&["init"]);
        assert_eq!(init[0]["type"], "initialized");
        let reg = u.run(&["register", "--count", "3"]);
        assert_eq!(reg[0]["type"], "registered");
        // Three and a last resort in each suite's pool.
        assert_eq!(reg[0]["uploaded"], 8);
    }
    let (a, b, c) = (alice.key(), bob.key(), carol.key());
    assert_eq!(a.len(), 64);

    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", &b]);
    alice.run(&["group", "add", "team", &c]);
    // Bob and Carol join from their Welcomes under the same group name.
    let joined = bob.run(&["recv"]);
    assert!(
        joined
            .iter()
            .any(|v| v["type"] == "joined" && v["group"] == "team")
    );
    let joined = carol.run(&["recv"]);
    assert!(
        joined
            .iter()
            .any(|v| v["type"] == "joined" && v["group"] == "team")
    );
    assert!(bob.recv().is_empty());

    // Everyone sends; each command is a separate process, so every user
    // restarts between messages.
    alice.run(&["send", "team", "a1"]);
    bob.run(&["send", "team", "b1"]);
    alice.run(&["send", "team", "a2"]);
    carol.run(&["send", "team", "c1"]);
    bob.run(&["send", "team", "b2"]);
    let m = |who: &str, t: &str| (who.to_owned(), t.to_owned());
    assert_eq!(alice.recv(), vec![m(&b, "b1"), m(&c, "c1"), m(&b, "b2")]);
    assert_eq!(bob.recv(), vec![m(&a, "a1"), m(&a, "a2"), m(&c, "c1")]);
    assert_eq!(
        carol.recv(),
        vec![m(&a, "a1"), m(&b, "b1"), m(&a, "a2"), m(&b, "b2")]
    );
    // Exactly once: nothing more.
    for u in [&alice, &bob, &carol] {
        assert!(u.recv().is_empty());
    }
    let list = carol.run(&["group", "list"]);
    assert_eq!(list[0]["group"], "team");
    assert_eq!(list[0]["members"].as_array().unwrap().len(), 3);

    // recv --stream delivers while another user sends.
    let mut streaming = carol
        .cmd()
        .args(["recv", "--stream"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = streaming.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Give the stream a moment to start waiting, then send twice.
    std::thread::sleep(Duration::from_millis(500));
    alice.run(&["send", "team", "live-1"]);
    bob.run(&["send", "team", "live-2"]);
    let mut live = Vec::new();
    while live.len() < 2 {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("recv --stream shows the messages");
        let v = typed_object(&line);
        if v["type"] == "message" {
            live.push(v["text"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(live, vec!["live-1", "live-2"]);
    // Carol sends from another terminal while her stream runs: the state
    // file is shared safely, and her stream keeps decrypting afterwards.
    carol.run(&["send", "team", "from-carol"]);
    alice.run(&["send", "team", "live-3"]);
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the stream carries on after a send from the same state");
        let v = typed_object(&line);
        if v["type"] == "message" {
            assert_eq!(v["text"], "live-3");
            break;
        }
        assert_ne!(v["type"], "warning", "{v}");
    }
    let _ = streaming.kill();
    let _ = streaming.wait();
    let texts: Vec<String> = alice.recv().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, vec!["live-2", "from-carol"]);
    let rest = carol.recv();
    assert!(rest.is_empty(), "{rest:?}");
}

#[test]
fn wrong_or_empty_password_and_missing_trust_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let alice = User {
        state: dir.path().join("alice.bin"),
        server: &server,
    };
    // An empty password creates nothing.
    let error = alice.fail(&["init"], &[("QPQ_PASSWORD", "")]);
    assert!(error.contains("QPQ_PASSWORD is set but empty"), "{error}");
    assert!(!alice.state.exists());
    alice.run(&["init"]);
    let error = alice.fail(&["whoami"], &[("QPQ_PASSWORD", "wrong")]);
    assert!(error.contains("password"), "{error}");
    // Nor does it open anything.
    let error = alice.fail(&["send", "team", "hi"], &[("QPQ_PASSWORD", "")]);
    assert!(error.contains("QPQ_PASSWORD is set but empty"), "{error}");
    // The state file is untouched by the failed attempt.
    assert_eq!(alice.key().len(), 64);
    let out = alice
        .cmd()
        .env_remove("QPQ_SERVER_FINGERPRINT")
        .args(["register"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--server-fingerprint"));
    // A second init refuses to overwrite the identity.
    let error = alice.fail(&["init"], &[]);
    assert!(error.contains("exists already"), "{error}");
    // A command line clap refuses is an error object too.
    let error = alice.fail(&["send", "team"], &[]);
    assert!(error.contains("required"), "{error}");
}

#[test]
fn three_users_chat_in_a_pq_group_of_the_pq_suite_with_files_and_edits() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let user = |name: &str| User {
        state: dir.path().join(format!("{name}.bin")),
        server: &server,
    };
    let users = [user("alice"), user("bob"), user("carol")];
    let [alice, bob, carol] = &users;
    for u in &users {
        u.run(&["init"]);
        u.run(&["register", "--count", "2"]);
    }
    let (a, b, c) = (alice.key(), bob.key(), carol.key());
    assert!(alice.text(&["group", "create", "--help"]).contains("--pq"));
    alice.run(&["group", "create", "quantum", "--pq"]);
    alice.run(&["group", "add", "quantum", &b]);
    alice.run(&["group", "add", "quantum", &c]);
    for u in [bob, carol] {
        let joined = u.run(&["recv"]);
        assert!(
            joined
                .iter()
                .any(|v| v["type"] == "joined" && v["group"] == "quantum"),
            "{joined:?}"
        );
        assert!(!joined.iter().any(|v| v["type"] == "warning"), "{joined:?}");
    }
    let list = carol.run(&["group", "list"]);
    assert_eq!(list[0]["group"], "quantum");
    assert_eq!(list[0]["pq"], true);
    assert!(carol.text(&["group", "list"]).contains("quantum  [pq]"));

    alice.run(&["send", "quantum", "a1"]);
    bob.run(&["send", "quantum", "b1"]);
    carol.run(&["send", "quantum", "c1"]);

    // Before anyone receives: what the server stores for each user is a
    // plain group payload (0x01 0x02; MLS of the PQ suite protects it), one
    // copy of each message for all its recipients.
    let machines: Vec<ClientMachine> = users.iter().map(User::machine).collect();
    let trust = ServerTrust::fingerprint_hex(&server.fingerprint).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut stored_for = Vec::new();
    for (i, m) in machines.iter().enumerate() {
        let channel = m.groups()[0].channel_id;
        let stored = runtime.block_on(async {
            let mut client = Client::connect(&server.addr, &trust).await.unwrap();
            client.authenticate(m.signing_key()).await.unwrap();
            // Cursor 0 acknowledges nothing: the messages stay queued.
            client
                .fetch(m.identity_key(), channel, 0, 100)
                .await
                .unwrap()
                .messages
        });
        assert_eq!(stored.len(), 2, "user {i}");
        for s in &stored {
            assert_eq!(&s.payload[..2], &[0x01, 0x02], "user {i}");
        }
        stored_for.push(stored);
    }
    // Alice's a1, as Bob and Carol have it: the same bytes.
    assert_eq!(stored_for[1][0].payload, stored_for[2][0].payload);
    let bobs_payload = stored_for[1][0].payload.clone();

    let m = |who: &str, t: &str| (who.to_owned(), t.to_owned());
    assert_eq!(alice.recv_in("quantum"), vec![m(&b, "b1"), m(&c, "c1")]);
    assert_eq!(bob.recv_in("quantum"), vec![m(&a, "a1"), m(&c, "c1")]);
    assert_eq!(carol.recv_in("quantum"), vec![m(&a, "a1"), m(&b, "b1")]);
    // A rotation of everyone's keys, and the group carries on.
    bob.run(&["update"]);
    alice.recv_in("quantum");
    carol.recv_in("quantum");
    alice.run(&["send", "quantum", "after rotation"]);
    assert_eq!(bob.recv_in("quantum"), vec![m(&a, "after rotation")]);
    assert_eq!(carol.recv_in("quantum"), vec![m(&a, "after rotation")]);

    // A tampered message reaches Bob through the real server (one byte of
    // a genuine one flipped, enqueued by Alice's identity): it is refused
    // with a warning, and the message behind it still arrives.
    let mut tampered = bobs_payload;
    let last = tampered.len() - 20;
    tampered[last] ^= 0x40;
    let channel = machines[1].groups()[0].channel_id;
    runtime.block_on(async {
        let mut client = Client::connect(&server.addr, &trust).await.unwrap();
        client
            .authenticate(machines[0].signing_key())
            .await
            .unwrap();
        client
            .enqueue(
                machines[1].identity_key(),
                channel,
                tampered,
                quicproquo_client::random_message_id(),
            )
            .await
            .unwrap();
    });
    alice.run(&["send", "quantum", "after tampering"]);
    let events = bob.run(&["recv"]);
    assert!(events.iter().any(|v| v["type"] == "warning"), "{events:?}");
    let texts: Vec<&str> = events
        .iter()
        .filter(|v| v["type"] == "message")
        .filter_map(|v| v["text"].as_str())
        .collect();
    assert_eq!(texts, vec!["after tampering"], "{events:?}");

    // A 1 MB file, saved by the receiver; a reply to it; an edit.
    let file = dir.path().join("photo.jpg");
    let bytes: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    std::fs::write(&file, &bytes).unwrap();
    let sent = alice.run(&[
        "send",
        "quantum",
        "--file",
        file.to_str().unwrap(),
        "--type",
        "image/jpeg",
    ]);
    let id = sent[0]["id"].as_str().expect("the message's id").to_owned();
    assert_eq!(id.len(), 32);
    let saved = dir.path().join("bob-files");
    std::fs::create_dir(&saved).unwrap();
    let got = bob.run(&["recv", "--save-dir", saved.to_str().unwrap()]);
    let message = got
        .iter()
        .find(|v| v["type"] == "message")
        .expect("the file arrives");
    assert_eq!(message["id"], id.as_str());
    assert_eq!(message["attachment"]["media_type"], "image/jpeg");
    assert_eq!(message["attachment"]["size"], 1_000_000);
    let copy = saved.join(format!("{}-photo.jpg", &id[..8]));
    assert!(std::fs::read(&copy).unwrap() == bytes, "saved whole");
    bob.run(&["send", "quantum", "nice", "--reply-to", &id]);
    alice.run(&["edit", "quantum", &id, "(a photo)"]);
    let got = carol.run(&["recv"]);
    let reply = got
        .iter()
        .find(|v| v["type"] == "message" && v["text"] == "nice")
        .expect("the reply arrives");
    assert_eq!(reply["reply_to"], id.as_str());
    let edit = got
        .iter()
        .find(|v| v["type"] == "edited")
        .expect("the edit arrives");
    assert_eq!(
        (edit["target"].as_str(), edit["text"].as_str()),
        (Some(id.as_str()), Some("(a photo)"))
    );
    assert_eq!(edit["sender"], a.as_str());
}

#[test]
fn five_users_race_commits_leave_and_remove_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let user = |name: &str| User {
        state: dir.path().join(format!("{name}.bin")),
        server: &server,
    };
    let users: Vec<User> = ["alice", "bob", "carol", "dave", "erin"]
        .iter()
        .map(|n| user(n))
        .collect();
    for u in &users {
        u.run(&["init"]);
        u.run(&["register", "--count", "2"]);
    }
    let keys: Vec<String> = users.iter().map(User::key).collect();
    let [alice, bob, carol, dave, erin] = &users[..] else {
        unreachable!()
    };
    alice.run(&["group", "create", "team"]);
    for k in &keys[1..] {
        alice.run(&["group", "add", "team", k]);
    }
    for u in &users[1..] {
        u.run(&["recv"]);
    }
    let epoch = |u: &User| u.machine().groups()[0].epoch;
    let start = epoch(alice);
    assert!(users.iter().all(|u| epoch(u) == start));

    // Bob rotates his keys while Carol removes Dave, both from epoch
    // `start`, as two processes at the same moment: the server takes one
    // Commit for the epoch; the other member catches up and makes its
    // change again on top. Nobody is told of a failure. (The race happens
    // whatever the timing: neither fetches before making its Commit, so
    // both Commits are for epoch `start`.)
    let spawn =
        |u: &User, args: &[&str]| u.cmd().args(args).stdout(Stdio::piped()).spawn().unwrap();
    let racing = [
        spawn(bob, &["update", "team"]),
        spawn(carol, &["group", "remove", "team", &keys[3]]),
    ];
    for child in racing {
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{stdout}");
        assert!(!stdout.contains("warning"), "{stdout}");
        assert!(stdout.contains("\"undelivered\":0"), "{stdout}");
    }
    for u in [alice, bob, carol, erin] {
        let out = u.run(&["recv"]);
        assert!(!out.iter().any(|v| v["type"] == "warning"), "{out:?}");
    }
    // Both changes are in, once each, and the four agree on the group.
    for u in [alice, bob, carol, erin] {
        assert_eq!(epoch(u), start + 2);
        assert_eq!(u.machine().groups()[0].members.len(), 4);
    }
    let auth = |u: &User| u.machine().epoch_authenticator("team");
    assert!([bob, carol, erin].iter().all(|u| auth(u) == auth(alice)));

    // Dave tries to read: he learns he was removed and gets nothing of the
    // new epochs, now or later.
    let out = dave.run(&["recv"]);
    assert!(out.iter().any(|v| v["type"] == "removed"), "{out:?}");
    assert!(!out.iter().any(|v| v["type"] == "message"), "{out:?}");
    assert!(
        dave.run(&["group", "list"])
            .iter()
            .all(|v| v.get("group").is_none())
    );

    // Erin leaves; Alice (the lowest leaf left) commits it when she sees
    // the proposal, and Bob and Carol follow.
    let left = erin.run(&["group", "leave", "team"]);
    assert_eq!(
        (&left[0]["type"], &left[0]["group"]),
        (&"left".into(), &"team".into())
    );
    let out = alice.run(&["recv"]);
    assert!(
        out.iter()
            .any(|v| v["type"] == "group_changed" && v["members"] == 3),
        "{out:?}"
    );
    for u in [bob, carol] {
        let out = u.run(&["recv"]);
        assert!(
            out.iter()
                .any(|v| v["type"] == "group_changed" && v["members"] == 3),
            "{out:?}"
        );
    }
    assert!([bob, carol].iter().all(|u| auth(u) == auth(alice)));

    // The three keep chatting; Dave and Erin see nothing of it.
    alice.run(&["send", "team", "still here"]);
    bob.run(&["send", "team", "me too"]);
    carol.run(&["send", "team", "and me"]);
    let m = |who: usize, t: &str| (keys[who].clone(), t.to_owned());
    assert_eq!(alice.recv(), vec![m(1, "me too"), m(2, "and me")]);
    assert_eq!(bob.recv(), vec![m(0, "still here"), m(2, "and me")]);
    assert_eq!(carol.recv(), vec![m(0, "still here"), m(1, "me too")]);
    for u in [dave, erin] {
        let out = u.run(&["recv"]);
        assert!(!out.iter().any(|v| v["type"] == "message"), "{out:?}");
    }
}

/// Users with these names, each with a fresh identity and KeyPackages on
/// `server`, their state files in `dir`.
fn registered<'a>(dir: &Path, server: &'a Server, names: &[&str]) -> Vec<User<'a>> {
    names
        .iter()
        .map(|name| {
            let u = User {
                state: dir.join(format!("{name}.bin")),
                server,
            };
            u.run(&["init"]);
            u.run(&["register", "--count", "2"]);
            u
        })
        .collect()
}

/// Alice and Bob, registered, in Alice's group `team`.
fn in_team<'a>(dir: &Path, server: &'a Server) -> Vec<User<'a>> {
    let users = registered(dir, server, &["alice", "bob"]);
    users[0].run(&["group", "create", "team"]);
    users[0].run(&["group", "add", "team", &users[1].key()]);
    users
}

#[test]
fn peer_control_characters_are_shown_escaped_on_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &registered(dir.path(), &server, &["alice", "bob"])[..] else {
        unreachable!()
    };
    // Alice names the group and writes the message; both reach Bob's
    // terminal. (The core refuses control characters in group names, but
    // not the bidi override, which would reverse the rest of the line.)
    let group = "te\u{202e}am";
    alice.run(&["group", "create", group]);
    alice.run(&["group", "add", group, &bob.key()]);
    alice.run(&["send", group, "hi\n[team] alice: fake \u{1b}[31mred\r"]);
    let shown = untimed(&bob.text(&["recv"]));
    let a = alice.key();
    assert_eq!(
        shown.lines().collect::<Vec<_>>(),
        vec![
            r"* you joined te\u{202e}am (2 members)".to_owned(),
            format!(
                r"[te\u{{202e}}am] {}…: hi\n[team] alice: fake \x1b[31mred\r",
                &a[..16]
            ),
        ],
        "{shown:?}"
    );
    let listed = bob.text(&["group", "list"]);
    assert!(
        listed.starts_with(r"te\u{202e}am  (2 members"),
        "{listed:?}"
    );
    assert!(!listed.contains('\u{1b}') && !listed.contains('\u{202e}'));
}

/// Human output without the send time of each message (`[group] HH:MM
/// sender: text` becomes `[group] sender: text`).
fn untimed(text: &str) -> String {
    text.lines()
        .map(|line| {
            let Some((group, rest)) = line.split_once("] ") else {
                return format!("{line}\n");
            };
            let b = rest.as_bytes();
            let timed = b.len() > 6
                && b[..5].iter().enumerate().all(|(i, c)| match i {
                    2 => *c == b':',
                    _ => c.is_ascii_digit(),
                })
                && b[5] == b' ';
            match timed {
                true => format!("{group}] {}\n", &rest[6..]),
                false => format!("{line}\n"),
            }
        })
        .collect()
}

/// Runs `cmd` with its stdout a pipe nobody reads; returns the exit code
/// and stderr once it ends, killing it after `deadline`.
fn into_closed_pipe(cmd: &mut Command, deadline: Duration) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut child = cmd.stdout(writer).stderr(Stdio::piped()).spawn().unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > deadline {
            let _ = child.kill();
            panic!("still running after {deadline:?} with its output closed");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &in_team(dir.path(), &server)[..] else {
        unreachable!()
    };
    for text in ["one", "two", "three"] {
        alice.run(&["send", "team", text]);
    }
    let quiet = |code: Option<i32>, stderr: &str| {
        assert!(matches!(code, Some(0 | 141)), "exit {code:?}: {stderr}");
        assert_eq!(stderr, "");
    };
    let limit = Duration::from_secs(60);
    // A local command, a command talking to the server, in both formats.
    let (code, stderr) = into_closed_pipe(bob.plain().args(["whoami", "--qr"]), limit);
    quiet(code, &stderr);
    let (code, stderr) = into_closed_pipe(bob.plain().arg("recv"), limit);
    quiet(code, &stderr);
    alice.run(&["send", "team", "four"]);
    let (code, stderr) = into_closed_pipe(bob.cmd().arg("recv"), limit);
    quiet(code, &stderr);
    // A stream stops at the first message it cannot show.
    alice.run(&["send", "team", "five"]);
    let (code, stderr) = into_closed_pipe(bob.plain().args(["recv", "--stream"]), limit);
    quiet(code, &stderr);
}

#[test]
fn send_dash_reads_the_message_from_stdin_less_one_final_newline() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &in_team(dir.path(), &server)[..] else {
        unreachable!()
    };
    for input in ["two lines\nof text\n", "ends in a blank line\n\n", "-"] {
        let mut child = alice
            .cmd()
            .args(["send", "team", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let a = alice.key();
    let m = |t: &str| (a.clone(), t.to_owned());
    assert_eq!(
        bob.recv(),
        vec![m("two lines\nof text"), m("ends in a blank line\n"), m("-")]
    );
}

#[test]
fn commands_leave_only_the_state_files_behind() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let states = dir.path().join("states");
    std::fs::create_dir(&states).unwrap();
    let [alice, bob] = &registered(&states, &server, &["alice", "bob"])[..] else {
        unreachable!()
    };
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", &bob.key()]);
    alice.run(&["send", "team", "hi"]);
    bob.run(&["recv"]);
    bob.run(&["group", "list"]);
    // A command that fails, and one whose output nobody reads.
    bob.fail(&["send", "nowhere", "hi"], &[]);
    alice.run(&["send", "team", "again"]);
    into_closed_pipe(bob.cmd().arg("recv"), Duration::from_secs(60));
    let mut left: Vec<String> = std::fs::read_dir(&states)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["alice.bin", "bob.bin"]);
}

#[test]
fn a_wrong_server_certificate_is_named_with_both_fingerprints() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let alice = &registered(dir.path(), &server, &["alice"])[0];
    let expected = "ab".repeat(32);
    let got: String = server.fingerprint.to_lowercase().replace(':', "");
    let error = alice.fail(&["register"], &[("QPQ_SERVER_FINGERPRINT", &expected)]);
    assert!(
        error.contains(&format!(
            "server certificate fingerprint mismatch: expected {expected}, got {got}"
        )),
        "{error}"
    );
    // The library gives the same, typed, to any front end.
    let trust = ServerTrust::fingerprint_hex(&expected).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refused = runtime.block_on(Client::connect(&server.addr, &trust));
    match refused {
        Err(ClientError::Trust(TrustError::FingerprintMismatch {
            expected: e,
            got: g,
        })) => {
            assert_eq!(e, [0xab; 32]);
            let ServerTrust::Fingerprint(real) = ServerTrust::fingerprint_hex(&got).unwrap() else {
                unreachable!()
            };
            assert_eq!(g, real);
        }
        other => panic!("{other:?}"),
    }
}

/// A loopback UDP port nothing listens on (bound, then released).
fn silent_port(ip: &str) -> u16 {
    let socket = std::net::UdpSocket::bind((ip, 0)).unwrap();
    socket.local_addr().unwrap().port()
}

#[test]
fn a_server_that_is_down_fails_within_seconds_naming_the_addresses() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let alice = &registered(dir.path(), &server, &["alice"])[0];
    let dead = format!("127.0.0.1:{}", silent_port("127.0.0.1"));
    let start = std::time::Instant::now();
    let error = alice.fail(&["register"], &[("QPQ_SERVER", &dead)]);
    // CONNECT_TIMEOUT, not QUIC's 30 s idle timeout.
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
    assert!(
        error.contains(&format!("connecting to {dead}"))
            && error.contains(&format!("no answer within 5 s from {dead}")),
        "{error}"
    );
}

#[test]
fn every_address_of_the_server_is_tried() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let alice = &registered(dir.path(), &server, &["alice"])[0];
    // `localhost` may resolve to `::1` first (where nothing listens) as
    // well as to 127.0.0.1 (where the server does).
    let port = server.addr.rsplit_once(':').unwrap().1;
    let local = format!("localhost:{port}");
    let out = alice
        .cmd()
        .env("QPQ_SERVER", &local)
        .arg("register")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Whatever this machine's resolver says: addresses that do not answer
    // come first, and the one that does still connects.
    let live: std::net::SocketAddr = server.addr.parse().unwrap();
    let addrs = [
        format!("127.0.0.1:{}", silent_port("127.0.0.1"))
            .parse()
            .unwrap(),
        format!("[::1]:{}", live.port()).parse().unwrap(),
        live,
    ];
    let trust = ServerTrust::fingerprint_hex(&server.fingerprint).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = runtime
        .block_on(Client::connect_any(&addrs, "localhost", &trust))
        .unwrap();
    assert_eq!(client.connection().remote_address(), live);
    // With none that answers, every address is named.
    let error = runtime
        .block_on(Client::connect_any(&addrs[..2], "localhost", &trust))
        .unwrap_err()
        .to_string();
    for addr in &addrs[..2] {
        assert!(error.contains(&addr.to_string()), "{error}");
    }
}

#[test]
fn a_message_sent_while_the_server_is_unreachable_goes_out_with_the_next_command() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &in_team(dir.path(), &server)[..] else {
        unreachable!()
    };
    bob.run(&["recv"]);
    // The server cannot be reached: the send succeeds, keeps the message
    // and says why it is still waiting.
    let dead = format!("127.0.0.1:{}", silent_port("127.0.0.1"));
    let out = alice
        .cmd()
        .args(["send", "team", "written offline"])
        .env("QPQ_SERVER", &dead)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(typed_object)
        .collect();
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "sent" && v["delivered"] == 0 && v["undelivered"] == 1),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|v| v["type"] == "warning"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains(&format!("connecting to {dead}")))),
        "{lines:?}"
    );
    assert!(bob.recv().is_empty());
    // The next command, with the server back, sends it first.
    alice.run(&["send", "team", "back online"]);
    let texts: Vec<String> = bob.recv().into_iter().map(|(_, t)| t).collect();
    assert_eq!(texts, ["written offline", "back online"]);
}

#[test]
fn recv_stream_stops_with_a_clear_error_on_a_wrong_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let alice = &registered(dir.path(), &server, &["alice"])[0];
    let wrong = "cd".repeat(32);
    // Retrying cannot help, so it ends instead of retrying forever.
    let error = alice.fail(&["recv", "--stream"], &[("QPQ_SERVER_FINGERPRINT", &wrong)]);
    assert!(
        error.contains("server certificate fingerprint mismatch"),
        "{error}"
    );
}

#[test]
fn messages_carry_and_show_their_send_time() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &in_team(dir.path(), &server)[..] else {
        unreachable!()
    };
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    alice.run(&["send", "team", "on time"]);
    let out = bob.run(&["recv"]);
    let message = out
        .iter()
        .find(|v| v["type"] == "message" && v["text"] == "on time")
        .unwrap_or_else(|| panic!("{out:?}"));
    let sent = message["sent_at_ms"].as_u64().unwrap();
    // The sender's clock, read while it sent (both run on this machine).
    assert!(
        sent >= before && sent < before + 60_000,
        "{sent} vs {before}"
    );
    assert!(message["seq"].as_u64().unwrap() > 0);
    // Human output shows it as a time of day: `[team] HH:MM sender: text`.
    alice.run(&["send", "team", "shown"]);
    let line = bob
        .text(&["recv"])
        .lines()
        .find(|l| l.ends_with(": shown"))
        .map(str::to_owned);
    let shown = line.unwrap_or_default();
    let time = shown.strip_prefix("[team] ").unwrap_or_default();
    let (hh, rest) = time.split_at(2.min(time.len()));
    assert!(
        hh.chars().all(|c| c.is_ascii_digit()) && rest.starts_with(':'),
        "{shown:?}"
    );
}

/// Lines a child process writes to stdout, as they come.
fn lines_of(child: &mut std::process::Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// The first line from `rx` that `want` accepts, within a minute.
fn expect_line(rx: &mpsc::Receiver<String>, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no line for {what}"));
        let v = typed_object(&line);
        if want(&v) {
            return v;
        }
    }
}

/// A child process killed if the test fails half-way (a stuck daemon
/// would keep the test run's output open).
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `<state>.sock`, once the session on `state` has bound it (within 30 s).
fn wait_for_socket(state: &Path) -> PathBuf {
    let socket = PathBuf::from(format!("{}.sock", state.display()));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no socket");
        std::thread::sleep(Duration::from_millis(20));
    }
    socket
}

#[test]
fn the_daemon_serves_json_lines_on_stdin_and_on_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &registered(dir.path(), &server, &["alice", "bob"])[..] else {
        unreachable!()
    };
    let mut daemon = bob
        .plain()
        .arg("daemon")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = daemon.stdin.take().unwrap();
    let lines = lines_of(&mut daemon);
    writeln!(stdin, r#"{{"id": 1, "method": "whoami"}}"#).unwrap();
    let who = expect_line(&lines, "whoami", |v| v["id"] == 1);
    assert_eq!(who["type"], "result");
    assert_eq!(who["result"]["identity_key"], bob.key());
    // The socket is private to this user.
    let socket = wait_for_socket(&bob.state);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // Alice adds Bob: the daemon joins and says so.
    alice.run(&["group", "create", "team"]);
    alice.run(&["group", "add", "team", &bob.key()]);
    expect_line(&lines, "joined", |v| v["type"] == "joined");
    // A qpq command on Bob's state goes through the daemon's socket (the
    // daemon holds the state file).
    let sent = bob.run(&["send", "team", "via the socket"]);
    assert!(sent.iter().any(|v| v["type"] == "sent"), "{sent:?}");
    assert_eq!(alice.recv(), vec![(bob.key(), "via the socket".into())]);
    // A bad request is an error answer, not the end.
    writeln!(stdin, r#"{{"id": 2, "method": "fly"}}"#).unwrap();
    let e = expect_line(&lines, "an error", |v| v["id"] == 2);
    assert_eq!(e["type"], "error");
    // Alice writes; the daemon shows it as it arrives.
    alice.run(&["send", "team", "to the daemon"]);
    let m = expect_line(&lines, "a message", |v| v["type"] == "message");
    assert_eq!(m["text"], "to the daemon");
    writeln!(stdin, r#"{{"id": "bye", "method": "shutdown"}}"#).unwrap();
    expect_line(&lines, "shutdown", |v| v["id"] == "bye");
    let status = daemon.wait().unwrap();
    assert!(status.success(), "{status:?}");
    // Nothing left behind but the state file.
    assert!(!socket.exists());
    assert!(!PathBuf::from(format!("{}.lock", bob.state.display())).exists());
}

/// Requests written all at once, more than a subscriber's event buffer
/// of them: the daemon answers each while it keeps passing the events on
/// (it used to stop draining events while a command ran, and the session,
/// waiting for room in that channel, never finished the command).
#[test]
fn the_daemon_answers_requests_pipelined_past_its_event_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [bob] = &registered(dir.path(), &server, &["bob"])[..] else {
        unreachable!()
    };
    bob.run(&["group", "create", "notes"]);
    let mut daemon = Daemon(
        bob.plain()
            .args(["daemon", "--no-socket"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = daemon.0.stdin.take().unwrap();
    let lines = lines_of(&mut daemon.0);
    let n = 3 * quicproquo_client::EVENTS_BUFFERED;
    let requests: String = (0..n)
        .map(|i| format!(
            "{{\"id\": {i}, \"method\": \"send\", \"params\": {{\"group\": \"notes\", \"text\": \"m{i}\"}}}}\n"
        ))
        .collect();
    let writer = std::thread::spawn(move || {
        stdin.write_all(requests.as_bytes()).unwrap();
        stdin
    });
    let (mut answered, mut delivered) = (0, 0);
    while answered < n || delivered < n {
        let v = expect_line(&lines, "answers and deliveries", |_| true);
        match v["type"].as_str() {
            Some("result") => {
                assert_eq!(v["id"], answered, "answers come in order");
                answered += 1;
            }
            Some("delivered") => delivered += 1,
            Some("error") => panic!("{v}"),
            _ => {}
        }
    }
    let mut stdin = writer.join().unwrap();
    writeln!(stdin, r#"{{"id": "bye", "method": "shutdown"}}"#).unwrap();
    expect_line(&lines, "shutdown", |v| v["id"] == "bye");
    assert!(daemon.0.wait().unwrap().success());
}

/// Every `qpq` command closes its connection on the way out, so the
/// server frees its slot at once: commands in a row from one address never
/// run into the per-address connection limit (set to 4 here), which
/// connections left open would hold for the server's idle timeout (30 s).
/// `QPQ_CLI_COMMANDS` runs more of them (500 for the long form).
#[test]
fn commands_in_a_row_from_one_address_all_get_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server =
        Server::start_configured(dir.path(), "127.0.0.1:0", "connections_per_ip_max = 4\n");
    let [alice] = &registered(dir.path(), &server, &["alice"])[..] else {
        unreachable!()
    };
    let n: usize = std::env::var("QPQ_CLI_COMMANDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    for i in 0..n {
        // `recv` connects, authenticates and fetches; a refused connection
        // would be a warning (the command itself still ends well).
        let out = alice.run(&["recv"]);
        assert!(
            !out.iter().any(|v| v["type"] == "warning"),
            "command {i}: {out:?}"
        );
    }
}

#[test]
fn recv_stream_shows_messages_and_carries_out_other_commands() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &in_team(dir.path(), &server)[..] else {
        unreachable!()
    };
    let mut stream = bob
        .cmd()
        .args(["recv", "--stream"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(&mut stream);
    expect_line(&lines, "joined", |v| v["type"] == "joined");
    alice.run(&["send", "team", "streamed"]);
    let m = expect_line(&lines, "a message", |v| v["type"] == "message");
    assert_eq!(m["text"], "streamed");
    // Bob answers from another terminal while his stream runs.
    bob.run(&["send", "team", "answered"]);
    assert_eq!(alice.recv(), vec![(bob.key(), "answered".into())]);
    let _ = stream.kill();
    let _ = stream.wait();
}

#[test]
fn contacts_name_peers_and_members_compare_safety_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob, carol] = &registered(dir.path(), &server, &["alice", "bob", "carol"])[..]
    else {
        unreachable!()
    };
    let (a, b, c) = (alice.key(), bob.key(), carol.key());

    // Bob names Alice and Carol; a second name for a key renames it.
    let added = bob.run(&["contact", "add", "alice", &a]);
    assert_eq!(added.len(), 1, "{added:?}");
    assert_eq!(added[0]["type"], "contact_added");
    assert_eq!(added[0]["name"], "alice");
    assert_eq!(added[0]["key"], a.as_str());
    bob.run(&["contact", "add", "caz", &c]);
    let renamed = bob.run(&["contact", "add", "carol", &c]);
    assert_eq!(renamed[0]["renamed_from"], "caz");
    let error = bob.fail(&["contact", "add", "car\nol", &c], &[]);
    assert!(error.contains("invalid contact name"), "{error}");
    let listed: Vec<(String, String)> = bob
        .run(&["contact", "list"])
        .into_iter()
        .map(|v| {
            assert_eq!(v["type"], "contact");
            (
                v["name"].as_str().unwrap().into(),
                v["key"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [("alice".into(), a.clone()), ("carol".into(), c.clone())]
    );
    assert_eq!(
        bob.text(&["contact", "list"]),
        format!("alice  {a}\ncarol  {c}\n")
    );

    // Alice adds Bob and Carol: her outcome says so once, not also as an
    // event when the server takes her Commit.
    alice.run(&["group", "create", "team"]);
    let out = alice.run(&["group", "add", "team", &b]);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0]["type"], "member_added");
    assert_eq!(out[0]["undelivered"], 0);
    alice.run(&["group", "add", "team", &c]);
    // Bob joins, then sees Alice add Carol, both named by his contacts.
    let seen = bob.run(&["recv"]);
    let added: Vec<&Value> = seen
        .iter()
        .filter(|v| v["type"] == "member_added")
        .collect();
    assert_eq!(added.len(), 1, "{seen:?}");
    assert_eq!(added[0]["group"], "team");
    assert_eq!(added[0]["member"], c.as_str());
    assert_eq!(added[0]["member_name"], "carol");
    assert_eq!(added[0]["by"], a.as_str());
    assert_eq!(added[0]["by_name"], "alice");
    carol.run(&["recv"]);

    // Messages: by contact name for Bob, by short key for Carol.
    alice.run(&["send", "team", "hi"]);
    let message = bob
        .run(&["recv"])
        .into_iter()
        .find(|v| v["type"] == "message")
        .unwrap();
    assert_eq!(message["sender"], a.as_str());
    assert_eq!(message["name"], "alice");
    alice.run(&["send", "team", "again"]);
    assert_eq!(untimed(&bob.text(&["recv"])), "[team] alice: again\n");
    let shown = untimed(&carol.text(&["recv"]));
    assert_eq!(
        shown,
        format!("[team] {}…: hi\n[team] {}…: again\n", &a[..16], &a[..16])
    );
    let members = bob.text(&["group", "members", "team"]);
    assert!(members.contains("\n    alice\n"), "{members}");
    assert!(
        members.contains(&format!("\n    {}…  (you)\n", &b[..16])),
        "{members}"
    );
    assert!(members.contains("\n    carol\n"), "{members}");

    // All three see the same safety number at the same epoch.
    let verify = |u: &User| {
        let v = u.run(&["group", "verify", "team"]);
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0]["type"], "safety_number");
        assert_eq!(v[0]["group"], "team");
        let digits = v[0]["digits"].as_str().unwrap().to_owned();
        assert_eq!(digits.len(), 60);
        (v[0]["epoch"].as_u64().unwrap(), digits)
    };
    let before = verify(alice);
    assert_eq!(before.0, 2);
    assert_eq!(verify(bob), before);
    assert_eq!(verify(carol), before);
    let human = bob.text(&["group", "verify", "team"]);
    assert!(
        human.starts_with("Safety number of team at epoch 2:\n"),
        "{human}"
    );
    assert!(
        human.contains(&format!("    {} ", &before.1[..5])),
        "{human}"
    );

    // Carol leaves: Alice commits it, and everyone is told she left.
    carol.run(&["group", "leave", "team"]);
    let seen = alice.run(&["recv"]);
    let left: Vec<&Value> = seen.iter().filter(|v| v["type"] == "member_left").collect();
    assert_eq!(left.len(), 1, "{seen:?}");
    assert_eq!(left[0]["member"], c.as_str());
    assert!(left[0].get("member_name").is_none(), "{seen:?}");
    let shown = bob.text(&["recv"]);
    assert!(shown.contains("* carol left team\n"), "{shown}");
    // A new epoch, a new number, equal again for those still in.
    let after = verify(alice);
    assert_eq!(after.0, 3);
    assert_ne!(after.1, before.1);
    assert_eq!(verify(bob), after);

    // Forgotten contacts are shown by key again.
    let removed = bob.run(&["contact", "remove", "alice"]);
    assert_eq!(removed[0]["type"], "contact_removed");
    assert_eq!(removed[0]["key"], a.as_str());
    alice.run(&["send", "team", "bye"]);
    assert_eq!(
        untimed(&bob.text(&["recv"])),
        format!("[team] {}…: bye\n", &a[..16])
    );
    let error = bob.fail(&["contact", "remove", "alice"], &[]);
    assert!(error.contains("no contact named `alice`"), "{error}");
}

/// `--version` of both binaries names the crate version and the commit
/// they were built from (12 hex digits; `unknown` outside a git checkout).
#[test]
fn both_binaries_name_their_version_and_commit() {
    for (bin, name) in [
        (std::path::PathBuf::from(env!("CARGO_BIN_EXE_qpq")), "qpq"),
        (common::server_binary(), "qpq-server"),
    ] {
        let out = std::process::Command::new(&bin)
            .arg("--version")
            .output()
            .expect("run --version");
        assert!(out.status.success(), "{name} --version");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let rest = text
            .strip_prefix(&format!("{name} {} (commit ", env!("CARGO_PKG_VERSION")))
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("{name} --version printed {text:?}"));
        assert!(
            rest == "unknown" || (rest.len() == 12 && rest.bytes().all(|b| b.is_ascii_hexdigit())),
            "{name} --version printed {text:?}"
        );
    }
}

/// Bob moves to another machine: his export, imported into a fresh
/// directory, is the same identity in the same group, and carries on the
/// conversation there. While a daemon has the state open, export, import
/// and passwd refuse rather than copy or replace what it is writing.
#[test]
fn an_exported_state_imported_elsewhere_carries_on_the_conversation() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let [alice, bob] = &in_team(dir.path(), &server)[..] else {
        unreachable!()
    };
    let (a, b) = (alice.key(), bob.key());
    bob.run(&["recv"]);
    alice.run(&["send", "team", "before the move"]);
    assert_eq!(bob.recv(), vec![(a.clone(), "before the move".into())]);

    let export = dir.path().join("bob.export");
    let out = bob.run(&["export", export.to_str().unwrap()]);
    assert_eq!(out[0]["type"], "exported", "{out:?}");
    assert_eq!(out[0]["identity_key"], b);
    // The copy is the state file as it is, private to its owner.
    assert!(holds(&export, &std::fs::read(&bob.state).unwrap()));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&export).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let moved = User {
        state: elsewhere.join("qpq-state.bin"),
        server: &server,
    };
    let out = moved.run(&["import", export.to_str().unwrap()]);
    assert_eq!(out[0]["type"], "imported", "{out:?}");
    assert_eq!(out[0]["kept"], Value::Null);
    assert_eq!(moved.key(), b);
    // The old machine is retired.
    std::fs::remove_file(&bob.state).unwrap();
    alice.run(&["send", "team", "after the move"]);
    assert_eq!(moved.recv(), vec![(a, "after the move".into())]);
    moved.run(&["send", "team", "from the new machine"]);
    assert_eq!(
        alice.recv(),
        vec![(b.clone(), "from the new machine".into())]
    );

    let mut daemon = Daemon(
        moved
            .plain()
            .arg("daemon")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdin = daemon.0.stdin.take().unwrap();
    let lines = lines_of(&mut daemon.0);
    wait_for_socket(&moved.state);
    let copy = dir.path().join("copy");
    let copy = copy.to_str().unwrap();
    for args in [
        &["export", copy][..],
        &["import", "--force", export.to_str().unwrap()],
        &["passwd"],
    ] {
        let error = moved.fail(args, &[("QPQ_NEW_PASSWORD", "another")]);
        assert!(error.contains("open in a qpq session"), "{args:?}: {error}");
    }
    writeln!(stdin, r#"{{"id": "bye", "method": "shutdown"}}"#).unwrap();
    expect_line(&lines, "shutdown", |v| v["id"] == "bye");
    assert!(daemon.0.wait().unwrap().success());
    assert!(!Path::new(copy).exists());
    assert_eq!(moved.key(), b, "the password is unchanged");
    assert!(!state_ops::backup_path(&moved.state).exists());
}

/// Every refusal of export and import leaves every file as it was: a
/// wrong password, a file or state already at the target, and damaged or
/// foreign files, each with its own message.
#[test]
fn export_and_import_refuse_what_would_lose_or_garble_a_state() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let user = |name: &str| User {
        state: dir.path().join(name),
        server: &server,
    };
    let (alice, carol) = (user("alice.bin"), user("carol.bin"));
    alice.run(&["init"]);
    carol.run(&["init"]);
    let at = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let alice_bytes = std::fs::read(&alice.state).unwrap();

    let export = at("alice.export");
    let error = alice.fail(&["export", &export], &[("QPQ_PASSWORD", "wrong")]);
    assert!(error.contains("wrong password"), "{error}");
    assert!(!Path::new(&export).exists());
    alice.run(&["export", &export]);
    let other = at("other");
    std::fs::write(&other, "keep me").unwrap();
    let error = alice.fail(&["export", &other], &[]);
    assert!(
        error.contains("exists already; --force replaces it"),
        "{error}"
    );
    assert_eq!(std::fs::read(&other).unwrap(), b"keep me");
    alice.run(&["export", "--force", &other]);
    assert!(holds(&other, &alice_bytes));

    let carol_bytes = std::fs::read(&carol.state).unwrap();
    let kept = state_ops::backup_path(&carol.state);
    let error = carol.fail(&["import", &export], &[]);
    assert!(
        error.contains("exists already and holds an identity"),
        "{error}"
    );
    let error = carol.fail(
        &["import", "--force", &export],
        &[("QPQ_PASSWORD", "wrong")],
    );
    assert!(error.contains("wrong password"), "{error}");
    assert!(holds(&carol.state, &carol_bytes));
    assert!(!kept.exists());
    let out = carol.run(&["import", "--force", &export]);
    assert_eq!(out[0]["kept"], kept.to_str().unwrap());
    assert!(holds(&carol.state, &alice_bytes));
    assert!(holds(&kept, &carol_bytes));
    assert_eq!(carol.key(), alice.key());
    // A second import would lose the state kept aside.
    let error = carol.fail(&["import", "--force", &export], &[]);
    assert!(error.contains("move it elsewhere first"), "{error}");
    assert!(holds(&kept, &carol_bytes));

    let fresh_dir = dir.path().join("fresh");
    std::fs::create_dir(&fresh_dir).unwrap();
    let fresh = user("fresh/qpq-state.bin");
    let mut flipped = alice_bytes.clone();
    *flipped.last_mut().unwrap() ^= 1;
    let mut newer_format = alice_bytes.clone();
    newer_format[8..10].copy_from_slice(&2u16.to_be_bytes());
    let newer_layout = state_file::seal(
        PASSWORD.as_bytes(),
        &[u8::try_from(STATE_VERSION + 1).unwrap(), 0],
        KdfParams::FLOOR,
        &mut rand_core::OsRng,
    )
    .unwrap();
    let mut appended = alice_bytes.clone();
    appended.push(0);
    let cases: [(&str, &[u8], &str); 6] = [
        (
            "truncated",
            &alice_bytes[..alice_bytes.len() - 10],
            "the state file is truncated",
        ),
        (
            "flipped",
            &flipped,
            "wrong password or the file was modified",
        ),
        (
            "foreign",
            b"#!/bin/sh\necho hello\n",
            "not a qpq state file",
        ),
        ("newer-format", &newer_format, "format version 2"),
        ("newer-layout", &newer_layout, "layout version 6"),
        ("appended", &appended, "1 unexpected bytes after its end"),
    ];
    for (name, bytes, want) in cases {
        let path = at(name);
        std::fs::write(&path, bytes).unwrap();
        let error = fresh.fail(&["import", &path], &[]);
        assert!(error.contains(want), "{name}: {error}");
        if name.starts_with("newer") {
            assert!(error.contains("upgrade qpq"), "{name}: {error}");
        }
    }
    // Nothing installed, and no temporary or lock file left.
    assert_eq!(std::fs::read_dir(&fresh_dir).unwrap().count(), 0);
}

/// `passwd` seals the same state under the new password with fresh salt
/// and the recommended parameters; the old password opens it no more.
#[test]
fn passwd_changes_the_password_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(dir.path());
    let alice = User {
        state: dir.path().join("alice.bin"),
        server: &server,
    };
    alice.run(&["init"]);
    let key = alice.key();
    // Sealed at the floor, so the test sees passwd raise the parameters.
    let plaintext = state_file::load(&alice.state, PASSWORD.as_bytes()).unwrap();
    state_file::save_with_params(
        &alice.state,
        PASSWORD.as_bytes(),
        &plaintext,
        KdfParams::FLOOR,
    )
    .unwrap();
    let before = std::fs::read(&alice.state).unwrap();
    let new = "a new password";

    let error = alice.fail(&["passwd"], &[("QPQ_NEW_PASSWORD", "")]);
    assert!(
        error.contains("QPQ_NEW_PASSWORD is set but empty"),
        "{error}"
    );
    let error = alice.fail(
        &["passwd"],
        &[("QPQ_PASSWORD", "wrong"), ("QPQ_NEW_PASSWORD", new)],
    );
    assert!(error.contains("wrong password"), "{error}");
    assert!(holds(&alice.state, &before));

    let out = alice
        .cmd()
        .env("QPQ_NEW_PASSWORD", new)
        .arg("passwd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = typed_object(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(v["type"], "password_changed");

    let after = std::fs::read(&alice.state).unwrap();
    let m_cost_kib = u32::from_be_bytes(after[11..15].try_into().unwrap());
    assert_eq!(m_cost_kib, KdfParams::RECOMMENDED.m_cost_kib());
    assert_ne!(after[24..40], before[24..40], "a fresh salt");
    let error = alice.fail(&["whoami"], &[]);
    assert!(error.contains("wrong password"), "{error}");
    let out = alice
        .cmd()
        .env("QPQ_PASSWORD", new)
        .arg("whoami")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = typed_object(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(v["identity_key"], key);
    assert!(state_file::load(&alice.state, new.as_bytes()).unwrap() == plaintext);
}

/// Completion scripts for every shell clap_complete knows and manual
/// pages for every command, generated from the command line itself.
#[test]
fn completions_and_manual_pages_cover_every_command() {
    let qpq = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_qpq"))
            .args(args)
            .output()
            .expect("run qpq");
        assert!(out.status.success(), "qpq {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let commands = subcommands(&qpq(&["--help"]));
    for c in ["send", "export", "import", "passwd", "completions", "man"] {
        assert!(
            commands.iter().any(|n| n == c),
            "{c} missing in {commands:?}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = qpq(&["completions", shell]);
        for c in &commands {
            assert!(script.contains(c.as_str()), "{shell}: no {c}");
        }
        if shell == "bash" {
            let path = dir.path().join("qpq.bash");
            std::fs::write(&path, &script).unwrap();
            let status = Command::new("bash").arg("-n").arg(&path).status().unwrap();
            assert!(status.success(), "bash -n refuses the script");
        }
    }

    let page = qpq(&["man"]);
    assert!(title(&page).starts_with(".TH qpq 1 "), "{page}");
    for c in &commands {
        assert!(
            page.contains(&format!("qpq\\-{c}(1)")),
            "qpq(1) names no {c}"
        );
    }

    let out_dir = dir.path().join("man").join("man1");
    let out = qpq(&["--json", "man", "--out-dir", out_dir.to_str().unwrap()]);
    let listed = typed_object(out.trim());
    assert_eq!(listed["type"], "man_pages");
    let mut want = vec!["qpq.1".to_owned()];
    for c in &commands {
        want.push(format!("qpq-{c}.1"));
        for sub in subcommands(&qpq(&[c, "--help"])) {
            want.push(format!("qpq-{c}-{sub}.1"));
        }
    }
    assert!(want.iter().any(|w| w == "qpq-group-add.1"), "{want:?}");
    want.sort();
    let mut written: Vec<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    written.sort();
    assert_eq!(written, want);
    assert_eq!(listed["files"].as_array().unwrap().len(), want.len());
    for name in &written {
        let text = std::fs::read_to_string(out_dir.join(name)).unwrap();
        let stem = name.trim_end_matches(".1");
        assert!(
            title(&text).starts_with(&format!(".TH {stem} 1 ")),
            "{name}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(out_dir.join("qpq.1")).unwrap(),
        page
    );
}

/// Whether the file at `path` holds exactly `bytes` (a failed comparison
/// of whole state files would print both).
fn holds(path: impl AsRef<Path>, bytes: &[u8]) -> bool {
    std::fs::read(path).unwrap() == bytes
}

/// The names in the `Commands:` list of a `--help`, but `help`.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// A manual page's `.TH` line: its first line after roff's string
/// definitions (`.ie` / `.el`, how the page prints an apostrophe).
fn title(page: &str) -> &str {
    page.lines()
        .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "))
        .unwrap_or_default()
}
