//! A message sent over a direct link between two members (the book's
//! Direct links chapter): the client machine makes and takes it, the p2p
//! shell carries it.

use std::fmt;

use crate::limits::DIRECT_HEADER_BYTES_MAX;
use crate::types::{ChannelId, MessageId};

/// The version byte that starts every frame.
pub const DIRECT_FRAME_VERSION: u8 = 1;

/// A message sent directly: a group payload exactly as it would be
/// enqueued at the server, for the same channel, with the same id.
#[derive(Clone, PartialEq, Eq)]
pub struct DirectMessage {
    /// The group's channel.
    pub channel: ChannelId,
    /// The id its server copies carry, so the receiver shows it once
    /// whichever way it comes.
    pub message_id: MessageId,
    /// The seq the server gave the sender's last message to this receiver
    /// on this channel before this one (0: none): the receiver takes this
    /// message only once it has processed its queue up to there, so a
    /// member's messages keep their order across both paths.
    pub after_seq: u64,
    /// The payload (an MLS message in its envelope).
    pub payload: Vec<u8>,
}

impl fmt::Debug for DirectMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectMessage")
            .field("channel", &self.channel)
            .field("message_id", &self.message_id)
            .field("after_seq", &self.after_seq)
            .field("payload_bytes", &self.payload.len())
            .finish()
    }
}

impl DirectMessage {
    /// The frame: version, the channel id's length and bytes, the message
    /// id, `after_seq` (big-endian u64), the payload's length (big-endian
    /// u32), the payload.
    pub fn encode(&self) -> Vec<u8> {
        let channel = self.channel.as_bytes();
        let mut out = Vec::with_capacity(DIRECT_HEADER_BYTES_MAX + self.payload.len());
        out.push(DIRECT_FRAME_VERSION);
        // At most CHANNEL_ID_BYTES_MAX (16): a ChannelId cannot be longer.
        out.push(u8::try_from(channel.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(channel);
        out.extend_from_slice(&self.message_id.0);
        out.extend_from_slice(&self.after_seq.to_be_bytes());
        // At most PAYLOAD_BYTES_MAX, checked before sending.
        out.extend_from_slice(
            &u32::try_from(self.payload.len())
                .unwrap_or(u32::MAX)
                .to_be_bytes(),
        );
        out.extend_from_slice(&self.payload);
        out
    }
}
