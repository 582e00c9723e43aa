//! Tree unit tests and test vectors

#[cfg(test)]
mod unit_tests;

#[cfg(any(feature = "test-utils", test))]
pub mod kats;
