//! Replays the committed corpus of the `state_file` fuzz target through the
//! target's own body (`fuzz/src/state_file.rs` is compiled in here), and
//! checks that the generated seeds are in it: a valid file at the
//! Argon2id floor and one refusal of each kind.

#[path = "../../../fuzz/src/corpus.rs"]
mod corpus;
#[path = "../../../fuzz/src/state_file.rs"]
mod state_file_target;

use quicproquo_client::state_file::{self, StateFileError};

fn dir() -> std::path::PathBuf {
    corpus::dir(env!("CARGO_MANIFEST_DIR"), 2, "state_file")
}

#[test]
fn state_file_corpus_replays() {
    let n = corpus::replay(&dir(), state_file_target::run);
    assert!(n >= state_file_target::seeds().len());
}

#[test]
fn state_file_seeds_are_in_the_corpus_and_only_the_valid_one_opens() {
    let seeds = state_file_target::seeds();
    let named: Vec<(&str, Vec<u8>)> = seeds.iter().map(|(n, b)| (n.as_str(), b.clone())).collect();
    corpus::check_seeds(&dir(), &named);
    for (name, bytes) in &seeds {
        let opened = state_file::open(state_file_target::PASSWORD, bytes);
        match name.as_str() {
            "valid_floor" => assert_eq!(
                opened.expect("the valid seed opens"),
                b"a client snapshot would be here"
            ),
            "flipped_tag" => assert!(matches!(opened, Err(StateFileError::WrongPassword))),
            _ => assert!(opened.is_err(), "{name} opened"),
        }
    }
}
