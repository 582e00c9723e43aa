//! mDNS on this host's network: one daemon announces an identity's
//! endpoint, another finds it by the identity key alone; an identity that
//! is not announced is not found.

use std::time::Duration;

use quicproquo_core::types::IdentityKey;
use quicproquo_p2p::discovery::{Discovery, discovery_id};

#[tokio::test]
async fn a_member_is_found_by_its_key_derived_id_and_nothing_else() {
    let alice = IdentityKey([1; 32]);
    let nobody = IdentityKey([2; 32]);
    let id = discovery_id(&alice);
    assert_eq!(id.len(), 32);
    assert!(!id.contains(&quicproquo_core::types::hex(&alice.0[..4])));
    assert_ne!(id, discovery_id(&nobody));

    let announcer = Discovery::start().unwrap();
    announcer.announce(&alice, 47_123).unwrap();
    let finder = Discovery::start().unwrap();
    let found = finder.find(&alice, Duration::from_secs(10)).await.unwrap();
    assert!(!found.is_empty(), "alice was not found");
    assert!(found.iter().all(|a| a.port() == 47_123), "{found:?}");
    let none = finder.find(&nobody, Duration::from_secs(2)).await.unwrap();
    assert!(none.is_empty(), "{none:?}");
    announcer.stop();
    finder.stop();
}
