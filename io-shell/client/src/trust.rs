//! How the client trusts the server: by pinning the SHA-256 fingerprint of
//! its certificate (the value `qpq-server` prints at start), or through a CA
//! certificate file. Verification is never turned off. A pinned
//! fingerprint that does not match is reported as such
//! ([`TrustError::FingerprintMismatch`]), with both values, rather than as
//! the TLS stack's generic certificate error.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use quicproquo_core::types::hex;
use quicproquo_proto::pin::PinnedCert;
use rustls::pki_types::{CertificateDer, pem::PemObject};

/// The server's expected identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerTrust {
    /// Accept exactly the certificate with this SHA-256 (of its DER).
    Fingerprint([u8; 32]),
    /// Accept certificates issued by the CA certificates in this PEM file,
    /// for the server's name.
    CaFile(PathBuf),
}

/// The trust setting cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// A fingerprint is not 64 hex digits.
    #[error("server fingerprint must be 64 hex digits (SHA-256), got `{0}`")]
    BadFingerprint(String),
    /// The CA file cannot be read or holds no certificate.
    #[error("CA file {path}: {message}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The server's certificate is not the pinned one.
    #[error(
        "server certificate fingerprint mismatch: expected {}, got {}",
        hex(.expected),
        hex(.got)
    )]
    FingerprintMismatch {
        /// The pinned SHA-256.
        expected: [u8; 32],
        /// The SHA-256 of the certificate the server presented.
        got: [u8; 32],
    },
}

/// Where a pinned-fingerprint check leaves the mismatch it refused: the TLS
/// stack passes on only a generic certificate error, so the connecting code
/// reads the mismatch from here. One per connection attempt.
#[derive(Debug, Default)]
pub(crate) struct RefusedCert(Mutex<Option<TrustError>>);

impl RefusedCert {
    /// The mismatch the check found, if it refused a certificate.
    pub(crate) fn take(&self) -> Option<TrustError> {
        self.0.lock().ok()?.take()
    }

    fn record(&self, expected: [u8; 32], got: [u8; 32]) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(TrustError::FingerprintMismatch { expected, got });
        }
    }
}

impl ServerTrust {
    /// Parses a fingerprint given as 64 hex digits (colons allowed).
    pub fn fingerprint_hex(hex: &str) -> Result<ServerTrust, TrustError> {
        let clean: String = hex.chars().filter(|c| *c != ':').collect();
        quicproquo_core::types::unhex(&clean)
            .map(ServerTrust::Fingerprint)
            .ok_or_else(|| TrustError::BadFingerprint(hex.to_owned()))
    }

    /// The TLS configuration for this trust; a refused pinned certificate
    /// is recorded in `refused`.
    pub(crate) fn rustls_config(
        &self,
        refused: Arc<RefusedCert>,
    ) -> Result<rustls::ClientConfig, TrustError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?;
        Ok(match self {
            ServerTrust::Fingerprint(fp) => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert::new(
                    *fp,
                    provider,
                    move |expected, got| refused.record(expected, got),
                )))
                .with_no_client_auth(),
            ServerTrust::CaFile(path) => builder
                .with_root_certificates(load_roots(path)?)
                .with_no_client_auth(),
        })
    }
}

fn load_roots(path: &Path) -> Result<rustls::RootCertStore, TrustError> {
    let err = |message: String| TrustError::CaFile {
        path: path.to_owned(),
        message,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(|e| err(e.to_string()))? {
        let cert = cert.map_err(|e| err(e.to_string()))?;
        roots.add(cert).map_err(|e| err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(err("no certificate found".into()));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_must_be_64_hex_digits() {
        let hex = "ab".repeat(32);
        assert_eq!(
            ServerTrust::fingerprint_hex(&hex).unwrap(),
            ServerTrust::Fingerprint([0xab; 32])
        );
        assert!(ServerTrust::fingerprint_hex("abc").is_err());
        assert!(ServerTrust::fingerprint_hex(&"zz".repeat(32)).is_err());
        assert!(ServerTrust::fingerprint_hex(&"é".repeat(32)).is_err());
    }

    #[test]
    fn a_mismatch_names_both_fingerprints() {
        let e = TrustError::FingerprintMismatch {
            expected: [0xab; 32],
            got: [0x01; 32],
        };
        assert_eq!(
            e.to_string(),
            format!(
                "server certificate fingerprint mismatch: expected {}, got {}",
                "ab".repeat(32),
                "01".repeat(32)
            )
        );
    }
}
