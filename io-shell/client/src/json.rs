//! The JSON shape of everything the client reports: one object per event,
//! outcome or group, each with a `"type"`. `qpq --json` prints these, one
//! per line, and `qpq daemon` sends them, so scripts read one format.
//! Keys are full hex; text is as sent (JSON escapes control characters).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use quicproquo_core::client::{ContentId, Event, GroupSummary, Outcome};
use quicproquo_core::types::hex;
use serde_json::{Value, json};

/// An event: `message` (with the sender's contact `name` if any, its
/// `id` and `reply_to` as 32 hex digits when it has them, and an
/// `attachment` object: `media_type`, `name`, `size`, `data_base64`),
/// `edited` and `deleted` (with the `target` message's id), `joined`, `member_added`, `member_removed`, `member_left`,
/// `group_changed`, `removed`, `warning`, `tampering`, `delivered`,
/// `connected`, `reconnecting`, `disconnected`, `direct_link` (a member
/// reached directly, `up`, or no longer).
pub fn event(e: &Event) -> Value {
    match e {
        Event::Delivered { group, message_id } => {
            json!({"type": "delivered", "group": group, "message_id": hex(message_id)})
        }
        Event::Connected => json!({"type": "connected"}),
        Event::Reconnecting {
            reason,
            retry_in_ms,
        } => json!({"type": "reconnecting", "reason": reason, "retry_in_ms": retry_in_ms}),
        Event::Disconnected { reason, permanent } => {
            json!({"type": "disconnected", "reason": reason, "permanent": permanent})
        }
        Event::DirectLink {
            peer,
            peer_name,
            up,
        } => {
            let mut v = json!({"type": "direct_link", "peer": hex(peer.as_bytes()), "up": up});
            if let Some(name) = peer_name {
                v["peer_name"] = json!(name);
            }
            v
        }
        Event::Message {
            group,
            sender,
            sender_name,
            text,
            seq,
            sent_at_ms,
            id,
            reply_to,
            attachment,
        } => {
            let mut v = json!({"type": "message", "group": group, "sender": hex(sender.as_bytes()), "text": text, "seq": seq, "sent_at_ms": sent_at_ms});
            if let Some(name) = sender_name {
                v["name"] = json!(name);
            }
            if let Some(id) = id {
                v["id"] = json!(id.to_hex());
            }
            if let Some(r) = reply_to {
                v["reply_to"] = json!(r.to_hex());
            }
            if let Some(a) = attachment {
                v["attachment"] = json!({
                    "media_type": a.media_type,
                    "name": a.name,
                    "size": a.data.len(),
                    "data_base64": BASE64.encode(&a.data),
                });
            }
            v
        }
        Event::Edited {
            group,
            sender,
            sender_name,
            target,
            text,
            seq,
            sent_at_ms,
        } => {
            let mut v = json!({"type": "edited", "group": group, "sender": hex(sender.as_bytes()), "target": target.to_hex(), "text": text, "seq": seq, "sent_at_ms": sent_at_ms});
            if let Some(name) = sender_name {
                v["name"] = json!(name);
            }
            v
        }
        Event::Deleted {
            group,
            sender,
            sender_name,
            target,
            seq,
            sent_at_ms,
        } => {
            let mut v = json!({"type": "deleted", "group": group, "sender": hex(sender.as_bytes()), "target": target.to_hex(), "seq": seq, "sent_at_ms": sent_at_ms});
            if let Some(name) = sender_name {
                v["name"] = json!(name);
            }
            v
        }
        Event::MemberAdded { group, member, by } => {
            json!({"type": "member_added", "group": group, "member": hex(member.as_bytes()), "by": hex(by.as_bytes())})
        }
        Event::MemberRemoved { group, member, by } => {
            json!({"type": "member_removed", "group": group, "member": hex(member.as_bytes()), "by": hex(by.as_bytes())})
        }
        Event::MemberLeft { group, member } => {
            json!({"type": "member_left", "group": group, "member": hex(member.as_bytes())})
        }
        Event::Joined { group, members } => {
            json!({"type": "joined", "group": group, "members": members})
        }
        Event::GroupChanged {
            group,
            epoch,
            members,
        } => {
            json!({"type": "group_changed", "group": group, "epoch": epoch, "members": members})
        }
        Event::Removed { group, by } => {
            json!({"type": "removed", "group": group, "by": hex(by.as_bytes())})
        }
        Event::Tampering { what } => json!({"type": "tampering", "message": what}),
        Event::Warning { message } => json!({"type": "warning", "message": message}),
        other => json!({"type": "other_event", "detail": format!("{other:?}")}),
    }
}

