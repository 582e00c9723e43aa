//! The view model: everything the window shows, as plain data, and how
//! each update from the session changes it. Drawing reads it every frame
//! ([`crate::app`]); nothing here waits, draws or does I/O, so it is tested
//! as plain values.

use std::collections::{BTreeMap, BTreeSet};

use quicproquo_client::display::{Names, short_key};
use quicproquo_core::client::{ContentId, Event, GroupSummary};
use quicproquo_core::types::IdentityKey;

/// Lines one conversation keeps in memory; older ones are dropped from the
/// view (they stay nowhere else: the state file keeps no history).
pub const LINES_PER_GROUP_MAX: usize = 10_000;
/// Notices shown at once; older ones go.
pub const NOTICES_MAX: usize = 5;

/// Which screen is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Screen {
    /// No state file yet: make an identity.
    FirstRun,
    /// A state file exists: its password opens it.
    Unlock,
    /// The session is open.
    Main,
}

/// The connection as the user sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// Not open yet, or first connecting.
    Connecting,
    /// Up.
    Connected,
    /// Lost; trying again.
    Retrying {
        /// Why it was lost.
        reason: String,
    },
    /// Given up (until the next command).
    Offline {
        /// Why.
        reason: String,
    },
}

impl Connection {
    /// One line for the status bar.
    pub fn label(&self) -> String {
        match self {
            Connection::Connecting => "connecting…".into(),
            Connection::Connected => "connected".into(),
            Connection::Retrying { reason } => format!("retrying: {reason}"),
            Connection::Offline { reason } => format!("offline: {reason}"),
        }
    }
}

/// Where one of this user's messages stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Queued and written; not every member has it yet.
    Sending,
    /// Every member has it: stored by the server, or taken over a direct
    /// link.
    Stored,
}

/// One line of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A message.
    Message {
        /// Who sent it, as shown (`you` for this user).
        sender: String,
        /// Its text, cleaned for display ([`clean_text`]).
        text: String,
        /// The sender's time, milliseconds since the Unix epoch, if known.
        sent_at_ms: Option<u64>,
        /// For this user's own messages, where it stands.
        delivery: Option<Delivery>,
        /// The message's id and its sender's key, for a received message
        /// that has an id: an edit or a deletion by the same sender
        /// applies to it.
        origin: Option<(ContentId, IdentityKey)>,
    },
    /// Something that happened to the group (joins, removals, key updates).
    System(String),
}

/// One group as the window shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupView {
    /// Post-quantum group.
    pub pq: bool,
    /// Members, this user included.
    pub members: usize,
    /// Their keys, this user included, once known.
    pub member_keys: Vec<IdentityKey>,
    /// The MLS epoch the group is at.
    pub epoch: u64,
    /// The group's safety number at `epoch`, when asked for (grouped
    /// digits).
    pub safety_number: Option<String>,
    /// Changes and messages the server has not taken yet.
    pub waiting: usize,
    /// Messages arrived while another group was open.
    pub unread: usize,
    /// The conversation, oldest first.
    pub lines: Vec<Line>,
    /// Lines dropped from the front so far (over
    /// [`LINES_PER_GROUP_MAX`]): `lines[i]` is the conversation's line
    /// number `dropped + i`.
    pub dropped: u64,
}

impl GroupView {
    /// The last message's text, for the group list.
    pub fn preview(&self) -> Option<&str> {
        self.lines.iter().rev().find_map(|l| match l {
            Line::Message { text, .. } => Some(text.as_str()),
            Line::System(_) => None,
        })
    }

    fn push(&mut self, line: Line) {
        self.lines.push(line);
        if self.lines.len() > LINES_PER_GROUP_MAX {
            let extra = self.lines.len() - LINES_PER_GROUP_MAX;
            self.lines.drain(..extra);
            self.dropped += extra as u64;
        }
    }
}

/// What the session tells the window.
#[derive(Debug, Clone)]
pub enum Update {
    /// The session is open.
    Opened {
        /// This user's identity.
        identity: IdentityKey,
        /// The groups.
        groups: Vec<GroupSummary>,
        /// The contact book.
        contacts: Vec<(String, IdentityKey)>,
    },
    /// Opening failed (wrong password, unreadable file, …); the screen
    /// stays.
    OpenFailed(String),
    /// Something happened.
    Event(Event),
    /// The groups as they are now (after a change of this user's).
    Groups(Vec<GroupSummary>),
    /// This user's message was queued and written.
    Sent {
        /// To which group.
        group: String,
        /// What.
        text: String,
        /// When, milliseconds since the Unix epoch.
        sent_at_ms: u64,
    },
    /// A command failed; shown as a notice.
    Failed(String),
    /// This user's KeyPackages are on the server: others can add them.
    Registered,
    /// The contact book as it is now.
    Contacts(Vec<(String, IdentityKey)>),
    /// A group's safety number (grouped digits).
    SafetyNumber {
        /// Which group.
        group: String,
        /// Its digits, in groups of five.
        digits: String,
    },
}

