//! What an application message carries inside MLS: the text and the
//! sender's clock when it was made.
//!
//! Layout (version 1): `0xFF`, the version byte `0x01`, the sender's time
//! as milliseconds since the Unix epoch (8 bytes, big-endian), then the
//! text as UTF-8. `0xFF` never starts valid UTF-8, so application data
//! that does not start with it is taken as bare UTF-8 text with no time
//! (what other MLS clients send); an unknown version is shown as text too,
//! with no time. A malformed text is shown with replacement characters,
//! never refused: the message was authenticated by MLS.

/// First byte of a qpq application message.
pub const CONTENT_MARKER: u8 = 0xFF;
/// The content layout this machine writes.
pub const CONTENT_VERSION: u8 = 1;
/// Bytes before the text: marker, version, time.
const HEADER_BYTES: usize = 2 + 8;

/// Encodes `text` made at `sent_at_ms` (Unix milliseconds).
pub fn encode_text(text: &str, sent_at_ms: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + text.len());
    out.push(CONTENT_MARKER);
    out.push(CONTENT_VERSION);
    out.extend_from_slice(&sent_at_ms.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
    out
}

/// Decodes application data into its text and the sender's time, if it
/// carries one.
pub fn decode_text(data: &[u8]) -> (String, Option<u64>) {
    if let [CONTENT_MARKER, CONTENT_VERSION, rest @ ..] = data
        && let Some((time, text)) = rest.split_first_chunk::<8>()
    {
        return (
            String::from_utf8_lossy(text).into_owned(),
            Some(u64::from_be_bytes(*time)),
        );
    }
    (String::from_utf8_lossy(data).into_owned(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(data: &[u8], text: &str, time: Option<u64>) {
        assert_eq!(decode_text(data), (text.to_owned(), time), "{data:?}");
    }

    #[test]
    fn text_and_time_round_trip() {
        check(
            &encode_text("hello", 1_700_000_000_123),
            "hello",
            Some(1_700_000_000_123),
        );
        check(&encode_text("", 0), "", Some(0));
    }

    #[test]
    fn bare_utf8_from_other_clients_is_text_without_a_time() {
        check(b"plain", "plain", None);
        check(b"", "", None);
    }

    #[test]
    fn short_unknown_and_malformed_content_is_shown_not_refused() {
        check(&[0xFF, 0x01, 0, 0], "\u{fffd}\u{1}\0\0", None);
        check(&[0xFF, 0x02, 1, 2], "\u{fffd}\u{2}\u{1}\u{2}", None);
        check(
            &[0xFF, 0x01, 0, 0, 0, 0, 0, 0, 0, 5, 0xC3],
            "\u{fffd}",
            Some(5),
        );
    }
}
