//! Every limit of the core in one place, each with the reason for its
//! value, in sections: the wire, the Authentication Service, the Delivery
//! Service, waiting, connections and rate limits (the NodeService), the
//! client machine, direct links between members, and the server's backups.
//! Operators can change the ones that
//! [`crate::node::NodeConfig`] carries through `qpq-server.toml`; the rest
//! are protocol constants.
//!
//! Invariant: anything a peer can grow (queues, maps, waiters, per-call work)
//! is bounded by one of these, and hitting a bound is answered with an explicit
//! error, never a silent drop.

use std::time::Duration;

// ----- the wire --------------------------------------------------------------

/// Version of the connection-authentication scheme a request carries; any
/// other value is refused so old clients fail loudly instead of subtly.
pub const AUTH_VERSION: u16 = 1;

/// Length of an Ed25519 public key, the identity of a user (RFC 8032).
pub const IDENTITY_KEY_BYTES: usize = 32;
/// Length of an Ed25519 signature (RFC 8032).
pub const SIGNATURE_BYTES: usize = 64;
/// Longest channel id: a 16-byte UUID names a conversation.
pub const CHANNEL_ID_BYTES_MAX: usize = 16;
/// Length of the sender-chosen message id used to make enqueue idempotent.
pub const MESSAGE_ID_BYTES: usize = 16;
/// Length of an authentication nonce: 256 bits cannot be guessed or repeat.
pub const AUTH_NONCE_BYTES: usize = 32;
/// Length of the TLS exporter value the shell derives for each connection.
pub const TLS_EXPORTER_BYTES: usize = 32;

/// Largest enqueued payload. A Welcome for a 200-member group is ~66 KiB;
/// 1 MiB leaves room for large groups and post-quantum envelopes.
pub const PAYLOAD_BYTES_MAX: usize = 1024 * 1024;
/// Largest KeyPackage. A classic MLS KeyPackage is ~300 bytes and a
/// post-quantum one a few KiB; anything bigger is not a KeyPackage.
pub const KEY_PACKAGE_BYTES_MAX: usize = 64 * 1024;
/// Largest hybrid public key blob: X25519 (32) + ML-KEM-768 (1184) plus
/// framing fits easily; the bound stops the AS being used as a file store.
pub const HYBRID_KEY_BYTES_MAX: usize = 4 * 1024;

// ----- the Authentication Service --------------------------------------------

/// KeyPackages one identity may keep on the server: enough to be added to
/// many groups while offline, small enough that one identity cannot fill the
/// disk.
pub const KEY_PACKAGES_PER_IDENTITY_MAX: u32 = 1_000;

/// The pool a KeyPackage goes to, and is fetched from, when the request
/// names no cipher suite: what clients that predate pools use, and where
/// qpq keeps its classic (0x0001) KeyPackages.
pub const DEFAULT_POOL: u16 = 0;

/// The MLS cipher suites an identity may keep a KeyPackage pool for,
/// besides [`DEFAULT_POOL`]: those of RFC 9420 (0x0001-0x0007) and the
/// hybrid post-quantum ones of draft-ietf-mls-pq-ciphersuites that openmls
/// implements (0x004D-0x004F). Each pool holds at most
/// `key_packages_per_identity_max` packages and one last-resort package;
/// the list bounds how many pools one identity can fill. The server does
/// not parse a KeyPackage: the uploader names its pool, and a fetcher
/// checks the suite of what it gets.
pub const KEY_PACKAGE_SUITES: [u16; 10] = [
    0x0001, 0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x0007, 0x004D, 0x004E, 0x004F,
];

// ----- the Delivery Service --------------------------------------------------

/// Messages one queue may hold before enqueue answers `queueFull`: a
/// recipient offline for a long time in busy groups, not a dumping ground.
pub const QUEUE_DEPTH_MAX: u64 = 10_000;
/// Bytes of payload one queue may hold before enqueue answers `queueFull`.
pub const QUEUE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// Retried enqueues are recognised by message id among the most recent this
/// many enqueues to the same queue; a sender retries within seconds, and
/// thousands of other messages to one recipient in between is far beyond it.
pub const DEDUP_WINDOW_PER_QUEUE: u64 = 4_096;

