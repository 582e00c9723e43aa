//! The client state machine: a user's identity, KeyPackages, MLS groups,
//! queue cursors and outbox, sans-io.
//!
//! The shell starts one [`Command`] at a time with [`ClientMachine::start`]
//! and drains [`Effect`]s with [`ClientMachine::poll_effect`]: requests to
//! send to the NodeService (answered with
//! [`ClientMachine::handle_response`]), state to persist, events to show,
//! and finally the command's outcome. The machine never performs I/O.
//!
//! States (DESIGN.md §3), derived from what the machine holds:
//! `NoState` (no state file) → `IdentityGenerated` → `Registered` →
//! `GroupOwner` | `GroupMember` → `Active` (see [`Phase`]).
//!
//! Invariants:
//! - Persist before upload: KeyPackage private keys are in the persisted
//!   state before any upload request is emitted.
//! - Persist before acknowledge: a fetch that acknowledges messages (by its
//!   cursor) is emitted only after the state that processed them is
//!   persisted, and a seq at or below a channel's cursor is never decrypted
//!   again (openmls cannot decrypt a message twice).
//! - Every enqueue goes through the persisted outbox with a fixed
//!   `messageId`, so retries — also after a crash — are stored once.
//! - The outbox goes out one entry per queue at a time, oldest first, so a
//!   recipient gets a Commit before its epoch's messages and each sender's
//!   messages in order, however the network reorders requests.
//! - One Commit per group at a time, merged only once the server has stored
//!   it (the first to reach the server wins its epoch): a Commit that lost
//!   is dropped and its change made again after catching up with the
//!   winner; messages and changes asked for meanwhile wait in the group's
//!   persisted queue, so nothing is encrypted for an epoch the group may
//!   never reach, and no member forks off.
//! - A fetched KeyPackage's credential identity and signature key both equal
//!   the identity asked for, and after every join and Commit each member's
//!   credential identity equals its signature key (DESIGN.md §7).
//! - Post-quantum groups (`pq`): every payload the group enqueues — Welcome,
//!   Commit, proposal, application message — leaves only inside a hybrid
//!   envelope sealed to the recipient's hybrid key, which was fetched and
//!   whose identity signature was verified; a payload on a pq group's
//!   channel that is not wrapped is refused. The own hybrid secret key is
//!   persisted before its public key is uploaded, and the last
//!   [`HYBRID_KEYS_KEPT`] keys are kept so envelopes sealed before a
//!   rotation still open.

pub mod envelope;
pub mod hybrid;
pub mod provider;
mod state;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use ed25519_dalek::{Signer as _, SigningKey};
use openmls::prelude::*;
use openmls_traits::OpenMlsProvider;
use openmls_traits::signatures::{Signer, SignerError};
use openmls_traits::types::SignatureScheme;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;
use sha2::{Digest, Sha256};
use tls_codec::Deserialize as _;

use crate::error::{ErrorKind, ServiceError};
use crate::node::{Gap, QueuedMessage, RequestBody, Response};
use crate::types::{ChannelId, IdentityKey, MessageId};

pub use envelope::{Envelope, EnvelopeError};
pub use hybrid::{HybridError, HybridPublicKey, HybridSecretKey};
pub use provider::QpqProvider;

use state::{Change, CommitRecord, EarlyMessage, GroupRecord, OutboxEntry, Persisted};

/// The MLS profile's ciphersuite (DESIGN.md §7): 0x0001.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// KeyPackage lifetime: at most 84 days (DESIGN.md §7).
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 84 * 24 * 60 * 60;
/// MLS exporter label of the key that seals a group's name in a Welcome.
pub const GROUP_NAME_EXPORTER_LABEL: &str = "quicproquo group name";
/// Messages asked for per fetch.
pub const FETCH_BATCH: u32 = 100;
/// Longest group name, in bytes.
pub const GROUP_NAME_BYTES_MAX: usize = 64;
/// Longest message text, in bytes; well inside the server's payload limit
/// after MLS framing.
pub const TEXT_BYTES_MAX: usize = 64 * 1024;
/// KeyPackages one `register` may generate at once.
pub const REGISTER_COUNT_MAX: u32 = 100;
/// Version of the persisted state layout. Versions 1 (before hybrid keys
/// and pq groups) and 2 (before the per-group queue of changes) still
/// restore.
pub const STATE_VERSION: u32 = 3;
/// Messages of a later epoch than its copy of the group that a member keeps
/// per group until the Commit that starts that epoch reaches it (a
/// Commit's copy to this member can be queued behind a message another
/// member made after processing its own copy); beyond it they are dropped
/// with a warning.
pub const EARLY_MESSAGES_MAX: usize = 256;
/// Payload bytes of such early messages kept per group: they are kept
/// before they can be authenticated, so whoever can put bytes in the queue
/// (the server) must not be able to grow the state file without bound.
pub const EARLY_BYTES_MAX: usize = 4 * 1024 * 1024;
/// How many epochs ahead of the member's copy of the group an early
/// message may be and still be kept; one further ahead is dropped with a
/// warning (no real Commit backlog gets that deep before it is read).
pub const EARLY_EPOCHS_AHEAD_MAX: u64 = 16;
/// Past epochs whose message keys a member keeps, so an application
/// message made before other members' Commits (sent concurrently with a
/// change, or from a device that was offline while the group changed)
/// still decrypts after them. RFC 9420 §14 leaves this to the application:
/// it trades a little forward secrecy for not losing such messages; one
/// that arrives more epochs late than this is reported as undecryptable.
pub const MAX_PAST_EPOCHS: usize = 16;
/// This user's hybrid secret keys kept: the current one and the three
/// before it. A rotation (`update` of all groups) publishes a new key; peers
/// refetch it after they process the rotating member's Commit, so only
/// envelopes sealed before that — queued, or in a peer's outbox — still use
/// an older key. Three rotations of slack covers a member who rotates again
/// before everyone has caught up, without keeping keys forever.
pub const HYBRID_KEYS_KEPT: usize = 4;
/// Verified peer hybrid public keys cached (one per identity this user
/// sends to in pq groups, 1,217 bytes each, so at most ~1.2 MB of state);
/// when full, the entry with the lowest identity is dropped and refetched
/// when needed.
pub const PEER_HYBRID_KEYS_MAX: usize = 1_000;

/// What the user asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Make sure at least `count` KeyPackages (and a last-resort one) are on
    /// the server.
    Register {
        /// Single-use KeyPackages to keep on the server.
        count: u32,
    },
    /// Create a group named `name` with only this user in it.
    CreateGroup {
        /// Its name, unique among this user's groups.
        name: String,
        /// Post-quantum: every member needs a hybrid key, and everything the
        /// group sends travels in hybrid envelopes.
        pq: bool,
    },
    /// Add `member` to the group `group`.
    AddMember {
        /// The group's name.
        group: String,
        /// The new member's identity key.
        member: IdentityKey,
    },
    /// Remove `member` from `group` (a Commit every member processes; the
    /// removed member learns it and stops).
    RemoveMember {
        /// The group's name.
        group: String,
        /// The member to remove.
        member: IdentityKey,
    },
    /// Leave `group`: propose removing oneself and forget the group. The
    /// remaining member with the lowest leaf index commits the proposal.
    Leave {
        /// The group's name.
        group: String,
    },
    /// Rotate this member's leaf keys (a self-update Commit) in `group`, or
    /// in every group when `None`; the latter also rotates (or creates) the
    /// hybrid key and uploads the new public key.
    Update {
        /// The group, or all.
        group: Option<String>,
    },
    /// Send `text` to every other member of `group`.
    Send {
        /// The group's name.
        group: String,
        /// The message.
        text: String,
    },
    /// Fetch and process everything pending; if nothing is, wait up to
    /// `wait_ms` for something to arrive.
    Receive {
        /// How long to wait when nothing is pending (0: don't wait).
        wait_ms: u64,
    },
    /// Wait up to `wait_ms` until a message is pending on any channel,
    /// without processing or persisting anything (a later `Receive` does
    /// that). Lets a long-running shell wait without holding the state.
    Wait {
        /// How long to wait.
        wait_ms: u64,
    },
}

/// What the machine asks the shell to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Write [`ClientMachine::snapshot`] to the state file now, before
    /// carrying out any later effect.
    Persist,
    /// Send `request` and pass its result to
    /// [`ClientMachine::handle_response`] with `token`.
    Request {
        /// Identifies the answer.
        token: u64,
        /// What to send.
        request: RequestBody,
    },
    /// Show this to the user.
    Event(Event),
    /// The command is finished.
    Done(Result<Outcome, CommandError>),
}

/// Something for the user to see.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message from a group member.
    Message {
        /// The group's name.
        group: String,
        /// Who sent it.
        sender: IdentityKey,
        /// What it says.
        text: String,
    },
    /// This user joined a group from a Welcome.
    Joined {
        /// The group's name.
        group: String,
        /// Members now in the group.
        members: usize,
    },
    /// Another member removed this user from a group; it is forgotten.
    Removed {
        /// The group's name.
        group: String,
    },
    /// A Commit changed a group.
    GroupChanged {
        /// The group's name.
        group: String,
        /// The new epoch.
        epoch: u64,
        /// Members now in the group.
        members: usize,
    },
    /// The server returned a KeyPackage fingerprint that differs from ours.
    Tampering {
        /// What was tampered with.
        what: String,
    },
    /// Something went wrong that did not stop the command.
    Warning {
        /// What.
        message: String,
    },
}

/// A finished command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// KeyPackages uploaded.
    Registered {
        /// Uploaded and confirmed by fingerprint.
        uploaded: u32,
        /// Already on the server before this call.
        already: u32,
        /// Refused or tampered with.
        failed: u32,
    },
    /// The group exists, with this user alone in it.
    GroupCreated {
        /// Its name.
        group: String,
    },
    /// The member is in the group.
    MemberAdded {
        /// The group.
        group: String,
        /// The new member.
        member: IdentityKey,
        /// Deliveries still in the outbox (retried by the next command).
        undelivered: u32,
    },
    /// The member is removed.
    MemberRemoved {
        /// The group.
        group: String,
        /// The removed member.
        member: IdentityKey,
        /// Deliveries still in the outbox (retried by the next command).
        undelivered: u32,
    },
    /// This user left the group.
    Left {
        /// The group.
        group: String,
    },
    /// Keys rotated.
    Updated {
        /// The groups whose epoch advanced.
        groups: Vec<String>,
        /// Deliveries still in the outbox (retried by the next command).
        undelivered: u32,
    },
    /// The message is on its way.
    Sent {
        /// The group.
        group: String,
        /// Recipients it was stored for.
        delivered: u32,
        /// Deliveries still in the outbox (retried by the next command).
        undelivered: u32,
    },
    /// Messages processed.
    Received {
        /// Application messages shown.
        messages: u32,
    },
    /// The wait ended.
    Waited {
        /// True if a message is pending on some channel.
        pending: bool,
    },
}

