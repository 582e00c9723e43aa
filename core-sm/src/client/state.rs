//! The client machine's persisted state layout (postcard), and the restore
//! of older layouts.
//!
//! postcard is not self-describing: a struct is its fields in order, with
//! no names and no way to skip a missing one. So every layout change bumps
//! [`STATE_VERSION`], the first field, and the older layout stays here as a
//! frozen copy that [`Persisted::decode`] converts. Version 1 predates
//! hybrid keys and pq groups: it restores with no hybrid key (a later
//! `register` or `update` makes one) and every group not pq. Version 2
//! predates the per-group queue of changes and the Commit awaiting the
//! server: it restores with both empty (its Commits were merged when made).
//! Version 3 predates contacts: it restores with none. Version 4 predates
//! direct links: it restores with no outbox entry allowed to go directly
//! (they all go through the server), no seq recorded for `after_seq` and
//! no payload taken directly.

use serde::{Deserialize, Serialize};

use super::{CommandError, STATE_VERSION, StateError};

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
    /// Changes and messages the user asked for that are not made yet, in
    /// order: they wait for `commit` (and `behind`).
    pub queue: Vec<Change>,
    /// This user's Commit to the group that the server has not accepted
    /// yet (openmls holds it as the group's pending commit).
    pub commit: Option<CommitRecord>,
    /// After a Commit lost the race for its epoch: the epoch the server said
    /// the group is at. Nothing in `queue` is made before this member's copy
    /// reaches it (it has not processed the winning Commit yet).
    pub behind: u64,
    /// Messages of a later epoch than this member's copy of the group,
    /// kept until the Commit that starts their epoch arrives.
    pub early: Vec<EarlyMessage>,
}

/// A message that arrived before the Commit that starts its epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct EarlyMessage {
    /// The epoch it was made in.
    pub epoch: u64,
    /// Its seq on the group's channel (for warnings).
    pub seq: u64,
    /// The payload as queued.
    pub payload: Vec<u8>,
}

/// Something the user asked a group for, made when its turn comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Change {
    /// An application message.
    Text(String),
    /// Add a member with the KeyPackage already fetched (single-use: it
    /// is kept for a retry).
    Add {
        member: [u8; 32],
        key_package: Vec<u8>,
    },
    /// Remove a member.
    Remove { member: [u8; 32] },
    /// Rotate this member's leaf keys.
    Update,
    /// Commit the removal of a member who left (its proposal, or a removal
    /// by value once the proposal is gone with its epoch).
    CommitLeave { leaver: [u8; 32] },
    /// Propose removing oneself and forget the group.
    Leave,
    /// An application message: content encoded under its id, its time
    /// stamped when it is made ([`super::content::stamp`]). (`Text`, from
    /// earlier versions, is sent as a text with a new id.)
    Content { id: [u8; 16], encoded: Vec<u8> },
}

/// A Commit of this user's waiting for the server's first acceptance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct CommitRecord {
    /// The message id of its outbox entries (one per recipient).
    pub message_id: [u8; 16],
    /// The change it makes, to make again if it loses its epoch's race.
    pub change: Change,
    /// For an add: the new member and the MLS Welcome, sent once the Commit
    /// is accepted (never for a Commit that lost).
    pub welcome: Option<([u8; 32], Vec<u8>)>,
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
    /// An application message: it may go over a direct link.
    pub direct: bool,
}

/// Everything the machine persists (layout version 5).
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
    /// Contacts: identity key and name, ordered by key.
    pub contacts: Vec<([u8; 32], String)>,
    /// The seq the server gave this user's last copy in each queue
    /// (recipient, channel): a direct message's `after_seq`.
    pub direct_last_seqs: Vec<([u8; 32], Vec<u8>, u64)>,
    /// Digests of the payloads taken over direct links, oldest first.
    pub direct_taken: Vec<[u8; 32]>,
}

impl Persisted {
    /// Encodes the state.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing owned plain data into a Vec cannot fail.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes the current layout or an older one.
    pub fn decode(snapshot: &[u8]) -> Result<Persisted, CommandError> {
        let bad = |e: postcard::Error| CommandError::State(StateError::Undecodable(e.to_string()));
        let (version, _) = postcard::take_from_bytes::<u32>(snapshot).map_err(bad)?;
        match version {
            STATE_VERSION => postcard::from_bytes(snapshot).map_err(bad),
            4 => Ok(postcard::from_bytes::<PersistedV4>(snapshot)
                .map_err(bad)?
                .upgrade()),
            3 => Ok(postcard::from_bytes::<PersistedV3>(snapshot)
                .map_err(bad)?
                .upgrade()
                .upgrade()),
            2 => Ok(postcard::from_bytes::<PersistedV2>(snapshot)
                .map_err(bad)?
                .upgrade()
                .upgrade()
                .upgrade()),
            1 => Ok(postcard::from_bytes::<PersistedV1>(snapshot)
                .map_err(bad)?
                .upgrade()
                .upgrade()
                .upgrade()
                .upgrade()),
            other => Err(CommandError::State(StateError::Version(other))),
        }
    }
}

