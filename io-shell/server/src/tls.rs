//! The server's TLS identity: a configured certificate chain and key, or a
//! self-signed certificate generated in the data directory on first start.
//! Clients pin the SHA-256 fingerprint of the leaf certificate (DER), which
//! the server prints at start.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// File name of the generated certificate inside the data directory.
pub const GENERATED_CERT_FILE: &str = "server-cert.pem";
/// File name of the generated private key inside the data directory.
pub const GENERATED_KEY_FILE: &str = "server-key.pem";

/// File name of the QUIC stateless-reset key inside the data directory.
pub const RESET_KEY_FILE: &str = "stateless-reset.key";
/// Bytes of the stateless-reset key (an HMAC-SHA256 key).
pub const RESET_KEY_BYTES: usize = 32;

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

pub use quicproquo_proto::pin::fingerprint;

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

/// The key QUIC derives its stateless-reset tokens from, kept in
/// `data_dir` (mode 0600) and made on first start. With the same key after
/// a restart, the server answers packets of connections it no longer knows
/// with a reset their clients accept, so they reconnect at once instead of
/// waiting for their idle timeout.
pub fn load_or_generate_reset_key(data_dir: &Path) -> Result<[u8; RESET_KEY_BYTES], TlsError> {
    let path = data_dir.join(RESET_KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            return bytes.try_into().map_err(|bytes: Vec<u8>| TlsError::Pem {
                path: path.clone(),
                message: format!(
                    "holds {} bytes, not the {RESET_KEY_BYTES} of a stateless-reset key; delete it to make a new one",
                    bytes.len()
                ),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&path, e)),
    }
    let mut key = [0u8; RESET_KEY_BYTES];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
    write_private(&path, &key)?;
    Ok(key)
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
    fn the_reset_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_generate_reset_key(dir.path()).unwrap();
        assert_eq!(load_or_generate_reset_key(dir.path()).unwrap(), a);
        fs::write(dir.path().join(RESET_KEY_FILE), b"short").unwrap();
        let e = load_or_generate_reset_key(dir.path()).unwrap_err();
        assert!(e.to_string().contains(RESET_KEY_FILE), "{e}");
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
