//! The client machine's public vocabulary: the commands a user gives, the
//! effects the shell carries out, the events and outcomes it shows, and the
//! errors a command ends with.

use super::*;

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
        /// Post-quantum: an MLS group of the hybrid post-quantum suite
        /// [`PQ_CIPHERSUITE`](super::PQ_CIPHERSUITE); members join with
        /// KeyPackages of that suite, which `register` uploads.
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
    /// Send typed content to a group: a text with a reply-to, an edit or a
    /// deletion of one's own earlier message, an attachment
    /// ([`content`](super::content)).
    SendContent {
        /// The group's name.
        group: String,
        /// What to send.
        content: Content,
    },
    /// Fetch and process everything pending; if nothing is, wait up to
    /// `wait_ms` for something to arrive.
    Receive {
        /// How long to wait when nothing is pending (0: don't wait).
        wait_ms: u64,
    },
    /// Name the identity `key` `name` in this user's contacts (a key
    /// already named is renamed). Local: persisted, nothing sent.
    AddContact {
        /// 1 to [`CONTACT_NAME_BYTES_MAX`] bytes, no control characters,
        /// not another key's name.
        name: String,
        /// Their identity key.
        key: IdentityKey,
    },
    /// Forget the contact `name`. Local: persisted, nothing sent.
    RemoveContact {
        /// The contact's name.
        name: String,
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
    /// Connect to the server and authenticate this user's identity, then
    /// report [`ClientMachine::handle_connected`] or
    /// [`ClientMachine::handle_connect_failed`]. Requests made meanwhile
    /// wait for it.
    Connect,
    /// Show this to the user.
    Event(Event),
    /// The command is finished.
    Done(Result<Outcome, CommandError>),
    /// Send `message` over the direct link to `peer` and pass whether the
    /// peer took it to [`ClientMachine::handle_direct_answer`] with `token`
    /// (not taken: refused, unanswered within
    /// [`DIRECT_ACK_TIMEOUT`](crate::limits::DIRECT_ACK_TIMEOUT), or the
    /// link broke).
    DirectSend {
        /// Identifies the answer.
        token: u64,
        /// The member it is for.
        peer: IdentityKey,
        /// What to send.
        message: crate::protocol::DirectMessage,
    },
    /// Answer the direct message of [`ClientMachine::handle_direct_message`]
    /// with `token`: taken (the state that processed it is written) or
    /// refused.
    DirectAnswer {
        /// The message.
        token: u64,
        /// Whether it was taken.
        taken: bool,
    },
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
        /// The sender's contact name, if this user gave them one.
        sender_name: Option<String>,
        /// What it says: the text, an attachment's file name, or a note
        /// that this version cannot show the content.
        text: String,
        /// Its seq in this user's queue of the group's channel.
        seq: u64,
        /// The sender's clock when it was made (Unix milliseconds), as the
        /// sender says; `None` from clients that do not send one.
        sent_at_ms: Option<u64>,
        /// Its id, which replies, edits and deletions refer to; `None` from
        /// clients that do not send one.
        id: Option<ContentId>,
        /// The message it answers.
        reply_to: Option<ContentId>,
        /// The file it carries.
        attachment: Option<Attachment>,
    },
    /// A member's new text for an earlier message. It applies only if that
    /// message has the same sender, which the receiver, holding the
    /// history, checks.
    Edited {
        /// The group's name.
        group: String,
        /// Who sent the edit.
        sender: IdentityKey,
        /// The sender's contact name, if this user gave them one.
        sender_name: Option<String>,
        /// The message edited.
        target: ContentId,
        /// Its new text.
        text: String,
        /// Its seq in this user's queue of the group's channel.
        seq: u64,
        /// The sender's clock when it was made.
        sent_at_ms: Option<u64>,
    },
    /// A member withdrew an earlier message. As for an edit, it applies
    /// only to a message of the same sender.
    Deleted {
        /// The group's name.
        group: String,
        /// Who deleted it.
        sender: IdentityKey,
        /// The sender's contact name, if this user gave them one.
        sender_name: Option<String>,
        /// The message deleted.
        target: ContentId,
        /// Its seq in this user's queue of the group's channel.
        seq: u64,
        /// The sender's clock when it was made.
        sent_at_ms: Option<u64>,
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
        /// The member who removed this user.
        by: IdentityKey,
    },
    /// `by` added `member` to a group: another member's Commit, or this
    /// user's once the server has taken it. Shown before the
    /// [`Event::GroupChanged`] of the same Commit.
    MemberAdded {
        /// The group's name.
        group: String,
        /// The new member.
        member: IdentityKey,
        /// Who added them (this user for its own Commits).
        by: IdentityKey,
    },
    /// `by` removed `member` from a group (as [`Event::MemberAdded`]).
    MemberRemoved {
        /// The group's name.
        group: String,
        /// The removed member.
        member: IdentityKey,
        /// Who removed them.
        by: IdentityKey,
    },
    /// `member` left a group: a Commit made their own removal proposal
    /// take effect (as [`Event::MemberAdded`]).
    MemberLeft {
        /// The group's name.
        group: String,
        /// The member who left.
        member: IdentityKey,
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
    /// Every other member has this message: the server stored it
    /// (durably) in their queues, or they took it over a direct link.
    Delivered {
        /// The group's name.
        group: String,
        /// The message id its copies carry.
        message_id: [u8; 16],
    },
    /// A connection to the server is up and authenticated.
    Connected,
    /// The connection could not be made or broke; the machine tries again
    /// in `retry_in_ms`.
    Reconnecting {
        /// What went wrong.
        reason: String,
        /// The pause before the next attempt.
        retry_in_ms: u64,
    },
    /// The machine stopped trying to reach the server until the next
    /// command: `permanent` when retrying cannot help (the certificate is
    /// not the trusted one, the server refuses this identity).
    Disconnected {
        /// What went wrong.
        reason: String,
        /// Retrying cannot help.
        permanent: bool,
    },
    /// A direct link to a member came up (`up`) or went down: while it is
    /// up, this user's messages to them go directly.
    DirectLink {
        /// The member.
        peer: IdentityKey,
        /// Their contact name, if this user gave them one.
        peer_name: Option<String>,
        /// Whether the link is up now.
        up: bool,
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
        /// The message's id, for replies, edits and deletions.
        id: ContentId,
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
    /// The contact is in the book.
    ContactAdded {
        /// Its name.
        name: String,
        /// Its identity key.
        key: IdentityKey,
        /// The key's previous name, if it had another one.
        renamed_from: Option<String>,
    },
    /// The contact is gone from the book.
    ContactRemoved {
        /// Its name.
        name: String,
        /// Its identity key.
        key: IdentityKey,
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
    /// The contact name is empty, too long or not printable.
    #[error("invalid contact name: {0}")]
    InvalidContactName(String),
    /// Another key has that contact name.
    #[error("a contact named `{0}` exists already (with another key)")]
    ContactExists(String),
    /// No contact has that name.
    #[error("no contact named `{0}`")]
    UnknownContact(String),
    /// The contact book holds [`CONTACTS_MAX`] contacts.
    #[error("the contact book is full ({CONTACTS_MAX} contacts); remove one first")]
    ContactsFull,
    /// The text is too long.
    #[error("message of {0} bytes is longer than {TEXT_BYTES_MAX}")]
    TextTooLong(usize),
    /// The content cannot be sent (too large, a bad media type or file
    /// name).
    #[error("{0}")]
    Content(#[from] ContentError),
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
    HybridEnvelope(EnvelopeRefusal),
    /// An MLS operation failed.
    #[error("MLS: {0}")]
    Mls(MlsError),
    /// The server refused a request the command needs.
    #[error("server: {0}")]
    Server(ServiceError),
    /// The persisted state does not decode.
    #[error("state: {0}")]
    State(StateError),
}

/// An MLS operation that failed: which step, and openmls' own words (its
/// error types differ from call to call, so they travel as text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{step}: {detail}")]
pub struct MlsError {
    /// What was being done.
    pub step: MlsStep,
    /// What went wrong.
    pub detail: String,
}

impl MlsError {
    /// A failure of `step`.
    pub fn new(step: MlsStep, detail: impl std::fmt::Display) -> MlsError {
        MlsError {
            step,
            detail: detail.to_string(),
        }
    }
}

/// The step of an [`MlsError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MlsStep {
    /// Reading a payload's envelope.
    #[error("the envelope")]
    Envelope,
    /// Decoding an MLS message.
    #[error("decoding")]
    Decode,
    /// Encoding an MLS message.
    #[error("encoding")]
    Encode,
    /// Creating a group or loading it from storage.
    #[error("the group")]
    Group,
    /// Making a Commit, a Welcome or a proposal.
    #[error("making a Commit")]
    Commit,
    /// Merging a Commit.
    #[error("merging a Commit")]
    Merge,
    /// Processing a received message.
    #[error("processing a message")]
    Process,
    /// Joining from a Welcome.
    #[error("joining")]
    Join,
    /// A member's credential.
    #[error("a credential")]
    Credential,
    /// A message for an epoch this member cannot reach.
    #[error("the epoch")]
    Epoch,
    /// The exporter key, and the group name it seals.
    #[error("the group name")]
    Exporter,
    /// Making a KeyPackage.
    #[error("making a KeyPackage")]
    KeyPackage,
    /// Encrypting an application message.
    #[error("encrypting")]
    Encrypt,
}

/// Why a hybrid envelope was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EnvelopeRefusal {
    /// A message of a pq group (named) came without one.
    #[error("a message in pq group `{0}` came without a hybrid envelope")]
    Missing(String),
    /// One hybrid envelope inside another.
    #[error("a hybrid envelope inside another")]
    Nested,
    /// The payload is not a hybrid envelope.
    #[error("not a hybrid payload")]
    NotHybrid,
    /// The payload does not decode.
    #[error("{0}")]
    Undecodable(EnvelopeError),
    /// Sealed to a key this user does not hold (its id's first bytes).
    #[error("sealed to hybrid key {0}…, which this user does not hold (never had, or rotated out)")]
    UnknownKey(String),
    /// It does not open.
    #[error("{0}")]
    DoesNotOpen(HybridError),
    /// Its Commit framing in the clear is not the Commit's inside.
    #[error("its commit framing is not the one of the Commit inside")]
    FramingMismatch,
    /// What it wraps does not decode.
    #[error("its content: {0}")]
    Content(EnvelopeError),
}

/// What is wrong with a persisted state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StateError {
    /// The bytes do not decode (the decoder's words).
    #[error("state does not decode: {0}")]
    Undecodable(String),
    /// A layout version this build does not read.
    #[error("state version {0} is not the supported {STATE_VERSION} (or 3, 2 or 1)")]
    Version(u32),
    /// A channel id that does not parse (of the named group, if any).
    #[error("a bad channel id{}", .0.as_ref().map(|g| format!(" in group `{g}`")).unwrap_or_default())]
    BadChannel(Option<String>),
    /// A group whose MLS state is missing.
    #[error("group `{0}` missing from MLS storage")]
    MissingGroup(String),
    /// The contact book breaks its own rules.
    #[error("contact: {0}")]
    Contact(String),
    /// A kept hybrid secret key does not decode.
    #[error("hybrid secret key: {0}")]
    HybridKey(HybridError),
}

/// Where the user is in the life cycle (ARCHITECTURE.md § Client life cycle).
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
    /// Post-quantum: an MLS group of [`PQ_CIPHERSUITE`](super::PQ_CIPHERSUITE),
    /// or a sealed group of an earlier version (classic MLS, everything in
    /// hybrid envelopes).
    pub pq: bool,
    /// Changes and messages this user asked for that the server has not
    /// taken yet: a Commit awaiting acceptance and what queues behind it.
    pub waiting: usize,
}
