// Included by the build scripts of `qpq` and `qpq-server`: sets
// `QPQ_GIT_COMMIT` to the commit the binary is built from (12 hex digits),
// or `unknown` outside a git checkout (a source archive), for `--version`.
// A build without the checkout (the Dockerfile's) names it with the
// variable `QPQ_BUILD_COMMIT` (hex digits, the first 12 kept).

fn git_commit() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let git = root.join(".git");
    // Rebuilt when HEAD moves: its file, and the branch file it names.
    if git.join("HEAD").exists() {
        println!("cargo:rerun-if-changed={}", git.join("HEAD").display());
    } else {
        println!("cargo:rerun-if-changed=build.rs");
    }
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD"))
        && let Some(branch) = head.trim().strip_prefix("ref: ")
    {
        // Only files that exist: cargo reruns a script for a missing one
        // on every build.
        for file in [git.join(branch), git.join("packed-refs")] {
            if file.exists() {
                println!("cargo:rerun-if-changed={}", file.display());
            }
        }
    }
    println!("cargo:rerun-if-env-changed=QPQ_BUILD_COMMIT");
    let given = std::env::var("QPQ_BUILD_COMMIT")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| s.len() >= 7 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(|s| s[..s.len().min(12)].to_ascii_lowercase());
    let commit = given.or_else(|| git_rev_parse(&root));
    println!(
        "cargo:rustc-env=QPQ_GIT_COMMIT={}",
        commit.as_deref().unwrap_or("unknown")
    );
}

fn git_rev_parse(root: &std::path::Path) -> Option<String> {
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
}
