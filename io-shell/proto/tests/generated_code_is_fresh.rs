//! The committed `src/generated/node_capnp.rs` must be what the pinned
//! toolchain generates from `schema/node.capnp` today. Runs the same code as
//! `regen.sh --check`; skips (with a note) where the pinned `capnp` compiler
//! is not installed, so builds and tests never need it. CI installs it and
//! also runs `bash io-shell/proto/regen.sh --check`.

#[path = "../regen/src/codegen.rs"]
#[allow(dead_code)]
mod codegen;

use std::path::Path;

#[test]
fn generated_code_matches_the_schema() {
    if let Err(why) = codegen::compiler_available() {
        eprintln!("SKIPPED generated_code_matches_the_schema: {why}");
        return;
    }
    let proto_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    match codegen::check(proto_dir) {
        Ok(None) => {}
        Ok(Some(fresh)) => panic!(
            "{} is stale: it differs from freshly generated {}; run `bash io-shell/proto/regen.sh`",
            codegen::committed_file(proto_dir).display(),
            fresh.display()
        ),
        Err(e) => panic!("could not regenerate: {e}"),
    }
}
