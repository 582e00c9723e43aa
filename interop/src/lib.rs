//! A group member on an independent MLS stack: [`Foreign`] runs mls-rs
//! (RFC 9420) with the RustCrypto provider, and talks to qpq-server the way
//! the qpq client does, through qpq's own transport
//! ([`quicproquo_client::Client`]), payload envelope
//! ([`quicproquo_core::client::Envelope`]) and application content
//! ([`quicproquo_core::client::content`]). Only the MLS stack is
//! independent, so a test that puts it in a group with the real qpq client
//! shows whether qpq still speaks MLS as RFC 9420 and another
//! implementation do (ARCHITECTURE.md § Interoperability).
//!
//! It keeps qpq's MLS profile (ARCHITECTURE.md § MLS profile): ciphersuite
//! 0x0001, a BasicCredential whose identity is the Ed25519 signature public
//! key (also its identity on the server), the ratchet tree in every
//! Welcome, and it checks that every member it adds or meets follows the
//! same credential rule. A member made with [`Foreign::with_grease`] puts
//! GREASE values (RFC 9420 §13.5) where a peer in the wild may: its
//! capabilities' extension types, its LeafNode's and KeyPackages'
//! extensions, and the GroupInfo of its Welcomes.
//!
//! A harness, not a client: it holds one group at a time, waits for
//! nothing by itself (the caller long-polls with [`Foreign::receive`]) and
//! keeps its state in memory only.

use std::collections::BTreeMap;

use chacha20poly1305::ChaCha20Poly1305;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use ed25519_dalek::SigningKey;
use mls_rs::client_builder::{BaseConfig, WithCryptoProvider, WithIdentityProvider};
use mls_rs::crypto::{SignaturePublicKey, SignatureSecretKey};
use mls_rs::error::MlsError;
use mls_rs::extension::ExtensionType;
use mls_rs::group::{CommitEffect, ReceivedMessage};
use mls_rs::identity::SigningIdentity;
use mls_rs::identity::basic::{BasicCredential, BasicIdentityProvider};
use mls_rs::{CipherSuite, Client, Extension, ExtensionList, Group, MlsMessage};
use mls_rs_crypto_rustcrypto::RustCryptoProvider;
use quicproquo_client::ClientError;
use quicproquo_core::ErrorKind;
use quicproquo_core::client::envelope::NAME_NONCE_BYTES;
use quicproquo_core::client::{Envelope, EnvelopeError, GROUP_NAME_EXPORTER_LABEL, content};
use quicproquo_core::types::{ChannelId, IdentityKey};
use rand_core::{OsRng, RngCore};

/// qpq's ciphersuite, MLS_128_DHKEMX25519_AES128GCM_SHA256_Ed25519 (0x0001).
pub const CIPHERSUITE: CipherSuite = CipherSuite::CURVE25519_AES128;

/// The mls-rs configuration of a [`Foreign`] member.
pub type Config =
    WithIdentityProvider<BasicIdentityProvider, WithCryptoProvider<RustCryptoProvider, BaseConfig>>;

/// Why a [`Foreign`] operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForeignError {
    /// mls-rs refused or failed.
    #[error("mls-rs: {0}")]
    Mls(#[from] MlsError),
    /// The server refused, or the connection failed.
    #[error("server: {0}")]
    Server(#[from] ClientError),
    /// A payload is not a qpq envelope.
    #[error("{0}")]
    Envelope(#[from] EnvelopeError),
    /// Something qpq's profile does not allow, or this harness cannot do.
    #[error("{0}")]
    Profile(String),
}

/// What [`Foreign::receive`] processed, in queue order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    /// Joined a group from a Welcome.
    Joined {
        /// The group's name, opened with the epoch's exporter secret.
        name: String,
        /// Members of the group.
        members: usize,
    },
    /// An application message.
    Text {
        /// Who sent it.
        sender: IdentityKey,
        /// Its text (qpq's content layout, or bare UTF-8).
        text: String,
        /// The sender's clock, if it sent one.
        sent_at_ms: Option<u64>,
    },
    /// Another member's Commit moved the group to `epoch`.
    Commit {
        /// Who made it.
        committer: IdentityKey,
        /// The new epoch.
        epoch: u64,
    },
    /// A Commit removed this member; the group is forgotten.
    Removed {
        /// Who removed it.
        by: IdentityKey,
    },
    /// A proposal, kept for a later Commit.
    Proposal,
}

/// How a Commit of this member fared at the server's commit fence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Commits made until one was accepted: 1 unless another member's
    /// Commit for the same epoch came first.
    pub attempts: u32,
    /// The epoch the group is at afterwards.
    pub epoch: u64,
}