/// Most messages one fetch returns, so one call's work and reply are bounded.
pub const FETCH_LIMIT_MAX: u32 = 1_000;
/// Most payload bytes one fetch returns (at least one message is always
/// returned if one is pending); keeps replies under the wire limit.
pub const FETCH_RESPONSE_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Recipients of one `enqueueBatch`: a large MLS group. 1,000 keys are
/// 32 KB of request, well inside the request limit beside a full payload.
pub const ENQUEUE_BATCH_RECIPIENTS_MAX: usize = 1_000;
/// Messages in one `enqueueMany`: enough for a sender to move its backlog
/// to a queue in a few round trips, few enough that the dedup window of
/// each queue ([`DEDUP_WINDOW_PER_QUEUE`]) spans many requests.
pub const ENQUEUE_MANY_MESSAGES_MAX: usize = 64;
/// Recipients times messages in one `enqueueMany`: the queue entries one
/// request writes.
pub const ENQUEUE_MANY_ENTRIES_MAX: usize = 4_096;
/// Payload bytes of one `enqueueMany`, all messages together: what one
/// largest `enqueue` carries, so it fits the same request limit.
pub const ENQUEUE_MANY_BYTES_MAX: usize = PAYLOAD_BYTES_MAX;
const _: () = assert!((ENQUEUE_MANY_MESSAGES_MAX as u64) < DEDUP_WINDOW_PER_QUEUE);
/// Accepted Commits a commit fence remembers (digests of the last ones, one
/// per epoch), so a copy of an accepted Commit that reaches its last
/// recipients late — after the group moved on by up to this many epochs —
/// still passes. 16 bytes each: at most 520 bytes per group and channel.
pub const COMMIT_FENCE_HISTORY: usize = 32;
/// Channels one `fetchWaitChannels` call may wait on.
pub const FETCH_WAIT_CHANNELS_MAX: usize = 256;
/// `(queue, waiter)` registrations all waiting calls together may hold (a
/// `fetchWait` holds one, a `fetchWaitChannels` one per channel); beyond it
/// new waits are answered `unavailable`. Bounds the wake-up index's memory
/// (about 100 bytes each).
pub const WAIT_CURSORS_MAX: usize = 1_000_000;

/// Messages one request drops from one queue for being older than the
/// message TTL; the rest go with the queue's next reads and writes, so no
/// request does unbounded work.
pub const TTL_EXPIRY_PER_REQUEST_MAX: u64 = 1_000;
/// Records (queue counters, and commit fences) one step of the background
/// sweep looks at, each; with the expiry bound above, one step's work and
/// batch are bounded.
pub const SWEEP_RECORDS_PER_STEP: usize = 256;
/// Queue counters the machine keeps in memory (it is their only writer, so
/// a copy saves a read per request); when full, it forgets them all and
/// refills from the store. About 150 bytes each: 100,000 take ~15 MB.
pub const QUEUE_COUNTERS_CACHED_MAX: usize = 100_000;
/// How long a commit fence outlives its group's last Commit before the
/// sweep deletes it: 90 days, longer than a KeyPackage lives
/// ([`KEY_PACKAGE_LIFETIME_SECS`](crate::client::KEY_PACKAGE_LIFETIME_SECS),
/// 84 days). A group whose fence is gone gets a new one from its next
/// Commit; what is lost is only the refusal of a Commit for an epoch the
/// group left more than 90 days ago (a member that slept that long).
pub const FENCE_TTL: Duration = Duration::from_secs(90 * 24 * 60 * 60);

// ----- waiting ---------------------------------------------------------------

/// Longest a fetchWait may block; longer requests are clamped to it. Shorter
/// than the QUIC idle timeout so a waiting connection is never idle-closed.
pub const FETCH_WAIT_TIMEOUT_MS_MAX: u64 = 25_000;
/// Long-poll waiters one connection may hold: one per channel a client
/// follows, with room to spare.
pub const WAITERS_PER_CONNECTION_MAX: usize = 64;
/// Long-poll waiters the whole server holds before answering `unavailable`.
pub const WAITERS_MAX: usize = 100_000;

// ----- connections -----------------------------------------------------------

/// Connections the machine tracks at once; the shell enforces the same bound
/// earlier, this one keeps the core's map bounded on its own.
pub const CONNECTIONS_MAX: usize = 100_000;

