//! The foreign bindings, generated from the library this build made:
//! - the committed Kotlin and Swift bindings are what `uniffi-bindgen`
//!   writes now (`regen.sh` rewrites them);
//! - Python bindings drive a real server from `tests/python/session_test.py`;
//! - the Kotlin bindings compile, where a Kotlin compiler is installed.

use std::path::{Path, PathBuf};
use std::process::Command;

use quicproquo_core::types::hex;
use quicproquo_server::testing::InProcessServer;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The shared library of this build (`cargo test` builds it with the
/// crate, as the `cdylib` it declares).
fn library() -> PathBuf {
    let name = format!(
        "{}quicproquo_mobile{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .parent()
        .expect("the binary's directory")
        .to_owned();
    [bin_dir.join(&name), bin_dir.join("deps").join(&name)]
        .into_iter()
        .filter(|p| p.exists())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .unwrap_or_else(|| panic!("{name} is not in {}", bin_dir.display()))
}

/// Runs `uniffi-bindgen generate` for `language` into `out`.
fn generate(language: &str, out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_uniffi-bindgen"))
        .args(["generate", "--library"])
        .arg(library())
        .args(["--language", language, "--out-dir"])
        .arg(out)
        .current_dir(manifest_dir())
        .status()
        .expect("uniffi-bindgen runs");
    assert!(status.success(), "uniffi-bindgen for {language} failed");
}

/// Every file under `dir`, relative to it, sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).expect("under the root").to_owned());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn the_committed_kotlin_and_swift_bindings_are_fresh() {
    let update = std::env::var_os("QPQ_UPDATE_BINDINGS").is_some();
    for language in ["kotlin", "swift"] {
        let fresh = tempfile::tempdir().expect("temporary directory");
        generate(language, fresh.path());
        let committed = manifest_dir().join("bindings").join(language);
        if update {
            let _ = std::fs::remove_dir_all(&committed);
            for f in files(fresh.path()) {
                let to = committed.join(&f);
                std::fs::create_dir_all(to.parent().expect("a parent")).expect("mkdir");
                std::fs::copy(fresh.path().join(&f), &to).expect("copy");
            }
            continue;
        }
        assert_eq!(
            files(fresh.path()),
            files(&committed),
            "the {language} bindings' files differ from bindings/{language}: run io-shell/mobile/regen.sh"
        );
        for f in files(fresh.path()) {
            let want = std::fs::read(fresh.path().join(&f)).expect("read");
            let have = std::fs::read(committed.join(&f)).expect("read");
            assert!(
                want == have,
                "bindings/{language}/{} is stale: run io-shell/mobile/regen.sh",
                f.display()
            );
        }
    }
}

/// Python 3, if this machine has it.
fn python() -> Option<&'static str> {
    let ok = Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some("python3")
}

/// Whether a missing tool must fail the test (`require`, as CI sets)
/// instead of skipping it with a message.
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "require")
}

#[test]
fn python_drives_the_bindings_against_a_real_server() {
    let Some(python) = python() else {
        assert!(
            !required("QPQ_MOBILE_TESTS"),
            "python3 is not installed and QPQ_MOBILE_TESTS=require"
        );
        eprintln!("SKIPPED: python3 is not installed; the Python bindings were not driven");
        return;
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let module = dir.path().join("module");
    generate("python", &module);
    let lib = library();
    std::fs::copy(&lib, module.join(lib.file_name().expect("a file name"))).expect("copy");
    let states = dir.path().join("states");
    std::fs::create_dir(&states).expect("mkdir");

    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let server = {
        let _enter = runtime.enter();
        InProcessServer::start(&dir.path().join("server"))
    };
    let memory = std::env::var("QPQ_MOBILE_MEMORY_MESSAGES").unwrap_or_else(|_| "0".into());
    let script = manifest_dir().join("tests/python/session_test.py");
    let status = Command::new(python)
        .arg(&script)
        .env("PYTHONPATH", &module)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("QPQ_SERVER", server.addr.to_string())
        .env("QPQ_SERVER_FINGERPRINT", hex(&server.fingerprint))
        .env("QPQ_TEST_DIR", &states)
        .env("QPQ_MEMORY_MESSAGES", memory)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "{} failed", script.display());
}

/// The Kotlin compiler's version, if one is installed.
fn kotlinc_version() -> Option<String> {
    let out = Command::new("kotlinc").arg("-version").output().ok()?;
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let v = text
        .split("kotlinc-jvm ")
        .nth(1)?
        .split_whitespace()
        .next()?;
    Some(v.to_owned())
}

/// Whether `version` (`major.minor.patch`) is Kotlin 1.4 or later: the
/// generated code uses trailing commas, which came with 1.4.
fn recent_enough(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (1, 4)
}

/// A JNA jar (the Kotlin bindings call the library through JNA).
fn jna_jar() -> Option<PathBuf> {
    let jar = PathBuf::from("/usr/share/java/jna.jar");
    jar.exists().then_some(jar)
}

#[test]
fn the_kotlin_bindings_compile_where_a_kotlin_compiler_is_installed() {
    let version = kotlinc_version();
    let jna = jna_jar();
    let (Some(version), Some(jna)) = (version.clone(), jna) else {
        eprintln!(
            "SKIPPED: kotlinc {} and JNA {}; the Kotlin bindings are checked fresh against the library (the_committed_kotlin_and_swift_bindings_are_fresh) but not compiled",
            version.as_deref().unwrap_or("not installed"),
            if jna_jar().is_some() {
                "found"
            } else {
                "not installed"
            },
        );
        assert!(!required("QPQ_KOTLIN_TESTS"), "QPQ_KOTLIN_TESTS=require");
        return;
    };
    if !recent_enough(&version) {
        eprintln!(
            "SKIPPED: kotlinc {version} is older than 1.4 (Debian 12 packages 1.3.31), which predates the trailing commas the generated code uses; the Kotlin bindings are checked fresh but not compiled"
        );
        assert!(!required("QPQ_KOTLIN_TESTS"), "QPQ_KOTLIN_TESTS=require");
        return;
    }
    let out = tempfile::tempdir().expect("temporary directory");
    let sources = manifest_dir().join("bindings/kotlin");
    let mut kotlinc = Command::new("kotlinc");
    kotlinc
        .arg("-cp")
        .arg(jna)
        .arg("-d")
        .arg(out.path().join("classes"));
    for f in files(&sources) {
        kotlinc.arg(sources.join(f));
    }
    let status = kotlinc.status().expect("kotlinc runs");
    assert!(status.success(), "the Kotlin bindings do not compile");
}
