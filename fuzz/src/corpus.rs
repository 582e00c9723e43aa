//! The committed seed corpus: where it lives and how tests read it. A
//! target's corpus is `fuzz/corpus/<target>/`; tests replay every file in
//! it, and check that the generated seeds (valid encodings from the
//! encoders, hostile messages) are among them. Setting
//! `QPQ_FUZZ_WRITE_SEEDS=1` writes the generated seeds instead, after an
//! encoder changed.

use std::path::{Path, PathBuf};

/// Environment variable that makes [`check_seeds`] (re)write the seeds.
pub const WRITE_SEEDS_VAR: &str = "QPQ_FUZZ_WRITE_SEEDS";

/// `fuzz/corpus/<target>`, from a crate directory `levels` below the
/// repository root (`CARGO_MANIFEST_DIR` of the calling test).
pub fn dir(manifest_dir: &str, levels: usize, target: &str) -> PathBuf {
    let mut root = PathBuf::from(manifest_dir);
    for _ in 0..levels {
        root.pop();
    }
    root.join("fuzz").join("corpus").join(target)
}

/// Every file of the corpus directory, sorted by name, with its bytes.
/// Panics if the directory is missing or empty: a replay of nothing must
/// not pass silently.
pub fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let entries = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("corpus directory {}: {e}", dir.display()));
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let e = e.expect("corpus directory entry");
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes =
                std::fs::read(e.path()).unwrap_or_else(|err| panic!("corpus file {name}: {err}"));
            (name, bytes)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "corpus {} is empty", dir.display());
    out
}

/// Runs `run` over every corpus file, naming the file if it panics.
pub fn replay(dir: &Path, mut run: impl FnMut(&[u8])) -> usize {
    let files = files(dir);
    for (name, bytes) in &files {
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(bytes)));
        if let Err(panic) = result {
            eprintln!("corpus file {} failed", dir.join(name).display());
            std::panic::resume_unwind(panic);
        }
    }
    files.len()
}

/// Checks that each generated seed is in the corpus as `seed-<name>` with
/// exactly these bytes, or writes them if [`WRITE_SEEDS_VAR`] is set.
pub fn check_seeds(dir: &Path, seeds: &[(&str, Vec<u8>)]) {
    let write = std::env::var_os(WRITE_SEEDS_VAR).is_some();
    if write {
        std::fs::create_dir_all(dir).expect("create corpus directory");
    }
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        if write {
            std::fs::write(&path, bytes).expect("write seed");
            continue;
        }
        let stored = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "seed {} missing ({e}); regenerate with {WRITE_SEEDS_VAR}=1 cargo test",
                path.display()
            )
        });
        assert!(
            stored == *bytes,
            "seed {} is stale; regenerate with {WRITE_SEEDS_VAR}=1 cargo test",
            path.display()
        );
    }
}
