//! Errors of the LSG manager: every one names the file and, for corrupt data, the offset and what
//! was expected against what was found.

use std::io;
use std::path::PathBuf;

use crate::Lsn;

/// Why a stored record or header could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Corruption {
    ChecksumMismatch {
        expected: u32,
        found: u32,
    },
    BadMagic {
        expected: [u8; 8],
        found: [u8; 8],
    },
    LengthOutOfBounds {
        length: u64,
        limit: u64,
    },
    ReservedNonZero,
    LsnOutOfSequence {
        expected: Lsn,
        found: Lsn,
    },
    WrongOwner {
        what: &'static str,
        expected: u64,
        found: u64,
    },
    UnknownRecordType(u8),
    Truncated {
        needed: u64,
        available: u64,
    },
    Malformed(&'static str),
}

impl std::fmt::Display for Corruption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Corruption::ChecksumMismatch { expected, found } => {
                write!(
                    f,
                    "crc32c mismatch: expected {expected:#010x}, found {found:#010x}"
                )
            }
            Corruption::BadMagic { expected, found } => write!(
                f,
                "bad magic: expected {:?}, found {:?}",
                String::from_utf8_lossy(expected),
                String::from_utf8_lossy(found)
            ),
            Corruption::LengthOutOfBounds { length, limit } => {
                write!(f, "length {length} out of bounds (limit {limit})")
            }
            Corruption::ReservedNonZero => write!(f, "reserved header bytes are not zero"),
            Corruption::LsnOutOfSequence { expected, found } => {
                write!(f, "LSN out of sequence: expected {expected}, found {found}")
            }
            Corruption::WrongOwner {
                what,
                expected,
                found,
            } => {
                write!(f, "{what} mismatch: expected {expected}, found {found}")
            }
            Corruption::UnknownRecordType(t) => write!(f, "unknown record type {t}"),
            Corruption::Truncated { needed, available } => {
                write!(f, "truncated: needed {needed} bytes, {available} available")
            }
            Corruption::Malformed(what) => write!(f, "malformed {what}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LsgError {
    /// The OS error is part of the message (not a separate cause), so it is printed once.
    #[error("{op} {path}: {error}")]
    Io {
        op: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error(
        "disk full while {op} {path}; nothing acknowledged was lost, retry when space is freed"
    )]
    DiskFull { op: &'static str, path: PathBuf },
    #[error(
        "{path} cannot be written ({op}): read-only file system or permission denied; open the LSG read-only to read it"
    )]
    ReadOnly { op: &'static str, path: PathBuf },
    #[error("corrupt data in {path} at offset {offset}: {what}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        what: Corruption,
    },
    #[error(
        "cannot read {len} bytes at offset {offset} of {path}: {error} (the device or file system failed the read: a media error)"
    )]
    Unreadable {
        path: PathBuf,
        offset: u64,
        len: u64,
        error: io::Error,
    },
    #[error("{path} is missing: {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path} is not a Duplex LSG file: {what}")]
    Foreign { path: PathBuf, what: Corruption },
    #[error(
        "{path} has format version {found}, newer than the {supported} this build supports; upgrade Duplex to open it"
    )]
    NewerFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("LSG at {path} is owned by epoch {epoch} (another process holds its lock)")]
    OwnedBy { path: PathBuf, epoch: u64 },
    #[error(
        "LSG at {path} was taken over: our owner epoch is {ours}, the manifest says {found}; refusing to write"
    )]
    Fenced {
        path: PathBuf,
        ours: u64,
        found: u64,
    },
    #[error("LSG at {path} already exists")]
    AlreadyExists { path: PathBuf },
    #[error(
        "{path} belongs to an audit trail whose MANIFEST is missing; nothing was changed (restore the MANIFEST, or move the directory away to create a new LSG)"
    )]
    ManifestMissing { path: PathBuf },
    #[error("key of {length} bytes exceeds the limit of {limit} bytes")]
    KeyTooLarge { length: usize, limit: usize },
    #[error("value of {length} bytes exceeds the limit of {limit} bytes")]
    ValueTooLarge { length: usize, limit: usize },
    #[error("record payload of {length} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge { length: usize, limit: usize },
    #[error("no data volume named {name:?} in this LSG")]
    UnknownVolume { name: String },
    #[error("invalid name {name:?}: {why}")]
    InvalidName { name: String, why: &'static str },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("LSN {lsn} was never appended (next LSN is {next})")]
    LsnNotAppended { lsn: Lsn, next: Lsn },
    #[error(
        "audit trail {path}: append expected to give LSN {expected}, but the next LSN is {next} ({})",
        if next > expected { "that LSN is already in the trail; nothing was written" } else { "appending it would leave a gap; nothing was written" }
    )]
    UnexpectedLsn {
        path: PathBuf,
        expected: Lsn,
        next: Lsn,
    },
    #[error("LSG at {path}: {what}")]
    WrongMode { path: PathBuf, what: &'static str },
    #[error("LSN {lsn} is below the first retained LSN {first}; it was truncated")]
    LsnTruncated { lsn: Lsn, first: Lsn },
    #[error("audit trail stopped after an earlier failure: {0}")]
    Failed(String),
    #[error("the process owning this store handle crashed (simulated)")]
    Crashed,
}

impl LsgError {
    /// Maps an I/O error to the clearest variant: disk full and read-only get their own.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        let path = path.into();
        match source.raw_os_error() {
            Some(libc_enospc) if libc_enospc == ENOSPC => LsgError::DiskFull { op, path },
            Some(code) if code == EROFS || code == EACCES || code == EPERM => {
                LsgError::ReadOnly { op, path }
            }
            _ => LsgError::Io {
                op,
                path,
                error: source,
            },
        }
    }

    /// Whether the operation may succeed if retried later with nothing lost (disk full).
    pub fn is_retriable(&self) -> bool {
        matches!(self, LsgError::DiskFull { .. })
    }
}

// errno values of Linux; kept here to avoid a libc dependency for four constants.
const EPERM: i32 = 1;
const EACCES: i32 = 13;
const ENOSPC: i32 = 28;
const EROFS: i32 = 30;

pub type Result<T, E = LsgError> = std::result::Result<T, E>;
