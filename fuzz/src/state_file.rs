//! Target `state_file`: `state_file::open` (the loader of the encrypted
//! `qpq-state.bin`) on arbitrary bytes with a fixed password.
//!
//! Checked: it never panics; it succeeds only for a file whose length is
//! exactly what its header announces; and a file it opens does not open
//! under another password.
//!
//! Cost: the header is parsed and checked (parameter floor and ceiling,
//! lengths) before Argon2id runs, so almost every input is refused in
//! microseconds. Only a well-formed file reaches the KDF. The ceiling lets
//! a file ask for up to 1 GiB and 10 passes (about 20 s of work, by
//! design), which would stall the fuzzer without testing anything new, so
//! the fuzz run skips inputs asking for more than [`M_COST_KIB_MAX`] /
//! [`T_COST_MAX`] / [`P_COST_MAX`]; the state file's own tests cover the
//! ceiling.

use quicproquo_client::state_file::{self, KdfParams};
use rand_core::{CryptoRng, RngCore};

/// The password every fuzz input is opened with.
pub const PASSWORD: &[u8] = b"correct horse battery staple";
/// Another password, which must never open what [`PASSWORD`] opens.
pub const WRONG_PASSWORD: &[u8] = b"correct horse battery stapler";
/// Largest Argon2id memory the fuzz run lets a file ask for: twice the
/// floor (the floor is 19 MiB).
pub const M_COST_KIB_MAX: u32 = 38 * 1024;
/// Most Argon2id passes the fuzz run lets a file ask for.
pub const T_COST_MAX: u32 = 3;
/// Most Argon2id lanes the fuzz run lets a file ask for.
pub const P_COST_MAX: u32 = 4;

/// Offsets of the header's fields (see `state_file`'s format table).
const M_COST_AT: usize = 11;
const SALT_LEN_AT: usize = 23;
const FIXED_HEADER_BYTES: usize = 56;
const TAG_BYTES: usize = 16;

/// The target's body.
pub fn run(data: &[u8]) {
    if too_costly(data) {
        return;
    }
    match state_file::open(PASSWORD, data) {
        Ok(plaintext) => {
            let salt = usize::from(data[SALT_LEN_AT]);
            assert_eq!(
                data.len(),
                FIXED_HEADER_BYTES + salt + plaintext.len() + TAG_BYTES,
                "opened a file whose length is not header + body"
            );
            assert!(
                matches!(
                    state_file::open(WRONG_PASSWORD, data),
                    Err(state_file::StateFileError::WrongPassword)
                ),
                "a file opened under two passwords"
            );
        }
        Err(e) => {
            // Every refusal explains itself.
            assert!(!e.to_string().is_empty());
        }
    }
}

/// True if the header asks for more Argon2id work than the fuzz run allows.
fn too_costly(data: &[u8]) -> bool {
    let field = |i: usize| {
        data.get(M_COST_AT + 4 * i..M_COST_AT + 4 * i + 4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map_or(0, u32::from_be_bytes)
    };
    field(0) > M_COST_KIB_MAX || field(1) > T_COST_MAX || field(2) > P_COST_MAX
}

/// Seeds: a valid file sealed under [`PASSWORD`] at the parameter floor
/// (deterministic salt and nonce), and refusals of each kind.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let valid = state_file::seal(
        PASSWORD,
        b"a client snapshot would be here",
        KdfParams::FLOOR,
        &mut CountingRng(0),
    )
    .expect("seal at the floor");
    let mut below_floor = valid.clone();
    below_floor[M_COST_AT..M_COST_AT + 4].copy_from_slice(&1024u32.to_be_bytes());
    let mut newer = valid.clone();
    newer[8..10].copy_from_slice(&2u16.to_be_bytes());
    let mut flipped = valid.clone();
    if let Some(last) = flipped.last_mut() {
        *last ^= 1;
    }
    vec![
        ("valid_floor".to_owned(), valid.clone()),
        ("flipped_tag".to_owned(), flipped),
        ("truncated".to_owned(), valid[..valid.len() - 1].to_vec()),
        ("trailing".to_owned(), [&valid[..], b"x"].concat()),
        ("below_floor".to_owned(), below_floor),
        ("newer_version".to_owned(), newer),
        ("magic_only".to_owned(), b"QPQSTATE".to_vec()),
        ("not_a_state_file".to_owned(), b"hello world".to_vec()),
    ]
}

/// A deterministic byte source for the seeds (never for real files): the
/// seeds must come out identical on every run.
struct CountingRng(u8);

impl RngCore for CountingRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }

    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for b in dest {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for CountingRng {}