/// Everything the window shows.
#[derive(Debug, Clone)]
pub struct Model {
    /// The screen up.
    pub screen: Screen,
    /// This user, once open.
    pub identity: Option<IdentityKey>,
    /// Groups by name.
    pub groups: BTreeMap<String, GroupView>,
    /// The group open in the conversation pane.
    pub selected: Option<String>,
    /// The connection.
    pub connection: Connection,
    /// Readable notices (errors, warnings), newest last.
    pub notices: Vec<String>,
    /// A request is out that the screen waits for (unlock, create).
    pub busy: bool,
    /// KeyPackages were uploaded (or topped up) since opening.
    pub registered: bool,
    /// Members reached over a direct link right now.
    pub direct: BTreeSet<IdentityKey>,
    names: Names,
}

impl Model {
    /// A model showing `screen`.
    pub fn new(screen: Screen) -> Model {
        Model {
            screen,
            identity: None,
            groups: BTreeMap::new(),
            selected: None,
            connection: Connection::Connecting,
            notices: Vec::new(),
            busy: false,
            registered: false,
            direct: BTreeSet::new(),
            names: Names::default(),
        }
    }

    /// Opens `group` in the conversation pane; its unread count goes.
    pub fn select(&mut self, group: &str) {
        if let Some(g) = self.groups.get_mut(group) {
            g.unread = 0;
            self.selected = Some(group.to_owned());
        }
    }

    /// Adds a notice.
    pub fn notice(&mut self, text: impl Into<String>) {
        self.notices.push(clean_text(&text.into()));
        if self.notices.len() > NOTICES_MAX {
            self.notices.remove(0);
        }
    }

