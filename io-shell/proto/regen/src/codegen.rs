//! The one pinned way to turn `schema/node.capnp` into
//! `src/generated/node_capnp.rs`: the `capnp` compiler binary (Debian's
//! `capnproto`, version [`CAPNP_VERSION`]) parses the schema and the `capnpc`
//! crate (pinned to `=0.27.0`) writes the Rust code. Shared by the `regen`
//! tool (which `regen.sh` runs) and the proto crate's freshness test, so both
//! generate exactly the same way.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The `capnp` compiler version the committed code was generated with.
/// Other versions may encode the schema nodes differently, so regenerating
/// with one of them could show a spurious diff.
pub const CAPNP_VERSION: &str = "0.9.2";

/// The name of the generated file, inside `src/generated/`.
pub const GENERATED_FILE: &str = "node_capnp.rs";

/// Why the compiler cannot be used.
#[derive(Debug)]
pub enum Unavailable {
    /// No `capnp` binary on `PATH`.
    Missing,
    /// A `capnp` binary of another version than [`CAPNP_VERSION`].
    WrongVersion(String),
}

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unavailable::Missing => write!(
                f,
                "the `capnp` compiler is not on PATH (install Debian's `capnproto` {CAPNP_VERSION})"
            ),
            Unavailable::WrongVersion(found) => write!(
                f,
                "found `{found}`, but the committed code is generated with Cap'n Proto {CAPNP_VERSION}"
            ),
        }
    }
}

/// Checks that `capnp` is on `PATH` and has the pinned version.
pub fn compiler_available() -> Result<(), Unavailable> {
    let output = Command::new("capnp")
        .arg("--version")
        .output()
        .map_err(|_| Unavailable::Missing)?;
    if !output.status.success() {
        return Err(Unavailable::Missing);
    }
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if version != format!("Cap'n Proto version {CAPNP_VERSION}") {
        return Err(Unavailable::WrongVersion(version));
    }
    Ok(())
}

/// The committed generated file of the proto crate at `proto_dir`.
pub fn committed_file(proto_dir: &Path) -> PathBuf {
    proto_dir.join("src").join("generated").join(GENERATED_FILE)
}

/// Generates the Rust code for `proto_dir/schema/node.capnp` into
/// `out_dir/`[`GENERATED_FILE`].
pub fn generate(proto_dir: &Path, out_dir: &Path) -> Result<(), String> {
    compiler_available().map_err(|e| e.to_string())?;
    let schema_dir = proto_dir.join("schema");
    std::fs::create_dir_all(out_dir).map_err(|e| format!("creating {}: {e}", out_dir.display()))?;
    capnpc::CompilerCommand::new()
        // Strip the checkout's location, so the output does not depend on it.
        .src_prefix(&schema_dir)
        .file(schema_dir.join("node.capnp"))
        // The schema imports nothing; keep /usr/include out of the picture.
        .no_standard_import()
        .output_path(out_dir)
        // The code is mounted as `crate::generated::node_capnp`.
        .default_parent_module(vec!["generated".into()])
        .run()
        .map_err(|e| format!("capnp code generation failed: {e}"))
}

/// Regenerates into a fresh directory under the system's temp dir and
/// compares with the committed file: `Ok(None)` if they are equal,
/// `Ok(Some(path))` with the fresh file's path if they differ.
pub fn check(proto_dir: &Path) -> Result<Option<PathBuf>, String> {
    let tmp = std::env::temp_dir().join(format!("qpq-proto-regen-{}", std::process::id()));
    generate(proto_dir, &tmp)?;
    let fresh_path = tmp.join(GENERATED_FILE);
    let fresh =
        std::fs::read(&fresh_path).map_err(|e| format!("reading {}: {e}", fresh_path.display()))?;
    let committed_path = committed_file(proto_dir);
    let committed = std::fs::read(&committed_path)
        .map_err(|e| format!("reading {}: {e}", committed_path.display()))?;
    if fresh == committed {
        // Best effort: a leftover temp dir is harmless.
        let _ = std::fs::remove_dir_all(&tmp);
        Ok(None)
    } else {
        Ok(Some(fresh_path))
    }
}
