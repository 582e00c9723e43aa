//! Why a message could not be decoded, and the typed error the server
//! answers with. Every way `decode_request` and `decode_reply` refuse input
//! is one of these; none of them is a panic.

use quicproquo_core::ServiceError;

/// A message that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is longer than the message limit; it was not parsed.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The input's length.
        len: usize,
        /// The limit it exceeds.
        max: usize,
    },
    /// The bytes are not a well-formed Cap'n Proto message of the schema
    /// (bad framing, truncation, out-of-bounds or amplified pointers, wrong
    /// pointer kinds, invalid UTF-8 text, ...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// A union holds a member this side does not know, typically because
    /// the peer speaks a newer version of the schema.
    #[error("unknown {what} {discriminant}; the peer may speak a newer protocol")]
    UnknownVariant {
        /// Which union: `method`, `reply`, `response` or `error kind`.
        what: &'static str,
        /// The union discriminant found.
        discriminant: u16,
    },
    /// A field is well-formed but invalid (e.g. a 31-byte identity key);
    /// carries the core's `invalidArgument` error.
    #[error("{0}")]
    Invalid(ServiceError),
}

impl DecodeError {
    /// The typed error to answer a request that failed to decode:
    /// `payloadTooLarge` for oversized input, the core's own error for an
    /// invalid field, and `invalidArgument` for everything else.
    pub fn to_service_error(&self) -> ServiceError {
        match self {
            DecodeError::TooLarge { .. } => ServiceError::payload_too_large(self.to_string()),
            DecodeError::Invalid(e) => e.clone(),
            DecodeError::Malformed(_) | DecodeError::UnknownVariant { .. } => {
                ServiceError::invalid_argument(self.to_string())
            }
        }
    }
}

impl From<capnp::Error> for DecodeError {
    fn from(e: capnp::Error) -> Self {
        DecodeError::Malformed(e.to_string())
    }
}
