//! Contacts: the names this user gives identity keys, kept in the machine's
//! persisted state so every front end shows the same names.
//!
//! Invariants: a name is 1 to [`CONTACT_NAME_BYTES_MAX`] bytes with no
//! control characters; names are unique and a key has at most one name
//! (adding a named key under a new name renames it); there are at most
//! [`CONTACTS_MAX`] contacts, and adding one more is refused with
//! [`CommandError::ContactsFull`]. Contacts are local: adding or removing
//! one sends nothing and needs no server.

use super::*;

/// The contact book: a name for each key, and the key for each name.
#[derive(Debug, Default, Clone)]
pub(super) struct Contacts {
    by_key: BTreeMap<IdentityKey, String>,
    by_name: BTreeMap<String, IdentityKey>,
}

impl Contacts {
    /// Rebuilds the book from its persisted list, checking every rule as
    /// an add would.
    pub fn restore(list: Vec<([u8; 32], String)>) -> Result<Contacts, CommandError> {
        let mut contacts = Contacts::default();
        for (key, name) in list {
            let key = IdentityKey(key);
            if contacts.by_key.contains_key(&key) {
                return Err(CommandError::State(StateError::Contact(format!(
                    "{} is listed twice",
                    key.short()
                ))));
            }
            contacts
                .add(name, key)
                .map_err(|e| CommandError::State(StateError::Contact(e.to_string())))?;
        }
        Ok(contacts)
    }

    /// The persisted form, ordered by key.
    pub fn to_list(&self) -> Vec<([u8; 32], String)> {
        self.by_key.iter().map(|(k, n)| (k.0, n.clone())).collect()
    }

    /// Names `key` `name`; returns the key's previous name if it had
    /// another one.
    pub fn add(&mut self, name: String, key: IdentityKey) -> Result<Option<String>, CommandError> {
        check_contact_name(&name)?;
        if let Some(owner) = self.by_name.get(&name) {
            if *owner == key {
                return Ok(None);
            }
            return Err(CommandError::ContactExists(name));
        }
        let previous = self.by_key.get(&key).cloned();
        if previous.is_none() && self.by_key.len() >= CONTACTS_MAX {
            return Err(CommandError::ContactsFull);
        }
        if let Some(old) = &previous {
            self.by_name.remove(old);
        }
        self.by_name.insert(name.clone(), key);
        self.by_key.insert(key, name);
        Ok(previous)
    }

    /// Forgets the contact `name`; returns its key.
    pub fn remove(&mut self, name: &str) -> Result<IdentityKey, CommandError> {
        let key = self
            .by_name
            .remove(name)
            .ok_or_else(|| CommandError::UnknownContact(name.to_owned()))?;
        self.by_key.remove(&key);
        Ok(key)
    }

    /// The name of `key`, if it is a contact.
    pub fn name(&self, key: &IdentityKey) -> Option<&str> {
        self.by_key.get(key).map(String::as_str)
    }

    /// Every contact, ordered by name.
    pub fn list(&self) -> Vec<(String, IdentityKey)> {
        self.by_name.iter().map(|(n, k)| (n.clone(), *k)).collect()
    }
}

impl ClientMachine {
    /// This user's contacts, ordered by name.
    pub fn contacts(&self) -> Vec<(String, IdentityKey)> {
        self.contacts.list()
    }

    /// The contact name of `key`, if this user gave it one.
    pub fn contact_name(&self, key: &IdentityKey) -> Option<&str> {
        self.contacts.name(key)
    }

    /// [`Command::AddContact`]: local, persisted, done at once.
    pub(super) fn add_contact(
        &mut self,
        name: String,
        key: IdentityKey,
    ) -> Result<(), CommandError> {
        let renamed_from = self.contacts.add(name.clone(), key)?;
        self.effects.push_back(Effect::Persist);
        self.effects
            .push_back(Effect::Done(Ok(Outcome::ContactAdded {
                name,
                key,
                renamed_from,
            })));
        Ok(())
    }

