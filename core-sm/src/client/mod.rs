//! The client state machine: a user's identity, KeyPackages, MLS groups,
//! queue cursors and outbox, sans-io.
//!
//! The shell feeds inputs — a [`Command`] at a time
//! ([`ClientMachine::handle_command`]), answers
//! ([`ClientMachine::handle_response`]), connection results
//! ([`ClientMachine::handle_connected`] and its siblings), the long-poll
//! switch ([`ClientMachine::handle_listen`]) and time
//! ([`ClientMachine::handle_timeout`], when
//! [`ClientMachine::poll_timeout`] says) — and drains [`Effect`]s with
//! [`ClientMachine::poll_effect`]: state to persist, a connection to make,
//! requests to send to the NodeService, events to show, and each command's
//! outcome. The machine never performs I/O and never reads a clock.
//!
//! The concerns live in their own files: `api` (the vocabulary), `link`
//! (the connection and every retry clock), `group` (a group as held in
//! memory: `Group`, `Groups`, its bounded `EarlyMessages`), `groups`
//! (changes and the commit race), `receive` (fetching, the long-poll,
//! processing), `outbox` (deliveries: the `Outbox` type and their
//! sending), `direct` (direct links: what goes over them, what a direct
//! message is taken for), `keys` (KeyPackages, hybrid keys, the `PeerKeys` cache),
//! `contacts`, `members` (who changed a group), `safety` (safety numbers),
//! `content` (what an application message carries), `mls` (MLS helpers),
//! `state` (the persisted layout, converted from and to these types at
//! [`ClientMachine::restore`] and [`ClientMachine::snapshot`]).
//!
//! States (ARCHITECTURE.md § Client life cycle), derived from what the
//! machine holds:
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
//!   `messageId`, so retries — also after a crash — are stored once. An
//!   application message to a member with a direct link up may go over it
//!   instead ([`Effect::DirectSend`]); the same id and bytes go through the
//!   server if it is not taken, and a receiver that took it skips the
//!   server copy.
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
//!   credential identity equals its signature key (ARCHITECTURE.md § MLS profile).
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
use crate::protocol::{Gap, QueuedMessage, RequestBody, Response};
use crate::time::Time;
use crate::types::{ChannelId, IdentityKey, MessageId};

pub use envelope::{Envelope, EnvelopeError};
pub use hybrid::{HybridError, HybridPublicKey, HybridSecretKey};
pub use provider::QpqProvider;

use state::{Change, CommitRecord, EarlyMessage, GroupRecord, OutboxEntry, Persisted};

/// The ciphersuite of a classic group (ARCHITECTURE.md § MLS profile):
/// 0x0001. Its KeyPackages live in the server's default pool.
pub const CIPHERSUITE: Ciphersuite = Ciphersuite::MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519;
/// The ciphersuite of a post-quantum group: 0x004F of
/// draft-ietf-mls-pq-ciphersuites, the same AEAD, hash and signature as
/// [`CIPHERSUITE`] with the hybrid ML-KEM-768 + X25519 KEM (X-Wing) for
/// HPKE, so every path secret and Welcome is sealed post-quantum while an
/// application message is encrypted once for everyone. Its KeyPackages
/// live in the server's pool named 0x004F.
pub const PQ_CIPHERSUITE: Ciphersuite =
    Ciphersuite::MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519;
/// Both suites, in the order `register` fills their pools.
pub const CIPHERSUITES: [Ciphersuite; 2] = [CIPHERSUITE, PQ_CIPHERSUITE];

