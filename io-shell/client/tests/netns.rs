//! Members on separate hosts: network namespaces joined by a bridge
//! (`common::lab`), `qpq-server` on host S, Alice on host A and Bob on
//! host B, each command run on its host through `ip netns exec`. Messages
//! go from host to host through the server; with S off the network they
//! wait in the sender's outbox and go out once it is back. (Direct links
//! between A and B will be shown here too once sessions send over them.)
//!
//! Needs root and iproute2. Without them the test prints why and passes;
//! `QPQ_NETNS_TESTS=require` (set by `.ci/run`) makes that a failure.

use std::path::PathBuf;
use std::process::Output;

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

#[test]
fn members_on_two_hosts_chat_through_a_server_on_a_third() {
    let lab = match Lab::new(&["a", "b", "s"]) {
        Ok(lab) => lab,
        Err(why) => {
            assert!(!lab::required(), "QPQ_NETNS_TESTS=require: {why}");
            eprintln!("SKIPPED: network namespaces cannot be made here ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let listen = format!("{}:7000", lab.addr("s"));
    let server = Server::start_as(
        lab.command("s", common::server_binary()),
        dir.path(),
        &listen,
        "",
    );
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
