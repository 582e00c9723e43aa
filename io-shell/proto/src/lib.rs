//! quicproquo wire format (in progress).
