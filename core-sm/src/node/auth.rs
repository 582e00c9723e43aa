//! Connections and authentication: the connection table, and the
//! challenge-response that binds a connection to an identity (a signature
//! over a fresh nonce and the connection's TLS exporter).
//!
//! Invariants it keeps:
//! - A connection is bound to at most one identity, once, and only by a
//!   signature that verifies over a nonce this machine drew for it; each
//!   nonce is good for one attempt, right or wrong.
//! - A request from the wrong identity changes nothing: every handler that
//!   touches an identity's keys or queues asks `identity` or `owner` before
//!   it reads or writes.

use ed25519_dalek::{Verifier, VerifyingKey};
use rand_core::RngCore;

use crate::error::ServiceError;
use crate::limits::{AUTH_NONCE_BYTES, TLS_EXPORTER_BYTES};
use crate::store::Store;
use crate::types::{ConnectionId, IdentityKey, Signature};

use super::{NodeService, Reply, Response, auth_message};

/// A connection the machine tracks: its TLS exporter, the challenge it
/// was given, the identity it authenticated as, and its parked waiters.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) tls_exporter: [u8; TLS_EXPORTER_BYTES],
    pub(super) nonce: Option<[u8; AUTH_NONCE_BYTES]>,
    pub(super) identity: Option<IdentityKey>,
    /// Ids of its waiters in the [`super::waiters::WaiterTable`].
    pub(super) waiters: Vec<u64>,
}

impl<S: Store> NodeService<S> {
    pub(super) fn auth_challenge(&mut self, conn: ConnectionId) -> Reply {
        let mut nonce = [0u8; AUTH_NONCE_BYTES];
        self.rng.fill_bytes(&mut nonce);
        let c = self.connection(conn)?;
        if c.identity.is_some() {
            return Err(ServiceError::invalid_argument(
                "connection is already authenticated",
            ));
        }
        c.nonce = Some(nonce);
        Ok(Response::AuthChallenge { nonce })
    }

    pub(super) fn authenticate(
        &mut self,
        conn: ConnectionId,
        identity_key: IdentityKey,
        signature: Signature,
    ) -> Reply {
        let c = self.connection(conn)?;
        if c.identity.is_some() {
            return Err(ServiceError::invalid_argument(
                "connection is already authenticated",
            ));
        }
        // The nonce is consumed by the first attempt, right or wrong.
        let Some(nonce) = c.nonce.take() else {
            return Err(ServiceError::unauthenticated(
                "no challenge outstanding on this connection; call authChallenge first",
            ));
        };
        let message = auth_message(&identity_key, &nonce, &c.tls_exporter);
        verify(&identity_key, &message, &signature).map_err(|()| {
            ServiceError::unauthenticated("authentication signature does not verify")
        })?;
        c.identity = Some(identity_key);
        Ok(Response::Authenticated)
    }

    fn connection(&mut self, conn: ConnectionId) -> Result<&mut Connection, ServiceError> {
        self.connections
            .get_mut(&conn)
            .ok_or_else(|| ServiceError::unauthenticated("unknown connection"))
    }

    pub(super) fn identity(&self, conn: ConnectionId) -> Result<IdentityKey, ServiceError> {
        self.connections
            .get(&conn)
            .and_then(|c| c.identity)
            .ok_or_else(|| {
                ServiceError::unauthenticated(
                    "connection is not authenticated; call authChallenge and authenticate first",
                )
            })
    }

    pub(super) fn owner(&self, conn: ConnectionId, key: &IdentityKey) -> Result<(), ServiceError> {
        let me = self.identity(conn)?;
        if me != *key {
            return Err(ServiceError::permission_denied(
                "this connection is authenticated as another identity",
            ));
        }
        Ok(())
    }
}

pub(super) fn verify(key: &IdentityKey, message: &[u8], signature: &Signature) -> Result<(), ()> {
    let vk = VerifyingKey::from_bytes(key.as_bytes()).map_err(|_| ())?;
    let sig = ed25519_dalek::Signature::from_bytes(&signature.0);
    vk.verify_strict(message, &sig).map_err(|_| ())?;
    // `verify_strict` already rejects weak keys and non-canonical encodings;
    // the plain `Verifier` check is kept as a second line.
    vk.verify(message, &sig).map_err(|_| ())
}
