//! The server's TLS identity: a configured certificate chain and key, or a
//! self-signed certificate generated in the data directory on first start.
//! Clients pin the SHA-256 fingerprint of the leaf certificate (DER), which
//! the server prints at start.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use sha2::{Digest, Sha256};

/// File name of the generated certificate inside the data directory.
pub const GENERATED_CERT_FILE: &str = "server-cert.pem";
/// File name of the generated private key inside the data directory.
pub const GENERATED_KEY_FILE: &str = "server-key.pem";

/// A certificate chain with its key.
#[derive(Debug)]
pub struct TlsIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the certificate came from, for the log.
    pub cert_path: PathBuf,
    /// True if it was generated during this start.
    pub generated: bool,
}

/// Why the TLS identity could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or key.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Certificate generation failed.
    #[error("generating the self-signed certificate failed: {0}")]
    Generate(String),
}

impl TlsIdentity {
    /// SHA-256 of the leaf certificate's DER encoding.
    pub fn fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.chain[0])
    }
}

/// SHA-256 of a certificate's DER encoding: the value clients pin.
pub fn fingerprint(cert: &CertificateDer<'_>) -> [u8; 32] {
    Sha256::digest(cert.as_ref()).into()
}

/// Loads `cert` and `key` from PEM files.
pub fn load(cert: &Path, key: &Path) -> Result<TlsIdentity, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.to_owned(),
            message: "no certificate found".to_owned(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    Ok(TlsIdentity {
        chain,
        key: key_der,
        cert_path: cert.to_owned(),
        generated: false,
    })
}

/// Loads the generated certificate from `data_dir`, creating it on first
/// start. The key file is written with mode 0600.
pub fn load_or_generate(data_dir: &Path) -> Result<TlsIdentity, TlsError> {
    let cert_path = data_dir.join(GENERATED_CERT_FILE);
    let key_path = data_dir.join(GENERATED_KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        return load(&cert_path, &key_path);
    }
    let names = vec!["localhost".to_owned(), "qpq-server".to_owned()];
    let certified =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    fs::create_dir_all(data_dir).map_err(|e| io_err(data_dir, e))?;
    write_private(&key_path, certified.signing_key.serialize_pem().as_bytes())?;
    write_atomic(&cert_path, certified.cert.pem().as_bytes())?;
    let mut id = load(&cert_path, &key_path)?;
    id.generated = true;
    Ok(id)
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(|e| io_err(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

fn io_err(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn pem_err(path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_certificate_is_reused_with_same_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate(dir.path()).unwrap();
        assert!(a.generated);
        let b = load_or_generate(dir.path()).unwrap();
        assert!(!b.generated);
        assert_eq!(a.fingerprint(), b.fingerprint());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(dir.path().join(GENERATED_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn missing_or_empty_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        fs::write(&cert, "not pem").unwrap();
        let e = load(&cert, &dir.path().join("k.pem")).unwrap_err();
        assert!(e.to_string().contains("c.pem"), "{e}");
    }
}
