//! The client machine's persisted state layout (postcard), and the restore
//! of older layouts.
//!
//! postcard is not self-describing: a struct is its fields in order, with
//! no names and no way to skip a missing one. So every layout change bumps
//! [`STATE_VERSION`], the first field, and the older layout stays here as a
//! frozen copy that [`Persisted::decode`] converts. Version 1 predates
//! hybrid keys and pq groups: it restores with no hybrid key (a later
//! `register` or `update` makes one) and every group not pq.

use serde::{Deserialize, Serialize};

use super::{CommandError, STATE_VERSION};

/// One group as persisted.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GroupRecord {
    pub name: String,
    pub group_id: Vec<u8>,
    pub channel_id: Vec<u8>,
    pub owner: bool,
    /// Post-quantum: everything the group sends is sealed to each
    /// recipient's hybrid key.
    pub pq: bool,
}

/// One delivery waiting in the outbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct OutboxEntry {
    pub recipient: [u8; 32],
    pub channel_id: Vec<u8>,
    pub payload: Vec<u8>,
    pub message_id: [u8; 16],
    /// `payload` still has to be sealed to the recipient's hybrid key
    /// before it leaves (the key may need fetching first).
    pub seal: bool,
}

/// Everything the machine persists (layout version 2).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Persisted {
    pub version: u32,
    pub identity_seed: [u8; 32],
    pub registered: bool,
    pub active: bool,
    pub groups: Vec<GroupRecord>,
    pub cursors: Vec<(Vec<u8>, u64)>,
    pub outbox: Vec<(u64, OutboxEntry)>,
    pub next_outbox_id: u64,
    pub mls_storage: Vec<(Vec<u8>, Vec<u8>)>,
    /// Own hybrid secret keys (`HybridSecretKey::to_bytes`), oldest first.
    pub hybrid_keys: Vec<Vec<u8>>,
    /// Verified peer hybrid public keys, by identity.
    pub peer_hybrid_keys: Vec<([u8; 32], Vec<u8>)>,
}

impl Persisted {
    /// Encodes the state.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing owned plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes the current layout or an older one.
    pub fn decode(snapshot: &[u8]) -> Result<Persisted, CommandError> {
        let bad = |e: postcard::Error| CommandError::State(format!("state does not decode: {e}"));
        let (version, _) = postcard::take_from_bytes::<u32>(snapshot).map_err(bad)?;
        match version {
            STATE_VERSION => postcard::from_bytes(snapshot).map_err(bad),
            1 => Ok(postcard::from_bytes::<PersistedV1>(snapshot)
                .map_err(bad)?
                .upgrade()),
            other => Err(CommandError::State(format!(
                "state version {other} is not the supported {STATE_VERSION} (or 1)"
            ))),
        }
    }
}

/// Layout version 1, frozen: do not change.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedV1 {
    pub version: u32,
    pub identity_seed: [u8; 32],
    pub registered: bool,
    pub active: bool,
    pub groups: Vec<GroupRecordV1>,
    pub cursors: Vec<(Vec<u8>, u64)>,
    pub outbox: Vec<(u64, OutboxEntryV1)>,
    pub next_outbox_id: u64,
    pub mls_storage: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A group in layout version 1, frozen.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct GroupRecordV1 {
    pub name: String,
    pub group_id: Vec<u8>,
    pub channel_id: Vec<u8>,
    pub owner: bool,
}

/// An outbox entry in layout version 1, frozen.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OutboxEntryV1 {
    pub recipient: [u8; 32],
    pub channel_id: Vec<u8>,
    pub payload: Vec<u8>,
    pub message_id: [u8; 16],
}

impl PersistedV1 {
    fn upgrade(self) -> Persisted {
        Persisted {
            version: STATE_VERSION,
            identity_seed: self.identity_seed,
            registered: self.registered,
            active: self.active,
            groups: self
                .groups
                .into_iter()
                .map(|g| GroupRecord {
                    name: g.name,
                    group_id: g.group_id,
                    channel_id: g.channel_id,
                    owner: g.owner,
                    pq: false,
                })
                .collect(),
            cursors: self.cursors,
            outbox: self
                .outbox
                .into_iter()
                .map(|(id, e)| {
                    (
                        id,
                        OutboxEntry {
                            recipient: e.recipient,
                            channel_id: e.channel_id,
                            payload: e.payload,
                            message_id: e.message_id,
                            seal: false,
                        },
                    )
                })
                .collect(),
            next_outbox_id: self.next_outbox_id,
            mls_storage: self.mls_storage,
            hybrid_keys: Vec::new(),
            peer_hybrid_keys: Vec::new(),
        }
    }
}
