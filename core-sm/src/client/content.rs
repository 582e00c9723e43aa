//! What an application message carries inside MLS: typed content (a text
//! with an optional reply-to, an edit or a deletion of one's own earlier
//! message, or an attachment), the sender's clock when it was made, and an
//! id other messages refer to it by.
//!
//! The book's page `docs/src/protocol/content.md` specifies it for other
//! clients, with worked examples that a test below checks.
//!
//! Layout, version 2 (what this machine writes):
//!
//! ```text
//! 0xFF | 0x02 | sent_at_ms u64 BE | id[16] | kind u8 | body
//! text       0x01: reply u8 (0, or 1 and reply_to[16]) | UTF-8 text
//! edit       0x02: target[16] | UTF-8 text (the new text)
//! delete     0x03: target[16]
//! attachment 0x04: reply u8 (0, or 1 and reply_to[16]) | type_len u8 | media type
//!                  | name_len u8 | UTF-8 file name | data
//! ```
//!
//! `id` is 16 random bytes the sender picks; `reply_to` and `target` are
//! ids of earlier messages of the same group. An edit or a deletion applies
//! only to a message of the same sender: the receiver checks (MLS
//! authenticates both senders), since only it holds the history.
//!
//! Version 1 is `0xFF 0x01 | sent_at_ms u64 BE | UTF-8 text`: a text with
//! no id, as earlier versions send it. `0xFF` never starts valid UTF-8, so
//! application data that does not start with it is taken as bare UTF-8 text
//! with no time and no id (what other MLS clients send); a version after 2
//! is shown as text too. A malformed text is shown with replacement
//! characters, never refused: the message was authenticated by MLS. A
//! version-2 message that does not decode, or of a kind this version does
//! not know, is [`Content::Unsupported`].

use crate::limits::{
    ATTACHMENT_BYTES_MAX, ATTACHMENT_NAME_BYTES_MAX, MEDIA_TYPE_BYTES_MAX, TEXT_BYTES_MAX,
};

/// First byte of a qpq application message.
pub const CONTENT_MARKER: u8 = 0xFF;
/// The content layout this machine writes.
pub const CONTENT_VERSION: u8 = 2;
/// The first layout: text and time only.
const VERSION_1: u8 = 1;
/// Bytes of a message id.
pub const CONTENT_ID_BYTES: usize = 16;

const KIND_TEXT: u8 = 0x01;
const KIND_EDIT: u8 = 0x02;
const KIND_DELETE: u8 = 0x03;
const KIND_ATTACHMENT: u8 = 0x04;

/// Bytes before a version-2 body: marker, version, time, id, kind.
const HEADER_BYTES: usize = 2 + 8 + CONTENT_ID_BYTES + 1;

/// The id a message is referred to by (for a reply, an edit, a deletion).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContentId(pub [u8; CONTENT_ID_BYTES]);

impl ContentId {
    /// The id as 32 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 32 hex digits.
    pub fn from_hex(s: &str) -> Option<ContentId> {
        crate::types::unhex(s).map(ContentId)
    }
}

/// A file sent in a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Its media type (RFC 6838, `type/subtype`), as the sender says.
    pub media_type: String,
    /// Its file name, as the sender says (no path).
    pub name: String,
    /// Its bytes.
    pub data: Vec<u8>,
}

/// What a message says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A text, perhaps a reply.
    Text {
        /// What it says.
        text: String,
        /// The message it answers.
        reply_to: Option<ContentId>,
    },
    /// The sender's new text for an earlier message of theirs.
    Edit {
        /// The message edited.
        target: ContentId,
        /// Its new text.
        text: String,
    },
    /// The sender withdraws an earlier message of theirs.
    Delete {
        /// The message deleted.
        target: ContentId,
    },
    /// A file, perhaps as a reply.
    Attachment {
        /// The file.
        attachment: Attachment,
        /// The message it answers.
        reply_to: Option<ContentId>,
    },
    /// Content of a later version or a kind this version does not know, or
    /// that does not decode: shown as such, never refused.
    Unsupported {
        /// The kind byte, if the header decoded.
        kind: Option<u8>,
    },
}

