//! A group as the machine holds it: its name, typed MLS group id and
//! channel, the changes waiting to be made, the Commit awaiting the server
//! and the messages that arrived early; converted from and to the
//! persisted [`GroupRecord`] at restore and snapshot.
//!
//! Invariants: a [`Group`]'s channel id parsed (a record whose channel id
//! does not is refused at restore), and its [`EarlyMessages`] hold at most
//! [`EARLY_MESSAGES_MAX`] messages and [`EARLY_BYTES_MAX`] payload bytes
//! that came in since the last restore. [`Groups`] has one group per name.

use super::*;

/// One of this user's groups.
#[derive(Debug, Clone)]
pub(super) struct Group {
    pub name: String,
    /// The MLS group id (the group's key in MLS storage).
    pub id: GroupId,
    /// The channel the group's messages are queued on.
    pub channel: ChannelId,
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
    pub early: EarlyMessages,
}

impl Group {
    /// A new group with nothing queued.
    pub fn new(name: String, id: GroupId, channel: ChannelId, owner: bool, pq: bool) -> Group {
        Group {
            name,
            id,
            channel,
            owner,
            pq,
            queue: Vec::new(),
            commit: None,
            behind: 0,
            early: EarlyMessages::default(),
        }
    }

    /// A group as persisted; one whose channel id does not parse is
    /// refused.
    pub fn restore(record: GroupRecord) -> Result<Group, CommandError> {
        let channel = ChannelId::try_from_slice(&record.channel_id)
            .map_err(|_| CommandError::State(StateError::BadChannel(Some(record.name.clone()))))?;
        Ok(Group {
            name: record.name,
            id: GroupId::from_slice(&record.group_id),
            channel,
            owner: record.owner,
            pq: record.pq,
            queue: record.queue,
            commit: record.commit,
            behind: record.behind,
            early: EarlyMessages {
                messages: record.early,
            },
        })
    }

    /// The group as persisted.
    pub fn snapshot(&self) -> GroupRecord {
        GroupRecord {
            name: self.name.clone(),
            group_id: self.id.as_slice().to_vec(),
            channel_id: self.channel.as_bytes().to_vec(),
            owner: self.owner,
            pq: self.pq,
            queue: self.queue.clone(),
            commit: self.commit.clone(),
            behind: self.behind,
            early: self.early.messages.clone(),
        }
    }

    /// A copy without the kept early messages (up to [`EARLY_BYTES_MAX`]
    /// of payloads), for code that only reads the group's other fields.
    pub fn head(&self) -> Group {
        Group {
            name: self.name.clone(),
            id: self.id.clone(),
            channel: self.channel,
            owner: self.owner,
            pq: self.pq,
            queue: self.queue.clone(),
            commit: self.commit.clone(),
            behind: self.behind,
            early: EarlyMessages::default(),
        }
    }
}

/// A group's messages of a later epoch than its copy, in arrival order.
#[derive(Debug, Clone, Default)]
pub(super) struct EarlyMessages {
    messages: Vec<EarlyMessage>,
}

/// Why an early message was not kept: the group keeps as many as it may.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct EarlyFull {
    /// Messages kept already.
    pub waiting: usize,
    /// Their payload bytes.
    pub bytes: usize,
}

impl EarlyMessages {
    /// Keeps a message, unless that would pass [`EARLY_MESSAGES_MAX`] or
    /// [`EARLY_BYTES_MAX`].
    pub fn push(&mut self, message: EarlyMessage) -> Result<(), EarlyFull> {
        let bytes = self.bytes();
        if self.messages.len() >= EARLY_MESSAGES_MAX
            || bytes + message.payload.len() > EARLY_BYTES_MAX
        {
            return Err(EarlyFull {
                waiting: self.messages.len(),
                bytes,
            });
        }
        self.messages.push(message);
        Ok(())
    }

    /// Takes the oldest message made in `epoch` or before (the group has
    /// reached its epoch).
    pub fn take_reached(&mut self, epoch: u64) -> Option<EarlyMessage> {
        let i = self.messages.iter().position(|m| m.epoch <= epoch)?;
        Some(self.messages.remove(i))
    }

    /// Payload bytes kept.
    fn bytes(&self) -> usize {
        self.messages.iter().map(|m| m.payload.len()).sum()
    }
}

/// This user's groups, in the order they were made or joined.
#[derive(Debug, Default)]
pub(super) struct Groups {
    groups: Vec<Group>,
}

