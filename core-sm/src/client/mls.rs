//! MLS helpers: the identity key as the MLS signer, the leaf capabilities,
//! member checks, group names and their sealing under the epoch's
//! exporter secret.

use super::*;

/// The identity key as an openmls signer: the MLS signature key is the
/// identity key itself.
#[derive(Debug)]
pub(super) struct IdentitySigner(pub(super) SigningKey);

impl Signer for IdentitySigner {
    fn sign(&self, payload: &[u8]) -> Result<Vec<u8>, SignerError> {
        Ok(self.0.sign(payload).to_bytes().to_vec())
    }

    fn signature_scheme(&self) -> SignatureScheme {
        SignatureScheme::ED25519
    }
}

/// Leaf capabilities: both suites this client speaks, the last-resort
/// KeyPackage extension (`last_resort`, type 0x000A, defined in
/// draft-ietf-mls-extensions; RFC 9420 §16.8 allows such packages), which a leaf must list to carry
/// it, and one GREASE value (RFC 9420 §13.5) in each list — ciphersuites,
/// extensions, proposals, credentials — drawn from the machine's seeded
/// randomness, so peers that mishandle unknown values are found out. Only
/// the lists carry GREASE, never an extension in use: openmls 0.9.2 as
/// published refuses a GREASE extension in use even when it is listed
/// (grease.rs), so clients on it would refuse ours.
pub(super) fn capabilities(provider: &QpqProvider) -> Capabilities {
    Capabilities::new(
        None,
        Some(&CIPHERSUITES),
        Some(&[ExtensionType::LastResort]),
        None,
        Some(&[CredentialType::Basic]),
    )
    .with_grease(provider.rand())
}

pub(super) fn members(group: &MlsGroup) -> Vec<IdentityKey> {
    group
        .members()
        .filter_map(|m| IdentityKey::try_from_slice(&m.signature_key).ok())
        .collect()
}

/// After a join or Commit: every member's credential identity must equal
/// its signature key (ARCHITECTURE.md § MLS profile).
pub(super) fn check_members(group: &MlsGroup) -> Result<(), CommandError> {
    for m in group.members() {
        let credential =
            BasicCredential::try_from(m.credential.clone()).map_err(mls(MlsStep::Credential))?;
        if credential.identity() != m.signature_key.as_slice() {
            return Err(CommandError::Mls(MlsError::new(
                MlsStep::Credential,
                "a member's credential identity differs from its signature key",
            )));
        }
    }
    Ok(())
}

pub(super) fn check_name(name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > GROUP_NAME_BYTES_MAX {
        return Err(CommandError::InvalidName(format!(
            "must be 1 to {GROUP_NAME_BYTES_MAX} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(CommandError::InvalidName(
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

pub(super) fn name_cipher(
    provider: &QpqProvider,
    group: &MlsGroup,
) -> Result<ChaCha20Poly1305, CommandError> {
    let key = group
        .export_secret(provider.crypto(), GROUP_NAME_EXPORTER_LABEL, b"", 32)
        .map_err(mls(MlsStep::Exporter))?;
    ChaCha20Poly1305::new_from_slice(&key)
        .map_err(|_| CommandError::Mls(MlsError::new(MlsStep::Exporter, "exporter length")))
}

pub(super) fn seal_name(
    provider: &QpqProvider,
    group: &MlsGroup,
    channel: &ChannelId,
    nonce: &[u8; envelope::NAME_NONCE_BYTES],
    name: &str,
) -> Result<Vec<u8>, CommandError> {
    name_cipher(provider, group)?
        .encrypt(
            nonce.into(),
            Payload {
                msg: name.as_bytes(),
                aad: channel.as_bytes(),
            },
        )
        .map_err(|_| {
            CommandError::Mls(MlsError::new(
                MlsStep::Exporter,
                "sealing the group name failed",
            ))
        })
}

pub(super) fn open_name(
    provider: &QpqProvider,
    group: &MlsGroup,
    channel: &ChannelId,
    nonce: &[u8; envelope::NAME_NONCE_BYTES],
    sealed: &[u8],
) -> Result<String, CommandError> {
    let plain = name_cipher(provider, group)?
        .decrypt(
            nonce.into(),
            Payload {
                msg: sealed,
                aad: channel.as_bytes(),
            },
        )
        .map_err(|_| {
            CommandError::Mls(MlsError::new(
                MlsStep::Exporter,
                "the group name in the Welcome does not open",
            ))
        })?;
    let name = String::from_utf8(plain).map_err(|_| {
        CommandError::Mls(MlsError::new(MlsStep::Exporter, "group name is not UTF-8"))
    })?;
    check_name(&name)?;
    Ok(name)
}