    /// [`Command::RemoveContact`]: local, persisted, done at once.
    pub(super) fn remove_contact(&mut self, name: String) -> Result<(), CommandError> {
        let key = self.contacts.remove(&name)?;
        self.effects.push_back(Effect::Persist);
        self.effects
            .push_back(Effect::Done(Ok(Outcome::ContactRemoved { name, key })));
        Ok(())
    }
}

/// A contact name is 1 to [`CONTACT_NAME_BYTES_MAX`] bytes with no control
/// characters (it is shown on terminals, one per line).
fn check_contact_name(name: &str) -> Result<(), CommandError> {
    if name.is_empty() || name.len() > CONTACT_NAME_BYTES_MAX {
        return Err(CommandError::InvalidContactName(format!(
            "must be 1 to {CONTACT_NAME_BYTES_MAX} bytes"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(CommandError::InvalidContactName(
            "must not contain control characters".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> IdentityKey {
        IdentityKey([n; 32])
    }

    /// Adds `name` for `key(n)` and checks the result.
    fn check(c: &mut Contacts, name: &str, n: u8, expected: Result<Option<&str>, CommandError>) {
        let got = c.add(name.to_owned(), key(n));
        assert_eq!(got, expected.map(|o| o.map(str::to_owned)), "{name:?}");
    }

    #[test]
    fn names_are_checked() {
        let mut c = Contacts::default();
        let invalid = |m: &str| Err(CommandError::InvalidContactName(m.into()));
        check(&mut c, "", 1, invalid("must be 1 to 64 bytes"));
        check(&mut c, &"a".repeat(65), 1, invalid("must be 1 to 64 bytes"));
        check(
            &mut c,
            "a\nb",
            1,
            invalid("must not contain control characters"),
        );
        check(
            &mut c,
            "\x1b[31m",
            1,
            invalid("must not contain control characters"),
        );
        check(&mut c, &"a".repeat(64), 1, Ok(None));
        check(&mut c, "Zoë 🙂", 2, Ok(None));
        assert_eq!(c.list().len(), 2);
    }

    #[test]
    fn a_name_is_unique_and_a_key_has_one_name() {
        let mut c = Contacts::default();
        check(&mut c, "alice", 1, Ok(None));
        check(&mut c, "alice", 1, Ok(None));
        check(
            &mut c,
            "alice",
            2,
            Err(CommandError::ContactExists("alice".into())),
        );
        check(&mut c, "ally", 1, Ok(Some("alice")));
        assert_eq!(c.list(), vec![("ally".to_owned(), key(1))]);
        assert_eq!(c.name(&key(1)), Some("ally"));
        check(&mut c, "alice", 2, Ok(None));
        assert_eq!(c.remove("ally"), Ok(key(1)));
        assert_eq!(c.name(&key(1)), None);
        assert_eq!(
            c.remove("ally"),
            Err(CommandError::UnknownContact("ally".into()))
        );
    }

    #[test]
    fn the_book_is_bounded_but_renaming_still_works_when_full() {
        let mut c = Contacts::default();
        for i in 0..CONTACTS_MAX {
            let k = IdentityKey(
                u32::try_from(i)
                    .unwrap()
                    .to_be_bytes()
                    .repeat(8)
                    .try_into()
                    .unwrap(),
            );
            c.add(format!("c{i}"), k).unwrap();
        }
        check(&mut c, "one more", 0xff, Err(CommandError::ContactsFull));
        let first = c.list()[0].1;
        assert_eq!(c.add("renamed".into(), first), Ok(Some("c0".into())));
        assert_eq!(c.list().len(), CONTACTS_MAX);
    }

    #[test]
    fn restore_refuses_what_add_refuses() {
        let ok = vec![([1; 32], "alice".to_owned()), ([2; 32], "bob".to_owned())];
        assert_eq!(Contacts::restore(ok.clone()).unwrap().to_list(), ok);
        let clash = vec![([1; 32], "alice".to_owned()), ([2; 32], "alice".to_owned())];
        assert!(matches!(
            Contacts::restore(clash),
            Err(CommandError::State(_))
        ));
        let twice = vec![([1; 32], "alice".to_owned()), ([1; 32], "al".to_owned())];
        assert!(matches!(
            Contacts::restore(twice),
            Err(CommandError::State(_))
        ));
    }
}