/// One member's group: the mls-rs state and qpq's channel and name.
struct Joined {
    group: Group<Config>,
    channel: ChannelId,
    name: String,
}

/// A group member on mls-rs, connected to a qpq-server.
pub struct Foreign {
    identity: IdentityKey,
    mls: Client<Config>,
    server: quicproquo_client::Client,
    group: Option<Joined>,
    /// The last seq processed, per channel of this member's queues.
    cursors: BTreeMap<ChannelId, u64>,
    /// The GREASE extension types this member uses, if it greases.
    grease: Option<Grease>,
}

/// A GREASE-using member's extension types (RFC 9420 §13.5), drawn at
/// random once: one for its LeafNodes' extensions, one for its
/// KeyPackages', one for its GroupInfos'. The first two are listed in its
/// capabilities, as RFC 9420 §7.2 and §10 require of any extension a
/// LeafNode or KeyPackage carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grease {
    /// In every LeafNode's extensions.
    pub leaf: u16,
    /// In every KeyPackage's extensions.
    pub key_package: u16,
    /// In the GroupInfo of every Welcome it makes.
    pub group_info: u16,
}

impl Grease {
    fn draw() -> Grease {
        let pick = || GREASE_VALUES[OsRng.next_u32() as usize % GREASE_VALUES.len()];
        let leaf = pick();
        let mut key_package = pick();
        while key_package == leaf {
            key_package = pick();
        }
        Grease {
            leaf,
            key_package,
            group_info: pick(),
        }
    }

    /// An extension of GREASE type `t` with a few random bytes, which a
    /// receiver ignores (§13.5).
    fn extension(t: u16) -> ExtensionList {
        let mut data = vec![0u8; 1 + OsRng.next_u32() as usize % 8];
        OsRng.fill_bytes(&mut data);
        let mut list = ExtensionList::new();
        list.set(Extension::new(ExtensionType::new(t), data));
        list
    }
}

/// The GREASE values of RFC 9420 §13.5.
pub const GREASE_VALUES: [u16; 15] = [
    0x0A0A, 0x1A1A, 0x2A2A, 0x3A3A, 0x4A4A, 0x5A5A, 0x6A6A, 0x7A7A, 0x8A8A, 0x9A9A, 0xAAAA, 0xBABA,
    0xCACA, 0xDADA, 0xEAEA,
];

impl Foreign {
    /// A member with signature (and identity) key `key`, talking through
    /// `server`, which must be authenticated as `key`.
    pub fn new(key: SigningKey, server: quicproquo_client::Client) -> Foreign {
        Self::make(key, server, None)
    }

    /// As [`Foreign::new`], but a member that greases (see [`Grease`]).
    pub fn with_grease(key: SigningKey, server: quicproquo_client::Client) -> Foreign {
        Self::make(key, server, Some(Grease::draw()))
    }

