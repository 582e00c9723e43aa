//! Peers that use GREASE values (RFC 9420 §13.5), as openmls sees them.
//!
//! openmls 0.9.2 as published parses an entry of a LeafNode's
//! `capabilities.extensions` with a GREASE value `x` as
//! `ExtensionType::Grease(x)`, but an extension of that type in a
//! KeyPackage's or LeafNode's `extensions` as `Extension::Unknown(x, _)`,
//! whose `extension_type()` was `ExtensionType::Unknown(x)`. Its checks that
//! every extension in use is listed in the leaf's capabilities (RFC 9420
//! §7.2, §10) compared the two as different, so a peer that greases its
//! extensions, as §13.5 says it SHOULD, was refused wherever openmls meets
//! its leaf: validating its KeyPackage, adding it, joining a group it is in
//! (the ratchet tree in the Welcome), processing its Commits and anyone's
//! Commit that adds it, plaintext or encrypted.
//!
//! The workspace builds openmls from `vendor/openmls`: 0.9.2 with the
//! upstream fix backported (openmls PR #2162: `extension_type()` of such an
//! extension is `Grease(x)`), so nothing here rewrites what a peer sent.
//! These tests pin the fix; the interop tests (`interop/tests/mls_rs.rs`)
//! show it with a GREASE-using mls-rs member.

#[cfg(test)]
mod tests {
    use openmls::prelude::*;
    use openmls_traits::OpenMlsProvider;
    use tls_codec::Deserialize as _;

    use crate::client::mls::IdentitySigner;
    use crate::client::{CIPHERSUITE, KEY_PACKAGE_LIFETIME_SECS, QpqProvider};

    /// A GREASE value (RFC 9420 §13.5).
    const GREASE_TYPE: u16 = 0x0A0A;

