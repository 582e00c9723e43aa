//! The book's runnable examples, run: every ```sh block of a page under
//! `docs/src/` that follows a `<!-- runnable -->` line is run, the page's
//! blocks in order as one `bash -euo pipefail` script (one reader
//! following the page in one terminal), in a fresh directory against a
//! fresh `qpq-server`, with `qpq` on the `PATH` and `QPQ_SERVER`,
//! `QPQ_SERVER_FINGERPRINT` and `QPQ_PASSWORD` set as the page tells the
//! reader to. The script must succeed, and its output must contain every
//! `<!-- expect: TEXT -->` of the page. So the quick start cannot rot.

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::Server;

const RUNNABLE: &str = "<!-- runnable -->";
const EXPECT: &str = "<!-- expect: ";

fn pages(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            pages(&path, out);
        } else if path.extension().is_some_and(|e| e == "md") {
            out.push(path);
        }
    }
}

/// The page's runnable blocks, in order, and its expectations.
fn examples(page: &str) -> (Vec<String>, Vec<String>) {
    let mut blocks = Vec::new();
    let mut expects = Vec::new();
    let mut lines = page.lines();
    let mut armed = false;
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if trimmed == RUNNABLE {
            armed = true;
        } else if let Some(text) = trimmed.strip_prefix(EXPECT) {
            expects.push(text.strip_suffix("-->").unwrap_or(text).trim().to_owned());
        } else if trimmed.starts_with("```") {
            let mut block = String::new();
            for body in lines.by_ref() {
                if body.trim_start().starts_with("```") {
                    break;
                }
                block.push_str(body);
                block.push('\n');
            }
            if armed {
                assert!(
                    trimmed == "```sh",
                    "a runnable block must be ```sh: {trimmed}"
                );
                blocks.push(block);
            }
            armed = false;
        } else if !trimmed.is_empty() {
            armed = false;
        }
    }
    (blocks, expects)
}

#[test]
fn the_books_runnable_examples_run_against_a_fresh_server() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut all = Vec::new();
    pages(&root.join("docs/src"), &mut all);
    all.sort();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_qpq"));
    let bin_dir = bin.parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut ran = 0;
    for page in all {
        let text = std::fs::read_to_string(&page).unwrap();
        let (blocks, expects) = examples(&text);
        if blocks.is_empty() {
            assert!(
                expects.is_empty(),
                "{}: expectations but nothing runs",
                page.display()
            );
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let server = Server::start(dir.path());
        let work = dir.path().join("reader");
        std::fs::create_dir(&work).unwrap();
        let script = format!("set -euo pipefail\n{}", blocks.concat());
        let out = Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&work)
            .env("PATH", &path)
            .env("QPQ_SERVER", &server.addr)
            .env("QPQ_SERVER_FINGERPRINT", &server.fingerprint)
            .env("QPQ_PASSWORD", "a long passphrase for the book")
            .env_remove("QPQ_STATE")
            .env_remove("QPQ_SERVER_CA")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{}: the examples failed ({})\n--- script\n{script}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
            page.display(),
            out.status
        );
        for e in &expects {
            assert!(
                stdout.contains(e.as_str()),
                "{}: the output lacks {e:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
                page.display()
            );
        }
        ran += 1;
    }
    assert!(ran >= 1, "no page of the book has runnable examples");
}
