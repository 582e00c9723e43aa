//! The commit fence: one Commit per epoch of an MLS group on a channel
//! (ARCHITECTURE.md § Guarantees, "One Commit per epoch").
//!
//! Invariants it keeps: on each channel, for each group, a Commit is
//! accepted only for the group's current epoch (or a later one), and only
//! one Commit per epoch; the same Commit bytes again pass without moving the
//! fence. A refused Commit stores nothing, and an accepted one moves the
//! fence in the batch that stores its entries (the caller, `enqueue`,
//! writes both). The only thing read from a payload is the cleartext
//! framing of a Commit ([`commit::commit_header`]).

use sha2::{Digest, Sha256};

use crate::error::ServiceError;
use crate::store::Store;
use crate::types::ChannelId;

use super::layout::{self, Fence};
use super::{NodeService, commit, corrupt};

impl<S: Store> NodeService<S> {
    /// The commit fence ([`commit`]; ARCHITECTURE.md § Guarantees): if
    /// `payload` is an MLS Commit, it is accepted only for the group's
    /// current epoch on this channel (or a later one), once; the same Commit
    /// bytes sent again (to the next recipient, or as a retry) pass without
    /// moving it, also after the group moved on (up to
    /// [`limits::COMMIT_FENCE_HISTORY`](crate::limits::COMMIT_FENCE_HISTORY)
    /// epochs). Returns the fence record to write with the enqueue, if it
    /// moves.
    pub(super) fn fence_check(
        &self,
        channel_id: &ChannelId,
        payload: &[u8],
        moved: &[(Vec<u8>, Fence)],
    ) -> Result<Option<(Vec<u8>, Fence)>, ServiceError> {
        let Some(header) = commit::commit_header(payload) else {
            return Ok(None);
        };
        let key = layout::fence_key(channel_id, &Sha256::digest(header.group_id).into());
        let digest: [u8; 32] = Sha256::digest(header.identity).into();
        let mut this = [0u8; layout::COMMIT_DIGEST_BYTES];
        this.copy_from_slice(&digest[..layout::COMMIT_DIGEST_BYTES]);
        let current = match moved.iter().find(|(k, _)| *k == key) {
            Some((_, f)) => Some(f.clone()),
            None => match self.get(&key)? {
                Some(v) => Some(Fence::decode(&v).map_err(corrupt)?),
                None => None,
            },
        };
        let too_far = || ServiceError::invalid_argument("a Commit for the last possible epoch");
        let Some(f) = current else {
            let epoch = header.epoch.checked_add(1).ok_or_else(too_far)?;
            return Ok(Some((
                key,
                Fence {
                    epoch,
                    accepted: vec![this],
                    touched_ms: None,
                },
            )));
        };
        if header.epoch < f.epoch {
            if f.accepted_for(header.epoch, &this) {
                return Ok(None);
            }
            return Err(ServiceError::stale_epoch(
                f.epoch,
                format!(
                    "the group already has a Commit for epoch {}; it is at epoch {} now",
                    header.epoch, f.epoch
                ),
            ));
        }
        let fence = f.advance(header.epoch, this).ok_or_else(too_far)?;
        Ok(Some((key, fence)))
    }
}