/// Why a command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// Another command is still running.
    #[error("another command is still running")]
    Busy,
    /// No group has that name.
    #[error("no group named `{0}`")]
    UnknownGroup(String),
    /// A group with that name exists already.
    #[error("a group named `{0}` exists already")]
    GroupExists(String),
    /// The name is empty, too long or not printable.
    #[error("invalid group name: {0}")]
    InvalidName(String),
    /// The text is too long.
    #[error("message of {0} bytes is longer than {TEXT_BYTES_MAX}")]
    TextTooLong(usize),
    /// The identity is already in the group (or is this user).
    #[error("{0} is already a member of the group")]
    AlreadyMember(String),
    /// The identity is not in the group.
    #[error("{0} is not a member of the group")]
    NotMember(String),
    /// The server has no KeyPackage for that identity.
    #[error("{0} has no KeyPackage on the server; they need to run `qpq register`")]
    NoKeyPackage(String),
    /// The fetched KeyPackage is invalid or not theirs.
    #[error("the KeyPackage the server returned is not acceptable: {0}")]
    BadKeyPackage(String),
    /// The member has no hybrid key on the server, which a pq group needs.
    #[error(
        "{0} has no hybrid (post-quantum) key on the server, which a pq group needs; they need to run `qpq register` with a current qpq"
    )]
    NoHybridKey(String),
    /// The hybrid key the server returned is not signed by its identity.
    #[error("the hybrid key the server returned for {0} is not signed by them: {1}")]
    BadHybridKey(String, HybridError),
    /// A pq group needs this user's own hybrid key first.
    #[error("a pq group needs your hybrid key on the server: run `qpq register` first")]
    NoOwnHybridKey,
    /// A hybrid envelope does not open, or a pq group's message came without
    /// one.
    #[error("hybrid envelope refused: {0}")]
    HybridEnvelope(String),
    /// An MLS operation failed.
    #[error("MLS: {0}")]
    Mls(String),
    /// The server refused a request the command needs.
    #[error("server: {0}")]
    Server(ServiceError),
    /// The persisted state does not decode.
    #[error("state: {0}")]
    State(String),
}

/// Where the user is in the life cycle (DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// An identity exists; nothing uploaded yet.
    IdentityGenerated,
    /// KeyPackages are on the server; no group yet.
    Registered,
    /// This user created a group (epoch 0 at creation).
    GroupOwner,
    /// This user joined a group from a Welcome.
    GroupMember,
    /// Messages have been exchanged.
    Active,
}

/// A group as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// Its name.
    pub name: String,
    /// The channel it talks on.
    pub channel_id: ChannelId,
    /// The current epoch.
    pub epoch: u64,
    /// Every member, this user included.
    pub members: Vec<IdentityKey>,
    /// Post-quantum: everything travels in hybrid envelopes.
    pub pq: bool,
    /// Changes and messages this user asked for that the server has not
    /// taken yet: a Commit awaiting acceptance and what queues behind it.
    pub waiting: usize,
}

/// What an in-flight request was for.
#[derive(Debug, Clone)]
enum Pending {
    Outbox(u64),
    /// One `enqueueBatch` carrying these entries (same channel, message id
    /// and payload; one per recipient).
    OutboxBatch(Vec<u64>),
    Count,
    Upload {
        fingerprint: [u8; 32],
    },
    UploadHybridKey,
    /// A recipient's hybrid key, for outbox entries waiting to be sealed.
    HybridKey(IdentityKey),
    /// The hybrid key of the member being added to a pq group.
    HybridKeyForAdd,
    FetchKeyPackage,
    Fetch(ChannelId),
    /// A `fetchWaitChannels` of a receive that found nothing pending.
    Wait,
    /// A `fetchWaitChannels` of `Command::Wait`: only whether anything came.
    Peek,
}

#[derive(Debug)]
enum Op {
    Register {
        want: u32,
        uploaded: u32,
        already: u32,
        failed: u32,
    },
    AddMember {
        group: String,
        member: IdentityKey,
        added: bool,
    },
    Send {
        group: String,
        delivered: u32,
    },
    /// A Commit (or, for a leave, a proposal) this user made: its
    /// deliveries are in flight; the outcome is ready.
    Committed {
        outcome: Outcome,
    },
    Receive {
        wait_ms: u64,
        waited: bool,
        shown: u32,
    },
    Wait {
        pending: bool,
    },
}

/// The client machine.
#[derive(Debug)]
pub struct ClientMachine {
    signer: IdentitySigner,
    identity: IdentityKey,
    provider: QpqProvider,
    registered: bool,
    active: bool,
    /// Own hybrid secret keys, oldest first; the last one is current.
    hybrid_keys: Vec<HybridSecretKey>,
    /// Verified hybrid public keys of peers, by identity.
    peer_hybrid_keys: BTreeMap<IdentityKey, HybridPublicKey>,
    groups: Vec<GroupRecord>,
    cursors: BTreeMap<ChannelId, u64>,
    outbox: BTreeMap<u64, OutboxEntry>,
    next_outbox_id: u64,
    op: Option<Op>,
    in_flight: BTreeMap<u64, Pending>,
    /// Outbox entries to send one by one, not in an `enqueueBatch` (a
    /// batch with them was refused for one member's full queue). Not
    /// persisted: a new process tries the batch again first.
    solo: BTreeSet<u64>,
    /// Message ids of this run's Commits the server accepted, whose other
    /// copies may still be in the outbox. Not persisted: it only decides
    /// whether a late refusal of such a copy is worth a warning.
    accepted_commits: BTreeSet<[u8; 16]>,
    /// Channels whose processing stopped at a message of a later epoch than
    /// a group with a pending Commit of ours is at: that Commit was
    /// accepted (others are past it) but its answer has not come back. The
    /// channel is fetched again once the Commit is settled. Not persisted:
    /// a new run finds the same message again.
    blocked: BTreeSet<ChannelId>,
    /// Set by the message being processed when it is of a later epoch than
    /// its group: it is kept (`GroupRecord::early`) instead.
    early_epoch: Option<u64>,
    next_token: u64,
    effects: VecDeque<Effect>,
}

impl ClientMachine {
    /// A new identity. `seed` seeds every random choice the machine makes
    /// (identity key, KeyPackage keys, ids): OS entropy in production.
    pub fn generate(seed: [u8; 32]) -> ClientMachine {
        let provider = QpqProvider::new(seed);
        let mut identity_seed = [0u8; 32];
        provider.fill(&mut identity_seed);
        Self::with(provider, identity_seed)
    }

    /// Restores a machine from [`Self::snapshot`] bytes; `seed` reseeds its
    /// randomness for this run.
    pub fn restore(snapshot: &[u8], seed: [u8; 32]) -> Result<ClientMachine, CommandError> {
        let p = Persisted::decode(snapshot)?;
        let provider = QpqProvider::new(seed);
        provider.restore_storage(p.mls_storage);
        let mut m = Self::with(provider, p.identity_seed);
        m.registered = p.registered;
        m.active = p.active;
        for secret in p.hybrid_keys {
            let key = HybridSecretKey::from_bytes(&secret)
                .map_err(|e| CommandError::State(format!("hybrid secret key: {e}")))?;
            m.hybrid_keys.push(key);
        }
        for (identity, public) in p.peer_hybrid_keys {
            // A cached key that no longer parses is refetched when needed.
            if let Ok(key) = HybridPublicKey::from_bytes(&public) {
                m.peer_hybrid_keys.insert(IdentityKey(identity), key);
            }
        }
        m.groups = p.groups;
        for (ch, seq) in p.cursors {
            let ch = ChannelId::try_from_slice(&ch)
                .map_err(|_| CommandError::State("bad channel id".into()))?;
            m.cursors.insert(ch, seq);
        }
        m.outbox = p.outbox.into_iter().collect();
        m.next_outbox_id = p.next_outbox_id;
        Ok(m)
    }

    fn with(provider: QpqProvider, identity_seed: [u8; 32]) -> ClientMachine {
        let key = SigningKey::from_bytes(&identity_seed);
        ClientMachine {
            identity: IdentityKey(key.verifying_key().to_bytes()),
            signer: IdentitySigner(key),
            provider,
            registered: false,
            active: false,
            hybrid_keys: Vec::new(),
            peer_hybrid_keys: BTreeMap::new(),
            groups: Vec::new(),
            cursors: BTreeMap::new(),
            outbox: BTreeMap::new(),
            next_outbox_id: 0,
            op: None,
            in_flight: BTreeMap::new(),
            solo: BTreeSet::new(),
            accepted_commits: BTreeSet::new(),
            blocked: BTreeSet::new(),
            early_epoch: None,
            next_token: 0,
            effects: VecDeque::new(),
        }
    }

    /// Everything to persist, as bytes for the encrypted state file.
    pub fn snapshot(&self) -> Vec<u8> {
        let p = Persisted {
            version: STATE_VERSION,
            identity_seed: self.signer.0.to_bytes(),
            registered: self.registered,
            active: self.active,
            groups: self.groups.clone(),
            cursors: self
                .cursors
                .iter()
                .map(|(c, s)| (c.as_bytes().to_vec(), *s))
                .collect(),
            outbox: self.outbox.iter().map(|(k, v)| (*k, v.clone())).collect(),
            next_outbox_id: self.next_outbox_id,
            mls_storage: self.provider.storage_snapshot(),
            hybrid_keys: self
                .hybrid_keys
                .iter()
                .map(|k| k.to_bytes().to_vec())
                .collect(),
            peer_hybrid_keys: self
                .peer_hybrid_keys
                .iter()
                .map(|(id, k)| (id.0, k.to_bytes()))
                .collect(),
        };
        p.encode()
    }

    /// This user's current hybrid public key, if it has one.
    pub fn hybrid_public_key(&self) -> Option<&HybridPublicKey> {
        self.hybrid_keys.last().map(HybridSecretKey::public)
    }

    /// Ids of the hybrid secret keys kept (oldest first; the last is
    /// current).
    pub fn hybrid_key_ids(&self) -> Vec<[u8; hybrid::KEY_ID_BYTES]> {
        self.hybrid_keys
            .iter()
            .map(|k| k.public().key_id())
            .collect()
    }

    /// Opens a payload sealed to one of this user's kept hybrid keys and
    /// returns the payload it wraps; for tests and diagnostics.
    pub fn open_hybrid_payload(&self, payload: &[u8]) -> Result<Vec<u8>, CommandError> {
        match Envelope::decode(payload) {
            Ok(Envelope::Hybrid { key_id, sealed, .. }) => self.open_hybrid(&key_id, &sealed),
            Ok(_) => Err(CommandError::HybridEnvelope("not a hybrid payload".into())),
            Err(e) => Err(CommandError::HybridEnvelope(e.to_string())),
        }
    }

    /// This user's identity key.
    pub fn identity_key(&self) -> IdentityKey {
        self.identity
    }

    /// The Ed25519 key that proves the identity (to the server and in MLS).
    pub fn signing_key(&self) -> &SigningKey {
        &self.signer.0
    }

    /// Where the user is in the life cycle.
    pub fn phase(&self) -> Phase {
        if self.active {
            Phase::Active
        } else if self.groups.iter().any(|g| g.owner) {
            Phase::GroupOwner
        } else if !self.groups.is_empty() {
            Phase::GroupMember
        } else if self.registered {
            Phase::Registered
        } else {
            Phase::IdentityGenerated
        }
    }

    /// Deliveries waiting in the outbox.
    pub fn outbox_len(&self) -> usize {
        self.outbox.len()
    }

