//! The hybrid KEM and envelope through the public API only, the way the
//! client machine will use them: generate at `register`, sign for
//! `uploadHybridKey`, verify what `fetchHybridKey` returns, seal to it, open
//! with the stored secret key. Plus a rough timing report (ignored by
//! default; speed is measured, never asserted).

use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use quicproquo_core::client::hybrid::{
    self, ENVELOPE_OVERHEAD_BYTES, HybridError, HybridPublicKey, HybridSecretKey,
};
use quicproquo_core::types::IdentityKey;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

#[test]
fn register_publish_fetch_seal_open() {
    let mut rng = ChaCha20Rng::from_seed([3; 32]);
    let identity_key = SigningKey::from_bytes(&[9; 32]);
    let identity = IdentityKey(identity_key.verifying_key().to_bytes());

    // register: generate, persist the secret, sign and upload the public key
    let secret = HybridSecretKey::generate(&mut rng);
    let stored = secret.to_bytes();
    let blob = secret.public().to_bytes();
    let signature = hybrid::sign_public_key(&identity_key, secret.public());

    // a peer fetches (blob, signature) and checks it against the identity
    let fetched = hybrid::verify_public_key(&identity, &blob, &signature).unwrap();
    let key_id = fetched.key_id();
    let envelope = hybrid::seal(&fetched, &key_id, b"Welcome bytes", &mut rng);
    assert_eq!(envelope.len(), 13 + ENVELOPE_OVERHEAD_BYTES);

    // the owner, in a later process, restores the secret and opens it
    let restored = HybridSecretKey::from_bytes(stored.as_slice()).unwrap();
    assert_eq!(restored.public().key_id(), key_id);
    assert_eq!(
        hybrid::open(&restored, &key_id, &envelope).unwrap(),
        b"Welcome bytes"
    );

    // after rotation the new key cannot open what was sealed to the old one
    let rotated = HybridSecretKey::generate(&mut rng);
    assert_eq!(
        hybrid::open(&rotated, &rotated.public().key_id(), &envelope),
        Err(HybridError::Decrypt)
    );
}

/// Prints the cost of each operation. Run in release:
/// `cargo test --release -p quicproquo-core --test hybrid -- --ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check; run in release with --nocapture"]
fn report_sizes_and_timings() {
    const ROUNDS: u32 = 2_000;
    let mut rng = ChaCha20Rng::from_seed([4; 32]);
    let identity_key = SigningKey::from_bytes(&[9; 32]);
    let identity = IdentityKey(identity_key.verifying_key().to_bytes());
    let secret = HybridSecretKey::generate(&mut rng);
    let public = secret.public().clone();
    let key_id = public.key_id();
    let blob = public.to_bytes();
    let signature = hybrid::sign_public_key(&identity_key, &public);
    let plaintext = vec![0x42u8; 1024];
    let envelope = hybrid::seal(&public, &key_id, &plaintext, &mut rng);

    println!(
        "public key {} bytes, secret key {} bytes, envelope overhead {} bytes",
        blob.len(),
        secret.to_bytes().len(),
        envelope.len() - plaintext.len()
    );
    report("generate", ROUNDS, || {
        let _ = HybridSecretKey::generate(&mut rng);
    });
    report("public key parse", ROUNDS, || {
        let _ = HybridPublicKey::from_bytes(&blob).unwrap();
    });
    report("verify_public_key", ROUNDS, || {
        let _ = hybrid::verify_public_key(&identity, &blob, &signature).unwrap();
    });
    report("seal 1 KiB", ROUNDS, || {
        let _ = hybrid::seal(&public, &key_id, &plaintext, &mut rng);
    });
    report("open 1 KiB", ROUNDS, || {
        let _ = hybrid::open(&secret, &key_id, &envelope).unwrap();
    });
    let large = vec![0x42u8; 64 * 1024];
    let large_envelope = hybrid::seal(&public, &key_id, &large, &mut rng);
    report("seal 64 KiB", ROUNDS / 4, || {
        let _ = hybrid::seal(&public, &key_id, &large, &mut rng);
    });
    report("open 64 KiB", ROUNDS / 4, || {
        let _ = hybrid::open(&secret, &key_id, &large_envelope).unwrap();
    });
}

fn report(what: &str, rounds: u32, mut f: impl FnMut()) {
    let start = Instant::now();
    for _ in 0..rounds {
        f();
    }
    let each: Duration = start.elapsed() / rounds;
    println!("{what:>20}: {:>7.1} µs", each.as_secs_f64() * 1e6);
}