    /// A KeyPackage as a GREASE-using peer sends it: GREASE extension types
    /// in its capabilities, its LeafNode's extensions and its own
    /// extensions. openmls makes it from `Unknown` values, which it writes
    /// as the same bytes as `Grease` ones.
    fn grease_key_package(provider: &QpqProvider, seed: u8) -> Vec<u8> {
        let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
        let public = key.verifying_key().to_bytes();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(public.to_vec()).into(),
            signature_key: public.to_vec().into(),
        };
        let grease = ExtensionType::Unknown(GREASE_TYPE);
        let capabilities = Capabilities::new(
            None,
            Some(&[CIPHERSUITE]),
            Some(&[grease]),
            None,
            Some(&[CredentialType::Basic]),
        );
        let unknown = || Extension::Unknown(GREASE_TYPE, UnknownExtension(vec![7; 3]));
        let bundle = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(KEY_PACKAGE_LIFETIME_SECS))
            .leaf_node_capabilities(capabilities)
            .leaf_node_extensions(Extensions::single(unknown()).unwrap())
            .key_package_extensions(Extensions::single(unknown()).unwrap())
            .build(CIPHERSUITE, provider, &IdentitySigner(key), credential)
            .unwrap();
        MlsMessageOut::from(bundle.key_package().clone())
            .to_bytes()
            .unwrap()
    }

    fn parse(bytes: &[u8]) -> KeyPackageIn {
        match MlsMessageIn::tls_deserialize_exact(bytes)
            .unwrap()
            .extract()
        {
            MlsMessageBodyIn::KeyPackage(kp) => kp,
            other => panic!("not a KeyPackage: {other:?}"),
        }
    }

    #[test]
    fn a_grease_extension_has_the_type_its_capabilities_entry_has() {
        let from_capabilities = ExtensionType::from(GREASE_TYPE);
        let in_use = Extension::Unknown(GREASE_TYPE, UnknownExtension(vec![]));
        assert_eq!(in_use.extension_type(), from_capabilities);
        assert_eq!(from_capabilities, ExtensionType::Grease(GREASE_TYPE));
        // A value outside the GREASE set stays unknown.
        let other = Extension::Unknown(0xF042, UnknownExtension(vec![]));
        assert_eq!(other.extension_type(), ExtensionType::Unknown(0xF042));
    }

    #[test]
    fn a_grease_key_package_validates_and_keeps_its_bytes() {
        let provider = QpqProvider::new([1; 32]);
        let bytes = grease_key_package(&provider, 3);
        let kp = parse(&bytes)
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .expect("valid: its GREASE extensions are listed");
        assert_eq!(MlsMessageOut::from(kp).to_bytes().unwrap(), bytes);
    }

    #[test]
    fn a_grease_key_package_can_be_added_and_its_group_joined_and_followed() {
        // Alice adds the GREASE leaf (openmls checks it again when the Add
        // is committed) and Bob in one Commit; Bob joins from a Welcome
        // whose ratchet tree holds that leaf, and follows Alice's next
        // Commit, encrypted, which adds another GREASE leaf.
        let provider = QpqProvider::new([1; 32]);
        let bob_provider = QpqProvider::new([2; 32]);
        let member = |seed: u8| {
            let key = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
            let public = key.verifying_key().to_bytes();
            let credential = CredentialWithKey {
                credential: BasicCredential::new(public.to_vec()).into(),
                signature_key: public.to_vec().into(),
            };
            (IdentitySigner(key), credential)
        };
        let (alice, alice_credential) = member(4);
        let (bob, bob_credential) = member(5);
        let bob_package = KeyPackage::builder()
            .key_package_lifetime(Lifetime::new(KEY_PACKAGE_LIFETIME_SECS))
            .build(CIPHERSUITE, &bob_provider, &bob, bob_credential)
            .unwrap();
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .build();
        let mut group = MlsGroup::new(&provider, &alice, &config, alice_credential).unwrap();
        let greasy = parse(&grease_key_package(&provider, 3))
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .unwrap();
        let (_, welcome, _) = group
            .add_members(
                &provider,
                &alice,
                &[greasy, bob_package.key_package().clone()],
            )
            .expect("the GREASE leaf passes openmls's leaf checks");
        group.merge_pending_commit(&provider).unwrap();
        assert_eq!(group.members().count(), 3);

        let welcome = match MlsMessageIn::tls_deserialize_exact(welcome.to_bytes().unwrap())
            .unwrap()
            .extract()
        {
            MlsMessageBodyIn::Welcome(w) => w,
            other => panic!("not a Welcome: {other:?}"),
        };
        let join = MlsGroupJoinConfig::builder()
            .wire_format_policy(MIXED_CIPHERTEXT_WIRE_FORMAT_POLICY)
            .build();
        let mut bobs = StagedWelcome::new_from_welcome(&bob_provider, &join, welcome, None)
            .expect("a ratchet tree with a GREASE leaf is accepted")
            .into_group(&bob_provider)
            .unwrap();
        assert_eq!(bobs.members().count(), 3);

        let another = parse(&grease_key_package(&provider, 6))
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .unwrap();
        let (commit, _, _) = group.add_members(&provider, &alice, &[another]).unwrap();
        group.merge_pending_commit(&provider).unwrap();
        let commit = MlsMessageIn::tls_deserialize_exact(commit.to_bytes().unwrap()).unwrap();
        let protocol = commit.try_into_protocol_message().unwrap();
        assert!(matches!(protocol, ProtocolMessage::PrivateMessage(_)));
        let processed = bobs
            .process_message(&bob_provider, protocol)
            .expect("an encrypted Commit adding a GREASE leaf is accepted");
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("not a Commit");
        };
        bobs.merge_staged_commit(&bob_provider, *staged).unwrap();
        assert_eq!(bobs.members().count(), 4);
        assert_eq!(
            bobs.epoch_authenticator().as_slice(),
            group.epoch_authenticator().as_slice()
        );
    }
}