impl Content {
    /// A plain text.
    pub fn text(text: impl Into<String>) -> Content {
        Content::Text {
            text: text.into(),
            reply_to: None,
        }
    }

    /// Checks the limits of content to send ([`TEXT_BYTES_MAX`],
    /// [`ATTACHMENT_BYTES_MAX`], [`MEDIA_TYPE_BYTES_MAX`],
    /// [`ATTACHMENT_NAME_BYTES_MAX`]) and that a media type and a file name
    /// are well-formed.
    pub fn check(&self) -> Result<(), ContentError> {
        match self {
            Content::Text { text, .. } | Content::Edit { text, .. } => {
                if text.len() > TEXT_BYTES_MAX {
                    return Err(ContentError::TextTooLong(text.len()));
                }
            }
            Content::Delete { .. } => {}
            Content::Attachment { attachment, .. } => {
                let Attachment {
                    media_type,
                    name,
                    data,
                } = attachment;
                if data.len() > ATTACHMENT_BYTES_MAX {
                    return Err(ContentError::AttachmentTooLarge(data.len()));
                }
                if !valid_media_type(media_type) {
                    return Err(ContentError::MediaType(media_type.clone()));
                }
                if name.is_empty()
                    || name.len() > ATTACHMENT_NAME_BYTES_MAX
                    || name
                        .chars()
                        .any(|c| c.is_control() || c == '/' || c == '\\')
                {
                    return Err(ContentError::FileName(name.clone()));
                }
            }
            Content::Unsupported { .. } => return Err(ContentError::Unsupported),
        }
        Ok(())
    }
}

/// Content that cannot be sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContentError {
    /// A text or an edit over [`TEXT_BYTES_MAX`].
    #[error("text of {0} bytes exceeds the limit of {TEXT_BYTES_MAX}")]
    TextTooLong(usize),
    /// An attachment over [`ATTACHMENT_BYTES_MAX`].
    #[error("attachment of {0} bytes exceeds the limit of {ATTACHMENT_BYTES_MAX}")]
    AttachmentTooLarge(usize),
    /// Not `type/subtype` of printable ASCII without spaces, or over
    /// [`MEDIA_TYPE_BYTES_MAX`].
    #[error(
        "media type {0:?} is not of the form type/subtype (printable ASCII, at most {MEDIA_TYPE_BYTES_MAX} bytes)"
    )]
    MediaType(String),
    /// Empty, over [`ATTACHMENT_NAME_BYTES_MAX`], or with a control
    /// character or a path separator.
    #[error(
        "file name {0:?} must be 1 to {ATTACHMENT_NAME_BYTES_MAX} bytes, without control characters or path separators"
    )]
    FileName(String),
    /// [`Content::Unsupported`] is only ever received.
    #[error("unsupported content cannot be sent")]
    Unsupported,
}

fn valid_media_type(t: &str) -> bool {
    let Some((kind, sub)) = t.split_once('/') else {
        return false;
    };
    t.len() <= MEDIA_TYPE_BYTES_MAX
        && !kind.is_empty()
        && !sub.is_empty()
        && t.bytes().all(|b| b.is_ascii_graphic())
        && !sub.contains('/')
}

/// A decoded message: its content, and its id and time when it has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    /// What it says.
    pub content: Content,
    /// Its id (version 2 only).
    pub id: Option<ContentId>,
    /// The sender's clock when it was made (Unix milliseconds).
    pub sent_at_ms: Option<u64>,
}

