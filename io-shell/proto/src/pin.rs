//! Trusting a server by the SHA-256 fingerprint of its certificate (of
//! the leaf's DER encoding), the value `qpq-server` prints at start and
//! clients pin: [`PinnedCert`] is the TLS certificate check that accepts
//! exactly that certificate, and still checks that the server proves
//! possession of its key in the handshake. Only TLS 1.3 is accepted.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// SHA-256 of a certificate's DER encoding: the value clients pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// What a refused certificate is reported to: the fingerprint expected
/// and the one presented (the TLS stack passes on only a generic error).
type OnMismatch = Box<dyn Fn([u8; 32], [u8; 32]) + Send + Sync>;

/// Accepts the one certificate whose SHA-256 is pinned.
pub struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    on_mismatch: OnMismatch,
}

impl PinnedCert {
    /// Pins `fingerprint`, checking handshake signatures with `provider`;
    /// a certificate refused for another fingerprint is reported to
    /// `on_mismatch(expected, got)`.
    pub fn new(
        fingerprint: [u8; 32],
        provider: Arc<CryptoProvider>,
        on_mismatch: impl Fn([u8; 32], [u8; 32]) + Send + Sync + 'static,
    ) -> PinnedCert {
        PinnedCert {
            fingerprint,
            provider,
            on_mismatch: Box::new(on_mismatch),
        }
    }
}

impl fmt::Debug for PinnedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedCert")
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            (self.on_mismatch)(self.fingerprint, got);
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered; a 1.2 handshake is never valid here.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
