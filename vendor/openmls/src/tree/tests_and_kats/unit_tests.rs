//! Tree unit tests.

mod test_secret_tree;
mod test_sender_ratchet;
