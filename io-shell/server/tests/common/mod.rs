//! Identities shared by the server's integration tests. The server itself
//! comes from `quicproquo_server::testing` (in process) or is the
//! `qpq-server` binary run as a child (attack and crash tests).

#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use quicproquo_core::types::IdentityKey;

/// A deterministic identity.
pub fn user(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

/// Its public identity key.
pub fn id(sk: &SigningKey) -> IdentityKey {
    IdentityKey(sk.verifying_key().to_bytes())
}