/// Encodes `content` (checked with [`Content::check`] first) made at
/// `sent_at_ms` (Unix milliseconds) under `id`.
pub fn encode(content: &Content, id: ContentId, sent_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + 64);
    out.push(CONTENT_MARKER);
    out.push(CONTENT_VERSION);
    out.extend_from_slice(&sent_at_ms.to_be_bytes());
    out.extend_from_slice(&id.0);
    let reply = |out: &mut Vec<u8>, reply_to: &Option<ContentId>| match reply_to {
        None => out.push(0),
        Some(r) => {
            out.push(1);
            out.extend_from_slice(&r.0);
        }
    };
    match content {
        Content::Text { text, reply_to } => {
            out.push(KIND_TEXT);
            reply(&mut out, reply_to);
            out.extend_from_slice(text.as_bytes());
        }
        Content::Edit { target, text } => {
            out.push(KIND_EDIT);
            out.extend_from_slice(&target.0);
            out.extend_from_slice(text.as_bytes());
        }
        Content::Delete { target } => {
            out.push(KIND_DELETE);
            out.extend_from_slice(&target.0);
        }
        Content::Attachment {
            attachment,
            reply_to,
        } => {
            out.push(KIND_ATTACHMENT);
            reply(&mut out, reply_to);
            // Both fit a byte: `check` bounds them.
            out.push(attachment.media_type.len() as u8);
            out.extend_from_slice(attachment.media_type.as_bytes());
            out.push(attachment.name.len() as u8);
            out.extend_from_slice(attachment.name.as_bytes());
            out.extend_from_slice(&attachment.data);
        }
        Content::Unsupported { kind } => out.push(kind.unwrap_or(0)),
    }
    out
}

/// `encoded` (from [`encode`]) with its time set to `sent_at_ms`.
pub fn stamp(encoded: &[u8], sent_at_ms: u64) -> Vec<u8> {
    let mut out = encoded.to_vec();
    if let Some(time) = out.get_mut(2..10) {
        time.copy_from_slice(&sent_at_ms.to_be_bytes());
    }
    out
}

/// Decodes application data.
pub fn decode(data: &[u8]) -> Decoded {
    match data {
        [CONTENT_MARKER, VERSION_1, rest @ ..] => {
            if let Some((time, text)) = rest.split_first_chunk::<8>() {
                return Decoded {
                    content: Content::text(String::from_utf8_lossy(text)),
                    id: None,
                    sent_at_ms: Some(u64::from_be_bytes(*time)),
                };
            }
        }
        [CONTENT_MARKER, CONTENT_VERSION, rest @ ..] => return decode_v2(rest),
        _ => {}
    }
    Decoded {
        content: Content::text(String::from_utf8_lossy(data)),
        id: None,
        sent_at_ms: None,
    }
}

fn decode_v2(data: &[u8]) -> Decoded {
    let mut r = Reader(data);
    let (Some(time), Some(id), Some(kind)) = (r.array::<8>(), r.array::<16>(), r.byte()) else {
        return Decoded {
            content: Content::Unsupported { kind: None },
            id: None,
            sent_at_ms: None,
        };
    };
    let content = body(kind, &mut r).unwrap_or(Content::Unsupported { kind: Some(kind) });
    Decoded {
        content,
        id: Some(ContentId(id)),
        sent_at_ms: Some(u64::from_be_bytes(time)),
    }
}

fn body(kind: u8, r: &mut Reader<'_>) -> Option<Content> {
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    Some(match kind {
        KIND_TEXT => {
            let reply_to = r.reply()?;
            Content::Text {
                text: text(r.rest()),
                reply_to,
            }
        }
        KIND_EDIT => {
            let target = ContentId(r.array()?);
            Content::Edit {
                target,
                text: text(r.rest()),
            }
        }
        KIND_DELETE => {
            let target = ContentId(r.array()?);
            r.rest().is_empty().then_some(Content::Delete { target })?
        }
        KIND_ATTACHMENT => {
            let reply_to = r.reply()?;
            let media_type = r.short()?;
            let name = r.short()?;
            Content::Attachment {
                attachment: Attachment {
                    media_type: text(media_type),
                    name: text(name),
                    data: r.rest().to_vec(),
                },
                reply_to,
            }
        }
        _ => return None,
    })
}

