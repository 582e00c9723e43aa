//! Unit tests for the ciphersuites.

mod tests;

// Test vector for basic crypto functionality
mod kat_crypto_basics;