    /// This user's groups.
    pub fn groups(&self) -> Vec<GroupSummary> {
        self.groups
            .iter()
            .filter_map(|r| {
                let group = self.load_group(r).ok()?;
                Some(GroupSummary {
                    name: r.name.clone(),
                    channel_id: ChannelId::try_from_slice(&r.channel_id).ok()?,
                    epoch: group.epoch().as_u64(),
                    members: members(&group),
                    pq: r.pq,
                    waiting: r.queue.len() + usize::from(r.commit.is_some()),
                })
            })
            .collect()
    }

    /// The MLS epoch authenticator of a group (equal for all members of the
    /// same epoch); for tests and diagnostics.
    pub fn epoch_authenticator(&self, group: &str) -> Option<Vec<u8>> {
        let r = self.groups.iter().find(|g| g.name == group)?;
        let g = self.load_group(r).ok()?;
        Some(g.epoch_authenticator().as_slice().to_vec())
    }

    /// Starts a command. Its effects follow from [`Self::poll_effect`]; the
    /// last one is [`Effect::Done`].
    pub fn start(&mut self, command: Command) {
        if self.op.is_some() {
            self.effects
                .push_back(Effect::Done(Err(CommandError::Busy)));
            return;
        }
        // Requests an earlier command left in flight (deliveries that kept
        // going after it failed) are no longer awaited: a shell stops at
        // `Done`. Forget them, or their outbox entries would never be sent
        // again and this command would wait for them forever; a late answer
        // is ignored, and a resent entry keeps its messageId (stored once).
        self.in_flight.clear();
        self.blocked.clear();
        // Deliveries left over from an earlier run go first (a wait touches
        // no state, so it sends nothing).
        if !matches!(command, Command::Wait { .. }) {
            self.flush_outbox();
            self.resume();
        }
        let result = match command {
            Command::Register { count } => self.start_register(count),
            Command::CreateGroup { name, pq } => self.create_group(name, pq),
            Command::AddMember { group, member } => self.start_add(group, member),
            Command::Send { group, text } => self.start_send(group, text),
            Command::RemoveMember { group, member } => self.remove_member(group, member),
            Command::Leave { group } => self.leave(group),
            Command::Update { group } => self.update(group),
            Command::Receive { wait_ms } => self.start_receive(wait_ms),
            Command::Wait { wait_ms } => {
                self.op = Some(Op::Wait { pending: false });
                self.wait_all(wait_ms, Pending::Peek, 1);
                Ok(())
            }
        };
        if let Err(e) = result {
            self.op = None;
            self.in_flight.clear();
            self.effects.push_back(Effect::Done(Err(e)));
            return;
        }
        self.maybe_done();
    }

    /// The answer to the request `token`. Transport failures come in as
    /// `unavailable`. Answers to requests the machine no longer waits for
    /// are ignored.
    pub fn handle_response(&mut self, token: u64, result: Result<Response, ServiceError>) {
        let Some(pending) = self.in_flight.remove(&token) else {
            return;
        };
        match pending {
            Pending::Outbox(id) => self.on_enqueued(id, result),
            Pending::OutboxBatch(ids) => self.on_enqueued_batch(ids, result),
            Pending::Count => self.on_count(result),
            Pending::Upload { fingerprint } => self.on_uploaded(fingerprint, result),
            Pending::UploadHybridKey => self.on_hybrid_key_uploaded(result),
            Pending::HybridKey(member) => self.on_hybrid_key(member, result),
            Pending::HybridKeyForAdd => self.on_hybrid_key_for_add(result),
            Pending::FetchKeyPackage => self.on_key_package(result),
            Pending::Fetch(ch) => self.on_messages(ch, result, false),
            Pending::Wait => self.on_channels(result),
            Pending::Peek => {
                if matches!(&result, Ok(Response::ChannelMessages { channels }) if !channels.is_empty())
                {
                    self.op = Some(Op::Wait { pending: true });
                    self.in_flight.retain(|_, p| !matches!(p, Pending::Peek));
                }
            }
        }
        self.maybe_done();
    }

    /// The next effect, or `None`.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    // ----- register ---------------------------------------------------------

    fn start_register(&mut self, count: u32) -> Result<(), CommandError> {
        self.op = Some(Op::Register {
            want: count.min(REGISTER_COUNT_MAX),
            uploaded: 0,
            already: 0,
            failed: 0,
        });
        self.request(
            Pending::Count,
            RequestBody::KeyPackageCount {
                identity_key: self.identity,
            },
        );
        self.publish_hybrid_key(false);
        Ok(())
    }

    /// Makes sure this user has a hybrid key — a new one when `rotate`,
    /// keeping the last [`HYBRID_KEYS_KEPT`] — persists it, and uploads its
    /// public key signed by the identity key. The AS keeps one key per
    /// identity, so the upload replaces the previous one.
    fn publish_hybrid_key(&mut self, rotate: bool) {
        if rotate || self.hybrid_keys.is_empty() {
            let key = HybridSecretKey::generate(&mut self.rng());
            self.hybrid_keys.push(key);
            let excess = self.hybrid_keys.len().saturating_sub(HYBRID_KEYS_KEPT);
            self.hybrid_keys.drain(..excess);
            // The secret key is in the state before its public key is out.
            self.effects.push_back(Effect::Persist);
        }
        let Some(secret) = self.hybrid_keys.last() else {
            return;
        };
        let public = secret.public();
        let body = RequestBody::UploadHybridKey {
            identity_key: self.identity,
            hybrid_key: public.to_bytes(),
            signature: hybrid::sign_public_key(&self.signer.0, public),
        };
        self.request(Pending::UploadHybridKey, body);
    }

