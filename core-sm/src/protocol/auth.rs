//! The signed transcripts both machines agree on: what a client signs to
//! authenticate a connection, and what an identity signs to vouch for its
//! hybrid public key.

use crate::limits::{AUTH_NONCE_BYTES, TLS_EXPORTER_BYTES};
use crate::types::IdentityKey;

/// Domain-separation prefix of the connection-authentication signature.
pub const AUTH_CONTEXT: &[u8] = b"quicproquo/auth/v1\0";
/// Domain-separation prefix of the hybrid-key signature.
pub const HYBRID_KEY_CONTEXT: &[u8] = b"quicproquo/hybrid-key/v1\0";

/// The bytes a client signs to authenticate a connection: a fixed context,
/// the identity claimed, the server's nonce and the connection's TLS exporter
/// value. The exporter ties the signature to one TLS session, so it is
/// useless on any other connection; the nonce makes it single-use.
pub fn auth_message(
    identity_key: &IdentityKey,
    nonce: &[u8; AUTH_NONCE_BYTES],
    tls_exporter: &[u8; TLS_EXPORTER_BYTES],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(AUTH_CONTEXT.len() + 32 + AUTH_NONCE_BYTES + TLS_EXPORTER_BYTES);
    m.extend_from_slice(AUTH_CONTEXT);
    m.extend_from_slice(identity_key.as_bytes());
    m.extend_from_slice(nonce);
    m.extend_from_slice(tls_exporter);
    m
}

/// The bytes an identity signs to vouch for its hybrid public key.
pub fn hybrid_key_message(identity_key: &IdentityKey, hybrid_key: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HYBRID_KEY_CONTEXT.len() + 32 + hybrid_key.len());
    m.extend_from_slice(HYBRID_KEY_CONTEXT);
    m.extend_from_slice(identity_key.as_bytes());
    m.extend_from_slice(hybrid_key);
    m
}
