//! A workaround for how openmls 0.9.2 reads GREASE extension types (RFC 9420
//! §13.5), applied where the machine hands a peer's KeyPackage or
//! PublicMessage to openmls (ARCHITECTURE.md § Interoperability).
//!
//! openmls parses an entry of a LeafNode's `capabilities.extensions` with a
//! GREASE value `x` as `ExtensionType::Grease(x)`, but an extension of that
//! type in a KeyPackage's or LeafNode's `extensions` as
//! `Extension::Unknown(x, _)`, whose `extension_type()` is
//! `ExtensionType::Unknown(x)`. Its checks that every extension in use is
//! listed in the leaf's capabilities (RFC 9420 §7.2, §10) compare the two
//! as different, so a peer that greases its extensions, as §13.5 says it
//! SHOULD, is refused: `KeyPackageIn::validate` with `UnsupportedExtension`,
//! and `LeafNode::validate_locally` (adding the peer, joining a group it is
//! in, processing its Commit with a path) with `UnsupportedExtensions`.
//!
//! Both variants are the same two bytes on the wire. [`unify`] rewrites the
//! parsed value before openmls checks it: every `Grease(x)` in a
//! `capabilities.extensions` list becomes `Unknown(x)`, so the comparison
//! holds, while signatures, tree hashes and what is passed on to other
//! members stay byte for byte what the peer made. It goes through the
//! types' serde form (openmls's storage representation), the only way to
//! reach a capabilities list from outside openmls.
//!
//! What it cannot reach is a LeafNode that openmls decrypts itself: the
//! ratchet tree in a Welcome's GroupInfo, and a Commit or proposal sent as a
//! PrivateMessage. Joining a group in which a member's leaf carries a
//! GREASE extension, and processing another member's encrypted Commit that
//! adds or updates such a leaf, still fail until openmls compares
//! extension types by value; then this module can go.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// `value` with every `Grease(x)` in a `capabilities.extensions` list
/// turned into `Unknown(x)` (see the module docs); `value` itself when it
/// has none, or if its serde form does not round-trip.
pub(super) fn unify<T: Serialize + DeserializeOwned>(value: T) -> T {
    let Ok(mut form) = serde_json::to_value(&value) else {
        return value;
    };
    if !rewrite(&mut form) {
        return value;
    }
    serde_json::from_value(form).unwrap_or(value)
}

/// Rewrites the GREASE extension types of every capabilities list below
/// `v`; true if it changed one.
fn rewrite(v: &mut Value) -> bool {
    match v {
        Value::Object(map) => {
            let mut changed = false;
            if let Some(Value::Object(capabilities)) = map.get_mut(CAPABILITIES)
                && let Some(Value::Array(types)) = capabilities.get_mut(EXTENSIONS)
            {
                for t in types.iter_mut() {
                    if let Value::Object(variant) = t
                        && variant.len() == 1
                        && let Some(x) = variant.remove(GREASE)
                    {
                        variant.insert(UNKNOWN.to_owned(), x);
                        changed = true;
                    }
                }
            }
            for child in map.values_mut() {
                changed |= rewrite(child);
            }
            changed
        }
        Value::Array(items) => items.iter_mut().fold(false, |c, i| rewrite(i) | c),
        _ => false,
    }
}

/// Field and variant names of openmls's serde form.
const CAPABILITIES: &str = "capabilities";
const EXTENSIONS: &str = "extensions";
const GREASE: &str = "Grease";
const UNKNOWN: &str = "Unknown";

#[cfg(test)]
mod tests {
    use openmls::prelude::*;
    use openmls_traits::OpenMlsProvider;
    use tls_codec::Deserialize as _;

    use super::*;
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
    fn openmls_refuses_a_key_package_with_grease_extensions_as_parsed() {
        // The premise: if this starts to pass, openmls compares extension
        // types by value and the workaround can go.
        let provider = QpqProvider::new([1; 32]);
        let bytes = grease_key_package(&provider, 3);
        let parsed = parse(&bytes);
        assert!(matches!(
            parsed.validate(provider.crypto(), ProtocolVersion::Mls10),
            Err(KeyPackageVerifyError::UnsupportedExtension)
        ));
    }

    #[test]
    fn a_unified_grease_key_package_validates_and_keeps_its_bytes() {
        let provider = QpqProvider::new([1; 32]);
        let bytes = grease_key_package(&provider, 3);
        let unified = unify(parse(&bytes));
        let kp = unified
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .expect("valid once GREASE types compare by value");
        assert_eq!(MlsMessageOut::from(kp).to_bytes().unwrap(), bytes);
    }

    #[test]
    fn a_unified_grease_key_package_can_be_added_to_a_group() {
        // openmls checks the new leaf again when the Add is committed
        // (`LeafNode::validate_locally`).
        let provider = QpqProvider::new([1; 32]);
        let bytes = grease_key_package(&provider, 3);
        let kp = unify(parse(&bytes))
            .validate(provider.crypto(), ProtocolVersion::Mls10)
            .unwrap();
        let key = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let public = key.verifying_key().to_bytes();
        let credential = CredentialWithKey {
            credential: BasicCredential::new(public.to_vec()).into(),
            signature_key: public.to_vec().into(),
        };
        let signer = IdentitySigner(key);
        let config = MlsGroupCreateConfig::builder()
            .ciphersuite(CIPHERSUITE)
            .use_ratchet_tree_extension(true)
            .build();
        let mut group = MlsGroup::new(&provider, &signer, &config, credential).unwrap();
        group
            .add_members(&provider, &signer, &[kp])
            .expect("the GREASE leaf passes openmls's leaf checks");
        group.merge_pending_commit(&provider).unwrap();
        assert_eq!(group.members().count(), 2);
    }

    #[test]
    fn unify_leaves_values_without_grease_alone() {
        let provider = QpqProvider::new([1; 32]);
        let bytes = grease_key_package(&provider, 3);
        let once = unify(parse(&bytes));
        assert_eq!(unify(once.clone()), once);
        let mut plain = serde_json::json!({"capabilities": {"extensions": [{"Unknown": 5}]}});
        assert!(!rewrite(&mut plain));
        let mut other = serde_json::json!({"proposals": [{"Grease": 2570}]});
        assert!(!rewrite(&mut other));
    }

    #[test]
    fn rewrite_turns_grease_extension_types_into_unknown_ones_at_any_depth() {
        let mut v = serde_json::json!({"a": [{"leaf": {"capabilities": {
            "extensions": ["LastResort", {"Grease": 2570}],
            "proposals": [{"Grease": 6682}]
        }}}]});
        assert!(rewrite(&mut v));
        assert_eq!(
            v,
            serde_json::json!({"a": [{"leaf": {"capabilities": {
                "extensions": ["LastResort", {"Unknown": 2570}],
                "proposals": [{"Grease": 6682}]
            }}}]})
        );
    }
}
