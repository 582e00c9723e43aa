//! The book's page of limits (`docs/src/reference/limits.md`) is generated
//! from the two places limits are defined: `core-sm/src/limits.rs` (every
//! constant, its value as written and its doc comment, by section) and
//! `qpq-server.toml` (every key, its default and its comment). This test
//! fails when the page is not what they generate;
//! `QPQ_UPDATE_BOOK=1 cargo test -p quicproquo-server --test limits_page`
//! writes it again.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One constant of limits.rs.
struct Constant {
    name: String,
    value: String,
    doc: String,
}

/// Turns rustdoc into book text: intra-doc links lose their brackets.
fn prose(doc: &str) -> String {
    let mut out = String::new();
    let mut rest = doc;
    while let Some(start) = rest.find("[`") {
        let Some(len) = rest[start..].find("`]") else {
            break;
        };
        out.push_str(&rest[..start]);
        out.push_str(&rest[start + 1..start + len + 1]);
        rest = &rest[start + len + 2..];
        // `[`X`](path)`: the path goes too.
        if rest.starts_with('(')
            && let Some(end) = rest.find(')')
        {
            rest = &rest[end + 1..];
        }
    }
    out.push_str(rest);
    out
}

/// The sections of limits.rs (`// ----- name ---`), each with its
/// constants in order.
fn limits(source: &str) -> Vec<(String, Vec<Constant>)> {
    let mut sections: Vec<(String, Vec<Constant>)> = Vec::new();
    let mut doc: Vec<&str> = Vec::new();
    let mut lines = source.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if let Some(title) = line.strip_prefix("// -----") {
            let title = title.trim_matches(|c: char| c == '-' || c == ' ');
            sections.push((title.to_owned(), Vec::new()));
            doc.clear();
        } else if let Some(text) = line.strip_prefix("///") {
            doc.push(text.trim());
        } else if let Some(decl) = line.strip_prefix("pub const ") {
            let mut decl = decl.to_owned();
            while !decl.trim_end().ends_with(';') {
                let next = lines.next().expect("a declaration ends with ;");
                decl.push(' ');
                decl.push_str(next.trim());
            }
            let (name, rest) = decl.split_once(':').expect("NAME: type = value;");
            let (_, value) = rest.split_once('=').expect("NAME: type = value;");
            let value = value.trim().trim_end_matches(';').trim();
            let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
            let value = value.replace("[ ", "[").replace(", ]", "]");
            let section = sections.last_mut().expect("constants are in sections");
            section.1.push(Constant {
                name: name.trim().to_owned(),
                value,
                doc: prose(&doc.join(" ")),
            });
            doc.clear();
        } else if !line.starts_with("#[") {
            doc.clear();
        }
    }
    sections
}

/// One key of qpq-server.toml.
struct Key {
    name: String,
    default: Option<String>,
    doc: String,
}

/// The keys of qpq-server.toml: `key = value` lines, and `# key = value`
/// lines after a comment for the keys that have no default, each with the
/// comment block above it; keys on consecutive lines share one comment.
fn keys(source: &str) -> Vec<Key> {
    let mut keys = Vec::new();
    let mut comment: Vec<&str> = Vec::new();
    // The comment of the key on the line before, if it was one.
    let mut previous: Option<String> = None;
    let is_key = |s: &str| {
        s.split_once(" = ").is_some_and(|(k, _)| {
            !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
        })
    };
    let words = |s: &str| s.split_whitespace().collect::<Vec<_>>().join(" ");
    for line in source.lines() {
        let line = line.trim();
        let commented = line.strip_prefix('#').map(str::trim);
        let key_line = match commented {
            Some(text) if is_key(text) && (!comment.is_empty() || previous.is_some()) => {
                Some((text, true))
            }
            None if is_key(line) => Some((line, false)),
            _ => None,
        };
        if let Some((text, example)) = key_line {
            let (k, v) = text.split_once(" = ").expect("checked");
            let doc = if comment.is_empty() {
                previous.clone().unwrap_or_default()
            } else {
                words(&comment.join(" "))
            };
            keys.push(Key {
                name: k.to_owned(),
                default: (!example).then(|| v.to_owned()),
                doc: if example {
                    format!("{doc} (Example: `{v}`.)")
                } else {
                    doc.clone()
                },
            });
            previous = Some(doc);
            comment.clear();
            continue;
        }
        previous = None;
        match commented {
            None => comment.clear(),
            Some(text) if text.starts_with("---") => {}
            Some(text) => comment.push(text),
        }
    }
    keys
}

fn page() -> String {
    let root = root();
    let limits_rs = std::fs::read_to_string(root.join("core-sm/src/limits.rs")).unwrap();
    let toml = std::fs::read_to_string(root.join("qpq-server.toml")).unwrap();
    let mut out = String::new();
    out.push_str(
        "# Limits\n\n\
         Every limit of qpq with its value: the protocol's and the core's fixed\n\
         limits, then the server's settings with their defaults. Anything a\n\
         peer can grow is bounded by one of them, and reaching a bound is\n\
         answered with a typed error, never a silent drop.\n\n\
         This page is generated from `core-sm/src/limits.rs` and\n\
         `qpq-server.toml` by the test `io-shell/server/tests/limits_page.rs`,\n\
         which fails when the page is out of date\n\
         (`QPQ_UPDATE_BOOK=1 cargo test -p quicproquo-server --test limits_page`\n\
         writes it again). Values are as the source writes them.\n\n\
         ## Fixed limits\n\n\
         Constants of `core-sm/src/limits.rs`, by section. The server settings\n\
         below override some of them for one server (`NodeConfig`).\n",
    );
    for (section, constants) in limits(&limits_rs) {
        let mut title = section.clone();
        title[..1].make_ascii_uppercase();
        write!(out, "\n### {title}\n\n").unwrap();
        for c in constants {
            writeln!(out, "- **`{}`** = `{}`. {}", c.name, c.value, c.doc).unwrap();
        }
    }
    out.push_str(
        "\n## Server settings\n\n\
         Keys of `qpq-server.toml` with their built-in defaults; each can also\n\
         be set by a `QPQ_` variable or a flag (the file's header says which\n\
         wins).\n\n",
    );
    for k in keys(&toml) {
        match k.default {
            Some(d) => writeln!(out, "- **`{}`** = `{d}`. {}", k.name, k.doc).unwrap(),
            None => writeln!(out, "- **`{}`** (no default). {}", k.name, k.doc).unwrap(),
        }
    }
    out
}

#[test]
fn the_books_limits_page_is_generated_from_the_sources() {
    let path = root().join("docs/src/reference/limits.md");
    let want = page();
    if std::env::var_os("QPQ_UPDATE_BOOK").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        have == want,
        "docs/src/reference/limits.md is out of date: run \
         QPQ_UPDATE_BOOK=1 cargo test -p quicproquo-server --test limits_page"
    );
    // Every constant and key made it.
    let source = std::fs::read_to_string(root().join("core-sm/src/limits.rs")).unwrap();
    let consts = source.matches("\npub const ").count();
    assert_eq!(
        want.matches("\n- **`").count() - keys_in_page(&want),
        consts
    );
}

fn keys_in_page(page: &str) -> usize {
    page.split("## Server settings")
        .nth(1)
        .map_or(0, |s| s.matches("\n- **`").count())
}