impl Groups {
    /// The groups as persisted; a record that does not restore fails all.
    pub fn restore(records: Vec<GroupRecord>) -> Result<Groups, CommandError> {
        let groups = records
            .into_iter()
            .map(Group::restore)
            .collect::<Result<_, _>>()?;
        Ok(Groups { groups })
    }

    /// The groups as persisted.
    pub fn snapshot(&self) -> Vec<GroupRecord> {
        self.groups.iter().map(Group::snapshot).collect()
    }

    /// Adds a group; its name must be new.
    pub fn push(&mut self, group: Group) {
        assert!(
            self.by_name(&group.name).is_none(),
            "group names are unique"
        );
        self.groups.push(group);
    }

    /// Forgets a group.
    pub fn remove(&mut self, id: &GroupId) {
        self.groups.retain(|g| g.id != *id);
    }

    pub fn by_name(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }

    pub fn by_name_mut(&mut self, name: &str) -> Option<&mut Group> {
        self.groups.iter_mut().find(|g| g.name == name)
    }

    pub fn by_id(&self, id: &GroupId) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == *id)
    }

    pub fn by_id_mut(&mut self, id: &GroupId) -> Option<&mut Group> {
        self.groups.iter_mut().find(|g| g.id == *id)
    }

    pub fn by_channel(&self, channel: ChannelId) -> Option<&Group> {
        self.groups.iter().find(|g| g.channel == channel)
    }

    pub fn by_channel_mut(&mut self, channel: ChannelId) -> Option<&mut Group> {
        self.groups.iter_mut().find(|g| g.channel == channel)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Group> {
        self.groups.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(channel_id: &[u8]) -> GroupRecord {
        GroupRecord {
            name: "team".into(),
            group_id: vec![7; 16],
            channel_id: channel_id.to_vec(),
            owner: true,
            pq: false,
            queue: vec![Change::Update],
            commit: None,
            behind: 3,
            early: vec![early(2, 10)],
        }
    }

    fn early(epoch: u64, payload_bytes: usize) -> EarlyMessage {
        EarlyMessage {
            epoch,
            seq: epoch,
            payload: vec![0; payload_bytes],
        }
    }

    /// Pushes messages of these payload sizes; the result of the last.
    fn check_push(sizes: &[usize]) -> Result<(), EarlyFull> {
        let mut kept = EarlyMessages::default();
        let mut last = Ok(());
        for size in sizes {
            last = kept.push(early(1, *size));
        }
        last
    }

    #[test]
    fn a_record_restores_and_snapshots_to_the_same_bytes() {
        for channel in [&[][..], &[1; 16][..], &[2; 3][..]] {
            let r = record(channel);
            let bytes = postcard::to_allocvec(&r).unwrap();
            let back = Group::restore(r).unwrap().snapshot();
            assert_eq!(postcard::to_allocvec(&back).unwrap(), bytes);
        }
    }

    #[test]
    fn a_record_with_a_bad_channel_id_is_refused() {
        assert!(matches!(
            Group::restore(record(&[0; 17])),
            Err(CommandError::State(_))
        ));
        assert!(matches!(
            Groups::restore(vec![record(&[1; 16]), record(&[0; 17])]),
            Err(CommandError::State(_))
        ));
    }

    #[test]
    fn early_messages_stop_at_their_count_and_bytes() {
        assert_eq!(check_push(&[1; EARLY_MESSAGES_MAX]), Ok(()));
        let mut sizes = vec![1; EARLY_MESSAGES_MAX];
        sizes.push(1);
        assert_eq!(
            check_push(&sizes),
            Err(EarlyFull {
                waiting: EARLY_MESSAGES_MAX,
                bytes: EARLY_MESSAGES_MAX,
            })
        );
        assert_eq!(check_push(&[EARLY_BYTES_MAX]), Ok(()));
        assert_eq!(
            check_push(&[EARLY_BYTES_MAX, 1]),
            Err(EarlyFull {
                waiting: 1,
                bytes: EARLY_BYTES_MAX,
            })
        );
    }

    #[test]
    fn early_messages_come_back_oldest_first_once_their_epoch_is_reached() {
        let mut kept = EarlyMessages::default();
        for epoch in [5, 3, 4] {
            kept.push(early(epoch, 1)).unwrap();
        }
        assert!(kept.take_reached(2).is_none());
        assert_eq!(kept.take_reached(4).map(|m| m.epoch), Some(3));
        assert_eq!(kept.take_reached(4).map(|m| m.epoch), Some(4));
        assert!(kept.take_reached(4).is_none());
        assert_eq!(kept.take_reached(5).map(|m| m.epoch), Some(5));
    }
}