    fn make(key: SigningKey, server: quicproquo_client::Client, grease: Option<Grease>) -> Foreign {
        let public = key.verifying_key().to_bytes();
        let credential = BasicCredential::new(public.to_vec()).into_credential();
        let signing_identity =
            SigningIdentity::new(credential, SignaturePublicKey::new(public.to_vec()));
        // The RustCrypto provider's Ed25519 secret key is the 64-byte
        // keypair encoding.
        let secret = SignatureSecretKey::new(key.to_keypair_bytes().to_vec());
        let listed: Vec<ExtensionType> = grease
            .iter()
            .flat_map(|g| [g.leaf, g.key_package])
            .map(ExtensionType::new)
            .collect();
        let mls = Client::builder()
            .identity_provider(BasicIdentityProvider)
            .crypto_provider(RustCryptoProvider::default())
            .extension_types(listed)
            .signing_identity(signing_identity, secret, CIPHERSUITE)
            .build();
        Foreign {
            identity: IdentityKey(public),
            mls,
            server,
            group: None,
            cursors: BTreeMap::new(),
            grease,
        }
    }

    /// The GREASE values this member uses, if it greases.
    pub fn grease(&self) -> Option<Grease> {
        self.grease
    }

    /// This member's identity key (its Ed25519 public key).
    pub fn identity(&self) -> IdentityKey {
        self.identity
    }

    /// Makes `count` KeyPackages, uploads them as `MLSMessage`s and returns
    /// what was uploaded.
    pub async fn upload_key_packages(&self, count: usize) -> Result<Vec<Vec<u8>>, ForeignError> {
        let mut uploaded = Vec::with_capacity(count);
        for _ in 0..count {
            let package = self
                .mls
                .generate_key_package_message(
                    self.key_package_extensions(),
                    self.leaf_extensions(),
                    None,
                )?
                .to_bytes()?;
            self.server
                .upload_key_package(self.identity, package.clone(), false)
                .await?;
            uploaded.push(package);
        }
        Ok(uploaded)
    }

    /// Creates a group named `name` with this member alone in it, on a new
    /// random channel.
    pub fn create_group(&mut self, name: &str) -> Result<(), ForeignError> {
        let group = self
            .mls
            .create_group(ExtensionList::new(), self.leaf_extensions(), None)?;
        let mut channel = [0u8; 16];
        OsRng.fill_bytes(&mut channel);
        self.group = Some(Joined {
            group,
            channel: channel_id(&channel)?,
            name: name.to_owned(),
        });
        Ok(())
    }

    /// Adds `member`: pops one of their KeyPackages from the server, checks
    /// it is theirs, commits the add and, once the server took the Commit,
    /// sends the Welcome in qpq's envelope to their default channel.
    pub async fn add(&mut self, member: IdentityKey) -> Result<Committed, ForeignError> {
        let (package, _last_resort) = self.server.fetch_key_package(member).await?;
        let package = MlsMessage::from_bytes(&package)?;
        let key_package = package
            .as_key_package()
            .ok_or_else(|| profile("the server returned no KeyPackage"))?;
        check_identity(key_package.signing_identity(), member)?;
        let mut welcome = None;
        let group_info_extensions = self.group_info_extensions();
        let committed = self
            .commit_until_accepted(|group| {
                let output = group
                    .commit_builder()
                    .add_member(package.clone())?
                    .set_group_info_ext(group_info_extensions.clone())
                    .build()?;
                welcome = output.welcome_messages.into_iter().next();
                Ok(output.commit_message)
            })
            .await?;
        let welcome = welcome.ok_or_else(|| profile("the add made no Welcome"))?;
        let joined = self.joined()?;
        let mut nonce = [0u8; NAME_NONCE_BYTES];
        OsRng.fill_bytes(&mut nonce);
        let payload = Envelope::Welcome {
            channel_id: joined.channel,
            nonce,
            sealed_name: seal_name(joined, &nonce)?,
            welcome: welcome.to_bytes()?,
        }
        .encode();
        self.server
            .enqueue(
                member,
                ChannelId::DEFAULT,
                payload,
                quicproquo_client::random_message_id(),
            )
            .await?;
        Ok(committed)
    }

