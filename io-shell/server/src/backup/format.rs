//! The backup file: what `qpq-server backup` writes, what the server
//! streams over its admin socket, and what `qpq-server restore` reads.
//! Version 1, every number big-endian:
//!
//! ```text
//! magic         8 bytes   "QPQBACK\n"
//! version       u32       1
//! taken_at      u64       Unix time of the snapshot, seconds
//! file_count    u32       files of the data directory, at most BACKUP_FILES_MAX
//!   each file:  name_len u16, name (1 to BACKUP_FILE_NAME_BYTES_MAX bytes,
//!               no '/' or NUL, not "." or ".."; names strictly increasing),
//!               mode u32 (permission bits, at most 0o7777),
//!               len u32 (at most BACKUP_FILE_BYTES_MAX), contents
//! records, keys strictly increasing:
//!   each:       key_len u16 (1 to 65,535), value_len u32 (at most
//!               BACKUP_VALUE_BYTES_MAX), key, value
//! end           u16       0
//! records       u64       how many records
//! record_bytes  u64       their keys' and values' bytes
//! checksum      32 bytes  SHA-256 of every byte before it
//! ```
//!
//! Nothing follows the checksum. [`Reader`] checks every length against its
//! bound before it reads what the length covers (so a hostile or corrupt
//! file never makes it allocate more than a bound, and never panics),
//! refuses keys out of order, compares the trailer's counts with what it
//! read and the checksum with its own, and refuses a newer version. One
//! [`Writer`] and one [`Reader`] serve the server, the backup command and
//! the restore.

use std::io::{self, Read, Write};

use quicproquo_core::limits::{
    BACKUP_FILE_BYTES_MAX, BACKUP_FILE_NAME_BYTES_MAX, BACKUP_FILES_MAX, BACKUP_VALUE_BYTES_MAX,
};
use sha2::{Digest, Sha256};

/// The first bytes of every backup file.
pub const MAGIC: [u8; 8] = *b"QPQBACK\n";

/// The format version this build writes, and the newest it reads.
pub const VERSION: u32 = 1;

/// A regular file of the data directory, carried by a backup.
#[derive(Clone, PartialEq, Eq)]
pub struct DataFile {
    /// Its name in the data directory (a Unix file name: bytes).
    pub name: Vec<u8>,
    /// Its permission bits (`0o600` for a key).
    pub mode: u32,
    /// What it holds.
    pub contents: Vec<u8>,
}

impl DataFile {
    /// The name for messages (lossy where it is not UTF-8).
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

impl std::fmt::Debug for DataFile {
    // The contents may be a private key: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataFile")
            .field("name", &self.display_name())
            .field("mode", &format_args!("{:o}", self.mode))
            .field("bytes", &self.contents.len())
            .finish()
    }
}

/// A record: key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// What a backup file starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Its format version.
    pub version: u32,
    /// Unix time of the snapshot, seconds.
    pub taken_at: u64,
    /// The data directory's files.
    pub files: Vec<DataFile>,
}

/// What a backup file holds besides its files, as written or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Records.
    pub records: u64,
    /// Bytes of their keys and values.
    pub record_bytes: u64,
    /// Bytes of the whole file.
    pub bytes: u64,
}

