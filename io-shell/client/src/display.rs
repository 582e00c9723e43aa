//! Showing peer-controlled text (messages, group names, warnings that quote
//! a peer or the server) on a terminal. Such text may hold control
//! characters: a newline would let a peer print a line that looks like
//! another message, and an escape sequence could recolour, move the cursor
//! or rewrite what the terminal shows. [`escape_control`] turns every such
//! character into visible text, so one peer string is always shown as one
//! run of characters on one line. Ordinary printable Unicode is kept as is.
//!
//! `qpq` escapes its human-readable output. Its JSON output carries the
//! text as it is (JSON escapes only the C0 controls); a program that shows
//! that text on a terminal should pass it through [`escape_control`] too.
//!
//! Peers are shown by their contact name, else by one short form of their
//! key, [`short_key`]; [`Names`] picks between them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write;

use quicproquo_core::client::ClientMachine;
use quicproquo_core::types::{IdentityKey, hex};

/// `text` with every control character written out: `\n`, `\r` and `\t`
/// by name, other C0 controls and DEL as `\xNN` (ESC is `\x1b`), and C1
/// controls, bidirectional formatting characters and the Unicode line and
/// paragraph separators as `\u{NNNN}`. Anything else, backslashes
/// included, is returned unchanged, and without a copy when nothing
/// needed escaping. The result is for display: a peer can type `\n` as
/// two characters, so it cannot be unescaped.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(needs_escape) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            // Writing to a String cannot fail.
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\x{:02x}", u32::from(c));
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The short form of an identity key shown to people: its first 16 hex
/// digits and `…`. Enough to tell keys apart at a glance, not to check
/// one: compare the whole key (`qpq whoami`) or a group's safety number
/// for that.
pub fn short_key(key: &IdentityKey) -> String {
    let mut s = hex(&key.as_bytes()[..SHORT_KEY_BYTES]);
    s.push('…');
    s
}

/// How peers are named on screen: by this user's contact name, else by
/// [`short_key`]. Built from the machine's contacts before a command runs
/// (the machine is busy while it runs).
#[derive(Debug, Clone, Default)]
pub struct Names {
    me: Option<IdentityKey>,
    contacts: BTreeMap<IdentityKey, String>,
}

impl Names {
    /// The names of `machine`'s contacts, and its own identity.
    pub fn of(machine: &ClientMachine) -> Names {
        Names::new(machine.identity_key(), machine.contacts())
    }

    /// The names of `contacts`, with `me` shown as `you`.
    pub fn new(me: IdentityKey, contacts: Vec<(String, IdentityKey)>) -> Names {
        Names {
            me: Some(me),
            contacts: contacts.into_iter().map(|(n, k)| (k, n)).collect(),
        }
    }

    /// The contact name of `key`, as it is (for JSON).
    pub fn name(&self, key: &IdentityKey) -> Option<&str> {
        self.contacts.get(key).map(String::as_str)
    }

    /// `key` for a terminal: its contact name, escaped, else its short key.
    pub fn show(&self, key: &IdentityKey) -> String {
        match self.name(key) {
            Some(name) => escape_control(name).into_owned(),
            None => short_key(key),
        }
    }

    /// As [`Names::show`], but this user is `you`.
    pub fn who(&self, key: &IdentityKey) -> String {
        if self.me.as_ref() == Some(key) {
            return "you".to_owned();
        }
        self.show(key)
    }
}

/// True for characters a terminal acts on instead of showing: C0 and C1
/// controls and DEL, the characters that reorder text (Unicode bidi
/// formatting, UAX #9), and the line and paragraph separators.
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// Bytes of a key that [`short_key`] shows (16 hex digits).
const SHORT_KEY_BYTES: usize = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, shown: &str) {
        assert_eq!(escape_control(input), shown, "input {input:?}");
    }

    #[test]
    fn printable_text_is_kept_without_a_copy() {
        for text in ["hello", "", "naïve café 日本語 🙂", r"C:\path\n", "a  b"] {
            check(text, text);
            assert!(matches!(escape_control(text), Cow::Borrowed(_)));
        }
    }

    #[test]
    fn line_breaks_cannot_start_a_fake_line() {
        check("hi\n[team] alice: fake", r"hi\n[team] alice: fake");
        check("a\r\nb", r"a\r\nb");
        check("a\tb", r"a\tb");
        check("a\u{2028}b\u{2029}c", r"a\u{2028}b\u{2029}c");
        check("a\u{85}b", r"a\u{85}b");
    }

    #[test]
    fn escape_sequences_are_shown_not_run() {
        check("\x1b[31mred", r"\x1b[31mred");
        check("\x1b]0;title\x07", r"\x1b]0;title\x07");
        check("\u{9b}2J", r"\u{9b}2J");
        check("nul\0del\x7f", r"nul\x00del\x7f");
    }

    #[test]
    fn a_key_is_shown_by_contact_name_else_by_its_first_16_hex_digits() {
        let mut key = [0xab; 32];
        key[..8].copy_from_slice(&[0x01, 0x23, 0x45, 0x67, 0x89, 0xab, 0xcd, 0xef]);
        let key = IdentityKey(key);
        assert_eq!(short_key(&key), "0123456789abcdef…");
        let mut names = Names::default();
        assert_eq!(names.show(&key), "0123456789abcdef…");
        assert_eq!(names.name(&key), None);
        names.contacts.insert(key, "al\u{202e}ice".into());
        assert_eq!(names.show(&key), r"al\u{202e}ice");
        assert_eq!(names.name(&key), Some("al\u{202e}ice"));
        assert_eq!(names.who(&key), r"al\u{202e}ice");
        names.me = Some(key);
        assert_eq!(names.who(&key), "you");
    }

    #[test]
    fn bidi_overrides_cannot_reorder_what_follows() {
        check("abc\u{202e}fed", r"abc\u{202e}fed");
        check("\u{2066}x\u{2069}", r"\u{2066}x\u{2069}");
        check("\u{200f}", r"\u{200f}");
    }
}
