//! Finding members on the local network with mDNS (opt-in): an endpoint
//! announces itself as an instance of `_qpq._udp.local` named by a
//! key-derived id, never the identity key; a member who knows a peer's
//! identity key derives the same id and asks for it.
//!
//! The id is 32 hex digits of SHA-256 over a label and the identity key.
//! It is a pseudonym: stable for an identity (a device that announces on
//! several networks can be recognised across them by anyone who saw it),
//! but it names the identity only to someone who already has the key.
//! What is found is only an address: the handshake on it still has to
//! prove the identity ([`crate::Endpoint::connect`]).

use std::net::SocketAddr;
use std::time::Duration;

use mdns_sd::{ServiceDaemon, ServiceEvent, ServiceInfo};
use quicproquo_core::types::{IdentityKey, hex};
use sha2::{Digest, Sha256};

use crate::P2pError;

/// The DNS-SD service type direct endpoints announce.
pub const SERVICE_TYPE: &str = "_qpq._udp.local.";
/// The label hashed with the identity key into the announced id.
pub const DISCOVERY_LABEL: &[u8] = b"quicproquo/p2p/discovery/v1";

/// The instance name `identity` announces: 32 hex digits.
pub fn discovery_id(identity: &IdentityKey) -> String {
    let digest = Sha256::new()
        .chain_update(DISCOVERY_LABEL)
        .chain_update(identity.0)
        .finalize();
    hex(&digest[..16])
}

fn mdns_err(e: mdns_sd::Error) -> P2pError {
    P2pError::Discovery(e.to_string())
}

/// An mDNS responder and querier (one thread of its own).
pub struct Discovery {
    daemon: ServiceDaemon,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Discovery")
    }
}

impl Discovery {
    /// Starts the mDNS daemon.
    pub fn start() -> Result<Discovery, P2pError> {
        Ok(Discovery {
            daemon: ServiceDaemon::new().map_err(mdns_err)?,
        })
    }

    /// Announces `identity`'s direct endpoint on `port`, on every
    /// interface's addresses.
    pub fn announce(&self, identity: &IdentityKey, port: u16) -> Result<(), P2pError> {
        let id = discovery_id(identity);
        let host = format!("{id}.local.");
        let info = ServiceInfo::new(
            SERVICE_TYPE,
            &id,
            &host,
            "",
            port,
            None::<std::collections::HashMap<String, String>>,
        )
        .map_err(mdns_err)?
        .enable_addr_auto();
        self.daemon.register(info).map_err(mdns_err)
    }

    /// The addresses `peer` announces, waiting up to `wait` for the first
    /// answer; empty if none came.
    pub async fn find(
        &self,
        peer: &IdentityKey,
        wait: Duration,
    ) -> Result<Vec<SocketAddr>, P2pError> {
        let fullname = format!("{}.{SERVICE_TYPE}", discovery_id(peer));
        let events = self.daemon.browse(SERVICE_TYPE).map_err(mdns_err)?;
        let found = tokio::time::timeout(wait, async {
            while let Ok(event) = events.recv_async().await {
                if let ServiceEvent::ServiceResolved(s) = event
                    && s.fullname == fullname
                {
                    let mut addrs: Vec<SocketAddr> = s
                        .addresses
                        .iter()
                        .map(|ip| SocketAddr::new(ip.to_ip_addr(), s.port))
                        .collect();
                    addrs.sort();
                    return addrs;
                }
            }
            Vec::new()
        })
        .await
        .unwrap_or_default();
        let _ = self.daemon.stop_browse(SERVICE_TYPE);
        Ok(found)
    }

    /// Stops announcing and answering.
    pub fn stop(&self) {
        let _ = self.daemon.shutdown();
    }
}