// ----- rate limits -----------------------------------------------------------

/// Distinct keys each rate limiter tracks. Keys whose bucket has refilled are
/// forgotten first; when all are busy, new keys are refused with
/// `rateLimited` rather than letting the map grow.
pub const RATE_LIMIT_KEYS_MAX: usize = 100_000;

/// KeyPackage fetches one requester may make for one target: a burst to add
/// someone to a few groups at once, then a slow refill.
pub const KEY_PACKAGE_FETCH_PER_PAIR_BURST: u32 = 20;
/// Refill rate of the per-(requester, target) KeyPackage fetch bucket.
pub const KEY_PACKAGE_FETCH_PER_PAIR_PER_SEC: u32 = 1;
/// KeyPackage fetches all requesters together may make for one target, so
/// many fresh identities cannot drain a victim's pool quickly.
pub const KEY_PACKAGE_FETCH_PER_TARGET_BURST: u32 = 100;
/// Refill rate of the per-target KeyPackage fetch bucket.
pub const KEY_PACKAGE_FETCH_PER_TARGET_PER_SEC: u32 = 5;
/// Enqueues one sender identity may burst.
pub const ENQUEUE_PER_SENDER_BURST: u32 = 20_000;
/// Sustained enqueues per second for one sender identity.
pub const ENQUEUE_PER_SENDER_PER_SEC: u32 = 10_000;

// ----- the client machine ---------------------------------------------------

/// Messages asked for per fetch.
pub const FETCH_BATCH: u32 = 100;
/// Longest group name, in bytes.
pub const GROUP_NAME_BYTES_MAX: usize = 64;
/// Longest contact name, in bytes (as long as a group name).
pub const CONTACT_NAME_BYTES_MAX: usize = 64;
/// Contacts kept at most: far more than anyone names by hand, and each
/// one is loaded and persisted with the state on every command.
pub const CONTACTS_MAX: usize = 10_000;
/// Longest message text, in bytes; well inside the server's payload limit
/// after MLS framing.
pub const TEXT_BYTES_MAX: usize = 64 * 1024;
/// Largest attachment in one message: 1 MB, which with its headers and
/// MLS's framing stays under [`PAYLOAD_BYTES_MAX`].
pub const ATTACHMENT_BYTES_MAX: usize = 1_000_000;
/// Longest media type of an attachment (`type/subtype`).
pub const MEDIA_TYPE_BYTES_MAX: usize = 127;
/// Longest file name of an attachment.
pub const ATTACHMENT_NAME_BYTES_MAX: usize = 255;
/// KeyPackages one `register` may generate at once.
pub const REGISTER_COUNT_MAX: u32 = 100;
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
/// First pause before reconnecting after a failed connection attempt
/// ([`crate::client::LinkPolicy::KeepTrying`]); it doubles with each failure.
pub const RECONNECT_BACKOFF_INITIAL: Duration = Duration::from_millis(250);
/// Longest pause between connection attempts: a server back from a
/// restart is found within this.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// First pause before a failed delivery (or long-poll) is tried again; it
/// doubles with each failure.
pub const RETRY_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// Longest pause between attempts of one delivery, whatever the server's
/// retry hint: a delivery is never parked for longer than this.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Attempts of one delivery that a command waits for under
/// [`crate::client::LinkPolicy::OneShot`] (100 + 200 + 400 + 800 ms of pauses) before it
/// ends with the delivery still in the outbox for the next command.
pub const RETRY_ATTEMPTS_PER_COMMAND: u32 = 5;
/// How long a long-lived machine ([`crate::client::LinkPolicy::KeepTrying`]) may hold a
/// stored delivery's removal from the outbox before it asks for a write
/// ([`crate::client::Effect::Persist`]); any earlier write takes it along. A crash in
/// between sends those copies again, and the server, which keeps each
/// queue's last [`DEDUP_WINDOW_PER_QUEUE`] message ids,
/// stores them once; so a sender's state file is written once per message
/// it makes, not once more per delivery.
pub const STORED_PERSIST_DELAY: Duration = Duration::from_millis(200);
/// How long one long-poll of a listening machine waits: the server's
/// longest wait, so an idle session makes one request per this.
pub const LISTEN_WAIT_MS: u64 = FETCH_WAIT_TIMEOUT_MS_MAX;

