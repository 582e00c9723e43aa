//! Regenerates the proto crate's committed Cap'n Proto code:
//! `quicproquo-proto-regen [OUT_DIR]` writes `node_capnp.rs` for
//! `schema/node.capnp` into `OUT_DIR` (default: the committed
//! `src/generated/`). Run it through `../regen.sh`, which also offers
//! `--check`.

// `check` and `committed_file` serve the freshness test, which includes the
// same module.
#[allow(dead_code)]
mod codegen;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    // This tool lives in `<proto>/regen`.
    let Some(proto_dir) = Path::new(env!("CARGO_MANIFEST_DIR")).parent() else {
        eprintln!("regen: cannot locate the proto crate");
        return ExitCode::FAILURE;
    };
    let mut args = std::env::args_os().skip(1);
    let out_dir = match args.next() {
        Some(dir) => PathBuf::from(dir),
        None => proto_dir.join("src").join("generated"),
    };
    if args.next().is_some() {
        eprintln!("usage: quicproquo-proto-regen [OUT_DIR]");
        return ExitCode::from(2);
    }
    match codegen::generate(proto_dir, &out_dir) {
        Ok(()) => {
            eprintln!(
                "regen: wrote {}",
                out_dir.join(codegen::GENERATED_FILE).display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("regen: {e}");
            ExitCode::FAILURE
        }
    }
}
