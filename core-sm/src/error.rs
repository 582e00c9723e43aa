//! The typed errors every NodeService response can carry (ARCHITECTURE.md
//! § Protocol).
//! Each has a kind, which the wire encodes as a union member, and a
//! human-readable message. Peer faults become one of these; nothing a peer
//! sends turns into a panic.

use std::borrow::Cow;
use std::fmt;

/// What went wrong, as the wire distinguishes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request is malformed or breaks a documented rule.
    InvalidArgument,
    /// The connection has not proved an identity, or the proof failed.
    Unauthenticated,
    /// The connection's identity may not act on this resource.
    PermissionDenied,
    /// The resource does not exist (e.g. no KeyPackage and no last resort).
    NotFound,
    /// A payload, package or key exceeds its size limit.
    PayloadTooLarge,
    /// Too many requests; try again after `retry_after_ms`.
    RateLimited {
        /// How long the client should wait before retrying.
        retry_after_ms: u64,
    },
    /// The queue (or KeyPackage pool) is at its depth or byte limit.
    QueueFull,
    /// A Commit for an epoch that already has one; carries the current epoch.
    StaleEpoch {
        /// The epoch the channel is at now.
        current_epoch: u64,
    },
    /// The server cannot take this request now (overloaded, shutting down,
    /// its disk full, or storage failed); retrying later may succeed.
    Unavailable,
    /// A bug or corrupted storage on the server side.
    Internal,
}

impl ErrorKind {
    /// True if the same request may succeed when tried again later:
    /// `unavailable` (overload, shutdown, a full disk, a failed fsync, or
    /// no connection),
    /// `rateLimited` (after its hint), `queueFull` (the recipient may
    /// drain it) and `internal` (a server fault that a restart may clear).
    /// Everything else — a malformed or forbidden request, a missing
    /// resource, a stale epoch — gets the same answer however often it is
    /// sent. The one rule for the client machine and the shells alike.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Unavailable
                | ErrorKind::RateLimited { .. }
                | ErrorKind::QueueFull
                | ErrorKind::Internal
        )
    }

    /// The pause the server asked for before a retry (`rateLimited`).
    pub fn retry_after(self) -> Option<std::time::Duration> {
        match self {
            ErrorKind::RateLimited { retry_after_ms } => {
                Some(std::time::Duration::from_millis(retry_after_ms))
            }
            _ => None,
        }
    }
}

/// A typed error with a message for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// The kind, which clients act on.
    pub kind: ErrorKind,
    /// A human-readable explanation; never contains keys or payloads.
    pub message: Cow<'static, str>,
}

impl ServiceError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        ServiceError {
            kind,
            message: message.into(),
        }
    }

    /// `invalidArgument` with `message`.
    pub fn invalid_argument(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }

    /// `unauthenticated` with `message`.
    pub fn unauthenticated(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unauthenticated, message)
    }

    /// `permissionDenied` with `message`.
    pub fn permission_denied(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::PermissionDenied, message)
    }

    /// `notFound` with `message`.
    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// `payloadTooLarge` with `message`.
    pub fn payload_too_large(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::PayloadTooLarge, message)
    }

    /// `rateLimited` with a retry hint and `message`.
    pub fn rate_limited(retry_after_ms: u64, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::RateLimited { retry_after_ms }, message)
    }

    /// `queueFull` with `message`.
    pub fn queue_full(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::QueueFull, message)
    }

    /// `staleEpoch` carrying the channel's `current_epoch`, with `message`.
    pub fn stale_epoch(current_epoch: u64, message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::StaleEpoch { current_epoch }, message)
    }

    /// `unavailable` with `message`.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// `internal` with `message`.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }
}

impl fmt::Display for ServiceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ServiceError {}
