//! The instruction-count benches (`qpq-icount`) under callgrind, checked
//! against the committed baseline `benches/icount-baseline.txt`: a bench
//! that needs more than [`REGRESSION_PERCENT`] more instructions per
//! operation than its baseline fails the test. Instruction counts do not
//! depend on the machine's load, so the check is exact where a timed one
//! would be noise.
//!
//! - Without valgrind the test says so and passes, unless
//!   `QPQ_ICOUNT_TESTS=require` (set by `.ci/run`), which fails it.
//! - `QPQ_ICOUNT_UPDATE=1` writes the measured counts as the new baseline
//!   (after a change that makes a bench cheaper, or one whose cost is
//!   wanted; say which in the commit).
//! - `QPQ_ICOUNT_BIN=path` counts another build of `qpq-icount` (for
//!   example `target/release/qpq-icount`; a relative path is taken from
//!   the workspace's root) and only prints its figures: the baseline is of
//!   the test profile's build.
//!
//! The baseline holds counts of the test profile's build, in which the
//! NodeService machine and the codec are optimised (the workspace's
//! `Cargo.toml`) but overflow checks and debug assertions are on, so they
//! are somewhat above a release build's. Counts also move with the
//! compiler version; after a toolchain update, refresh the baseline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// How much a bench may grow before the test fails.
const REGRESSION_PERCENT: f64 = 5.0;

fn baseline_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("icount-baseline.txt")
}

/// `name instructions_per_op` lines; `#` starts a comment.
fn read_baseline() -> BTreeMap<String, u64> {
    let text = std::fs::read_to_string(baseline_path()).unwrap_or_default();
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (name, n) = l.split_once(' ').expect("`name count` per line");
            (
                name.to_owned(),
                n.trim().parse().expect("a whole number of instructions"),
            )
        })
        .collect()
}

fn write_baseline(counts: &BTreeMap<String, u64>) {
    let mut text = String::from(
        "# Instructions per operation of each qpq-icount bench, test-profile build\n\
         # (see benches/tests/icount.rs). Written by\n\
         # QPQ_ICOUNT_UPDATE=1 cargo test -p quicproquo-benches --test icount\n",
    );
    for (name, n) in counts {
        text.push_str(&format!("{name} {n}\n"));
    }
    std::fs::write(baseline_path(), text).expect("write the baseline");
}

fn valgrind_present() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Instructions per operation of `bench` in `bin`, counted by callgrind.
fn count(bin: &Path, bench: &str, dir: &Path) -> u64 {
    let out = dir.join(format!("{}.callgrind", bench.replace('/', "_")));
    let run = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--toggle-collect=*icount_measured*")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(bin)
        .arg(bench)
        .output()
        .expect("run valgrind");
    assert!(
        run.status.success(),
        "{bench} under callgrind failed: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ops: u64 = String::from_utf8_lossy(&run.stdout)
        .trim()
        .parse()
        .expect("qpq-icount prints the operations it measured");
    let report = std::fs::read_to_string(&out).expect("callgrind wrote its counts");
    let total: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("totals:"))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
        .expect("a totals line");
    assert!(
        total > 0,
        "{bench}: nothing counted (is the toggle's function name right?)"
    );
    total / ops
}

#[test]
fn instruction_counts_stay_within_their_baseline() {
    if !valgrind_present() {
        let msg = "valgrind is not installed: the instruction counts cannot be taken";
        assert!(
            std::env::var("QPQ_ICOUNT_TESTS").as_deref() != Ok("require"),
            "{msg} (QPQ_ICOUNT_TESTS=require)"
        );
        eprintln!("skipped: {msg}");
        return;
    }
    // A relative path is taken from the workspace's root, where the
    // command is typed (tests run in the package's directory).
    let other = std::env::var_os("QPQ_ICOUNT_BIN")
        .map(|p| Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p));
    let bin = other
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qpq-icount")));
    let list = Command::new(&bin)
        .arg("--list")
        .output()
        .expect("run qpq-icount");
    let benches: Vec<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert!(!benches.is_empty(), "qpq-icount lists its benches");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let measured: BTreeMap<String, u64> = benches
        .iter()
        .map(|b| (b.clone(), count(&bin, b, dir.path())))
        .collect();

    let baseline = read_baseline();
    eprintln!(
        "{:<28} {:>14} {:>14} {:>8}",
        "bench", "instr/op", "baseline", "change"
    );
    let mut regressed = Vec::new();
    for (name, n) in &measured {
        let base = baseline.get(name).copied();
        let change = base.map(|b| (*n as f64 / b as f64 - 1.0) * 100.0);
        eprintln!(
            "{name:<28} {n:>14} {:>14} {:>8}",
            base.map_or("-".to_owned(), |b| b.to_string()),
            change.map_or("new".to_owned(), |c| format!("{c:+.1}%")),
        );
        if change.is_some_and(|c| c > REGRESSION_PERCENT) {
            regressed.push(name.clone());
        }
    }
    if let Some(bin) = other {
        eprintln!(
            "(counted {}: not compared with the test profile's baseline)",
            bin.display()
        );
        return;
    }
    if std::env::var_os("QPQ_ICOUNT_UPDATE").is_some() {
        write_baseline(&measured);
        eprintln!("baseline written to {}", baseline_path().display());
        return;
    }
    let missing: Vec<&String> = measured
        .keys()
        .filter(|k| !baseline.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "benches without a baseline: {missing:?}; run with QPQ_ICOUNT_UPDATE=1 to record them"
    );
    assert!(
        regressed.is_empty(),
        "instructions per operation grew by more than {REGRESSION_PERCENT}% in {regressed:?}; \
         if that cost is wanted, record it with QPQ_ICOUNT_UPDATE=1 and say why in the commit"
    );
}