// ----- direct links between members (peer-to-peer) ---------------------------

/// Longest frame header of a direct message: version, channel id length,
/// channel id, message id, the seq it follows, payload length.
pub const DIRECT_HEADER_BYTES_MAX: usize = 1 + 1 + CHANNEL_ID_BYTES_MAX + MESSAGE_ID_BYTES + 8 + 4;
/// Direct messages one peer may have in flight on one connection (one
/// stream each): enough to keep a conversation flowing, few enough that a
/// peer cannot hold much of this client's memory (at most this many times
/// [`PAYLOAD_BYTES_MAX`]).
pub const DIRECT_STREAMS_MAX: u32 = 16;
/// Direct connections one endpoint keeps open at once, in and out: a
/// client talks directly to the members of its groups on its network,
/// not to a crowd.
pub const DIRECT_CONNECTIONS_MAX: u32 = 64;
/// A direct connection with no traffic closes after this; the next
/// message connects again (or goes through the server).
pub const DIRECT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a direct connection attempt may take before the message goes
/// through the server instead: peers on one network answer in
/// milliseconds.
pub const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a direct message waits for the peer's acknowledgement before
/// it goes through the server instead.
pub const DIRECT_ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// A direct connection sends a keep-alive this often, so a link between
/// two running members stays up through quiet spells.
pub const DIRECT_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// A member with no direct link up is tried again this often (when its
/// address is known or mDNS finds it); a link whose send went unanswered
/// is closed and tried again after this too.
pub const DIRECT_REDIAL: Duration = Duration::from_secs(5);
/// Digests of payloads a client took over direct links that it keeps
/// (persisted, oldest dropped first), to recognize a server copy of one
/// whose answer the sender never got: 32 bytes each.
pub const DIRECT_TAKEN_MAX: usize = 1_024;

// ----- backups of a server (qpq-server backup and restore) -------------------

/// Files of the data directory a backup carries besides the database (the
/// generated TLS certificate and key, other key files): a data directory
/// holds a handful, and a backup of one with more is refused.
pub const BACKUP_FILES_MAX: usize = 64;
/// Bytes of one such file: keys and certificates take a few KiB, and a
/// larger file is refused by name rather than carried.
pub const BACKUP_FILE_BYTES_MAX: usize = 1024 * 1024;
/// Bytes of one such file's name: the longest name Linux filesystems take.
pub const BACKUP_FILE_NAME_BYTES_MAX: usize = 255;
/// Bytes of one record's value in a backup. The largest record the server
/// writes is one payload ([`PAYLOAD_BYTES_MAX`]) and its entry's header;
/// a longer length in a backup file is refused as corrupt before anything
/// is allocated for it.
pub const BACKUP_VALUE_BYTES_MAX: usize = 2 * PAYLOAD_BYTES_MAX;
/// Records read from a snapshot per range read, and written per batch on
/// restore.
pub const BACKUP_RECORDS_PER_CHUNK: usize = 1_000;
/// Bytes of keys and values per chunk: a backup and a restore hold one
/// chunk at a time, so their memory is bounded whatever the records' sizes.
pub const BACKUP_CHUNK_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Backups a server streams over its admin socket at once. Each holds a
/// snapshot, which keeps the versions it reads from being compacted away,
/// so another request meanwhile is refused ("a backup is already running").
pub const ADMIN_BACKUPS_MAX: usize = 1;
/// Connections the admin socket serves at once, each bounded in time by
/// [`ADMIN_REQUEST_TIMEOUT`] and [`BACKUP_STALL_TIMEOUT`]; one beyond them
/// is closed unanswered.
pub const ADMIN_CONNECTIONS_MAX: usize = 4;
/// Bytes of a request on the admin socket (one line).
pub const ADMIN_REQUEST_BYTES_MAX: usize = 64;
/// Bytes of the error line a server answers on the admin socket that the
/// backup command reads.
pub const ADMIN_ERROR_BYTES_MAX: usize = 1024;
/// Time a client of the admin socket has to send its request.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Either end of a backup stream gives up when the other has not moved
/// for this long: a stalled `qpq-server backup` must not hold the server's
/// snapshot for ever, nor a stalled server the command.
pub const BACKUP_STALL_TIMEOUT: Duration = Duration::from_secs(30);