    /// Commits an update of this member's own leaf (a new HPKE key through
    /// the tree: RFC 9420 §12.4, an empty Commit with a path).
    pub async fn update(&mut self) -> Result<Committed, ForeignError> {
        self.commit_until_accepted(|group| Ok(group.commit_builder().build()?.commit_message))
            .await
    }

    /// Commits the removal of `member`; they get the Commit too, so they
    /// learn it.
    pub async fn remove(&mut self, member: IdentityKey) -> Result<Committed, ForeignError> {
        self.commit_until_accepted(|group| {
            let index = group
                .roster()
                .members_iter()
                .find(|m| m.signing_identity.signature_key.as_bytes() == member.as_bytes())
                .ok_or_else(|| MlsError::MemberNotFound)?
                .index;
            Ok(group
                .commit_builder()
                .remove_member(index)?
                .build()?
                .commit_message)
        })
        .await
    }

    /// Makes an update Commit without sending it: the group keeps it
    /// pending until [`Foreign::apply_pending_commit`] or
    /// [`Foreign::redo_update_after_losing`]. With
    /// [`Foreign::enqueue_commit_to`] a test sends its copies one by one, to
    /// race another member's Commit for the same epoch.
    pub fn make_update(&mut self) -> Result<MlsMessage, ForeignError> {
        let group = &mut self.joined_mut()?.group;
        Ok(group.commit_builder().build()?.commit_message)
    }

