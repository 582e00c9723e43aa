//! A real `qpq-server` process for the client's end-to-end tests.

#![allow(dead_code)]

pub mod lab;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running `qpq-server`; killed when dropped.
pub struct Server {
    child: Option<Child>,
    /// `127.0.0.1:port` it listens on.
    pub addr: String,
    /// Its certificate's SHA-256 fingerprint, 64 hex digits.
    pub fingerprint: String,
    dir: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `qpq-server` binary next to `qpq`, built if this test run has not
/// built it or if it is older than the sources it is built from (a stale
/// server would test yesterday's code). `cargo test --workspace` builds it
/// with everything else, so then it is fresh and nothing is built here; a
/// package-scoped build (`-p`) resolves other features and can rebuild
/// much of the graph, so it runs only when needed.
pub fn server_binary() -> PathBuf {
    let qpq = PathBuf::from(env!("CARGO_BIN_EXE_qpq"));
    let server = qpq.with_file_name(format!("qpq-server{}", std::env::consts::EXE_SUFFIX));
    if !server.exists() || older_than_sources(&server) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let profile_release = qpq.parent().is_some_and(|p| p.ends_with("release"));
        let mut build = Command::new(cargo);
        build.args(["build", "--bin", "qpq-server", "-p", "quicproquo-server"]);
        if profile_release {
            build.arg("--release");
        }
        let status = build.status().expect("cargo build runs");
        assert!(status.success(), "building qpq-server failed");
    }
    server
}

/// Whether any source of the server (its crate, the core, the protocol)
/// changed after `binary` was built.
fn older_than_sources(binary: &Path) -> bool {
    let Ok(built) = std::fs::metadata(binary).and_then(|m| m.modified()) else {
        return true;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dirs = ["io-shell/server/src", "io-shell/proto/src", "core-sm/src"];
    dirs.iter().any(|d| newer_file(&root.join(d), built))
}

fn newer_file(dir: &Path, than: std::time::SystemTime) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.flatten().any(|e| {
        let path = e.path();
        if path.is_dir() {
            newer_file(&path, than)
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > than)
        }
    })
}

impl Server {
    /// Starts a server with its data in `dir`, on a free port.
    pub fn start(dir: &Path) -> Server {
        Self::start_on(dir, "127.0.0.1:0")
    }

    /// Starts a server with its data in `dir`, listening on `listen`.
    pub fn start_on(dir: &Path, listen: &str) -> Server {
        Self::start_configured(dir, listen, "")
    }

    /// Starts a server with its data in `dir`, listening on `listen`, with
    /// `config` as its `qpq-server.toml`.
    pub fn start_configured(dir: &Path, listen: &str, config: &str) -> Server {
        Self::start_as(Command::new(server_binary()), dir, listen, config)
    }

    /// Starts `server` (the `qpq-server` binary, perhaps run by a wrapper
    /// such as `ip netns exec`) with its data in `dir`, listening on
    /// `listen`, with `config` as its `qpq-server.toml`.
    pub fn start_as(mut server: Command, dir: &Path, listen: &str, config: &str) -> Server {
        std::fs::write(dir.join("server.toml"), config).unwrap();
        let mut child = server
            .env("QPQ_CONFIG", dir.join("server.toml"))
            .env("QPQ_LISTEN", listen)
            .env("QPQ_DATA_DIR", dir.join("server-data"))
            .env("QPQ_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qpq-server");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut addr, mut fingerprint) = (None, None);
        while addr.is_none() || fingerprint.is_none() {
            let line = lines.next().expect("server output").unwrap();
            if let Some(rest) = line.strip_prefix("qpq-server listening on ") {
                addr = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(rest) = line.strip_prefix("certificate SHA-256 fingerprint: ") {
                fingerprint = Some(rest.trim().to_owned());
            }
        }
        // Whatever it prints later (the metrics address, ...) is read and
        // dropped: a closed pipe would stop it.
        std::thread::spawn(move || lines.for_each(drop));
        Server {
            child: Some(child),
            addr: addr.unwrap(),
            fingerprint: fingerprint.unwrap(),
            dir: dir.to_owned(),
        }
    }

    /// Kills the server (SIGKILL: what it acknowledged is on disk) and
    /// starts it again on the same address and data.
    pub fn restart(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let mut again = Server::start_on(&self.dir, &self.addr.clone());
        assert_eq!(again.fingerprint, self.fingerprint);
        self.child = again.child.take();
    }
}