    /// Takes one update.
    pub fn apply(&mut self, update: Update) {
        match update {
            Update::Opened {
                identity,
                groups,
                contacts,
            } => {
                self.busy = false;
                self.screen = Screen::Main;
                self.identity = Some(identity);
                self.names = Names::new(identity, contacts);
                self.set_groups(groups);
            }
            Update::OpenFailed(why) => {
                self.busy = false;
                self.notice(why);
            }
            Update::Groups(groups) => self.set_groups(groups),
            Update::Sent {
                group,
                text,
                sent_at_ms,
            } => {
                let g = self.groups.entry(group).or_default();
                g.push(Line::Message {
                    sender: "you".into(),
                    text: clean_text(&text),
                    sent_at_ms: Some(sent_at_ms),
                    delivery: Some(Delivery::Sending),
                    origin: None,
                });
            }
            Update::Failed(why) => {
                self.busy = false;
                self.notice(why);
            }
            Update::Registered => self.registered = true,
            Update::Contacts(contacts) => {
                if let Some(me) = self.identity {
                    self.names = Names::new(me, contacts);
                }
            }
            Update::SafetyNumber { group, digits } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.safety_number = Some(digits);
                }
            }
            Update::Event(e) => self.event(e),
        }
    }

    fn set_groups(&mut self, groups: Vec<GroupSummary>) {
        let names: Vec<String> = groups.iter().map(|g| g.name.clone()).collect();
        for s in groups {
            let g = self.groups.entry(s.name.clone()).or_default();
            g.pq = s.pq;
            g.members = s.members.len();
            g.member_keys = s.members;
            g.waiting = s.waiting;
            if g.epoch != s.epoch {
                // A new epoch has a new safety number: ask again to see it.
                g.epoch = s.epoch;
                g.safety_number = None;
            }
        }
        // A group left or removed from goes from the list.
        self.groups.retain(|name, _| names.contains(name));
        if self
            .selected
            .as_ref()
            .is_some_and(|s| !self.groups.contains_key(s))
        {
            self.selected = None;
        }
        if self.selected.is_none()
            && let Some(first) = self.groups.keys().next().cloned()
        {
            self.select(&first);
        }
    }

    /// Replaces the text of message `target` by `sender` in `group`; false
    /// if there is no such line.
    fn rewrite(
        &mut self,
        group: &str,
        target: ContentId,
        sender: IdentityKey,
        text: String,
    ) -> bool {
        let Some(g) = self.groups.get_mut(group) else {
            return false;
        };
        let line = g.lines.iter_mut().find_map(|l| match l {
            Line::Message {
                text,
                origin: Some(origin),
                ..
            } if *origin == (target, sender) => Some(text),
            _ => None,
        });
        match line {
            Some(old) => {
                *old = text;
                true
            }
            None => false,
        }
    }

    fn event(&mut self, e: Event) {
        match e {
            Event::Message {
                group,
                sender,
                sender_name,
                text,
                sent_at_ms,
                attachment,
                id,
                ..
            } => {
                let origin = id.map(|id| (id, sender));
                let sender = match sender_name {
                    Some(name) => clean_text(&name),
                    None => self.names.who(&sender),
                };
                let open = self.selected.as_deref() == Some(group.as_str());
                let g = self.groups.entry(group).or_default();
                if !open {
                    g.unread += 1;
                }
                let text = match attachment {
                    Some(file) => format!(
                        "[file {} ({}, {} bytes)]",
                        clean_text(&file.name),
                        clean_text(&file.media_type),
                        file.data.len()
                    ),
                    None => clean_text(&text),
                };
                g.push(Line::Message {
                    sender,
                    text,
                    sent_at_ms,
                    delivery: None,
                    origin,
                });
            }
            // An edit or a deletion applies to the line of that message by
            // the same sender; when there is none here (not received in
            // this run, or another sender's), it is shown as a note.
            Event::Edited {
                group,
                sender,
                sender_name,
                target,
                text,
                ..
            } => {
                let text = clean_text(&text);
                if !self.rewrite(&group, target, sender, format!("{text} (edited)")) {
                    let who =
                        sender_name.map_or_else(|| self.names.who(&sender), |n| clean_text(&n));
                    self.system(&group, format!("{who} edited a message: {text}"));
                }
            }
            Event::Deleted {
                group,
                sender,
                sender_name,
                target,
                ..
            } => {
                let rewritten = self.rewrite(&group, target, sender, "(deleted)".into());
                if !rewritten {
                    let who =
                        sender_name.map_or_else(|| self.names.who(&sender), |n| clean_text(&n));
                    self.system(&group, format!("{who} deleted a message"));
                }
            }
            Event::Joined { group, members } => {
                let g = self.groups.entry(group.clone()).or_default();
                g.members = members;
                g.push(Line::System(format!("you joined ({members} members)")));
                if self.selected.is_none() {
                    self.select(&group);
                }
            }
            Event::Removed { group, by } => {
                let who = self.names.who(&by);
                self.system(&group, format!("{who} removed you from the group"));
                // The group goes from the list with the next group list
                // (the session forgets it), its lines with it: the notice
                // stays to say why.
                self.notice(format!("{who} removed you from the group {group}"));
            }
            Event::MemberAdded { group, member, by } => {
                let (who, whom) = (self.names.who(&by), self.names.who(&member));
                self.system(&group, format!("{who} added {whom}"));
            }
            Event::MemberRemoved { group, member, by } => {
                let (who, whom) = (self.names.who(&by), self.names.who(&member));
                self.system(&group, format!("{who} removed {whom}"));
            }
            Event::MemberLeft { group, member } => {
                let who = self.names.who(&member);
                self.system(&group, format!("{who} left"));
            }
            Event::GroupChanged {
                group,
                epoch,
                members,
            } => {
                if let Some(g) = self.groups.get_mut(&group) {
                    g.members = members;
                }
                self.system(&group, format!("keys updated (epoch {epoch})"));
            }
            Event::Delivered { group, .. } => {
                // Deliveries of one group complete in the order sent.
                if let Some(g) = self.groups.get_mut(&group)
                    && let Some(Line::Message { delivery, .. }) = g.lines.iter_mut().find(|l| {
                        matches!(
                            l,
                            Line::Message {
                                delivery: Some(Delivery::Sending),
                                ..
                            }
                        )
                    })
                {
                    *delivery = Some(Delivery::Stored);
                }
            }
            Event::Tampering { what } => self.notice(format!("tampering: {what}")),
            Event::Warning { message } => self.notice(message),
            Event::Connected => self.connection = Connection::Connected,
            Event::Reconnecting { reason, .. } => {
                self.connection = Connection::Retrying {
                    reason: clean_text(&reason),
                }
            }
            Event::Disconnected { reason, .. } => {
                self.connection = Connection::Offline {
                    reason: clean_text(&reason),
                }
            }
            Event::DirectLink { peer, up: true, .. } => {
                self.direct.insert(peer);
            }
            Event::DirectLink {
                peer, up: false, ..
            } => {
                self.direct.remove(&peer);
            }
            _ => {}
        }
    }

    fn system(&mut self, group: &str, text: String) {
        if let Some(g) = self.groups.get_mut(group) {
            g.push(Line::System(text));
        }
    }

    /// This user's identity key in hex, once open.
    pub fn identity_hex(&self) -> Option<String> {
        self.identity
            .map(|k| quicproquo_core::types::hex(k.as_bytes()))
    }

    /// How `key` is shown: a contact name, `you`, or its short key.
    pub fn who(&self, key: &IdentityKey) -> String {
        clean_text(&self.names.who(key))
    }

    /// This user's short key, once open.
    pub fn identity_short(&self) -> Option<String> {
        self.identity.map(|k| short_key(&k))
    }
}