/// The server pool that holds this client's KeyPackages of `suite`: the
/// default pool for the classic suite (where clients that name no pool
/// look), the suite's own pool for any other.
pub fn key_package_pool(suite: Ciphersuite) -> u16 {
    if suite == CIPHERSUITE {
        crate::limits::DEFAULT_POOL
    } else {
        u16::from(suite)
    }
}
/// KeyPackage lifetime: at most 84 days (ARCHITECTURE.md § MLS profile).
pub const KEY_PACKAGE_LIFETIME_SECS: u64 = 84 * 24 * 60 * 60;
/// MLS exporter label of the key that seals a group's name in a Welcome.
pub const GROUP_NAME_EXPORTER_LABEL: &str = "quicproquo group name";
/// Version of the persisted state layout. Versions 1 (before hybrid keys
/// and pq groups), 2 (before the per-group queue of changes), 3 (before
/// contacts) and 4 (before direct links) still restore.
pub const STATE_VERSION: u32 = 5;
// The client machine's limits live with every other limit.
pub use crate::limits::{
    CONTACT_NAME_BYTES_MAX, CONTACTS_MAX, EARLY_BYTES_MAX, EARLY_EPOCHS_AHEAD_MAX,
    EARLY_MESSAGES_MAX, FETCH_BATCH, GROUP_NAME_BYTES_MAX, HYBRID_KEYS_KEPT, LISTEN_WAIT_MS,
    MAX_PAST_EPOCHS, PEER_HYBRID_KEYS_MAX, RECONNECT_BACKOFF_INITIAL, RECONNECT_BACKOFF_MAX,
    REGISTER_COUNT_MAX, RETRY_ATTEMPTS_PER_COMMAND, RETRY_BACKOFF_INITIAL, RETRY_BACKOFF_MAX,
    STORED_PERSIST_DELAY, TEXT_BYTES_MAX,
};

mod api;
mod contacts;
pub mod content;
mod direct;
pub use content::{Attachment, Content, ContentError, ContentId};
#[cfg(test)]
mod grease;
mod group;
mod groups;
mod keys;
mod link;
mod members;
mod mls;
mod outbox;
mod receive;
mod safety;

pub use api::{
    Command, CommandError, Effect, EnvelopeRefusal, Event, GroupSummary, MlsError, MlsStep,
    Outcome, Phase, StateError,
};
use contacts::Contacts;
use direct::Direct;
use group::{Group, Groups};
use keys::PeerKeys;
pub use link::{ConnectFailure, LinkPolicy, backoff};
use link::{Link, Retry};
use mls::*;
use outbox::Outbox;
pub use safety::{SAFETY_NUMBER_LABEL, SafetyNumber};

/// What an in-flight request was for.
#[derive(Debug, Clone)]
enum Pending {
    Outbox(u64),
    /// One `enqueueBatch` carrying these entries (same channel, message id
    /// and payload; one per recipient).
    OutboxBatch(Vec<u64>),
    /// The size of this user's pool of KeyPackages of a suite.
    Count(Ciphersuite),
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
    /// The long-poll of a listening machine.
    Listen,
}

impl Pending {
    /// Whether the running command waits for this request's answer.
    /// Deliveries hold it only under [`LinkPolicy::OneShot`]; the
    /// long-poll never does.
    fn holds_command(&self, policy: LinkPolicy) -> bool {
        match self {
            Pending::Listen => false,
            Pending::Outbox(_) | Pending::OutboxBatch(_) | Pending::HybridKey(_) => {
                policy == LinkPolicy::OneShot
            }
            _ => true,
        }
    }
}

/// A request the machine made and awaits the answer to.
#[derive(Debug)]
struct InFlight {
    pending: Pending,
    body: RequestBody,
    /// Handed to the shell on the current connection; `false` while it
    /// waits for one.
    sent: bool,
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
        /// The group's ciphersuite: the pool the KeyPackage comes from.
        suite: Ciphersuite,
        added: bool,
    },
    Send {
        group: String,
        delivered: u32,
        id: ContentId,
    },
    /// A Commit (or, for a leave, a proposal) this user made: its
    /// deliveries are in flight; the outcome is ready.
    Committed { outcome: Outcome },
    Receive {
        wait_ms: u64,
        waited: bool,
        shown: u32,
    },
}

