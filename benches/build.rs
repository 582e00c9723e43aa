//! Compiles `proto/bench.proto`, the Protobuf side of the codec comparison,
//! into prost types in `OUT_DIR` (included by `src/pb.rs`). protox parses the
//! schema in Rust, so the build needs no `protoc` binary.

fn main() {
    const SCHEMA: &str = "proto/bench.proto";
    println!("cargo:rerun-if-changed={SCHEMA}");
    let descriptors = protox::compile([SCHEMA], ["proto"])
        .unwrap_or_else(|e| panic!("{SCHEMA} does not compile: {e:?}"));
    prost_build::compile_fds(descriptors)
        .unwrap_or_else(|e| panic!("prost-build failed on {SCHEMA}: {e}"));
}
