//! Who did what: the events that name who joined, left or was removed by
//! a Commit, and by whom, read from the staged Commit's proposals before it
//! is merged (the removed members are still in the tree then).
//!
//! The proposer of each change is named (for a proposal committed by
//! reference, the member who proposed it; for one inline, the committer).
//! A Remove proposed by the removed member itself is a leave. Events come
//! in the order RFC 9420 §12.3 applies proposals: removals, then adds.

use super::group::Group;
use super::*;
use state::Change;

/// The membership events of `commit`, a Commit of `committer` to `group`
/// (this user's copy, named `name`, not yet merged). A removal of this
/// user is [`Event::Removed`].
pub(super) fn commit_events(
    group: &MlsGroup,
    name: &str,
    commit: &StagedCommit,
    committer: IdentityKey,
) -> Vec<Event> {
    let identity_at = |index: LeafNodeIndex| {
        group
            .member(index)
            .and_then(|c| BasicCredential::try_from(c.clone()).ok())
            .and_then(|c| IdentityKey::try_from_slice(c.identity()).ok())
    };
    let proposer = |sender: &Sender| match sender {
        Sender::Member(index) => identity_at(*index).unwrap_or(committer),
        _ => committer,
    };
    let mut events = Vec::new();
    for remove in commit.remove_proposals() {
        let removed = remove.remove_proposal().removed();
        let by = proposer(remove.sender());
        if removed == group.own_leaf_index() {
            events.push(Event::Removed {
                group: name.to_owned(),
                by,
            });
            continue;
        }
        let Some(member) = identity_at(removed) else {
            continue;
        };
        events.push(
            if matches!(remove.sender(), Sender::Member(i) if *i == removed) {
                Event::MemberLeft {
                    group: name.to_owned(),
                    member,
                }
            } else {
                Event::MemberRemoved {
                    group: name.to_owned(),
                    member,
                    by,
                }
            },
        );
    }
    for add in commit.add_proposals() {
        // The caller has checked that the credential identity is the
        // signature key (ARCHITECTURE.md § MLS profile).
        let leaf = add.add_proposal().key_package().leaf_node();
        let Ok(member) = IdentityKey::try_from_slice(leaf.signature_key().as_slice()) else {
            continue;
        };
        events.push(Event::MemberAdded {
            group: name.to_owned(),
            member,
            by: proposer(add.sender()),
        });
    }
    events
}

impl ClientMachine {
    /// The membership events of this user's pending Commit to `group`, to
    /// show once it is merged. A removal made for another member's leave
    /// is their leave, also when it went by value (their proposal was gone
    /// with its epoch).
    pub(super) fn own_commit_events(
        &self,
        record: &Group,
        group: &MlsGroup,
        change: &Change,
    ) -> Vec<Event> {
        let Some(commit) = group.pending_commit() else {
            return Vec::new();
        };
        let mut events = commit_events(group, &record.name, commit, self.identity);
        if let Change::CommitLeave { leaver } = change {
            for e in &mut events {
                if let Event::MemberRemoved { group, member, .. } = e
                    && member.0 == *leaver
                {
                    *e = Event::MemberLeft {
                        group: group.clone(),
                        member: *member,
                    };
                }
            }
        }
        events
    }
}