/// Why bytes are not a backup this build can read, or could not be
/// written as one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The magic is missing.
    #[error("not a qpq-server backup (it does not start with the backup magic)")]
    NotABackup,
    /// Written by a newer qpq-server.
    #[error(
        "written in backup format {found}, and this qpq-server reads format {supported} and \
         older: restore it with a newer qpq-server"
    )]
    NewerVersion {
        /// The file's version.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The bytes end before the format does.
    #[error("the file ends early, at byte {offset} (truncated?)")]
    Truncated {
        /// Bytes read.
        offset: u64,
    },
    /// A length, name, order or count the format does not allow.
    #[error("corrupt at byte {offset}: {what}")]
    Corrupt {
        /// Where.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// The SHA-256 at the end does not match the bytes before it.
    #[error("checksum mismatch: the file is corrupt or truncated")]
    Checksum,
    /// Bytes follow the checksum.
    #[error("bytes follow the checksum: the file was changed or appended to")]
    TrailingBytes,
    /// A record or file the format cannot carry (never one the server
    /// writes).
    #[error("cannot be written to a backup: {0}")]
    Unencodable(String),
    /// Reading or writing failed.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Writes a backup: [`Writer::start`] with the header, [`Writer::record`]
/// for each record in key order, [`Writer::finish`] for the trailer and
/// the checksum.
pub struct Writer<W: Write> {
    out: W,
    hasher: Sha256,
    totals: Totals,
    last_key: Vec<u8>,
}

impl<W: Write> Writer<W> {
    /// Writes the header and `files` (in name order) to `out`.
    pub fn start(out: W, taken_at: u64, files: &[DataFile]) -> Result<Self, FormatError> {
        let mut files: Vec<&DataFile> = files.iter().collect();
        files.sort_by(|a, b| a.name.cmp(&b.name));
        check_files(&files).map_err(FormatError::Unencodable)?;
        let mut w = Writer {
            out,
            hasher: Sha256::new(),
            totals: Totals::default(),
            last_key: Vec::new(),
        };
        w.put(&MAGIC)?;
        w.put(&VERSION.to_be_bytes())?;
        w.put(&taken_at.to_be_bytes())?;
        // Checked above: at most BACKUP_FILES_MAX files, each small.
        w.put(&u32::try_from(files.len()).unwrap_or(u32::MAX).to_be_bytes())?;
        for f in files {
            w.put(
                &u16::try_from(f.name.len())
                    .unwrap_or(u16::MAX)
                    .to_be_bytes(),
            )?;
            w.put(&f.name)?;
            w.put(&f.mode.to_be_bytes())?;
            w.put(
                &u32::try_from(f.contents.len())
                    .unwrap_or(u32::MAX)
                    .to_be_bytes(),
            )?;
            w.put(&f.contents)?;
        }
        Ok(w)
    }

    /// Writes one record; keys must come in strictly increasing order.
    pub fn record(&mut self, key: &[u8], value: &[u8]) -> Result<(), FormatError> {
        let key_len = u16::try_from(key.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| FormatError::Unencodable(format!("a key of {} bytes", key.len())))?;
        if value.len() > BACKUP_VALUE_BYTES_MAX {
            return Err(FormatError::Unencodable(format!(
                "a value of {} bytes (at most {BACKUP_VALUE_BYTES_MAX})",
                value.len()
            )));
        }
        if self.totals.records > 0 && key <= self.last_key.as_slice() {
            return Err(FormatError::Unencodable("keys out of order".into()));
        }
        self.put(&key_len.to_be_bytes())?;
        // value.len() <= BACKUP_VALUE_BYTES_MAX < u32::MAX.
        self.put(&(value.len() as u32).to_be_bytes())?;
        self.put(key)?;
        self.put(value)?;
        self.last_key.clear();
        self.last_key.extend_from_slice(key);
        self.totals.records += 1;
        self.totals.record_bytes += (key.len() + value.len()) as u64;
        Ok(())
    }

    /// Writes the end, the counts and the checksum, flushes, and returns
    /// the output and what was written.
    pub fn finish(mut self) -> Result<(W, Totals), FormatError> {
        self.put(&0u16.to_be_bytes())?;
        self.put(&self.totals.records.to_be_bytes())?;
        self.put(&self.totals.record_bytes.to_be_bytes())?;
        let checksum = self.hasher.finalize_reset();
        self.out.write_all(&checksum)?;
        self.totals.bytes += checksum.len() as u64;
        self.out.flush()?;
        Ok((self.out, self.totals))
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), FormatError> {
        self.out.write_all(bytes)?;
        self.hasher.update(bytes);
        self.totals.bytes += bytes.len() as u64;
        Ok(())
    }
}

/// Reads a backup: [`Reader::open`] reads and checks the header and the
/// files, [`Reader::next_record`] hands out records until `None`, by which
/// time the trailer, the checksum and the end of the input are checked.
pub struct Reader<R: Read> {
    input: R,
    hasher: Sha256,
    totals: Totals,
    last_key: Vec<u8>,
    checksum: Option<[u8; 32]>,
}

impl<R: Read> Reader<R> {
    /// Reads and checks the header and the files.
    pub fn open(input: R) -> Result<(Self, Header), FormatError> {
        let mut r = Reader {
            input,
            hasher: Sha256::new(),
            totals: Totals::default(),
            last_key: Vec::new(),
            checksum: None,
        };
        let header = r.header()?;
        Ok((r, header))
    }

    /// The next record, or `None` once the trailer and the checksum have
    /// been read and checked.
    pub fn next_record(&mut self) -> Result<Option<Record>, FormatError> {
        if self.checksum.is_some() {
            return Ok(None);
        }
        let key_len = usize::from(self.u16()?);
        if key_len == 0 {
            self.trailer()?;
            return Ok(None);
        }
        let value_len = self.u32()? as usize;
        if value_len > BACKUP_VALUE_BYTES_MAX {
            return Err(self.corrupt(format!(
                "a value of {value_len} bytes (at most {BACKUP_VALUE_BYTES_MAX})"
            )));
        }
        let key = self.bytes(key_len)?;
        if self.totals.records > 0 && key <= self.last_key {
            return Err(self.corrupt("keys out of order".into()));
        }
        let value = self.bytes(value_len)?;
        self.last_key.clear();
        self.last_key.extend_from_slice(&key);
        self.totals.records += 1;
        self.totals.record_bytes += (key_len + value_len) as u64;
        Ok(Some((key, value)))
    }

    /// What was read so far.
    pub fn totals(&self) -> Totals {
        self.totals
    }

    /// The checksum, once the whole backup was read and checked.
    pub fn checksum(&self) -> Option<[u8; 32]> {
        self.checksum
    }

    fn header(&mut self) -> Result<Header, FormatError> {
        let mut magic = [0u8; MAGIC.len()];
        let got = read_up_to(&mut self.input, &mut magic)?;
        if magic[..got] != MAGIC[..got] {
            return Err(FormatError::NotABackup);
        }
        if got < magic.len() {
            return Err(FormatError::Truncated { offset: got as u64 });
        }
        self.hasher.update(magic);
        self.totals.bytes = got as u64;
        let version = self.u32()?;
        if version > VERSION {
            return Err(FormatError::NewerVersion {
                found: version,
                supported: VERSION,
            });
        }
        if version == 0 {
            return Err(self.corrupt("format version 0".into()));
        }
        let taken_at = self.u64()?;
        let count = self.u32()? as usize;
        if count > BACKUP_FILES_MAX {
            return Err(self.corrupt(format!("{count} files (at most {BACKUP_FILES_MAX})")));
        }
        let mut files: Vec<DataFile> = Vec::with_capacity(count);
        for _ in 0..count {
            let name_len = usize::from(self.u16()?);
            if name_len == 0 || name_len > BACKUP_FILE_NAME_BYTES_MAX {
                return Err(self.corrupt(format!("a file name of {name_len} bytes")));
            }
            let name = self.bytes(name_len)?;
            let mode = self.u32()?;
            let len = self.u32()? as usize;
            if len > BACKUP_FILE_BYTES_MAX {
                return Err(self.corrupt(format!(
                    "a file of {len} bytes (at most {BACKUP_FILE_BYTES_MAX})"
                )));
            }
            let contents = self.bytes(len)?;
            files.push(DataFile {
                name,
                mode,
                contents,
            });
            let all: Vec<&DataFile> = files.iter().collect();
            check_files(&all).map_err(|what| self.corrupt(what))?;
        }
        Ok(Header {
            version,
            taken_at,
            files,
        })
    }

    fn trailer(&mut self) -> Result<(), FormatError> {
        let records = self.u64()?;
        let record_bytes = self.u64()?;
        if (records, record_bytes) != (self.totals.records, self.totals.record_bytes) {
            return Err(self.corrupt(format!(
                "the trailer counts {records} records of {record_bytes} bytes, the file holds \
                 {} of {}",
                self.totals.records, self.totals.record_bytes
            )));
        }
        let want: [u8; 32] = self.hasher.finalize_reset().into();
        let mut got = [0u8; 32];
        if read_up_to(&mut self.input, &mut got)? < got.len() {
            return Err(FormatError::Truncated {
                offset: self.totals.bytes,
            });
        }
        self.totals.bytes += got.len() as u64;
        if got != want {
            return Err(FormatError::Checksum);
        }
        if read_up_to(&mut self.input, &mut [0u8; 1])? != 0 {
            return Err(FormatError::TrailingBytes);
        }
        self.checksum = Some(want);
        Ok(())
    }

    fn corrupt(&self, what: String) -> FormatError {
        FormatError::Corrupt {
            offset: self.totals.bytes,
            what,
        }
    }

    fn fill(&mut self, buf: &mut [u8]) -> Result<(), FormatError> {
        let got = read_up_to(&mut self.input, buf)?;
        self.hasher.update(&buf[..got]);
        self.totals.bytes += got as u64;
        if got < buf.len() {
            return Err(FormatError::Truncated {
                offset: self.totals.bytes,
            });
        }
        Ok(())
    }

    fn u16(&mut self) -> Result<u16, FormatError> {
        let mut b = [0u8; 2];
        self.fill(&mut b)?;
        Ok(u16::from_be_bytes(b))
    }

    fn u32(&mut self) -> Result<u32, FormatError> {
        let mut b = [0u8; 4];
        self.fill(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, FormatError> {
        let mut b = [0u8; 8];
        self.fill(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// `len` bytes; the caller has bounded `len`, and the buffer grows only
    /// as bytes arrive, so a truncated file does not cost the whole length.
    fn bytes(&mut self, len: usize) -> Result<Vec<u8>, FormatError> {
        let mut out = Vec::with_capacity(len.min(READ_AHEAD_BYTES));
        (&mut self.input).take(len as u64).read_to_end(&mut out)?;
        self.hasher.update(&out);
        self.totals.bytes += out.len() as u64;
        if out.len() < len {
            return Err(FormatError::Truncated {
                offset: self.totals.bytes,
            });
        }
        Ok(out)
    }
}

/// Reads a backup from the start to the end, checking everything, and
/// returns its header, what it holds and its checksum. When the format
/// breaks before the end, `raw` (the same bytes again, e.g. the file
/// reopened) decides what is reported: a checksum that does not match the
/// bytes before it is reported as [`FormatError::Checksum`] (corruption or
/// truncation), else the format's own complaint.
pub fn verify<R: Read>(
    input: R,
    raw: impl FnOnce() -> io::Result<(R, u64)>,
) -> Result<(Header, Totals, [u8; 32]), FormatError> {
    let result = (|| {
        let (mut reader, header) = Reader::open(input)?;
        while reader.next_record()?.is_some() {}
        let checksum = reader.checksum().ok_or(FormatError::Checksum)?;
        Ok((header, reader.totals(), checksum))
    })();
    match result {
        Err(e @ (FormatError::Truncated { .. } | FormatError::Corrupt { .. })) => {
            let (input, len) = raw()?;
            if checksum_matches(input, len)? {
                Err(e)
            } else {
                Err(FormatError::Checksum)
            }
        }
        other => other,
    }
}

/// Whether the last 32 of `len` bytes are the SHA-256 of those before.
fn checksum_matches(mut input: impl Read, len: u64) -> io::Result<bool> {
    let Some(body) = len.checked_sub(32) else {
        return Ok(false);
    };
    let mut hasher = Sha256::new();
    let copied = io::copy(&mut (&mut input).take(body), &mut HashWriter(&mut hasher))?;
    let mut tail = [0u8; 32];
    let got = read_up_to(&mut input, &mut tail)?;
    Ok(copied == body && got == tail.len() && <[u8; 32]>::from(hasher.finalize()) == tail)
}

/// Feeds what is written to a hash.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Checks files as the format carries them: at most [`BACKUP_FILES_MAX`],
/// names plain, bounded and strictly increasing, modes permission bits,
/// contents bounded.
fn check_files(files: &[&DataFile]) -> Result<(), String> {
    if files.len() > BACKUP_FILES_MAX {
        return Err(format!(
            "{} files (at most {BACKUP_FILES_MAX})",
            files.len()
        ));
    }
    for (i, f) in files.iter().enumerate() {
        let name = f.display_name();
        if f.name.is_empty()
            || f.name.len() > BACKUP_FILE_NAME_BYTES_MAX
            || f.name.contains(&b'/')
            || f.name.contains(&0)
            || f.name == b"."
            || f.name == b".."
        {
            return Err(format!("the file name {name:?} is not a plain file name"));
        }
        if f.mode > 0o7777 {
            return Err(format!("file {name:?} has mode {:o}", f.mode));
        }
        if f.contents.len() > BACKUP_FILE_BYTES_MAX {
            return Err(format!(
                "file {name:?} has {} bytes (at most {BACKUP_FILE_BYTES_MAX})",
                f.contents.len()
            ));
        }
        if i > 0 && files[i - 1].name >= f.name {
            return Err(format!("file {name:?} is out of order or twice"));
        }
    }
    Ok(())
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
pub(super) fn read_up_to(input: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match input.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// The most a read of a bounded length reserves before the bytes arrive.
const READ_AHEAD_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn file(name: &str, mode: u32, contents: &[u8]) -> DataFile {
        DataFile {
            name: name.as_bytes().to_vec(),
            mode,
            contents: contents.to_vec(),
        }
    }

    fn records() -> Vec<Record> {
        (0..40u16)
            .map(|i| {
                let key = [&[0x10u8][..], &i.to_be_bytes()].concat();
                (key, vec![i as u8; usize::from(i) * 3])
            })
            .collect()
    }

    fn encode(taken_at: u64, files: &[DataFile], records: &[Record]) -> Vec<u8> {
        let mut w = Writer::start(Vec::new(), taken_at, files).unwrap();
        for (k, v) in records {
            w.record(k, v).unwrap();
        }
        let (bytes, totals) = w.finish().unwrap();
        assert_eq!(totals.bytes, bytes.len() as u64);
        bytes
    }

    fn sample() -> Vec<u8> {
        let files = [
            file("server-key.pem", 0o600, b"-----BEGIN PRIVATE KEY-----"),
            file("server-cert.pem", 0o644, b"-----BEGIN CERTIFICATE-----"),
        ];
        encode(1_700_000_000, &files, &records())
    }

    /// Reads `bytes` whole, as restore's first pass does.
    fn check(bytes: &[u8]) -> Result<(Header, Vec<Record>), FormatError> {
        let (mut r, header) = Reader::open(bytes)?;
        let mut out = Vec::new();
        while let Some(rec) = r.next_record()? {
            out.push(rec);
        }
        assert!(r.checksum().is_some());
        Ok((header, out))
    }

    fn verified(bytes: &[u8]) -> Result<(Header, Totals, [u8; 32]), FormatError> {
        verify(bytes, || Ok((bytes, bytes.len() as u64)))
    }

    #[test]
    fn a_backup_reads_back_as_written() {
        let bytes = sample();
        let (header, got) = check(&bytes).unwrap();
        assert_eq!(header.version, VERSION);
        assert_eq!(header.taken_at, 1_700_000_000);
        let names: Vec<String> = header.files.iter().map(DataFile::display_name).collect();
        assert_eq!(
            names,
            ["server-cert.pem", "server-key.pem"],
            "in name order"
        );
        assert_eq!(header.files[1].mode, 0o600);
        assert_eq!(got, records());
        let (_, totals, _) = verified(&bytes).unwrap();
        assert_eq!(totals.records, 40);
        assert_eq!(totals.bytes, bytes.len() as u64);
        let empty = encode(0, &[], &[]);
        assert_eq!(check(&empty).unwrap().1, vec![]);
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for len in 0..bytes.len() {
            let cut = &bytes[..len];
            let e = verified(cut).unwrap_err();
            assert!(
                matches!(
                    e,
                    FormatError::Checksum | FormatError::Truncated { .. } | FormatError::NotABackup
                ),
                "cut at {len}: {e}"
            );
            if len >= MAGIC.len() + 4 {
                assert!(matches!(e, FormatError::Checksum), "cut at {len}: {e}");
            }
        }
    }

    #[test]
    fn wrong_magic_newer_version_and_trailing_bytes_are_named() {
        let bytes = sample();
        let mut other = bytes.clone();
        other[0] = b'X';
        assert!(matches!(verified(&other), Err(FormatError::NotABackup)));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(VERSION + 1).to_be_bytes());
        let e = verified(&newer).unwrap_err();
        assert!(
            matches!(e, FormatError::NewerVersion { found, supported: VERSION } if found == VERSION + 1),
            "{e}"
        );
        assert!(e.to_string().contains("newer qpq-server"), "{e}");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(verified(&longer), Err(FormatError::TrailingBytes)));
    }

    #[test]
    fn a_length_beyond_its_bound_is_refused_before_it_is_read() {
        // A valid file (checksum and all) that claims a value longer than
        // the bound: refused as corrupt without reading or allocating it.
        let mut w = Writer::start(Vec::new(), 0, &[]).unwrap();
        w.put(&1u16.to_be_bytes()).unwrap();
        w.put(&u32::MAX.to_be_bytes()).unwrap();
        let (bytes, _) = w.finish().unwrap();
        let e = check(&bytes).unwrap_err();
        assert!(matches!(e, FormatError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("value of 4294967295 bytes"), "{e}");
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would() {
        let mut w = Writer::start(Vec::new(), 0, &[]).unwrap();
        w.record(b"b", b"1").unwrap();
        assert!(w.record(b"a", b"1").is_err(), "out of order");
        assert!(w.record(b"b", b"1").is_err(), "twice");
        assert!(w.record(b"", b"1").is_err(), "empty key");
        assert!(
            w.record(b"c", &vec![0; BACKUP_VALUE_BYTES_MAX + 1])
                .is_err()
        );
        for bad in ["", ".", "..", "a/b", "a\0b"] {
            assert!(
                Writer::start(Vec::new(), 0, &[file(bad, 0o600, b"")]).is_err(),
                "{bad:?}"
            );
        }
        let twice = [file("a", 0o600, b""), file("a", 0o600, b"")];
        assert!(Writer::start(Vec::new(), 0, &twice).is_err());
        assert!(Writer::start(Vec::new(), 0, &[file("a", 0o10000, b"")]).is_err());
    }

    proptest! {
        /// Any change to a backup — bytes overwritten anywhere, or cut
        /// short — is refused, and nothing panics.
        #[test]
        fn a_changed_backup_is_refused(
            changes in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in proptest::option::of(any::<prop::sample::Index>()),
        ) {
            let original = sample();
            let mut bytes = original.clone();
            for (at, xor) in &changes {
                let i = at.index(bytes.len());
                bytes[i] ^= xor.max(&1);
            }
            if let Some(cut) = cut {
                bytes.truncate(cut.index(bytes.len()));
            }
            prop_assume!(bytes != original);
            prop_assert!(verified(&bytes).is_err());
        }

        /// Arbitrary bytes after a valid magic and version: refused, no
        /// panic, whatever lengths they claim.
        #[test]
        fn garbage_is_refused(tail in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&VERSION.to_be_bytes());
            bytes.extend_from_slice(&tail);
            prop_assert!(verified(&bytes).is_err());
        }
    }
}