/// Reads a version-2 message front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }

    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (a, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*a)
    }

    /// A length byte and that many bytes.
    fn short(&mut self) -> Option<&'a [u8]> {
        let len = usize::from(self.byte()?);
        let (s, rest) = self.0.split_at_checked(len)?;
        self.0 = rest;
        Some(s)
    }

    /// The reply flag and the id it announces.
    fn reply(&mut self) -> Option<Option<ContentId>> {
        match self.byte()? {
            0 => Some(None),
            1 => Some(Some(ContentId(self.array()?))),
            _ => None,
        }
    }

    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: ContentId = ContentId([7; 16]);
    const OTHER: ContentId = ContentId([9; 16]);

    fn round_trip(content: Content) {
        content.check().expect("sendable");
        let bytes = encode(&content, ID, 1_700_000_000_123);
        assert_eq!(
            decode(&bytes),
            Decoded {
                content,
                id: Some(ID),
                sent_at_ms: Some(1_700_000_000_123)
            }
        );
    }

    /// The hex block after `<!-- example: NAME -->` in the book's page on
    /// this format.
    fn book_example(name: &str) -> Vec<u8> {
        const PAGE: &str = include_str!("../../../docs/src/protocol/content.md");
        let marker = format!("<!-- example: {name} -->");
        let after = &PAGE[PAGE.find(&marker).expect("the example is in the book")..];
        let block = after
            .split("```")
            .nth(1)
            .expect("a code block follows")
            .trim_start_matches("text");
        block
            .split_whitespace()
            .map(|h| u8::from_str_radix(h, 16).expect("hex bytes"))
            .collect()
    }

    #[test]
    fn the_book_examples_are_what_encode_writes() {
        let time = 1_700_000_000_123;
        let reply = Content::Text {
            text: "yes".into(),
            reply_to: Some(OTHER),
        };
        assert_eq!(book_example("text reply"), encode(&reply, ID, time));
        let file = Content::Attachment {
            attachment: Attachment {
                media_type: "text/plain".into(),
                name: "a.txt".into(),
                data: b"hi\n".to_vec(),
            },
            reply_to: None,
        };
        assert_eq!(book_example("attachment"), encode(&file, ID, time));
        assert_eq!(decode(&book_example("attachment")).content, file);
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Content::text("hello"));
        round_trip(Content::text(""));
        round_trip(Content::Text {
            text: "yes".into(),
            reply_to: Some(OTHER),
        });
        round_trip(Content::Edit {
            target: OTHER,
            text: "fixed".into(),
        });
        round_trip(Content::Delete { target: OTHER });
        round_trip(Content::Attachment {
            attachment: Attachment {
                media_type: "image/png".into(),
                name: "cat.png".into(),
                data: vec![0x89, b'P', b'N', b'G', 0, 0xFF],
            },
            reply_to: Some(OTHER),
        });
        round_trip(Content::Attachment {
            attachment: Attachment {
                media_type: "application/octet-stream".into(),
                name: "x".into(),
                data: vec![0xAB; ATTACHMENT_BYTES_MAX],
            },
            reply_to: None,
        });
    }

    #[test]
    fn version_1_and_bare_utf8_are_texts_without_an_id() {
        let mut v1 = vec![0xFF, 0x01];
        v1.extend_from_slice(&5u64.to_be_bytes());
        v1.extend_from_slice(b"old");
        assert_eq!(
            decode(&v1),
            Decoded {
                content: Content::text("old"),
                id: None,
                sent_at_ms: Some(5)
            }
        );
        for bare in [&b"plain"[..], b""] {
            assert_eq!(
                decode(bare),
                Decoded {
                    content: Content::text(String::from_utf8_lossy(bare)),
                    id: None,
                    sent_at_ms: None
                }
            );
        }
    }

    #[test]
    fn short_unknown_and_malformed_content_is_shown_not_refused() {
        let text = |data: &[u8]| decode(data).content;
        // Version 1 too short for its time, a later version: text.
        assert_eq!(
            text(&[0xFF, 0x01, 0, 0]),
            Content::text("\u{fffd}\u{1}\0\0")
        );
        assert_eq!(
            text(&[0xFF, 0x03, 1, 2]),
            Content::text("\u{fffd}\u{3}\u{1}\u{2}")
        );
        // Version 2: a header cut short, an unknown kind, bodies cut short
        // or with a bad reply flag, a deletion with trailing bytes.
        assert_eq!(
            text(&[0xFF, 0x02, 0, 0]),
            Content::Unsupported { kind: None }
        );
        let header = |kind: u8| {
            let mut h = encode(&Content::Delete { target: OTHER }, ID, 1);
            h.truncate(HEADER_BYTES - 1);
            h.push(kind);
            h
        };
        for (kind, body) in [
            (0x05, &[][..]),
            (KIND_TEXT, &[2][..]),
            (KIND_TEXT, &[1, 0, 0][..]),
            (KIND_EDIT, &[1; 15][..]),
            (KIND_DELETE, &[1; 17][..]),
            (KIND_ATTACHMENT, &[0, 5, b'a'][..]),
            (KIND_ATTACHMENT, &[0, 1, b'a', 9][..]),
        ] {
            let mut data = header(kind);
            data.extend_from_slice(body);
            assert_eq!(
                decode(&data),
                Decoded {
                    content: Content::Unsupported { kind: Some(kind) },
                    id: Some(ID),
                    sent_at_ms: Some(1)
                },
                "{kind} {body:?}"
            );
        }
        // Malformed UTF-8 in a text: replacement characters.
        let mut data = header(KIND_TEXT);
        data.extend_from_slice(&[0, 0xC3]);
        assert_eq!(decode(&data).content, Content::text("\u{fffd}"));
    }

    #[test]
    fn limits_and_names_are_checked_before_sending() {
        let file = |media_type: &str, name: &str, len: usize| Content::Attachment {
            attachment: Attachment {
                media_type: media_type.into(),
                name: name.into(),
                data: vec![0; len],
            },
            reply_to: None,
        };
        assert_eq!(
            Content::text("x".repeat(TEXT_BYTES_MAX + 1)).check(),
            Err(ContentError::TextTooLong(TEXT_BYTES_MAX + 1))
        );
        assert_eq!(
            file("a/b", "f", ATTACHMENT_BYTES_MAX + 1).check(),
            Err(ContentError::AttachmentTooLarge(ATTACHMENT_BYTES_MAX + 1))
        );
        for bad in [
            "",
            "text",
            "/plain",
            "text/",
            "te xt/plain",
            "a/b/c",
            "tëxt/plain",
        ] {
            assert!(
                matches!(file(bad, "f", 1).check(), Err(ContentError::MediaType(_))),
                "{bad:?}"
            );
        }
        let long = "n".repeat(ATTACHMENT_NAME_BYTES_MAX + 1);
        for bad in ["", "a/b", "a\\b", "bell\u{7}", &long] {
            assert!(
                matches!(file("a/b", bad, 1).check(), Err(ContentError::FileName(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            Content::Unsupported { kind: None }.check(),
            Err(ContentError::Unsupported)
        );
    }

    #[test]
    fn ids_print_and_parse_as_hex() {
        let id = ContentId([0xAB; 16]);
        assert_eq!(id.to_hex(), "ab".repeat(16));
        assert_eq!(ContentId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ContentId::from_hex("ab"), None);
        assert_eq!(ContentId::from_hex(&"zz".repeat(16)), None);
    }
}