    /// Enqueues one copy of `commit` for `recipient` on the group's
    /// channel; `false` if the server's commit fence refused it
    /// (`staleEpoch`: another member's Commit won the epoch).
    pub async fn enqueue_commit_to(
        &self,
        recipient: IdentityKey,
        commit: &MlsMessage,
    ) -> Result<bool, ForeignError> {
        let joined = self.joined()?;
        let sent = self
            .server
            .enqueue(
                recipient,
                joined.channel,
                group_payload(commit)?,
                quicproquo_client::random_message_id(),
            )
            .await;
        match sent {
            Ok(_) => Ok(true),
            Err(e) if lost_epoch(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies the pending Commit (the server took it); returns the new
    /// epoch.
    pub fn apply_pending_commit(&mut self) -> Result<u64, ForeignError> {
        let group = &mut self.joined_mut()?.group;
        group.apply_pending_commit()?;
        Ok(group.current_epoch())
    }

    /// The pending Commit lost its epoch: drops it, processes the channel
    /// until the winning Commit is in, and commits the update again.
    pub async fn redo_update_after_losing(&mut self) -> Result<Committed, ForeignError> {
        self.catch_up_after_losing().await?;
        let mut again = self.update().await?;
        again.attempts += 1;
        Ok(again)
    }

    /// Encrypts `text` as a qpq application message and sends it to every
    /// other member.
    pub async fn send(&mut self, text: &str) -> Result<(), ForeignError> {
        let sent_at_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut id = [0u8; content::CONTENT_ID_BYTES];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut id);
        let data = content::encode(
            &content::Content::text(text),
            content::ContentId(id),
            sent_at_ms,
        );
        let joined = self.joined_mut()?;
        let message = joined
            .group
            .encrypt_application_message(&data, Vec::new())?;
        self.broadcast(&message).await?;
        Ok(())
    }

    /// Fetches and processes what is queued for this member: Welcomes on
    /// the default channel, then the group's channel. Waits up to
    /// `wait_ms` for the first message on the channel it watches (the
    /// group's once in one, else the default one) when none is queued.
    pub async fn receive(&mut self, wait_ms: u64) -> Result<Vec<Received>, ForeignError> {
        let mut out = Vec::new();
        let watching = self
            .group
            .as_ref()
            .map_or(ChannelId::DEFAULT, |g| g.channel);
        let mut channels = vec![ChannelId::DEFAULT];
        if watching != ChannelId::DEFAULT {
            channels.push(watching);
        }
        let mut any = false;
        for channel in channels {
            let after = self.cursors.get(&channel).copied().unwrap_or(0);
            let fetched = if channel == watching && wait_ms > 0 && !any {
                self.server
                    .fetch_wait(self.identity, channel, after, FETCH_LIMIT, wait_ms)
                    .await?
            } else {
                self.server
                    .fetch(self.identity, channel, after, FETCH_LIMIT)
                    .await?
            };
            for m in fetched.messages {
                any = true;
                self.cursors.insert(channel, m.seq);
                if let Some(r) = self.process(channel, &m.payload).await? {
                    out.push(r);
                }
            }
        }
        Ok(out)
    }

    /// The group's current epoch.
    pub fn epoch(&self) -> Result<u64, ForeignError> {
        Ok(self.joined()?.group.current_epoch())
    }

    /// The group's epoch authenticator (RFC 9420 §8.7).
    pub fn epoch_authenticator(&self) -> Result<Vec<u8>, ForeignError> {
        Ok(self.joined()?.group.epoch_authenticator()?.to_vec())
    }

    /// Whether this member is in a group.
    pub fn in_group(&self) -> bool {
        self.group.is_some()
    }

    /// The group's members' identity keys, in leaf order.
    pub fn members(&self) -> Result<Vec<IdentityKey>, ForeignError> {
        Ok(members(&self.joined()?.group))
    }

    /// The raw mls-rs group, for checks a test makes on its state.
    pub fn group(&self) -> Option<&Group<Config>> {
        self.group.as_ref().map(|g| &g.group)
    }

    // ----- helpers ----------------------------------------------------------

    /// Makes a Commit with `make`, sends it and applies it once the server
    /// took it; on `staleEpoch` (another member's Commit won the epoch)
    /// drops it, catches up and makes it again.
    async fn commit_until_accepted(
        &mut self,
        mut make: impl FnMut(&mut Group<Config>) -> Result<MlsMessage, MlsError>,
    ) -> Result<Committed, ForeignError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            if attempts > COMMIT_ATTEMPTS_MAX {
                return Err(profile("the Commit lost its epoch too often"));
            }
            let commit = make(&mut self.joined_mut()?.group)?;
            if self.send_commit(&commit).await? {
                let group = &mut self.joined_mut()?.group;
                group.apply_pending_commit()?;
                return Ok(Committed {
                    attempts,
                    epoch: group.current_epoch(),
                });
            }
            self.catch_up_after_losing().await?;
        }
    }

