//! The real-window test: two `qpq-gui` windows (Alice and Bob) under Xvfb
//! and a `qpq` CLI user (Carol) against a real `qpq-server`, driven only
//! through the accessibility tree (AT-SPI), by `real_window/drive.py`
//! inside `real_window/run.sh` (its private X display and D-Bus session).
//! Alice creates a group, adds Bob and Carol, all three exchange messages,
//! the two windows (both with `--mdns`) mark each other reached directly,
//! Alice removes Bob, and Bob never receives what she sends after. Each
//! step's screenshot lands in `target/tmp/real-window/` (`NN-step.png`,
//! with the apps' and server's logs).
//!
//! It needs Debian's xvfb, dbus, at-spi2-core, python3-pyatspi,
//! libgl1-mesa-dri, imagemagick and systemd's `busctl`. Without them it
//! says so on stderr and checks nothing, unless `QPQ_GUI_TESTS=require`
//! (which `.ci/run` sets after installing them): then it fails.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The whole run's limit; every step inside has its own (30 s).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// What the test needs from the machine, or the first thing missing.
fn missing_tool() -> Option<String> {
    let found = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    for tool in ["Xvfb", "dbus-run-session", "busctl", "import"] {
        if !found(tool) {
            return Some(tool.to_owned());
        }
    }
    for path in ["/usr/libexec/at-spi-bus-launcher", "/usr/bin/python3"] {
        if !Path::new(path).exists() {
            return Some(path.to_owned());
        }
    }
    let pyatspi = Command::new("/usr/bin/python3")
        .args(["-c", "import pyatspi"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!pyatspi).then(|| "python3-pyatspi".to_owned())
}

/// The directory with `qpq-gui`, `qpq` and `qpq-server` of this build,
/// building the other two packages' binaries if this run has not.
fn binaries() -> PathBuf {
    let gui = PathBuf::from(env!("CARGO_BIN_EXE_qpq-gui"));
    let dir = gui.parent().expect("a directory").to_owned();
    let missing = ["qpq", "qpq-server"].iter().any(|b| !dir.join(b).exists());
    if missing {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-p",
            "quicproquo-client",
            "-p",
            "quicproquo-server",
            "--bins",
        ]);
        if dir.ends_with("release") {
            build.arg("--release");
        }
        assert!(
            build.status().expect("cargo runs").success(),
            "building qpq and qpq-server failed"
        );
    }
    dir
}

#[test]
fn two_windows_and_a_cli_user_chat_and_a_removed_member_hears_nothing() {
    if let Some(tool) = missing_tool() {
        let message = format!(
            "the real-window test needs {tool} (apt-get install xvfb dbus at-spi2-core \
             python3-pyatspi libgl1-mesa-dri imagemagick systemd)"
        );
        assert!(
            std::env::var("QPQ_GUI_TESTS").as_deref() != Ok("require"),
            "{message}"
        );
        eprintln!("SKIPPED: {message}");
        return;
    }
    let bin = binaries();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("real-window");
    let _ = std::fs::remove_dir_all(&out);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/real_window/run.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--bin")
        .arg(&bin)
        .arg("--out")
        .arg(&out)
        .spawn()
        .expect("run.sh starts");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for run.sh") {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "the real-window test ran past {RUN_TIMEOUT:?}; screenshots and logs in {}",
                out.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "the real-window test failed ({status}); screenshots, logs and the accessibility \
         trees are in {}",
        out.display()
    );
    // The conversation's screenshot is there, as every step's.
    let shots = std::fs::read_dir(&out)
        .expect("the output directory")
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
        .count();
    assert!(shots >= 7, "{shots} screenshots in {}", out.display());
}
