//! The core stays sans-io: this test fails if `quicproquo-core` (or anything
//! it depends on at run time) pulls in an I/O runtime, a network stack or a
//! storage engine, or if its source reads a clock, the OS random generator,
//! the file system or sockets.

use std::path::Path;
use std::process::Command;

/// Crates that do I/O or own threads; none may appear in the core's normal
/// dependency tree.
const FORBIDDEN_CRATES: &[&str] = &[
    "tokio",
    "quinn",
    "quinn-proto",
    "fjall",
    "lsm-tree",
    "turmoil",
    "mio",
    "socket2",
    "async-std",
    "smol",
];

/// Source patterns that mean ambient time, randomness or I/O.
const FORBIDDEN_SOURCE: &[&str] = &[
    "Instant::now",
    "SystemTime::now",
    "OsRng",
    "thread_rng",
    "rand::rng(",
    "getrandom",
    "from_entropy",
    "std::net",
    "std::fs",
    "std::thread",
    "std::sync::Mutex",
    "tokio::",
    "quinn::",
    "fjall::",
    "turmoil::",
];

#[test]
fn core_has_no_io_dependencies() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none"])
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["-p", "quicproquo-core"])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(
        names.contains(&"quicproquo-core"),
        "unexpected tree:\n{tree}"
    );
    for bad in FORBIDDEN_CRATES {
        assert!(
            !names.contains(bad),
            "quicproquo-core depends on `{bad}`; the core must stay sans-io:\n{tree}"
        );
    }
}

#[test]
fn core_source_reads_no_clock_randomness_or_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offenders = Vec::new();
    visit(&src, &mut |path, text| {
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            for pat in FORBIDDEN_SOURCE {
                if code.contains(pat) {
                    offenders.push(format!("{}:{}: {pat}", path.display(), n + 1));
                }
            }
        }
    });
    assert!(
        offenders.is_empty(),
        "sans-io violations:\n{}",
        offenders.join("\n")
    );
}

fn visit(dir: &Path, f: &mut dyn FnMut(&Path, &str)) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            visit(&path, f);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let text = std::fs::read_to_string(&path).expect("read source");
            f(&path, &text);
        }
    }
}