    fn on_hybrid_key_uploaded(&mut self, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::HybridKeyUploaded) => {}
            Ok(other) => self.warn(format!(
                "unexpected answer to a hybrid key upload: {other:?}"
            )),
            Err(e) => self.warn(format!(
                "hybrid key upload refused: {e}; run `qpq register` again"
            )),
        }
    }

    fn on_count(&mut self, result: Result<Response, ServiceError>) {
        let (count, has_last_resort) = match result {
            Ok(Response::KeyPackageCount {
                count,
                has_last_resort,
            }) => (count, has_last_resort),
            Ok(other) => return self.fail(unexpected(&other)),
            Err(e) => return self.fail(CommandError::Server(e)),
        };
        let Some(Op::Register { want, already, .. }) = &mut self.op else {
            return;
        };
        *already = count;
        let missing = want.saturating_sub(count);
        let mut uploads = Vec::new();
        for i in 0..missing + u32::from(!has_last_resort) {
            let last_resort = i == missing;
            match self.key_package(last_resort) {
                Ok(bytes) => uploads.push((bytes, last_resort)),
                Err(e) => return self.fail(e),
            }
        }
        if uploads.is_empty() {
            self.registered = true;
            return;
        }
        // The private keys are in storage now: persist before uploading.
        self.effects.push_back(Effect::Persist);
        for (package, last_resort) in uploads {
            let fingerprint: [u8; 32] = Sha256::digest(&package).into();
            self.request(
                Pending::Upload { fingerprint },
                RequestBody::UploadKeyPackage {
                    identity_key: self.identity,
                    package,
                    last_resort,
                },
            );
        }
    }

    fn on_uploaded(&mut self, fingerprint: [u8; 32], result: Result<Response, ServiceError>) {
        let ok = match result {
            Ok(Response::KeyPackageUploaded {
                fingerprint: theirs,
            }) if theirs == fingerprint => true,
            Ok(Response::KeyPackageUploaded { .. }) => {
                self.effects.push_back(Effect::Event(Event::Tampering {
                    what: "the server's fingerprint of an uploaded KeyPackage differs from ours; it is not counted as uploaded".into(),
                }));
                false
            }
            Ok(other) => {
                self.warn(format!("unexpected answer to an upload: {other:?}"));
                false
            }
            Err(e) => {
                self.warn(format!("KeyPackage upload refused: {e}"));
                false
            }
        };
        if let Some(Op::Register {
            uploaded, failed, ..
        }) = &mut self.op
        {
            if ok {
                *uploaded += 1;
                self.registered = true;
            } else {
                *failed += 1;
            }
        }
    }

    fn key_package(&mut self, last_resort: bool) -> Result<Vec<u8>, CommandError> {
        let mut builder = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(KEY_PACKAGE_LIFETIME_SECS))
            .leaf_node_capabilities(capabilities());
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(CIPHERSUITE, &self.provider, &self.signer, self.credential())
            .map_err(mls)?;
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .map_err(mls)
    }

    // ----- groups -----------------------------------------------------------

    fn create_group(&mut self, name: String, pq: bool) -> Result<(), CommandError> {
        check_name(&name)?;
        if self.groups.iter().any(|g| g.name == name) {
            return Err(CommandError::GroupExists(name));
        }
        // Members seal to each other's hybrid keys, this user's included.
        if pq && self.hybrid_keys.is_empty() {
            return Err(CommandError::NoOwnHybridKey);
        }
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .capabilities(capabilities())
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let group =
            MlsGroup::new(&self.provider, &self.signer, &config, self.credential()).map_err(mls)?;
        let mut channel = [0u8; 16];
        self.provider.fill(&mut channel);
        self.groups.push(GroupRecord {
            name: name.clone(),
            group_id: group.group_id().as_slice().to_vec(),
            channel_id: channel.to_vec(),
            owner: true,
            pq,
            queue: Vec::new(),
            commit: None,
            behind: 0,
            early: Vec::new(),
        });
        self.effects.push_back(Effect::Persist);
        self.effects
            .push_back(Effect::Done(Ok(Outcome::GroupCreated { group: name })));
        Ok(())
    }

    fn start_add(&mut self, group: String, member: IdentityKey) -> Result<(), CommandError> {
        let record = self.record(&group)?;
        let g = self.load_group(&record)?;
        if members(&g).contains(&member) {
            return Err(CommandError::AlreadyMember(member.short()));
        }
        // Asked before (an interrupted `group add`): that add is on its way
        // already, with a KeyPackage fetched for it.
        let adding = |c: &Change| matches!(c, Change::Add { member: m, .. } if *m == member.0);
        if record.queue.iter().any(adding)
            || record.commit.as_ref().is_some_and(|c| adding(&c.change))
        {
            self.op = Some(Op::AddMember {
                group,
                member,
                added: true,
            });
            return Ok(());
        }
        self.op = Some(Op::AddMember {
            group,
            member,
            added: false,
        });
        if record.pq {
            // The hybrid key first: refusing a member without one must not
            // use up one of their single-use KeyPackages. Always fetched
            // anew (not from the cache), so the Welcome goes to their
            // current key.
            self.request(
                Pending::HybridKeyForAdd,
                RequestBody::FetchHybridKey {
                    identity_key: member,
                },
            );
        } else {
            self.request_key_package(member);
        }
        Ok(())
    }

    fn request_key_package(&mut self, member: IdentityKey) {
        self.request(
            Pending::FetchKeyPackage,
            RequestBody::FetchKeyPackage {
                identity_key: member,
            },
        );
    }

    fn on_hybrid_key_for_add(&mut self, result: Result<Response, ServiceError>) {
        let Some(Op::AddMember { member, .. }) = &self.op else {
            return;
        };
        let member = *member;
        match self.accept_hybrid_key(member, result) {
            Ok(()) => self.request_key_package(member),
            Err(e) => self.fail(e),
        }
    }

    /// A fetched hybrid key for outbox entries waiting to be sealed to it.
    fn on_hybrid_key(&mut self, member: IdentityKey, result: Result<Response, ServiceError>) {
        match self.accept_hybrid_key(member, result) {
            Ok(()) => self.flush_outbox(),
            Err(CommandError::NoHybridKey(who)) => {
                // Retrying cannot help: drop them and say so, as for an
                // enqueue the server refuses for good.
                let before = self.outbox.len();
                self.outbox
                    .retain(|_, e| !(e.seal && e.recipient == member.0));
                self.effects.push_back(Effect::Persist);
                self.warn(format!(
                    "{} message(s) for {who} in a pq group were dropped: they have no hybrid key",
                    before - self.outbox.len()
                ));
            }
            Err(e @ CommandError::BadHybridKey(..)) => {
                // The server lies about their key: nothing is sealed to it;
                // the messages stay in the outbox for a later attempt.
                self.effects.push_back(Effect::Event(Event::Tampering {
                    what: format!("{e}; messages to them stay in the outbox"),
                }));
            }
            Err(e) => self.warn(format!("delivery deferred, will retry: {e}")),
        }
    }

    /// Checks a `fetchHybridKey` answer for `member`: their identity must
    /// have signed the key. Caches it when it is good.
    fn accept_hybrid_key(
        &mut self,
        member: IdentityKey,
        result: Result<Response, ServiceError>,
    ) -> Result<(), CommandError> {
        let (blob, signature) = match result {
            Ok(Response::HybridKey {
                hybrid_key,
                signature,
            }) => (hybrid_key, signature),
            Ok(other) => return Err(unexpected(&other)),
            Err(e) if e.kind == ErrorKind::NotFound => {
                return Err(CommandError::NoHybridKey(member.short()));
            }
            Err(e) => return Err(CommandError::Server(e)),
        };
        let key = hybrid::verify_public_key(&member, &blob, &signature)
            .map_err(|e| CommandError::BadHybridKey(member.short(), e))?;
        if self.peer_hybrid_keys.len() >= PEER_HYBRID_KEYS_MAX
            && !self.peer_hybrid_keys.contains_key(&member)
        {
            self.peer_hybrid_keys.pop_first();
        }
        self.peer_hybrid_keys.insert(member, key);
        Ok(())
    }

    fn on_key_package(&mut self, result: Result<Response, ServiceError>) {
        let Some(Op::AddMember { group, member, .. }) = &self.op else {
            return;
        };
        let (group, member) = (group.clone(), *member);
        let package = match result {
            Ok(Response::KeyPackage { package, .. }) => package,
            Ok(other) => return self.fail(unexpected(&other)),
            Err(e) if e.kind == ErrorKind::NotFound => {
                return self.fail(CommandError::NoKeyPackage(member.short()));
            }
            Err(e) => return self.fail(CommandError::Server(e)),
        };
        match self.add_member(&group, member, &package) {
            Ok(()) => {
                if let Some(Op::AddMember { added, .. }) = &mut self.op {
                    *added = true;
                }
            }
            Err(e) => self.fail(e),
        }
    }

    /// Queues the add of `member` with their fetched KeyPackage (checked
    /// now, so a bad one fails the command).
    fn add_member(
        &mut self,
        group_name: &str,
        member: IdentityKey,
        package: &[u8],
    ) -> Result<(), CommandError> {
        self.validate_key_package(member, package)?;
        self.queue_change(
            group_name,
            Change::Add {
                member: member.0,
                key_package: package.to_vec(),
            },
        )
    }

    /// Parses and validates a fetched KeyPackage, and checks that it is
    /// really `member`'s: its credential identity and its signature key must
    /// both be the identity asked for, or the server substituted a key.
    fn validate_key_package(
        &self,
        member: IdentityKey,
        package: &[u8],
    ) -> Result<KeyPackage, CommandError> {
        let bad = |m: String| CommandError::BadKeyPackage(m);
        let key_package_in = match MlsMessageIn::tls_deserialize_exact(package) {
            Ok(msg) => match msg.extract() {
                MlsMessageBodyIn::KeyPackage(kp) => kp,
                _ => return Err(bad("not a KeyPackage message".into())),
            },
            // A bare KeyPackage (no MLSMessage framing) is accepted too.
            Err(_) => KeyPackageIn::tls_deserialize_exact(package)
                .map_err(|e| bad(format!("does not decode: {e}")))?,
        };
        let kp = key_package_in
            .validate(self.provider.crypto(), ProtocolVersion::Mls10)
            .map_err(|e| bad(e.to_string()))?;
        if kp.ciphersuite() != CIPHERSUITE {
            return Err(bad("unsupported ciphersuite".into()));
        }
        let credential = BasicCredential::try_from(kp.leaf_node().credential().clone())
            .map_err(|e| bad(e.to_string()))?;
        if credential.identity() != member.as_bytes()
            || kp.leaf_node().signature_key().as_slice() != member.as_bytes()
        {
            return Err(bad(
                "its credential or signature key is not the identity asked for".into(),
            ));
        }
        Ok(kp)
    }

    // ----- lifecycle --------------------------------------------------------

    fn remove_member(&mut self, name: String, member: IdentityKey) -> Result<(), CommandError> {
        if member == self.identity {
            return Err(CommandError::NotMember(
                "you (use `group leave` to leave a group)".into(),
            ));
        }
        let record = self.record(&name)?;
        let group = self.load_group(&record)?;
        if !members(&group).contains(&member) {
            return Err(CommandError::NotMember(member.short()));
        }
        self.queue_change(&name, Change::Remove { member: member.0 })?;
        self.op = Some(Op::Committed {
            outcome: Outcome::MemberRemoved {
                group: name,
                member,
                undelivered: 0,
            },
        });
        Ok(())
    }

    fn leave(&mut self, name: String) -> Result<(), CommandError> {
        self.queue_change(&name, Change::Leave)?;
        self.op = Some(Op::Committed {
            outcome: Outcome::Left { group: name },
        });
        Ok(())
    }

    fn update(&mut self, only: Option<String>) -> Result<(), CommandError> {
        let all = only.is_none();
        let names: Vec<String> = match only {
            Some(name) => vec![self.record(&name)?.name],
            None => self.groups.iter().map(|g| g.name.clone()).collect(),
        };
        for name in &names {
            self.queue_change(name, Change::Update)?;
        }
        if all {
            // Every group gets a Commit from this user, on which each peer
            // drops its cached copy of this user's hybrid key.
            self.publish_hybrid_key(true);
        }
        self.op = Some(Op::Committed {
            outcome: Outcome::Updated {
                groups: names,
                undelivered: 0,
            },
        });
        Ok(())
    }

    /// Every member of `group` but this user.
    fn others(&self, group: &MlsGroup) -> Vec<IdentityKey> {
        members(group)
            .into_iter()
            .filter(|m| *m != self.identity)
            .collect()
    }

    /// Puts one MLS message for the group's channel in the outbox for each
    /// recipient, under one message id, which it returns.
    fn send_group_message(
        &mut self,
        record: &GroupRecord,
        recipients: &[IdentityKey],
        message: MlsMessageOut,
    ) -> Result<[u8; 16], CommandError> {
        let channel = ChannelId::try_from_slice(&record.channel_id)
            .map_err(|_| CommandError::State("bad channel id".into()))?;
        let payload = Envelope::Group {
            message: message.to_bytes().map_err(mls)?,
        }
        .encode();
        Ok(self.add_group_to_outbox(recipients, channel, payload, record.pq))
    }

    // ----- send -------------------------------------------------------------

    fn start_send(&mut self, group_name: String, text: String) -> Result<(), CommandError> {
        if text.len() > TEXT_BYTES_MAX {
            return Err(CommandError::TextTooLong(text.len()));
        }
        self.active = true;
        self.op = Some(Op::Send {
            group: group_name.clone(),
            delivered: 0,
        });
        self.queue_change(&group_name, Change::Text(text))
    }

    // ----- the queue of changes ---------------------------------------------

    /// Queues `change` for the group, persisted, then makes what can be made
    /// now and sends it. A change waits behind the group's Commit that the
    /// server has not accepted yet (MLS allows one pending Commit, and a
    /// message or change made on top of it would be made in an epoch the
    /// group may never reach).
    fn queue_change(&mut self, group_name: &str, change: Change) -> Result<(), CommandError> {
        let record = self.record(group_name)?;
        if let Some(g) = self.groups.iter_mut().find(|g| g.name == group_name) {
            g.queue.push(change);
        }
        self.effects.push_back(Effect::Persist);
        self.advance(&record.group_id);
        self.flush_outbox();
        Ok(())
    }

    /// What the start of a command picks up from an earlier run: queued
    /// changes are made, and a group still behind the epoch its lost Commit
    /// met is fetched first.
    fn resume(&mut self) {
        let groups: Vec<(Vec<u8>, bool, Vec<u8>)> = self
            .groups
            .iter()
            .filter(|g| g.commit.is_none() && !g.queue.is_empty())
            .map(|g| (g.group_id.clone(), g.behind > 0, g.channel_id.clone()))
            .collect();
        for (group_id, behind, channel) in groups {
            match ChannelId::try_from_slice(&channel) {
                Ok(ch) if behind => self.fetch(ch),
                _ => self.advance(&group_id),
            }
        }
        self.flush_outbox();
    }

    /// Makes the group's queued changes in order, until one is a Commit (it
    /// waits for the server's acceptance) or the queue is empty. Nothing is
    /// made while the group is behind the epoch a lost Commit met: those
    /// changes would lose again.
    fn advance(&mut self, group_id: &[u8]) {
        loop {
            let Some(record) = self
                .groups
                .iter()
                .find(|g| g.group_id == group_id)
                .map(GroupRecord::head)
            else {
                return;
            };
            if record.commit.is_some() || record.queue.is_empty() {
                return;
            }
            let mut group = match self.load_group(&record) {
                Ok(g) => g,
                Err(e) => return self.warn(format!("group {}: {e}", record.name)),
            };
            if group.epoch().as_u64() < record.behind {
                return;
            }
            if let Some(g) = self.group_mut(group_id) {
                g.queue.remove(0);
                g.behind = 0;
            }
            let change = record.queue[0].clone();
            if let Err(e) = self.make(&record, &mut group, change) {
                self.warn(format!(
                    "a change to group {} could not be made and was dropped: {e}",
                    record.name
                ));
            }
            self.effects.push_back(Effect::Persist);
        }
    }

    /// Makes one change: an application message goes to the outbox; a
    /// Commit goes to the outbox and stays pending (openmls) until the
    /// server accepts it; a leave sends its proposal and forgets the group.
    fn make(
        &mut self,
        record: &GroupRecord,
        group: &mut MlsGroup,
        change: Change,
    ) -> Result<(), CommandError> {
        let recipients = self.others(group);
        let index_of = |group: &MlsGroup, who: &[u8; 32]| {
            group
                .members()
                .find(|m| m.signature_key == who.as_slice())
                .map(|m| m.index)
        };
        let (commit, welcome) = match &change {
            Change::Text(text) => {
                let message = group
                    .create_message(&self.provider, &self.signer, text.as_bytes())
                    .map_err(mls)?;
                self.send_group_message(record, &recipients, message)?;
                return Ok(());
            }
            Change::Leave => {
                let proposal = group
                    .leave_group(&self.provider, &self.signer)
                    .map_err(mls)?;
                self.send_group_message(record, &recipients, proposal)?;
                self.forget(&record.group_id);
                return Ok(());
            }
            Change::Add {
                member,
                key_package,
            } => {
                let member = IdentityKey(*member);
                if recipients.contains(&member) {
                    self.warn(format!(
                        "{} was added to group {} by another member meanwhile",
                        member.short(),
                        record.name
                    ));
                    return Ok(());
                }
                let key_package = self.validate_key_package(member, key_package)?;
                let (commit, welcome, _) = group
                    .add_members(&self.provider, &self.signer, &[key_package])
                    .map_err(mls)?;
                (commit, Some((member.0, welcome.to_bytes().map_err(mls)?)))
            }
            Change::Remove { member } => {
                // Removed by another member meanwhile: nothing to do. The
                // removed member gets the Commit too, so they learn of it.
                let Some(index) = index_of(group, member) else {
                    return Ok(());
                };
                let (commit, _, _) = group
                    .remove_members(&self.provider, &self.signer, &[index])
                    .map_err(mls)?;
                (commit, None)
            }
            Change::Update => {
                let (commit, _, _) = group
                    .self_update(&self.provider, &self.signer, LeafNodeParameters::default())
                    .map_err(mls)?
                    .into_contents();
                (commit, None)
            }
            Change::CommitLeave { leaver } => {
                let Some(index) = index_of(group, leaver) else {
                    return Ok(());
                };
                let recipients: Vec<IdentityKey> =
                    recipients.into_iter().filter(|m| m.0 != *leaver).collect();
                // Their proposal, while it is in this epoch; once a Commit
                // has moved the group on, a removal by value.
                let (commit, _, _) = if group.pending_proposals().next().is_some() {
                    group
                        .commit_to_pending_proposals(&self.provider, &self.signer)
                        .map_err(mls)?
                } else {
                    group
                        .remove_members(&self.provider, &self.signer, &[index])
                        .map_err(mls)?
                };
                self.commit(record, &recipients, commit, change, None)?;
                return Ok(());
            }
        };
        self.commit(record, &recipients, commit, change, welcome)
    }

    /// Sends a Commit just made and keeps it pending until the server
    /// accepts it; with nobody to send it to, nobody can race it, and it is
    /// merged at once.
    fn commit(
        &mut self,
        record: &GroupRecord,
        recipients: &[IdentityKey],
        commit: MlsMessageOut,
        change: Change,
        welcome: Option<([u8; 32], Vec<u8>)>,
    ) -> Result<(), CommandError> {
        let message_id = self.send_group_message(record, recipients, commit)?;
        if let Some(g) = self.group_mut(&record.group_id) {
            g.commit = Some(CommitRecord {
                message_id,
                change,
                welcome,
            });
        }
        if recipients.is_empty() {
            self.commit_accepted(message_id);
        }
        Ok(())
    }

    /// The server stored a Commit of ours (the outbox entries with
    /// `message_id`) for the first time: it won its epoch. Merge it, send
    /// the Welcome if it added someone, and make what queued behind it.
    fn commit_accepted(&mut self, message_id: [u8; 16]) {
        let Some(record) = self.group_committing(message_id) else {
            return;
        };
        let Some(commit) = record.commit.clone() else {
            return;
        };
        if let Some(g) = self.group_mut(&record.group_id) {
            g.commit = None;
        }
        self.accepted_commits.insert(message_id);
        self.effects.push_back(Effect::Persist);
        if let Err(e) = self.merge_own_commit(&record, commit) {
            self.warn(format!("group {}: {e}", record.name));
        }
        self.replay_early(&record.group_id);
        self.unblock(&record.channel_id);
        self.advance(&record.group_id);
    }

    fn merge_own_commit(
        &mut self,
        record: &GroupRecord,
        commit: CommitRecord,
    ) -> Result<(), CommandError> {
        let mut group = self.load_group(record)?;
        group.merge_pending_commit(&self.provider).map_err(mls)?;
        check_members(&group)?;
        if matches!(commit.change, Change::CommitLeave { .. }) {
            // Made for another member's leave, not asked for by this user:
            // show it, as any change another member makes.
            self.effects.push_back(Effect::Event(Event::GroupChanged {
                group: record.name.clone(),
                epoch: group.epoch().as_u64(),
                members: group.members().count(),
            }));
        }
        let Some((member, welcome)) = commit.welcome else {
            return Ok(());
        };
        // The group's name is sealed under the new epoch's exporter secret,
        // which the joiner derives from the Welcome.
        let channel = ChannelId::try_from_slice(&record.channel_id)
            .map_err(|_| CommandError::State("bad channel id".into()))?;
        let mut nonce = [0u8; envelope::NAME_NONCE_BYTES];
        self.provider.fill(&mut nonce);
        let sealed_name = seal_name(&self.provider, &group, &channel, &nonce, &record.name)?;
        let welcome = Envelope::Welcome {
            channel_id: channel,
            nonce,
            sealed_name,
            welcome,
        }
        .encode();
        // The Welcome goes to the new member's default channel: they do not
        // know the group's channel yet.
        self.add_to_outbox(IdentityKey(member), ChannelId::DEFAULT, welcome, record.pq);
        Ok(())
    }

    /// Our Commit with `message_id` lost its epoch to another member's:
    /// forget it and queue its change again, first, to be made once this
    /// member's copy of the group is at epoch `behind` (it has processed the
    /// winning Commit). `refused`: the server refused it with `staleEpoch`
    /// naming `behind`, so the channel is fetched to catch up; otherwise the
    /// winning Commit is being processed right now. Its other copies in the
    /// outbox go too (they would be refused as well); copies in flight are
    /// refused on their own.
    fn commit_lost(&mut self, message_id: [u8; 16], behind: u64, refused: bool) {
        self.drop_copies(message_id);
        self.effects.push_back(Effect::Persist);
        let Some(record) = self.group_committing(message_id) else {
            if refused && self.accepted_commits.contains(&message_id) {
                // A Commit accepted earlier whose copy to a member came too
                // late: the group had moved on by more epochs than the
                // server remembers. (A copy of a Commit already known to
                // have lost is refused as expected.)
                self.warn(
                    "a change you made to a group reached some members too late and was refused for them; they cannot follow the group until they are removed and added again".into(),
                );
            }
            return;
        };
        let Some(commit) = record.commit.clone() else {
            return;
        };
        if let Ok(mut group) = self.load_group(&record)
            && let Err(e) = group.clear_pending_commit(self.provider.storage())
        {
            self.warn(format!("group {}: {e:?}", record.name));
        }
        if let Some(g) = self.group_mut(&record.group_id) {
            g.commit = None;
            g.queue.insert(0, commit.change);
            g.behind = g.behind.max(behind);
        }
        self.unblock(&record.channel_id);
        // Catch up with the winning Commit, then make the change again.
        if refused && let Ok(ch) = ChannelId::try_from_slice(&record.channel_id) {
            self.fetch(ch);
        }
        self.advance(&record.group_id);
    }

    /// Resumes a channel whose processing waited for a Commit of ours to be
    /// settled.
    fn unblock(&mut self, channel: &[u8]) {
        if let Ok(ch) = ChannelId::try_from_slice(channel)
            && self.blocked.remove(&ch)
        {
            self.fetch(ch);
        }
    }

    /// Forgets a group (left or removed), with what it still had to make.
    fn forget(&mut self, group_id: &[u8]) {
        let Some(record) = self
            .groups
            .iter()
            .find(|g| g.group_id == group_id)
            .map(GroupRecord::head)
        else {
            return;
        };
        if let Some(commit) = &record.commit {
            self.drop_copies(commit.message_id);
        }
        let unsent = record
            .queue
            .iter()
            .filter(|c| matches!(c, Change::Text(_)))
            .count();
        if unsent > 0 {
            self.warn(format!(
                "{unsent} message(s) to group {} were never sent: you are no longer in it",
                record.name
            ));
        }
        self.groups.retain(|g| g.group_id != group_id);
    }

    /// The group whose pending Commit went out under `message_id`.
    fn group_committing(&self, message_id: [u8; 16]) -> Option<GroupRecord> {
        self.groups
            .iter()
            .find(|g| {
                g.commit
                    .as_ref()
                    .is_some_and(|c| c.message_id == message_id)
            })
            .map(GroupRecord::head)
    }

    /// Drops the outbox entries of `message_id` that are not in flight
    /// (those are answered on their own).
    fn drop_copies(&mut self, message_id: [u8; 16]) {
        let in_flight = self.outbox_in_flight();
        self.outbox
            .retain(|id, e| e.message_id != message_id || in_flight.contains(id));
    }

    /// The group with this MLS group id, to change.
    fn group_mut(&mut self, group_id: &[u8]) -> Option<&mut GroupRecord> {
        self.groups.iter_mut().find(|g| g.group_id == group_id)
    }

    /// Outbox entries in an enqueue in flight.
    fn outbox_in_flight(&self) -> BTreeSet<u64> {
        self.in_flight
            .values()
            .flat_map(|p| match p {
                Pending::Outbox(id) => vec![*id],
                Pending::OutboxBatch(ids) => ids.clone(),
                _ => Vec::new(),
            })
            .collect()
    }

    // ----- receive ----------------------------------------------------------

    fn start_receive(&mut self, wait_ms: u64) -> Result<(), CommandError> {
        self.op = Some(Op::Receive {
            wait_ms,
            waited: false,
            shown: 0,
        });
        for ch in self.channels() {
            self.fetch(ch);
        }
        Ok(())
    }

    fn channels(&self) -> Vec<ChannelId> {
        let mut out = vec![ChannelId::DEFAULT];
        out.extend(
            self.groups
                .iter()
                .filter_map(|g| ChannelId::try_from_slice(&g.channel_id).ok()),
        );
        out
    }

    fn fetch(&mut self, channel: ChannelId) {
        // One fetch per channel at a time: a second would only bring the
        // same messages.
        if self
            .in_flight
            .values()
            .any(|p| matches!(p, Pending::Fetch(c) if *c == channel))
        {
            return;
        }
        let after_seq = self.cursors.get(&channel).copied().unwrap_or(0);
        self.request(
            Pending::Fetch(channel),
            RequestBody::Fetch {
                recipient_key: self.identity,
                channel_id: channel,
                after_seq,
                limit: FETCH_BATCH,
            },
        );
    }

    /// A long-poll on `channel` from its cursor, answered as `pending`.
    /// One long-poll over every channel from its cursor (one per
    /// [`crate::limits::FETCH_WAIT_CHANNELS_MAX`] channels), answered as
    /// `pending`.
    fn wait_all(&mut self, wait_ms: u64, pending: Pending, limit: u32) {
        let cursors: Vec<(ChannelId, u64)> = self
            .channels()
            .into_iter()
            .map(|ch| (ch, self.cursors.get(&ch).copied().unwrap_or(0)))
            .collect();
        for chunk in cursors.chunks(crate::limits::FETCH_WAIT_CHANNELS_MAX) {
            self.request(
                pending.clone(),
                RequestBody::FetchWaitChannels {
                    recipient_key: self.identity,
                    cursors: chunk.to_vec(),
                    limit,
                    timeout_ms: wait_ms,
                },
            );
        }
    }

    /// The answer to a [`Pending::Wait`]: each channel's messages, as a
    /// fetch's.
    fn on_channels(&mut self, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::ChannelMessages { channels }) => {
                for c in channels {
                    self.on_batch(c.channel_id, c.messages, c.gap, true);
                }
            }
            Ok(other) => self.warn(format!("unexpected answer to a wait: {other:?}")),
            Err(e) => self.warn(format!("wait refused: {e}")),
        }
    }

    fn on_messages(
        &mut self,
        channel: ChannelId,
        result: Result<Response, ServiceError>,
        waited: bool,
    ) {
        let (messages, gap) = match result {
            Ok(Response::Messages { messages, gap, .. }) => (messages, gap),
            Ok(other) => {
                self.warn(format!("unexpected answer to a fetch: {other:?}"));
                return;
            }
            Err(e) => {
                self.warn(format!("fetch refused: {e}"));
                return;
            }
        };
        self.on_batch(channel, messages, gap, waited);
    }

    /// Processes one channel's messages from a fetch or a wait, then fetches
    /// the channel again with the new cursor (acknowledging them).
    fn on_batch(
        &mut self,
        channel: ChannelId,
        messages: Vec<QueuedMessage>,
        gap: Option<Gap>,
        waited: bool,
    ) {
        if let Some(gap) = gap {
            self.report_gap(channel, gap);
        }
        if messages.is_empty() {
            // Drained: the channel's groups are as up to date as the server
            // can make them; make what they queued.
            let groups: Vec<Vec<u8>> = self
                .groups
                .iter()
                .filter(|g| g.channel_id == channel.as_bytes() && !g.queue.is_empty())
                .map(|g| g.group_id.clone())
                .collect();
            for group_id in groups {
                self.advance(&group_id);
            }
            self.flush_outbox();
            return;
        }
        let channels_before = self.channels();
        let effects_before = self.effects.len();
        for m in messages {
            if self.blocked.contains(&channel) {
                break;
            }
            self.process(channel, m);
        }
        // Persist what was processed before showing it (a crash in between
        // would otherwise show it twice), then acknowledge it with the next
        // fetch (its cursor), which also drains the rest.
        let shown: Vec<Effect> = self.effects.drain(effects_before..).collect();
        self.effects.push_back(Effect::Persist);
        self.effects.extend(shown);
        if waited {
            // Something arrived: stop waiting on the other channels.
            self.in_flight.retain(|_, p| !matches!(p, Pending::Wait));
        }
        if !self.blocked.contains(&channel) {
            self.fetch(channel);
        }
        // Groups joined from Welcomes in this batch: drain their channels
        // too. (Groups can also disappear, by removal, in the same batch.)
        let joined: Vec<ChannelId> = self
            .channels()
            .into_iter()
            .filter(|ch| !channels_before.contains(ch))
            .collect();
        for ch in joined {
            self.fetch(ch);
        }
    }

    /// The server dropped `gap` (its message TTL) before this client
    /// fetched it: say so, once, and move the cursor past it (those seqs
    /// are gone; the cursor is persisted with the next state write).
    fn report_gap(&mut self, channel: ChannelId, gap: Gap) {
        let cursor = self.cursors.entry(channel).or_insert(0);
        if gap.to <= *cursor {
            return;
        }
        *cursor = gap.to;
        let whose = self
            .groups
            .iter()
            .find(|g| g.channel_id == channel.as_bytes())
            .map_or_else(|| "invitations".to_owned(), |g| format!("group {}", g.name));
        let n = gap.to - gap.from + 1;
        self.effects.push_back(Effect::Persist);
        self.warn(format!(
            "{n} message(s) of {whose} (seq {}..={}) expired on the server before they were fetched; they are lost",
            gap.from, gap.to
        ));
    }

    fn process(&mut self, channel: ChannelId, message: QueuedMessage) {
        let cursor = self.cursors.entry(channel).or_insert(0);
        if message.seq <= *cursor {
            // Delivered again after a lost acknowledgement: already processed,
            // and MLS cannot decrypt it twice.
            return;
        }
        let before = *cursor;
        *cursor = message.seq;
        self.early_epoch = None;
        let result = self.process_payload(channel, &message.payload);
        if self.blocked.contains(&channel) {
            // Not processed: read again once our pending Commit is settled.
            self.cursors.insert(channel, before);
            return;
        }
        if let Some(epoch) = self.early_epoch.take() {
            return self.keep_early(channel, epoch, message);
        }
        if let Err(e) = result {
            self.warn(format!(
                "message {} on channel could not be processed: {e}",
                message.seq
            ));
        }
    }

    /// Processes one queued payload. A payload that does not open is an
    /// error (the caller warns and moves on, like an MLS message that does
    /// not decrypt, so it does not block the queue behind it).
    fn process_payload(&mut self, channel: ChannelId, payload: &[u8]) -> Result<(), CommandError> {
        match Envelope::decode(payload) {
            Ok(Envelope::Hybrid {
                framing,
                key_id,
                sealed,
            }) => self
                .open_hybrid(&key_id, &sealed)
                .and_then(|inner| {
                    // A framing in the clear must be the one of the Commit
                    // inside, or the server fenced something else.
                    if framing.is_some() && framing != crate::node::commit::commit_framing(&inner) {
                        return Err(CommandError::HybridEnvelope(
                            "its commit framing is not the one of the Commit inside".into(),
                        ));
                    }
                    Envelope::decode(&inner)
                        .map_err(|e| CommandError::HybridEnvelope(format!("its content: {e}")))
                })
                .and_then(|inner| self.process_envelope(channel, inner, true)),
            Ok(envelope) => self.process_envelope(channel, envelope, false),
            Err(e) => Err(CommandError::Mls(e.to_string())),
        }
    }

    /// Keeps a message of a later epoch than its group's until the Commit
    /// that starts that epoch arrives ([`Self::replay_early`]); the cursor
    /// moves past it (it is persisted in the group's record).
    fn keep_early(&mut self, channel: ChannelId, epoch: u64, message: QueuedMessage) {
        let Some(g) = self
            .groups
            .iter_mut()
            .find(|g| g.channel_id == channel.as_bytes())
        else {
            return;
        };
        let kept: usize = g.early.iter().map(|m| m.payload.len()).sum();
        if g.early.len() >= EARLY_MESSAGES_MAX || kept + message.payload.len() > EARLY_BYTES_MAX {
            let (name, waiting) = (g.name.clone(), g.early.len());
            return self.warn(format!(
                "message {} of group {name} is for epoch {epoch}, which this device has not reached, and {waiting} such messages ({kept} bytes) wait already: dropped",
                message.seq
            ));
        }
        g.early.push(EarlyMessage {
            epoch,
            seq: message.seq,
            payload: message.payload,
        });
    }

    /// Processes the kept messages of a group whose epoch it has reached,
    /// oldest first (after a Commit moved it on).
    fn replay_early(&mut self, group_id: &[u8]) {
        loop {
            let Some(record) = self.groups.iter().find(|g| g.group_id == group_id) else {
                return;
            };
            let Ok(epoch) = self.load_group(record).map(|g| g.epoch().as_u64()) else {
                return;
            };
            let Some(i) = record.early.iter().position(|m| m.epoch <= epoch) else {
                return;
            };
            let Ok(channel) = ChannelId::try_from_slice(&record.channel_id) else {
                return;
            };
            let Some(g) = self.group_mut(group_id) else {
                return;
            };
            let m = g.early.remove(i);
            self.early_epoch = None;
            let result = self.process_payload(channel, &m.payload);
            if let Some(epoch) = self.early_epoch.take() {
                self.keep_early(
                    channel,
                    epoch,
                    QueuedMessage {
                        seq: m.seq,
                        payload: m.payload,
                    },
                );
                return;
            }
            if let Err(e) = result {
                self.warn(format!(
                    "message {} on channel could not be processed: {e}",
                    m.seq
                ));
            }
        }
    }

    /// Processes a decoded payload; `wrapped` says it came in a hybrid
    /// envelope.
    fn process_envelope(
        &mut self,
        channel: ChannelId,
        envelope: Envelope,
        wrapped: bool,
    ) -> Result<(), CommandError> {
        match envelope {
            Envelope::Welcome {
                channel_id,
                nonce,
                sealed_name,
                welcome,
            } => self.join(channel_id, &nonce, &sealed_name, &welcome, wrapped),
            Envelope::Group { message } => self.process_group_message(channel, &message, wrapped),
            Envelope::Hybrid { .. } => Err(CommandError::HybridEnvelope(
                "a hybrid envelope inside another".into(),
            )),
        }
    }

    /// Opens a hybrid envelope sealed to one of the kept hybrid keys.
    fn open_hybrid(
        &self,
        key_id: &[u8; hybrid::KEY_ID_BYTES],
        sealed: &[u8],
    ) -> Result<Vec<u8>, CommandError> {
        let key = self
            .hybrid_keys
            .iter()
            .rev()
            .find(|k| k.public().key_id() == *key_id)
            .ok_or_else(|| {
                CommandError::HybridEnvelope(format!(
                    "sealed to hybrid key {}…, which this user does not hold (never had, or rotated out)",
                    crate::types::hex(&key_id[..4])
                ))
            })?;
        hybrid::open(key, key_id, sealed).map_err(|e| CommandError::HybridEnvelope(e.to_string()))
    }

    /// Joins from a Welcome; a Welcome that came in a hybrid envelope
    /// (`pq`) makes a pq group, since only a pq group's member seals one.
    fn join(
        &mut self,
        channel: ChannelId,
        nonce: &[u8; envelope::NAME_NONCE_BYTES],
        sealed_name: &[u8],
        welcome: &[u8],
        pq: bool,
    ) -> Result<(), CommandError> {
        let msg = MlsMessageIn::tls_deserialize_exact(welcome).map_err(mls)?;
        let MlsMessageBodyIn::Welcome(welcome) = msg.extract() else {
            return Err(CommandError::Mls("not a Welcome".into()));
        };
        let config = MlsGroupJoinConfig::builder()
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .max_past_epochs(MAX_PAST_EPOCHS)
            .build();
        let group = StagedWelcome::new_from_welcome(&self.provider, &config, welcome, None)
            .map_err(mls)?
            .into_group(&self.provider)
            .map_err(mls)?;
        check_members(&group)?;
        let name = open_name(&self.provider, &group, &channel, nonce, sealed_name)?;
        let name = self.unique_name(name);
        let count = group.members().count();
        self.groups.push(GroupRecord {
            name: name.clone(),
            group_id: group.group_id().as_slice().to_vec(),
            channel_id: channel.as_bytes().to_vec(),
            owner: false,
            pq,
            queue: Vec::new(),
            commit: None,
            behind: 0,
            early: Vec::new(),
        });
        self.effects.push_back(Effect::Event(Event::Joined {
            group: name,
            members: count,
        }));
        Ok(())
    }

    fn process_group_message(
        &mut self,
        channel: ChannelId,
        bytes: &[u8],
        wrapped: bool,
    ) -> Result<(), CommandError> {
        let Some(record) = self
            .groups
            .iter()
            .find(|g| g.channel_id == channel.as_bytes())
            .map(GroupRecord::head)
        else {
            return Err(CommandError::Mls(
                "message on a channel of no known group".into(),
            ));
        };
        if record.pq && !wrapped {
            // No downgrade: every member of a pq group seals what it sends.
            return Err(CommandError::HybridEnvelope(format!(
                "a message in pq group `{}` came without a hybrid envelope",
                record.name
            )));
        }
        let mut group = self.load_group(&record)?;
        let msg = MlsMessageIn::tls_deserialize_exact(bytes).map_err(mls)?;
        let protocol = msg.try_into_protocol_message().map_err(mls)?;
        if record.commit.is_some() && protocol.epoch() > group.epoch() {
            // Others are past the epoch of our pending Commit: the server
            // accepted it, and the answer is still to come (or was lost).
            // This message needs that Commit merged first.
            self.blocked.insert(channel);
            return Ok(());
        }
        if protocol.epoch() > group.epoch() {
            let epoch = protocol.epoch().as_u64();
            if epoch - group.epoch().as_u64() > EARLY_EPOCHS_AHEAD_MAX {
                return Err(CommandError::Mls(format!(
                    "a message for epoch {epoch}, more than {EARLY_EPOCHS_AHEAD_MAX} ahead of this device's epoch {}",
                    group.epoch().as_u64()
                )));
            }
            // The Commit that starts that epoch is still to come (its copy
            // to us is behind this message in our queue): keep it.
            self.early_epoch = Some(epoch);
            return Ok(());
        }
        let processed = group
            .process_message(&self.provider, protocol)
            .map_err(mls)?;
        let sender = BasicCredential::try_from(processed.credential().clone())
            .ok()
            .and_then(|c| IdentityKey::try_from_slice(c.identity()).ok());
        match processed.into_content() {
            ProcessedMessageContent::ApplicationMessage(app) => {
                let text = String::from_utf8_lossy(&app.into_bytes()).into_owned();
                self.active = true;
                if let Some(Op::Receive { shown, .. }) = &mut self.op {
                    *shown += 1;
                }
                let sender =
                    sender.ok_or_else(|| CommandError::Mls("sender has no identity".into()))?;
                self.effects.push_back(Effect::Event(Event::Message {
                    group: record.name,
                    sender,
                    text,
                }));
            }
            ProcessedMessageContent::ProposalMessage(proposal) => {
                let leaving = match (proposal.proposal(), proposal.sender()) {
                    (Proposal::Remove(r), Sender::Member(from)) if r.removed() == *from => {
                        Some(*from)
                    }
                    _ => None,
                };
                group
                    .store_pending_proposal(self.provider.storage(), *proposal)
                    .map_err(mls)?;
                // A member leaving needs someone to commit its removal: the
                // remaining member with the lowest leaf index does, so the
                // others do not race it. It is queued (made once this
                // channel is drained, behind this member's own changes).
                if let Some(leaver) = leaving {
                    let me = group.own_leaf_index();
                    let committer = group.members().map(|m| m.index).find(|i| *i != leaver);
                    let leaver = group
                        .member(leaver)
                        .and_then(|c| BasicCredential::try_from(c.clone()).ok())
                        .and_then(|c| IdentityKey::try_from_slice(c.identity()).ok());
                    if committer == Some(me)
                        && let Some(leaver) = leaver
                        && let Some(g) = self.group_mut(&record.group_id)
                    {
                        g.queue.push(Change::CommitLeave { leaver: leaver.0 });
                    }
                }
            }
            ProcessedMessageContent::StagedCommitMessage(commit) => {
                for add in commit.add_proposals() {
                    let leaf = add.add_proposal().key_package().leaf_node();
                    let identity =
                        BasicCredential::try_from(leaf.credential().clone()).map_err(mls)?;
                    if identity.identity() != leaf.signature_key().as_slice() {
                        return Err(CommandError::Mls(
                            "a Commit adds a member whose credential is not its signature key"
                                .into(),
                        ));
                    }
                }
                // The committer may have rotated its hybrid key with this
                // Commit (`update`): fetch it anew before sealing to it.
                if let Some(committer) = sender {
                    self.peer_hybrid_keys.remove(&committer);
                }
                let removed = commit.self_removed();
                // Another member's Commit for this epoch came first: ours,
                // if one is pending, lost; its change is made again on top.
                if let Some(own) = &record.commit {
                    group
                        .clear_pending_commit(self.provider.storage())
                        .map_err(mls)?;
                    let next = group.epoch().as_u64().saturating_add(1);
                    self.commit_lost(own.message_id, next, false);
                }
                group
                    .merge_staged_commit(&self.provider, *commit)
                    .map_err(mls)?;
                if removed {
                    // Removed by another member: nothing more can be read or
                    // sent in this group.
                    self.forget(&record.group_id);
                    self.effects
                        .push_back(Effect::Event(Event::Removed { group: record.name }));
                    return Ok(());
                }
                check_members(&group)?;
                self.effects.push_back(Effect::Event(Event::GroupChanged {
                    group: record.name,
                    epoch: group.epoch().as_u64(),
                    members: group.members().count(),
                }));
                self.replay_early(&record.group_id);
            }
            ProcessedMessageContent::ExternalJoinProposalMessage(_) => {}
            _ => {}
        }
        Ok(())
    }

    fn unique_name(&self, name: String) -> String {
        if !self.groups.iter().any(|g| g.name == name) {
            return name;
        }
        (2..)
            .map(|n| format!("{name} ({n})"))
            .find(|candidate| !self.groups.iter().any(|g| g.name == *candidate))
            .unwrap_or(name)
    }

    // ----- outbox -----------------------------------------------------------

    /// Queues `payload` for `recipient`; with `seal`, it is sealed to their
    /// hybrid key when it goes out.
    fn add_to_outbox(
        &mut self,
        recipient: IdentityKey,
        channel: ChannelId,
        payload: Vec<u8>,
        seal: bool,
    ) {
        let mut message_id = [0u8; 16];
        self.provider.fill(&mut message_id);
        self.add_entry(recipient, channel, payload, message_id, seal);
    }

    /// One payload for several recipients: one entry each, under one
    /// message id, so [`Self::flush_outbox`] can send the entries that are
    /// due together as one `enqueueBatch` (the server stores the payload
    /// once). A retry to the recipients still missing it reuses the id.
    fn add_group_to_outbox(
        &mut self,
        recipients: &[IdentityKey],
        channel: ChannelId,
        payload: Vec<u8>,
        seal: bool,
    ) -> [u8; 16] {
        let mut message_id = [0u8; 16];
        self.provider.fill(&mut message_id);
        for r in recipients {
            self.add_entry(*r, channel, payload.clone(), message_id, seal);
        }
        message_id
    }

    fn add_entry(
        &mut self,
        recipient: IdentityKey,
        channel: ChannelId,
        payload: Vec<u8>,
        message_id: [u8; 16],
        seal: bool,
    ) {
        let id = self.next_outbox_id;
        self.next_outbox_id += 1;
        self.outbox.insert(
            id,
            OutboxEntry {
                recipient: recipient.0,
                channel_id: channel.as_bytes().to_vec(),
                payload,
                message_id,
                seal,
            },
        );
    }

    /// Sends the oldest outbox entry of each queue that has none in flight.
    ///
    /// Entries to one queue (recipient and channel) go one at a time, in the
    /// order they were made, the next only once the previous one is stored:
    /// the server numbers a queue in arrival order, and concurrent enqueues
    /// may arrive in any order. A recipient must get a Commit before the
    /// messages of the epoch it starts (it cannot decrypt them otherwise)
    /// and one sender's messages in the order sent; an entry deferred by a
    /// failure would otherwise be overtaken by a later one sent beside it.
    ///
    /// An entry still to be sealed is sealed first if the recipient's
    /// hybrid key is known (and keeps its sealed payload, so retries send
    /// the same bytes); otherwise the key is fetched, once per recipient,
    /// and the entry (with the rest of its queue) waits for it.
    fn flush_outbox(&mut self) {
        let in_flight = self.outbox_in_flight();
        let mut busy: BTreeSet<(&[u8; 32], &[u8])> = in_flight
            .iter()
            .filter_map(|id| self.outbox.get(id))
            .map(|e| (&e.recipient, e.channel_id.as_slice()))
            .collect();
        let mut next = Vec::new();
        for (id, e) in &self.outbox {
            if busy.insert((&e.recipient, e.channel_id.as_slice())) {
                next.push(*id);
            }
        }
        let mut missing: Vec<IdentityKey> = Vec::new();
        let mut due = Vec::new();
        for id in next {
            let Some(e) = self.outbox.get(&id) else {
                continue;
            };
            let Ok(_) = ChannelId::try_from_slice(&e.channel_id) else {
                self.outbox.remove(&id);
                continue;
            };
            let recipient = IdentityKey(e.recipient);
            if e.seal {
                let Some(key) = self.peer_hybrid_keys.get(&recipient) else {
                    if !missing.contains(&recipient) {
                        missing.push(recipient);
                    }
                    continue;
                };
                let key_id = key.key_id();
                let sealed = hybrid::seal(key, &key_id, &e.payload, &mut self.rng());
                // A Commit shows its framing, so the fence covers pq groups.
                let payload = Envelope::Hybrid {
                    framing: crate::node::commit::commit_framing(&e.payload),
                    key_id,
                    sealed,
                }
                .encode();
                if let Some(e) = self.outbox.get_mut(&id) {
                    e.payload = payload;
                    e.seal = false;
                }
            }
            if self.outbox.contains_key(&id) {
                due.push(id);
            }
        }
        // Entries due at once with one channel, message id and payload (a
        // group message to several members) go as one enqueueBatch.
        let mut batches: Vec<Vec<u64>> = Vec::new();
        for id in due {
            let Some(e) = self.outbox.get(&id) else {
                continue;
            };
            let same = batches.iter_mut().find(|b| {
                self.outbox.get(&b[0]).is_some_and(|f| {
                    f.message_id == e.message_id
                        && f.channel_id == e.channel_id
                        && f.payload == e.payload
                        && b.len() < crate::limits::ENQUEUE_BATCH_RECIPIENTS_MAX
                })
            });
            let same = same.filter(|_| !self.solo.contains(&id));
            match same {
                Some(b) => b.push(id),
                None => batches.push(vec![id]),
            }
        }
        for ids in batches {
            let Some(e) = self.outbox.get(&ids[0]) else {
                continue;
            };
            let Ok(channel_id) = ChannelId::try_from_slice(&e.channel_id) else {
                continue;
            };
            let (payload, message_id) = (e.payload.clone(), MessageId(e.message_id));
            if let [id] = ids[..] {
                let body = RequestBody::Enqueue {
                    recipient_key: IdentityKey(e.recipient),
                    channel_id,
                    payload,
                    message_id,
                };
                self.request(Pending::Outbox(id), body);
                continue;
            }
            let recipient_keys = ids
                .iter()
                .filter_map(|id| self.outbox.get(id))
                .map(|e| IdentityKey(e.recipient))
                .collect();
            let body = RequestBody::EnqueueBatch {
                recipient_keys,
                channel_id,
                payload,
                message_id,
            };
            self.request(Pending::OutboxBatch(ids), body);
        }
        for member in missing {
            let asked = self
                .in_flight
                .values()
                .any(|p| matches!(p, Pending::HybridKey(m) if *m == member));
            if !asked {
                self.request(
                    Pending::HybridKey(member),
                    RequestBody::FetchHybridKey {
                        identity_key: member,
                    },
                );
            }
        }
    }

    /// The answer to an `enqueueBatch` of outbox entries: all stored, or
    /// none, and then each entry is handled as a refused single enqueue
    /// would be.
    fn on_enqueued_batch(&mut self, ids: Vec<u64>, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::EnqueuedBatch { seqs }) if seqs.len() == ids.len() => {
                let message_id = ids
                    .first()
                    .and_then(|id| self.outbox.get(id))
                    .map(|e| e.message_id);
                for id in &ids {
                    self.outbox.remove(id);
                }
                if let Some(message_id) = message_id {
                    self.commit_accepted(message_id);
                }
                self.effects.push_back(Effect::Persist);
                if let Some(Op::Send { delivered, .. }) = &mut self.op {
                    *delivered = delivered.saturating_add(ids.len() as u32);
                }
                self.flush_outbox();
            }
            Ok(other) => self.warn(format!("unexpected answer to an enqueueBatch: {other:?}")),
            Err(ServiceError {
                kind: ErrorKind::StaleEpoch { current_epoch },
                ..
            }) => {
                let message_id = ids
                    .first()
                    .and_then(|id| self.outbox.get(id))
                    .map(|e| e.message_id);
                for id in &ids {
                    self.outbox.remove(id);
                }
                if let Some(message_id) = message_id {
                    self.commit_lost(message_id, current_epoch, true);
                }
                self.flush_outbox();
            }
            Err(e) if refused_for_good(&e) => {
                // Retrying cannot help: drop them and say so, once.
                for id in &ids {
                    self.outbox.remove(id);
                }
                self.effects.push_back(Effect::Persist);
                self.warn(format!(
                    "a message could not be delivered to {} members and was dropped: {e}",
                    ids.len()
                ));
                self.flush_outbox();
            }
            Err(e) if matches!(e.kind, ErrorKind::QueueFull) => {
                // One member's full queue must not hold up the others: send
                // these one by one from now on.
                self.solo.extend(ids);
                self.warn(format!("delivery to a member deferred, will retry: {e}"));
                self.flush_outbox();
            }
            // The entries behind them in their queues wait too.
            Err(e) => self.warn(format!("delivery deferred, will retry: {e}")),
        }
    }

    fn on_enqueued(&mut self, id: u64, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::Enqueued { .. }) => {
                if let Some(e) = self.outbox.remove(&id) {
                    self.commit_accepted(e.message_id);
                }
                self.effects.push_back(Effect::Persist);
                if let Some(Op::Send { delivered, .. }) = &mut self.op {
                    *delivered += 1;
                }
                // The next entry to the same queue may go now.
                self.flush_outbox();
            }
            Err(ServiceError {
                kind: ErrorKind::StaleEpoch { current_epoch },
                ..
            }) => {
                if let Some(e) = self.outbox.remove(&id) {
                    self.commit_lost(e.message_id, current_epoch, true);
                }
                self.flush_outbox();
            }
            Err(e) if refused_for_good(&e) => {
                // Retrying cannot help: drop it and say so.
                self.outbox.remove(&id);
                self.effects.push_back(Effect::Persist);
                self.warn(format!(
                    "a message could not be delivered and was dropped: {e}"
                ));
                self.flush_outbox();
            }
            // The entries behind it in its queue wait too, so they cannot
            // overtake it.
            Err(e) => self.warn(format!("delivery deferred, will retry: {e}")),
            Ok(other) => self.warn(format!("unexpected answer to an enqueue: {other:?}")),
        }
    }

    // ----- plumbing ---------------------------------------------------------

    fn request(&mut self, pending: Pending, request: RequestBody) {
        let token = self.next_token;
        self.next_token += 1;
        self.in_flight.insert(token, pending);
        self.effects.push_back(Effect::Request { token, request });
    }

    /// A generator for one operation, seeded from the machine's.
    fn rng(&self) -> ChaCha20Rng {
        let mut seed = [0u8; 32];
        self.provider.fill(&mut seed);
        ChaCha20Rng::from_seed(seed)
    }

    fn warn(&mut self, message: String) {
        self.effects
            .push_back(Effect::Event(Event::Warning { message }));
    }

    fn fail(&mut self, e: CommandError) {
        // Outbox deliveries already sent keep going; the command ends.
        self.in_flight.retain(|_, p| {
            matches!(
                p,
                Pending::Outbox(_) | Pending::OutboxBatch(_) | Pending::HybridKey(_)
            )
        });
        self.op = None;
        self.effects.push_back(Effect::Done(Err(e)));
    }

    /// Finishes the running command once nothing it waits for is in flight.
    fn maybe_done(&mut self) {
        if !self.in_flight.is_empty() {
            return;
        }
        // Nothing was pending: wait on every channel, once.
        if let Some(Op::Receive {
            wait_ms,
            waited: false,
            shown: 0,
        }) = self.op
            && wait_ms > 0
        {
            self.op = Some(Op::Receive {
                wait_ms,
                waited: true,
                shown: 0,
            });
            self.wait_all(wait_ms, Pending::Wait, FETCH_BATCH);
            return;
        }
        // Deliveries in the outbox, and messages and changes queued behind a
        // Commit the server has not accepted yet.
        let queued: usize = self.groups.iter().map(|g| g.queue.len()).sum();
        let undelivered = u32::try_from(self.outbox.len() + queued).unwrap_or(u32::MAX);
        if matches!(self.op, None | Some(Op::AddMember { added: false, .. })) {
            return;
        }
        // Counters and flags changed by the answers are persisted too (a
        // wait changes nothing).
        if !matches!(self.op, Some(Op::Wait { .. })) {
            self.effects.push_back(Effect::Persist);
        }
        let outcome = match self.op.take() {
            None => return,
            Some(Op::Register {
                uploaded,
                already,
                failed,
                ..
            }) => Outcome::Registered {
                uploaded,
                already,
                failed,
            },
            Some(Op::AddMember { added: false, .. }) => return,
            Some(Op::AddMember { group, member, .. }) => Outcome::MemberAdded {
                group,
                member,
                undelivered,
            },
            Some(Op::Send { group, delivered }) => Outcome::Sent {
                group,
                delivered,
                undelivered,
            },
            Some(Op::Receive { shown, .. }) => Outcome::Received { messages: shown },
            Some(Op::Wait { pending }) => Outcome::Waited { pending },
            Some(Op::Committed { outcome }) => match outcome {
                Outcome::MemberRemoved { group, member, .. } => Outcome::MemberRemoved {
                    group,
                    member,
                    undelivered,
                },
                Outcome::Updated { groups, .. } => Outcome::Updated {
                    groups,
                    undelivered,
                },
                other => other,
            },
        };
        self.effects.push_back(Effect::Done(Ok(outcome)));
    }

    fn credential(&self) -> CredentialWithKey {
        CredentialWithKey {
            credential: BasicCredential::new(self.identity.0.to_vec()).into(),
            signature_key: self.identity.0.to_vec().into(),
        }
    }

    fn record(&self, name: &str) -> Result<GroupRecord, CommandError> {
        self.groups
            .iter()
            .find(|g| g.name == name)
            .map(GroupRecord::head)
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    fn load_group(&self, record: &GroupRecord) -> Result<MlsGroup, CommandError> {
        MlsGroup::load(
            self.provider.storage(),
            &GroupId::from_slice(&record.group_id),
        )
        .map_err(mls)?
        .ok_or_else(|| {
            CommandError::State(format!("group `{}` missing from MLS storage", record.name))
        })
    }
}