    /// Sends a Commit to every other member; `false` if the server's commit
    /// fence refused it (`staleEpoch`). With nobody else in the group,
    /// nobody can race it.
    async fn send_commit(&mut self, commit: &MlsMessage) -> Result<bool, ForeignError> {
        match self.broadcast(commit).await {
            Ok(()) => Ok(true),
            Err(ForeignError::Server(e)) if lost_epoch(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Our Commit lost its epoch: forget it, then process the group's
    /// channel until the winning Commit is in.
    async fn catch_up_after_losing(&mut self) -> Result<(), ForeignError> {
        let joined = self.joined_mut()?;
        joined.group.clear_pending_commit();
        let epoch = joined.group.current_epoch();
        for _ in 0..COMMIT_ATTEMPTS_MAX {
            self.receive(CATCH_UP_WAIT_MS).await?;
            if !self.in_group() || self.epoch()? > epoch {
                return Ok(());
            }
        }
        Err(profile("the Commit that won the epoch never arrived"))
    }

    /// Sends `message` to every member but this one, one copy each, under
    /// one message id.
    async fn broadcast(&self, message: &MlsMessage) -> Result<(), ForeignError> {
        let joined = self.joined()?;
        let payload = group_payload(message)?;
        let id = quicproquo_client::random_message_id();
        for member in members(&joined.group) {
            if member != self.identity {
                self.server
                    .enqueue(member, joined.channel, payload.clone(), id)
                    .await?;
            }
        }
        Ok(())
    }

    /// Processes one payload from `channel`.
    async fn process(
        &mut self,
        channel: ChannelId,
        payload: &[u8],
    ) -> Result<Option<Received>, ForeignError> {
        match Envelope::decode(payload)? {
            Envelope::Welcome {
                channel_id,
                nonce,
                sealed_name,
                welcome,
            } => {
                if self.group.is_some() {
                    return Err(profile("a second Welcome: this harness holds one group"));
                }
                let welcome = MlsMessage::from_bytes(&welcome)?;
                let (group, _info) = self.mls.join_group(None, &welcome, None)?;
                check_members(&group)?;
                let mut joined = Joined {
                    group,
                    channel: channel_id,
                    name: String::new(),
                };
                joined.name = open_name(&joined, &nonce, &sealed_name)?;
                let r = Received::Joined {
                    name: joined.name.clone(),
                    members: joined.group.roster().members_iter().count(),
                };
                self.group = Some(joined);
                Ok(Some(r))
            }
            Envelope::Group { message } => {
                let Some(joined) = self.group.as_mut().filter(|g| g.channel == channel) else {
                    return Err(profile("a group message on a channel of no group"));
                };
                let message = MlsMessage::from_bytes(&message)?;
                // The roster before the message: a Commit that removes this
                // member leaves no group to look its committer up in.
                let before: BTreeMap<u32, IdentityKey> = joined
                    .group
                    .roster()
                    .members_iter()
                    .filter_map(|m| Some((m.index, identity_of(&m.signing_identity).ok()?)))
                    .collect();
                let sender = |index: u32| {
                    before
                        .get(&index)
                        .copied()
                        .ok_or_else(|| profile("a message from no member"))
                };
                match joined.group.process_incoming_message(message)? {
                    ReceivedMessage::ApplicationMessage(app) => {
                        let decoded = content::decode(app.data());
                        let sent_at_ms = decoded.sent_at_ms;
                        let text = match decoded.content {
                            content::Content::Text { text, .. } => text,
                            other => return Err(profile(format!("not a text: {other:?}"))),
                        };
                        Ok(Some(Received::Text {
                            sender: sender(app.sender_index)?,
                            text,
                            sent_at_ms,
                        }))
                    }
                    ReceivedMessage::Commit(commit) => {
                        let committer = sender(commit.committer)?;
                        if let CommitEffect::Removed { .. } = commit.effect {
                            self.group = None;
                            return Ok(Some(Received::Removed { by: committer }));
                        }
                        check_members(&joined.group)?;
                        Ok(Some(Received::Commit {
                            committer,
                            epoch: joined.group.current_epoch(),
                        }))
                    }
                    ReceivedMessage::Proposal(_) => Ok(Some(Received::Proposal)),
                    other => Err(profile(format!("unexpected on a group channel: {other:?}"))),
                }
            }
            Envelope::Hybrid { .. } => Err(profile("hybrid envelopes (pq groups) are not spoken")),
        }
    }

    fn leaf_extensions(&self) -> ExtensionList {
        self.grease
            .map_or_else(ExtensionList::new, |g| Grease::extension(g.leaf))
    }

    fn key_package_extensions(&self) -> ExtensionList {
        self.grease
            .map_or_else(ExtensionList::new, |g| Grease::extension(g.key_package))
    }

    fn group_info_extensions(&self) -> ExtensionList {
        self.grease
            .map_or_else(ExtensionList::new, |g| Grease::extension(g.group_info))
    }

    fn joined(&self) -> Result<&Joined, ForeignError> {
        self.group.as_ref().ok_or_else(|| profile("not in a group"))
    }

    fn joined_mut(&mut self) -> Result<&mut Joined, ForeignError> {
        self.group.as_mut().ok_or_else(|| profile("not in a group"))
    }
}

/// `message` in qpq's group envelope.
fn group_payload(message: &MlsMessage) -> Result<Vec<u8>, ForeignError> {
    Ok(Envelope::Group {
        message: message.to_bytes()?,
    }
    .encode())
}

/// The server's commit fence refused a Commit: another member's Commit
/// for the same epoch came first.
fn lost_epoch(e: &ClientError) -> bool {
    matches!(e.kind(), ErrorKind::StaleEpoch { .. })
}

/// The members of `group`, by identity key.
fn members(group: &Group<Config>) -> Vec<IdentityKey> {
    group
        .roster()
        .members_iter()
        .filter_map(|m| identity_of(&m.signing_identity).ok())
        .collect()
}

/// qpq's credential rule: a BasicCredential whose identity is the Ed25519
/// signature key, which is then the member's identity key.
fn identity_of(identity: &SigningIdentity) -> Result<IdentityKey, ForeignError> {
    let key = identity.signature_key.as_bytes();
    let credential = identity
        .credential
        .as_basic()
        .ok_or_else(|| profile("not a BasicCredential"))?;
    if credential.identifier.as_slice() != key {
        return Err(profile(
            "a credential identity differs from its signature key",
        ));
    }
    let key = <[u8; 32]>::try_from(key).map_err(|_| profile("not an Ed25519 key"))?;
    Ok(IdentityKey(key))
}

fn check_identity(identity: &SigningIdentity, expected: IdentityKey) -> Result<(), ForeignError> {
    if identity_of(identity)? != expected {
        return Err(profile("a KeyPackage of another identity"));
    }
    Ok(())
}

fn check_members(group: &Group<Config>) -> Result<(), ForeignError> {
    for m in group.roster().members_iter() {
        identity_of(&m.signing_identity)?;
    }
    Ok(())
}

/// The key that seals a group's name in a Welcome: qpq's exporter label,
/// empty context, 32 bytes (RFC 9420 §8.5).
fn name_cipher(joined: &Joined) -> Result<ChaCha20Poly1305, ForeignError> {
    let key = joined
        .group
        .export_secret(GROUP_NAME_EXPORTER_LABEL.as_bytes(), b"", 32)?;
    ChaCha20Poly1305::new_from_slice(&key).map_err(|_| profile("exporter length"))
}

fn seal_name(joined: &Joined, nonce: &[u8; NAME_NONCE_BYTES]) -> Result<Vec<u8>, ForeignError> {
    name_cipher(joined)?
        .encrypt(
            nonce.into(),
            Payload {
                msg: joined.name.as_bytes(),
                aad: joined.channel.as_bytes(),
            },
        )
        .map_err(|_| profile("sealing the group name failed"))
}

fn open_name(
    joined: &Joined,
    nonce: &[u8; NAME_NONCE_BYTES],
    sealed: &[u8],
) -> Result<String, ForeignError> {
    let plain = name_cipher(joined)?
        .decrypt(
            nonce.into(),
            Payload {
                msg: sealed,
                aad: joined.channel.as_bytes(),
            },
        )
        .map_err(|_| profile("the group name in the Welcome does not open"))?;
    String::from_utf8(plain).map_err(|_| profile("the group name is not UTF-8"))
}

fn channel_id(bytes: &[u8]) -> Result<ChannelId, ForeignError> {
    ChannelId::try_from_slice(bytes).map_err(|e| profile(e.to_string()))
}

fn profile(message: impl Into<String>) -> ForeignError {
    ForeignError::Profile(message.into())
}

/// Commits made for one change before giving up: a test races at most one
/// other member.
const COMMIT_ATTEMPTS_MAX: u32 = 4;
/// How long one wait for the Commit that won an epoch lasts.
const CATCH_UP_WAIT_MS: u64 = 5_000;
/// Messages asked for per fetch: a test's queues stay far below it.
const FETCH_LIMIT: u32 = 256;
