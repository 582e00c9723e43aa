//! Registering (KeyPackages and this user's hybrid key on the server) and
//! peers' hybrid keys: fetched, checked against their identity's
//! signature, cached in [`PeerKeys`] (at most [`PEER_HYBRID_KEYS_MAX`]).

use super::*;

/// Verified hybrid public keys of peers, by identity: at most
/// [`PEER_HYBRID_KEYS_MAX`]; when full, the key of the lowest identity
/// makes room and is refetched when needed.
#[derive(Debug, Default)]
pub(super) struct PeerKeys {
    keys: BTreeMap<IdentityKey, HybridPublicKey>,
}

impl PeerKeys {
    /// The keys as persisted; one that no longer parses is left out (it is
    /// refetched when needed).
    pub fn restore(keys: Vec<([u8; 32], Vec<u8>)>) -> PeerKeys {
        let keys = keys
            .into_iter()
            .filter_map(|(identity, public)| {
                let key = HybridPublicKey::from_bytes(&public).ok()?;
                Some((IdentityKey(identity), key))
            })
            .collect();
        PeerKeys { keys }
    }

    /// The keys, ordered by identity, to persist.
    pub fn snapshot(&self) -> Vec<([u8; 32], Vec<u8>)> {
        self.keys
            .iter()
            .map(|(id, k)| (id.0, k.to_bytes()))
            .collect()
    }

    /// Caches a verified key, dropping the lowest identity's when full.
    pub fn insert(&mut self, identity: IdentityKey, key: HybridPublicKey) {
        if self.keys.len() >= PEER_HYBRID_KEYS_MAX && !self.keys.contains_key(&identity) {
            self.keys.pop_first();
        }
        self.keys.insert(identity, key);
        assert!(self.keys.len() <= PEER_HYBRID_KEYS_MAX);
    }

    pub fn get(&self, identity: &IdentityKey) -> Option<&HybridPublicKey> {
        self.keys.get(identity)
    }

    /// Forgets a key (its owner may have rotated it).
    pub fn remove(&mut self, identity: &IdentityKey) {
        self.keys.remove(identity);
    }
}

impl ClientMachine {
    // ----- register ---------------------------------------------------------

    pub(super) fn start_register(&mut self, count: u32) -> Result<(), CommandError> {
        self.op = Some(Op::Register {
            want: count.min(REGISTER_COUNT_MAX),
            uploaded: 0,
            already: 0,
            failed: 0,
        });
        // One pool per suite: classic groups take from the default pool,
        // post-quantum groups from the PQ suite's.
        for suite in CIPHERSUITES {
            self.request(
                Pending::Count(suite),
                RequestBody::KeyPackageCount {
                    identity_key: self.identity,
                    cipher_suite: key_package_pool(suite),
                },
            );
        }
        // Sealed pq groups of earlier versions still need the hybrid key.
        self.publish_hybrid_key(false);
        Ok(())
    }

    /// Makes sure this user has a hybrid key — a new one when `rotate`,
    /// keeping the last [`HYBRID_KEYS_KEPT`] — persists it, and uploads its
    /// public key signed by the identity key. The AS keeps one key per
    /// identity, so the upload replaces the previous one.
    pub(super) fn publish_hybrid_key(&mut self, rotate: bool) {
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

    pub(super) fn on_hybrid_key_uploaded(&mut self, result: Result<Response, ServiceError>) {
        match result {
            Ok(Response::HybridKeyUploaded) => {}
            Ok(other) => self.warn(format!(
                "unexpected answer to a hybrid key upload: {other:?}"
            )),
            Err(e) => self.warn_refused("hybrid key upload (run `qpq register` again)", &e),
        }
    }

    pub(super) fn on_count(&mut self, suite: Ciphersuite, result: Result<Response, ServiceError>) {
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
        *already += count;
        let missing = want.saturating_sub(count);
        let mut uploads = Vec::new();
        for i in 0..missing + u32::from(!has_last_resort) {
            let last_resort = i == missing;
            match self.key_package(suite, last_resort) {
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
                    cipher_suite: key_package_pool(suite),
                },
            );
        }
    }

    pub(super) fn on_uploaded(
        &mut self,
        fingerprint: [u8; 32],
        result: Result<Response, ServiceError>,
    ) {
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

    pub(super) fn key_package(
        &mut self,
        suite: Ciphersuite,
        last_resort: bool,
    ) -> Result<Vec<u8>, CommandError> {
        let mut builder = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(KEY_PACKAGE_LIFETIME_SECS))
            .leaf_node_capabilities(capabilities(&self.provider));
        if last_resort {
            builder = builder.mark_as_last_resort();
        }
        let bundle = builder
            .build(suite, &self.provider, &self.signer, self.credential())
            .map_err(mls(MlsStep::KeyPackage))?;
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .map_err(mls(MlsStep::Encode))
    }

    /// A fetched hybrid key for outbox entries waiting to be sealed to it.
    pub(super) fn on_hybrid_key(
        &mut self,
        member: IdentityKey,
        result: Result<Response, ServiceError>,
    ) {
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
    pub(super) fn accept_hybrid_key(
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
        self.peer_hybrid_keys.insert(member, key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache filled with `count` identities (`[i; 32]` for `i` from 1,
    /// as two bytes), all with one key.
    fn filled(count: usize) -> (PeerKeys, HybridPublicKey) {
        let secret = HybridSecretKey::generate(&mut ChaCha20Rng::from_seed([9; 32]));
        let key = secret.public().clone();
        let mut peers = PeerKeys::default();
        for i in 1..=count {
            peers.insert(identity(i), key.clone());
        }
        (peers, key)
    }

    fn identity(i: usize) -> IdentityKey {
        let mut id = [0u8; 32];
        id[..2].copy_from_slice(&(i as u16).to_be_bytes());
        IdentityKey(id)
    }

    #[test]
    fn a_full_cache_drops_the_lowest_identity_for_a_new_one() {
        let (mut peers, key) = filled(PEER_HYBRID_KEYS_MAX);
        assert_eq!(peers.keys.len(), PEER_HYBRID_KEYS_MAX);
        peers.insert(identity(PEER_HYBRID_KEYS_MAX + 1), key.clone());
        assert_eq!(peers.keys.len(), PEER_HYBRID_KEYS_MAX);
        assert!(peers.get(&identity(1)).is_none());
        assert!(peers.get(&identity(PEER_HYBRID_KEYS_MAX + 1)).is_some());
        // A key cached already is replaced, and nothing makes room.
        peers.insert(identity(2), key);
        assert_eq!(peers.keys.len(), PEER_HYBRID_KEYS_MAX);
        assert!(peers.get(&identity(2)).is_some());
    }

    #[test]
    fn the_cache_restores_from_its_snapshot() {
        let (peers, _) = filled(3);
        let mut list = peers.snapshot();
        assert_eq!(PeerKeys::restore(list.clone()).snapshot(), list);
        // A key that no longer parses is left out.
        list[0].1.truncate(10);
        assert_eq!(PeerKeys::restore(list.clone()).snapshot(), list[1..]);
    }
}