/// The identity key as an openmls signer: the MLS signature key is the
/// identity key itself.
#[derive(Debug)]
struct IdentitySigner(SigningKey);

impl Signer for IdentitySigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Leaf capabilities: the defaults plus the last-resort KeyPackage
/// extension (RFC 9420 §17.3), which a leaf must list to carry it.
fn capabilities() -> Capabilities {
    Capabilities::new(
        None,
        Some(&[CIPHERSUITE]),
        Some(&[ExtensionType::LastResort]),
        None,
        Some(&[CredentialType::Basic]),
    )
}

fn members(group: &MlsGroup) -> Vec<IdentityKey> {
    group
        .members()
        .filter_map(|m| IdentityKey::try_from_slice(&m.signature_key).ok())
        .collect()
}

/// After a join or Commit: every member's credential identity must equal
/// its signature key (DESIGN.md §7).
fn check_members(group: &MlsGroup) -> Result<(), CommandError> {
    for m in group.members() {
        let credential = BasicCredential::try_from(m.credential.clone()).map_err(mls)?;
        if credential.identity() != m.signature_key.as_slice() {
            return Err(CommandError::Mls(
                "a member's credential identity differs from its signature key".into(),
            ));
        }
    }
    Ok(())
}

fn check_name(name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > GROUP_NAME_BYTES_MAX {
        return Err(CommandError::InvalidName(format!(
            "must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(CommandError::InvalidName(
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

fn name_cipher(provider: &QpqProvider, group: &MlsGroup) -> Result<ChaCha20Poly1305, CommandError> {
    let key = group
        .export_secret(provider.crypto(), GROUP_NAME_EXPORTER_LABEL, b"", 32)
        .map_err(mls)?;
    ChaCha20Poly1305::new_from_slice(&key).map_err(|_| CommandError::Mls("exporter length".into()))
}

fn seal_name(
    provider: &QpqProvider,
    group: &MlsGroup,
    channel: &ChannelId,
    nonce: &[u8; envelope::NAME_NONCE_BYTES],
    name: &str,
) -> Result<Vec<u8>, CommandError> {
    name_cipher(provider, group)?
        .encrypt(
            nonce.into(),
            Payload {
                msg: name.as_bytes(),
                aad: channel.as_bytes(),
            },
        )
        .map_err(|_| CommandError::Mls("sealing the group name failed".into()))
}

fn open_name(
    provider: &QpqProvider,
    group: &MlsGroup,
    channel: &ChannelId,
    nonce: &[u8; envelope::NAME_NONCE_BYTES],
    sealed: &[u8],
) -> Result<String, CommandError> {
    let plain = name_cipher(provider, group)?
        .decrypt(
            nonce.into(),
            Payload {
                msg: sealed,
                aad: channel.as_bytes(),
            },
        )
        .map_err(|_| CommandError::Mls("the group name in the Welcome does not open".into()))?;
    let name = String::from_utf8(plain)
        .map_err(|_| CommandError::Mls("group name is not UTF-8".into()))?;
    check_name(&name)?;
    Ok(name)
}

/// An enqueue refusal that retrying cannot change.
fn refused_for_good(e: &ServiceError) -> bool {
    matches!(
        e.kind,
        ErrorKind::InvalidArgument | ErrorKind::PayloadTooLarge | ErrorKind::PermissionDenied
    )
}

fn mls(e: impl std::fmt::Display) -> CommandError {
    CommandError::Mls(e.to_string())
}

fn unexpected(r: &Response) -> CommandError {
    CommandError::Server(ServiceError::internal(format!("unexpected answer: {r:?}")))
}

#[cfg(test)]
mod tests;
