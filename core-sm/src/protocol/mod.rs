//! What the NodeService and the client machine share: the requests and
//! responses of the NodeService protocol as typed values ([`Request`],
//! [`Response`], ...), the signed transcripts ([`auth_message`],
//! [`hybrid_key_message`]), and the envelope framing of payloads the
//! server may read ([`framing`]: the envelope prefixes and an MLS Commit's
//! cleartext header), and the frame of a direct link ([`DirectMessage`]). Neither machine reaches into the other; both speak
//! this. The wire codec (`quicproquo-proto`) converts Cap'n Proto messages
//! to and from these types.

mod auth;
mod direct;
pub mod framing;
mod messages;

pub use auth::{AUTH_CONTEXT, HYBRID_KEY_CONTEXT, auth_message, hybrid_key_message};
pub use direct::{DIRECT_FRAME_VERSION, DirectMessage};
pub use messages::{
    ChannelMessages, Gap, Outgoing, QueuedMessage, Reply, Request, RequestBody, Response,
};