/// Layout version 4, frozen: do not change. Its groups are today's
/// [`GroupRecord`]; a change to it freezes a copy of it here.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedV4 {
    pub version: u32,
    pub identity_seed: [u8; 32],
    pub registered: bool,
    pub active: bool,
    pub groups: Vec<GroupRecord>,
    pub cursors: Vec<(Vec<u8>, u64)>,
    pub outbox: Vec<(u64, OutboxEntryV4)>,
    pub next_outbox_id: u64,
    pub mls_storage: Vec<(Vec<u8>, Vec<u8>)>,
    pub hybrid_keys: Vec<Vec<u8>>,
    pub peer_hybrid_keys: Vec<([u8; 32], Vec<u8>)>,
    pub contacts: Vec<([u8; 32], String)>,
}

/// An outbox entry in layout versions 3 and 4, frozen.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OutboxEntryV4 {
    pub recipient: [u8; 32],
    pub channel_id: Vec<u8>,
    pub payload: Vec<u8>,
    pub message_id: [u8; 16],
    pub seal: bool,
}

impl PersistedV4 {
    fn upgrade(self) -> Persisted {
        Persisted {
            version: STATE_VERSION,
            identity_seed: self.identity_seed,
            registered: self.registered,
            active: self.active,
            groups: self.groups,
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
                            seal: e.seal,
                            direct: false,
                        },
                    )
                })
                .collect(),
            next_outbox_id: self.next_outbox_id,
            mls_storage: self.mls_storage,
            hybrid_keys: self.hybrid_keys,
            peer_hybrid_keys: self.peer_hybrid_keys,
            contacts: self.contacts,
            direct_last_seqs: Vec::new(),
            direct_taken: Vec::new(),
        }
    }
}

/// Layout version 3, frozen: do not change. Its groups are today's
/// [`GroupRecord`]; a change to it freezes a copy of it here.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedV3 {
    pub version: u32,
    pub identity_seed: [u8; 32],
    pub registered: bool,
    pub active: bool,
    pub groups: Vec<GroupRecord>,
    pub cursors: Vec<(Vec<u8>, u64)>,
    pub outbox: Vec<(u64, OutboxEntryV4)>,
    pub next_outbox_id: u64,
    pub mls_storage: Vec<(Vec<u8>, Vec<u8>)>,
    pub hybrid_keys: Vec<Vec<u8>>,
    pub peer_hybrid_keys: Vec<([u8; 32], Vec<u8>)>,
}

impl PersistedV3 {
    fn upgrade(self) -> PersistedV4 {
        PersistedV4 {
            version: 4,
            identity_seed: self.identity_seed,
            registered: self.registered,
            active: self.active,
            groups: self.groups,
            cursors: self.cursors,
            outbox: self.outbox,
            next_outbox_id: self.next_outbox_id,
            mls_storage: self.mls_storage,
            hybrid_keys: self.hybrid_keys,
            peer_hybrid_keys: self.peer_hybrid_keys,
            contacts: Vec::new(),
        }
    }
}

/// Layout version 2, frozen: do not change.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct PersistedV2 {
    pub version: u32,
    pub identity_seed: [u8; 32],
    pub registered: bool,
    pub active: bool,
    pub groups: Vec<GroupRecordV2>,
    pub cursors: Vec<(Vec<u8>, u64)>,
    pub outbox: Vec<(u64, OutboxEntryV2)>,
    pub next_outbox_id: u64,
    pub mls_storage: Vec<(Vec<u8>, Vec<u8>)>,
    pub hybrid_keys: Vec<Vec<u8>>,
    pub peer_hybrid_keys: Vec<([u8; 32], Vec<u8>)>,
}

/// A group in layout version 2, frozen.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct GroupRecordV2 {
    pub name: String,
    pub group_id: Vec<u8>,
    pub channel_id: Vec<u8>,
    pub owner: bool,
    pub pq: bool,
}

/// An outbox entry in layout version 2, frozen.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct OutboxEntryV2 {
    pub recipient: [u8; 32],
    pub channel_id: Vec<u8>,
    pub payload: Vec<u8>,
    pub message_id: [u8; 16],
    pub seal: bool,
}

impl PersistedV2 {
    fn upgrade(self) -> PersistedV3 {
        PersistedV3 {
            version: 3,
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
                    pq: g.pq,
                    queue: Vec::new(),
                    commit: None,
                    behind: 0,
                    early: Vec::new(),
                })
                .collect(),
            cursors: self.cursors,
            outbox: self
                .outbox
                .into_iter()
                .map(|(id, e)| {
                    (
                        id,
                        OutboxEntryV4 {
                            recipient: e.recipient,
                            channel_id: e.channel_id,
                            payload: e.payload,
                            message_id: e.message_id,
                            seal: e.seal,
                        },
                    )
                })
                .collect(),
            next_outbox_id: self.next_outbox_id,
            mls_storage: self.mls_storage,
            hybrid_keys: self.hybrid_keys,
            peer_hybrid_keys: self.peer_hybrid_keys,
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
    fn upgrade(self) -> PersistedV2 {
        PersistedV2 {
            version: 2,
            identity_seed: self.identity_seed,
            registered: self.registered,
            active: self.active,
            groups: self
                .groups
                .into_iter()
                .map(|g| GroupRecordV2 {
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
                        OutboxEntryV2 {
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