/// The client machine.
///
/// Its [`Time`] is wall-clock time: microseconds since the Unix epoch as
/// the shell's clock reads it (the shell takes the wall clock once and
/// moves it on with a monotonic clock). Deadlines are only compared with
/// later readings, so a wall clock that jumps delays or hurries a retry
/// at worst; the one place the value itself counts is the send time
/// carried inside each application message ([`content`]).
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
    peer_hybrid_keys: PeerKeys,
    /// The names this user gave identity keys.
    contacts: Contacts,
    groups: Groups,
    cursors: BTreeMap<ChannelId, u64>,
    outbox: Outbox,
    /// Direct links: peers with one up, sends in flight, and what
    /// ordering and recognizing direct messages takes.
    direct: Direct,
    op: Option<Op>,
    in_flight: BTreeMap<u64, InFlight>,
    /// The time of the input being handled.
    now: Time,
    link: Link,
    /// Requests to fail because the machine gave up connecting.
    refusals: Vec<u64>,
    refusal_reason: String,
    /// Keeping a long-poll on every channel ([`Self::handle_listen`]).
    listening: bool,
    /// The long-poll must be made anew (its channels or cursors changed).
    listen_stale: bool,
    /// Failed long-polls in a row, and when to try again.
    listen_attempts: u32,
    listen_at: Option<Time>,
    /// When the outbox's stored deliveries, removed but not yet written,
    /// must be ([`STORED_PERSIST_DELAY`]).
    persist_at: Option<Time>,
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
    next_token: u64,
    effects: VecDeque<Effect>,
    /// `pq` groups this machine creates are sealed ones, as before the
    /// post-quantum suite: only tests and benches that check such groups
    /// still work set it ([`Self::create_sealed_pq_groups`]).
    sealed_pq_groups: bool,
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

    /// Makes the `pq` groups this machine creates from now on sealed ones:
    /// classic MLS groups whose every payload travels in hybrid envelopes,
    /// which is what `pq` made before the post-quantum suite. Such groups
    /// still work (joined, used, changed); this makes new ones to test and
    /// measure that.
    #[cfg(any(test, feature = "testing"))]
    pub fn create_sealed_pq_groups(&mut self, sealed: bool) {
        self.sealed_pq_groups = sealed;
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
                .map_err(|e| CommandError::State(StateError::HybridKey(e)))?;
            m.hybrid_keys.push(key);
        }
        m.peer_hybrid_keys = PeerKeys::restore(p.peer_hybrid_keys);
        m.contacts = Contacts::restore(p.contacts)?;
        m.groups = Groups::restore(p.groups)?;
        for (ch, seq) in p.cursors {
            let ch = ChannelId::try_from_slice(&ch)
                .map_err(|_| CommandError::State(StateError::BadChannel(None)))?;
            m.cursors.insert(ch, seq);
        }
        m.outbox = Outbox::restore(p.outbox, p.next_outbox_id);
        m.direct = Direct::restore(p.direct_last_seqs, p.direct_taken);
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
            sealed_pq_groups: false,
            hybrid_keys: Vec::new(),
            peer_hybrid_keys: PeerKeys::default(),
            contacts: Contacts::default(),
            groups: Groups::default(),
            cursors: BTreeMap::new(),
            outbox: Outbox::default(),
            direct: Direct::default(),
            op: None,
            in_flight: BTreeMap::new(),
            now: Time::ZERO,
            link: Link::new(),
            refusals: Vec::new(),
            refusal_reason: String::new(),
            listening: false,
            listen_stale: false,
            listen_attempts: 0,
            listen_at: None,
            persist_at: None,
            accepted_commits: BTreeSet::new(),
            blocked: BTreeSet::new(),
            next_token: 0,
            effects: VecDeque::new(),
        }
    }

    /// Everything to persist, as bytes for the encrypted state file.
    pub fn snapshot(&self) -> Vec<u8> {
        let (outbox, next_outbox_id) = self.outbox.snapshot();
        let p = Persisted {
            version: STATE_VERSION,
            identity_seed: self.signer.0.to_bytes(),
            registered: self.registered,
            active: self.active,
            groups: self.groups.snapshot(),
            cursors: self
                .cursors
                .iter()
                .map(|(c, s)| (c.as_bytes().to_vec(), *s))
                .collect(),
            outbox,
            next_outbox_id,
            mls_storage: self.provider.storage_snapshot(),
            hybrid_keys: self
                .hybrid_keys
                .iter()
                .map(|k| k.to_bytes().to_vec())
                .collect(),
            peer_hybrid_keys: self.peer_hybrid_keys.snapshot(),
            contacts: self.contacts.to_list(),
            direct_last_seqs: self.direct.last_seqs(),
            direct_taken: self.direct.taken(),
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
            Ok(_) => Err(CommandError::HybridEnvelope(EnvelopeRefusal::NotHybrid)),
            Err(e) => Err(CommandError::HybridEnvelope(EnvelopeRefusal::Undecodable(
                e,
            ))),
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
                    channel_id: r.channel,
                    epoch: group.epoch().as_u64(),
                    members: members(&group),
                    pq: r.pq || group.ciphersuite() == PQ_CIPHERSUITE,
                    waiting: r.queue.len() + usize::from(r.commit.is_some()),
                })
            })
            .collect()
    }

    /// The MLS epoch authenticator of a group (equal for all members of the
    /// same epoch); for tests and diagnostics.
    pub fn epoch_authenticator(&self, group: &str) -> Option<Vec<u8>> {
        let r = self.groups.by_name(group)?;
        let g = self.load_group(r).ok()?;
        Some(g.epoch_authenticator().as_slice().to_vec())
    }

    /// Starts a command. Its effects follow from [`Self::poll_effect`]; the
    /// last one of the command is [`Effect::Done`]. One command runs at a
    /// time (another gets [`CommandError::Busy`]); the long-poll of
    /// [`Self::handle_listen`] and background deliveries go on beside it.
    pub fn handle_command(&mut self, now: Time, command: Command) {
        self.now = now;
        if self.op.is_some() {
            self.effects
                .push_back(Effect::Done(Err(CommandError::Busy)));
            return;
        }
        // Contacts are local: changed and persisted, with no request and no
        // effect on the deliveries and retries under way.
        let local = match command {
            Command::AddContact { name, key } => self.add_contact(name, key),
            Command::RemoveContact { name } => self.remove_contact(name),
            command => return self.start_remote(command),
        };
        if let Err(e) = local {
            self.effects.push_back(Effect::Done(Err(e)));
        }
    }

    /// Starts a command that may need the server.
    fn start_remote(&mut self, command: Command) {
        // Requests an earlier command left waiting for a connection (a
        // one-shot shell stops carrying requests at `Done`) are made anew
        // where still needed: outbox entries by the flush below (with the
        // same messageId, so stored once), fetches by this command. The
        // long-poll stays.
        self.in_flight
            .retain(|_, r| r.sent || matches!(r.pending, Pending::Listen));
        self.blocked.clear();
        // A new command tries the server again, and every delivery at once.
        self.link.given_up = false;
        self.link.reconnect_at = None;
        self.outbox.clear_retries();
        // Deliveries and changes left over from an earlier run go first.
        self.flush_outbox();
        self.resume();
        let result = match command {
            Command::Register { count } => self.start_register(count),
            Command::CreateGroup { name, pq } => self.create_group(name, pq),
            Command::AddMember { group, member } => self.start_add(group, member),
            Command::Send { group, text } => self.start_send(group, Content::text(text)),
            Command::SendContent { group, content } => self.start_send(group, content),
            Command::RemoveMember { group, member } => self.remove_member(group, member),
            Command::Leave { group } => self.leave(group),
            Command::Update { group } => self.update(group),
            Command::Receive { wait_ms } => self.start_receive(wait_ms),
            Command::AddContact { .. } | Command::RemoveContact { .. } => {
                unreachable!("handled above")
            }
        };
        if let Err(e) = result {
            self.fail(e);
        }
        self.settle();
    }

    /// The answer to the request `token`. Transport failures that end the
    /// connection come in through [`Self::handle_disconnected`] instead;
    /// others (a timeout) as `unavailable`. Answers to requests the machine
    /// no longer waits for are ignored.
    pub fn handle_response(
        &mut self,
        now: Time,
        token: u64,
        result: Result<Response, ServiceError>,
    ) {
        self.now = now;
        let Some(r) = self.in_flight.remove(&token) else {
            return;
        };
        self.dispatch(r.pending, result);
        self.settle();
    }

    /// Hands an answer to whatever the request was for.
    fn dispatch(&mut self, pending: Pending, result: Result<Response, ServiceError>) {
        match pending {
            Pending::Outbox(id) => self.on_enqueued(id, result),
            Pending::OutboxBatch(ids) => self.on_enqueued_batch(ids, result),
            Pending::Count(suite) => self.on_count(suite, result),
            Pending::Upload { fingerprint } => self.on_uploaded(fingerprint, result),
            Pending::UploadHybridKey => self.on_hybrid_key_uploaded(result),
            Pending::HybridKey(member) => self.on_hybrid_key(member, result),
            Pending::HybridKeyForAdd => self.on_hybrid_key_for_add(result),
            Pending::FetchKeyPackage => self.on_key_package(result),
            Pending::Fetch(ch) => self.on_messages(ch, result),
            Pending::Wait => self.on_channels(result),
            Pending::Listen => self.on_listen(result),
        }
    }

    /// The next effect, or `None`. A queued [`Effect::Persist`] always
    /// comes first, once for all of them: the shell may wait on any other
    /// effect (a connection, a request's answer) and be stopped there, and
    /// a change the machine made must be in the state file before that.
    /// The snapshot is the whole state, so writing it earlier than asked
    /// is always safe.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        if self.effects.iter().any(|e| matches!(e, Effect::Persist)) {
            self.effects.retain(|e| !matches!(e, Effect::Persist));
            // This write takes along every stored delivery.
            self.persist_at = None;
            return Some(Effect::Persist);
        }
        self.effects.pop_front()
    }

    // ----- plumbing ---------------------------------------------------------

    fn request(&mut self, pending: Pending, body: RequestBody) {
        let token = self.next_token;
        self.next_token += 1;
        self.in_flight.insert(
            token,
            InFlight {
                pending,
                body,
                sent: false,
            },
        );
        self.send_or_hold(token);
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

    /// Warns that a request for `what` was refused, unless it failed only
    /// because the server could not be reached: that is shown once, as
    /// [`Event::Disconnected`].
    fn warn_refused(&mut self, what: &str, e: &ServiceError) {
        if self.link.given_up && e.kind == ErrorKind::Unavailable {
            return;
        }
        self.warn(format!("{what} refused: {e}"));
    }

    fn fail(&mut self, e: CommandError) {
        // Outbox deliveries already sent keep going, and the long-poll;
        // the command ends.
        self.in_flight.retain(|_, r| {
            matches!(
                r.pending,
                Pending::Outbox(_)
                    | Pending::OutboxBatch(_)
                    | Pending::HybridKey(_)
                    | Pending::Listen
            )
        });
        self.op = None;
        self.effects.push_back(Effect::Done(Err(e)));
    }

    /// Finishes the running command once nothing it waits for is in flight
    /// or due for a retry.
    fn maybe_done(&mut self) {
        let policy = self.link.policy;
        if self.op.is_none()
            || self
                .in_flight
                .values()
                .any(|r| r.pending.holds_command(policy))
            || self.retries_hold_command()
            || (policy == LinkPolicy::OneShot && self.direct.in_flight().next().is_some())
        {
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
        // Counters and flags changed by the answers are persisted too.
        self.effects.push_back(Effect::Persist);
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
            Some(Op::Send {
                group,
                delivered,
                id,
            }) => Outcome::Sent {
                group,
                id,
                delivered,
                undelivered,
            },
            Some(Op::Receive { shown, .. }) => Outcome::Received { messages: shown },
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

    fn record(&self, name: &str) -> Result<Group, CommandError> {
        self.groups
            .by_name(name)
            .map(Group::head)
            .ok_or_else(|| CommandError::UnknownGroup(name.to_owned()))
    }

    fn load_group(&self, record: &Group) -> Result<MlsGroup, CommandError> {
        MlsGroup::load(self.provider.storage(), &record.id)
            .map_err(mls(MlsStep::Group))?
            .ok_or_else(|| CommandError::State(StateError::MissingGroup(record.name.clone())))
    }
}

/// Maps an openmls failure of `step` to the command's error.
fn mls<E: std::fmt::Display>(step: MlsStep) -> impl Fn(E) -> CommandError {
    move |e| CommandError::Mls(MlsError::new(step, e))
}

fn unexpected(r: &Response) -> CommandError {
    CommandError::Server(ServiceError::internal(format!("unexpected answer: {r:?}")))
}

#[cfg(test)]
mod tests;