/// `text` as a window may show it: line breaks and tabs kept, every other
/// control character, bidirectional override and separator replaced by
/// U+FFFD, so a peer cannot reorder or hide what is shown.
pub fn clean_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c,
            c if c.is_control()
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}' | '\u{061c}' | '\u{2028}' | '\u{2029}') =>
            {
                '\u{fffd}'
            }
            c => c,
        })
        .collect()
}

/// The UTC calendar day of `ms` since the Unix epoch, as `YYYY-MM-DD`.
pub fn day(ms: u64) -> String {
    // Howard Hinnant's days-to-civil algorithm.
    let z = i64::try_from(ms / 86_400_000).unwrap_or(i64::MAX / 2) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> IdentityKey {
        IdentityKey([n; 32])
    }

    fn summary(name: &str) -> GroupSummary {
        GroupSummary {
            name: name.into(),
            channel_id: quicproquo_core::types::ChannelId::DEFAULT,
            epoch: 1,
            members: vec![key(1), key(2)],
            pq: false,
            waiting: 0,
        }
    }

    fn open() -> Model {
        let mut m = Model::new(Screen::Unlock);
        m.apply(Update::Opened {
            identity: key(1),
            groups: vec![summary("team"), summary("zoo")],
            contacts: vec![("bob".into(), key(2))],
        });
        m
    }

    #[test]
    fn opening_shows_the_groups_with_the_first_selected() {
        let m = open();
        assert_eq!(m.screen, Screen::Main);
        assert_eq!(m.selected.as_deref(), Some("team"));
        assert_eq!(m.groups["team"].members, 2);
    }

    #[test]
    fn an_edit_or_deletion_applies_only_to_a_message_of_the_same_sender() {
        let mut m = open();
        let message = |id: u8, text: &str| {
            Update::Event(Event::Message {
                group: "team".into(),
                sender: key(2),
                sender_name: None,
                text: text.into(),
                seq: 1,
                sent_at_ms: None,
                id: Some(ContentId([id; 16])),
                reply_to: None,
                attachment: None,
            })
        };
        let edit = |by: u8, id: u8, text: &str| {
            Update::Event(Event::Edited {
                group: "team".into(),
                sender: key(by),
                sender_name: None,
                target: ContentId([id; 16]),
                text: text.into(),
                seq: 2,
                sent_at_ms: None,
            })
        };
        m.apply(message(1, "lunch at noon?"));
        m.apply(message(2, "or later"));
        m.apply(edit(2, 1, "lunch at one?"));
        // Someone else cannot edit Bob's message: a note, the line stays.
        m.apply(edit(3, 2, "forged\u{1b}[2J"));
        m.apply(Update::Event(Event::Deleted {
            group: "team".into(),
            sender: key(2),
            sender_name: None,
            target: ContentId([2; 16]),
            seq: 3,
            sent_at_ms: None,
        }));
        let texts: Vec<&str> = m.groups["team"]
            .lines
            .iter()
            .map(|l| match l {
                Line::Message { text, .. } => text.as_str(),
                Line::System(s) => s.as_str(),
            })
            .collect();
        assert_eq!(
            texts,
            [
                "lunch at one? (edited)",
                "(deleted)",
                "0303030303030303… edited a message: forged\u{fffd}[2J"
            ]
        );
    }

    #[test]
    fn messages_are_named_counted_unread_and_cleaned() {
        let mut m = open();
        for (group, text) in [("team", "hi"), ("zoo", "evil\u{1b}[2J\u{202e}txt")] {
            m.apply(Update::Event(Event::Message {
                group: group.into(),
                sender: key(2),
                sender_name: None,
                text: text.into(),
                seq: 1,
                sent_at_ms: Some(5),
                id: None,
                reply_to: None,
                attachment: None,
            }));
        }
        assert_eq!(
            m.groups["team"].unread, 0,
            "the open group has nothing unread"
        );
        assert_eq!(m.groups["zoo"].unread, 1);
        let Line::Message { sender, text, .. } = &m.groups["zoo"].lines[0] else {
            panic!("a message line");
        };
        assert_eq!(sender, "bob");
        assert_eq!(text, "evil\u{fffd}[2J\u{fffd}txt");
        m.select("zoo");
        assert_eq!(m.groups["zoo"].unread, 0);
        assert_eq!(
            m.groups["zoo"].preview(),
            Some("evil\u{fffd}[2J\u{fffd}txt")
        );
    }

    #[test]
    fn own_messages_go_from_sending_to_stored_in_order() {
        let mut m = open();
        for text in ["one", "two"] {
            m.apply(Update::Sent {
                group: "team".into(),
                text: text.into(),
                sent_at_ms: 0,
            });
        }
        m.apply(Update::Event(Event::Delivered {
            group: "team".into(),
            message_id: [0; 16],
        }));
        let states: Vec<_> = m.groups["team"]
            .lines
            .iter()
            .map(|l| match l {
                Line::Message { delivery, .. } => *delivery,
                Line::System(_) => None,
            })
            .collect();
        assert_eq!(states, [Some(Delivery::Stored), Some(Delivery::Sending)]);
    }

    #[test]
    fn membership_events_are_system_lines_and_the_connection_is_tracked() {
        let mut m = open();
        m.apply(Update::Event(Event::MemberAdded {
            group: "team".into(),
            member: key(3),
            by: key(1),
        }));
        m.apply(Update::Event(Event::MemberRemoved {
            group: "team".into(),
            member: key(2),
            by: key(1),
        }));
        let lines = m.groups["team"].lines.to_vec();
        assert_eq!(
            lines,
            [
                Line::System(format!("you added {}", short_key(&key(3)))),
                Line::System("you removed bob".into())
            ]
        );
        m.apply(Update::Event(Event::Reconnecting {
            reason: "lost".into(),
            retry_in_ms: 250,
        }));
        assert_eq!(m.connection.label(), "retrying: lost");
        m.apply(Update::Event(Event::Connected));
        assert_eq!(m.connection, Connection::Connected);
        // A member reached directly is marked until the link goes.
        m.apply(Update::Event(Event::DirectLink {
            peer: key(2),
            peer_name: Some("bob".into()),
            up: true,
        }));
        assert!(m.direct.contains(&key(2)));
        m.apply(Update::Event(Event::DirectLink {
            peer: key(2),
            peer_name: Some("bob".into()),
            up: false,
        }));
        assert!(m.direct.is_empty());
    }

    #[test]
    fn days_are_calendar_dates() {
        assert_eq!(day(0), "1970-01-01");
        assert_eq!(day(951_782_400_000), "2000-02-29");
        assert_eq!(day(1_796_567_842_000), "2026-12-06");
    }

    #[test]
    fn contacts_and_safety_numbers_arrive_as_updates() {
        let mut m = open();
        assert_eq!(m.who(&key(3)), short_key(&key(3)));
        m.apply(Update::Contacts(vec![("carol".into(), key(3))]));
        assert_eq!(m.who(&key(3)), "carol");
        assert_eq!(m.who(&key(1)), "you");
        m.apply(Update::SafetyNumber {
            group: "team".into(),
            digits: "12345 67890".into(),
        });
        assert_eq!(
            m.groups["team"].safety_number.as_deref(),
            Some("12345 67890")
        );
        assert_eq!(m.groups["team"].member_keys, [key(1), key(2)]);
        // Listed again at the same epoch it stays; a new epoch clears it.
        m.apply(Update::Groups(vec![summary("team")]));
        assert!(m.groups["team"].safety_number.is_some());
        let mut next = summary("team");
        next.epoch = 2;
        m.apply(Update::Groups(vec![next]));
        assert!(m.groups["team"].safety_number.is_none());
    }

    #[test]
    fn a_long_conversation_keeps_its_newest_lines() {
        let mut m = open();
        for n in 0..LINES_PER_GROUP_MAX + 3 {
            m.apply(Update::Sent {
                group: "team".into(),
                text: n.to_string(),
                sent_at_ms: 0,
            });
        }
        let g = &m.groups["team"];
        assert_eq!(g.lines.len(), LINES_PER_GROUP_MAX);
        assert_eq!(
            g.preview(),
            Some((LINES_PER_GROUP_MAX + 2).to_string().as_str())
        );
    }
}
