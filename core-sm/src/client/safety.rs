//! Safety numbers: 60 decimal digits derived from a group's MLS epoch
//! authenticator (RFC 9420 §8.7), for members to compare out of band
//! (ARCHITECTURE.md § Safety numbers).
//!
//! Every member of a group at the same epoch derives the same digits, and
//! only a member holding that epoch's key schedule can: equal numbers mean
//! the members share one group state. The number changes with every epoch.

use super::*;

/// Domain-separation label hashed before the epoch authenticator.
pub const SAFETY_NUMBER_LABEL: &[u8] = b"quicproquo safety number v1";
/// Groups of digits in a safety number.
pub const SAFETY_NUMBER_GROUPS: usize = 12;
/// Digits per group.
pub const SAFETY_NUMBER_GROUP_DIGITS: usize = 5;
/// Hash bytes each group of digits is taken from (40 bits reduced mod
/// 100,000, as Signal's safety numbers do: the bias is below 10^-7).
const BYTES_PER_GROUP: usize = 5;

/// A group's safety number at one epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyNumber {
    /// The epoch it belongs to: only numbers of the same epoch compare.
    pub epoch: u64,
    /// Sixty decimal digits, without separators.
    pub digits: String,
}

impl SafetyNumber {
    /// The number for an epoch authenticator: SHA-512 over
    /// [`SAFETY_NUMBER_LABEL`] and the authenticator; each of 12 groups is
    /// 5 bytes of it, big-endian, mod 100,000, written as 5 digits.
    pub fn derive(epoch: u64, authenticator: &[u8]) -> SafetyNumber {
        let hash = sha2::Sha512::new()
            .chain_update(SAFETY_NUMBER_LABEL)
            .chain_update(authenticator)
            .finalize();
        let mut digits = String::with_capacity(SAFETY_NUMBER_GROUPS * SAFETY_NUMBER_GROUP_DIGITS);
        for chunk in hash
            .chunks_exact(BYTES_PER_GROUP)
            .take(SAFETY_NUMBER_GROUPS)
        {
            let n = chunk.iter().fold(0u64, |n, b| n << 8 | u64::from(*b));
            // Writing to a String cannot fail.
            let _ = std::fmt::Write::write_fmt(&mut digits, format_args!("{:05}", n % 100_000));
        }
        assert_eq!(
            digits.len(),
            SAFETY_NUMBER_GROUPS * SAFETY_NUMBER_GROUP_DIGITS
        );
        SafetyNumber { epoch, digits }
    }

    /// The digits in groups of five separated by spaces, for people to
    /// read aloud and compare.
    pub fn grouped(&self) -> String {
        self.digits
            .as_bytes()
            .chunks(SAFETY_NUMBER_GROUP_DIGITS)
            .map(|g| String::from_utf8_lossy(g).into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl ClientMachine {
    /// The safety number of `group` at its current epoch, or `None` if
    /// there is no such group.
    pub fn safety_number(&self, group: &str) -> Option<SafetyNumber> {
        let r = self.groups.by_name(group)?;
        let g = self.load_group(r).ok()?;
        Some(SafetyNumber::derive(
            g.epoch().as_u64(),
            g.epoch_authenticator().as_slice(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_twelve_groups_of_five_and_depend_on_every_input() {
        let n = SafetyNumber::derive(3, &[7; 32]);
        assert_eq!(n.epoch, 3);
        assert_eq!(n.digits.len(), 60);
        assert!(n.digits.bytes().all(|b| b.is_ascii_digit()));
        let grouped = n.grouped();
        assert_eq!(grouped.split(' ').count(), 12);
        assert!(grouped.split(' ').all(|g| g.len() == 5));
        assert_eq!(grouped.replace(' ', ""), n.digits);
        assert_eq!(SafetyNumber::derive(3, &[7; 32]), n);
        assert_ne!(SafetyNumber::derive(3, &[8; 32]).digits, n.digits);
    }

    #[test]
    fn digits_match_a_known_answer() {
        // Computed independently (Python's hashlib): a change of label,
        // hash, byte order or reduction changes it, and so would every
        // member's number.
        let n = SafetyNumber::derive(0, &[0; 32]);
        assert_eq!(
            n.digits,
            "230041283240680623557840508143675850041612627011859318994841"
        );
    }
}