/// A command's outcome: `registered`, `group_created`, `member_added`,
/// `member_removed`, `left`, `updated`, `sent`, `received`,
/// `contact_added`, `contact_removed`.
pub fn outcome(o: &Outcome) -> Value {
    match o {
        Outcome::Registered {
            uploaded,
            already,
            failed,
        } => {
            json!({"type": "registered", "uploaded": uploaded, "already": already, "failed": failed})
        }
        Outcome::GroupCreated { group } => json!({"type": "group_created", "group": group}),
        Outcome::MemberAdded {
            group,
            member,
            undelivered,
        } => {
            json!({"type": "member_added", "group": group, "member": hex(member.as_bytes()), "undelivered": undelivered})
        }
        Outcome::Sent {
            group,
            id,
            delivered,
            undelivered,
        } => {
            json!({"type": "sent", "group": group, "id": id.to_hex(), "delivered": delivered, "undelivered": undelivered})
        }
        Outcome::Received { messages } => json!({"type": "received", "messages": messages}),
        Outcome::MemberRemoved {
            group,
            member,
            undelivered,
        } => {
            json!({"type": "member_removed", "group": group, "member": hex(member.as_bytes()), "undelivered": undelivered})
        }
        Outcome::Left { group } => json!({"type": "left", "group": group}),
        Outcome::ContactAdded {
            name,
            key,
            renamed_from,
        } => {
            let mut v = json!({"type": "contact_added", "name": name, "key": hex(key.as_bytes())});
            if let Some(old) = renamed_from {
                v["renamed_from"] = json!(old);
            }
            v
        }
        Outcome::ContactRemoved { name, key } => {
            json!({"type": "contact_removed", "name": name, "key": hex(key.as_bytes())})
        }
        Outcome::Updated {
            groups,
            undelivered,
        } => json!({"type": "updated", "groups": groups, "undelivered": undelivered}),
        other => json!({"type": "other_outcome", "detail": format!("{other:?}")}),
    }
}

/// The outcome [`outcome`] made `v` from, as a daemon's answer carries it;
/// `None` for anything else.
pub fn outcome_from(v: &Value) -> Option<Outcome> {
    let text = |k: &str| v[k].as_str().map(str::to_owned);
    let count = |k: &str| v[k].as_u64().and_then(|n| u32::try_from(n).ok());
    let key = |k: &str| crate::daemon::parse_key(v[k].as_str()?).ok();
    Some(match v["type"].as_str()? {
        "registered" => Outcome::Registered {
            uploaded: count("uploaded")?,
            already: count("already")?,
            failed: count("failed")?,
        },
        "group_created" => Outcome::GroupCreated {
            group: text("group")?,
        },
        "member_added" => Outcome::MemberAdded {
            group: text("group")?,
            member: key("member")?,
            undelivered: count("undelivered")?,
        },
        "member_removed" => Outcome::MemberRemoved {
            group: text("group")?,
            member: key("member")?,
            undelivered: count("undelivered")?,
        },
        "sent" => Outcome::Sent {
            group: text("group")?,
            id: ContentId::from_hex(v["id"].as_str()?)?,
            delivered: count("delivered")?,
            undelivered: count("undelivered")?,
        },
        "received" => Outcome::Received {
            messages: count("messages")?,
        },
        "left" => Outcome::Left {
            group: text("group")?,
        },
        "contact_added" => Outcome::ContactAdded {
            name: text("name")?,
            key: key("key")?,
            renamed_from: text("renamed_from"),
        },
        "contact_removed" => Outcome::ContactRemoved {
            name: text("name")?,
            key: key("key")?,
        },
        "updated" => Outcome::Updated {
            groups: v["groups"]
                .as_array()?
                .iter()
                .map(|g| g.as_str().map(str::to_owned))
                .collect::<Option<_>>()?,
            undelivered: count("undelivered")?,
        },
        _ => return None,
    })
}

/// One of this user's groups: `group`.
pub fn group(g: &GroupSummary) -> Value {
    json!({
        "type": "group",
        "group": g.name,
        "pq": g.pq,
        "epoch": g.epoch,
        "waiting": g.waiting,
        "channel_id": hex(g.channel_id.as_bytes()),
        "members": g.members.iter().map(|m| hex(m.as_bytes())).collect::<Vec<_>>(),
    })
}
