//! Log storage groups (LSGs): an audit trail plus the data volumes whose changes it records,
//! stored as fixed-size segment files, owned by one process at a time.
//!
//! This crate is the stable storage under the audit and volume process pairs. It knows nothing of
//! pairs, transactions or the network; it guarantees that what [`AuditTrail::wait_durable`]
//! acknowledged survives any crash, that a torn tail is cut off and corruption inside durable data
//! is reported, and that only the holder of the current [`OwnerEpoch`] writes.
//!
//! Storage goes through the [`Store`] trait: [`FileStore`] for real files, [`SimStore`] for
//! deterministic simulations that crash storage. See `docs/storage-format.md` for the bytes.
//!
//! A warm backup on the same storage opens the LSG read-only early, keeps it current with
//! [`LogStorageGroup::catch_up`] and takes over with [`LogStorageGroup::adopt_for_write_in`],
//! which gives what a fresh open for writing gives without reading whole volumes again.

mod audit;
mod error;
mod lsg;
mod manifest;
pub mod record;
mod segment;
mod sim_store;
mod slots;
mod store;
mod volume;

use serde::{Deserialize, Serialize};

pub use audit::{AuditReader, AuditRecord, AuditStats, AuditTrail};
pub use error::{Corruption, LsgError, Result};
pub use lsg::{LogStorageGroup, OpenMode};
pub use manifest::MANIFEST_NAME;
pub use record::{RecordFlags, RecordType};
pub use sim_store::{SimFile, SimFileImage, SimLock, SimStore};
pub use store::{FileLock, FileStore, RealFile, Store, StoreFile};
pub use volume::{
    Compaction, DataVolume, VolumeRecord, VolumeScanStats, VolumeStats,
    validate_name as validate_volume_name,
};

/// The on-disk format version this build writes; it reads this one and older ones.
pub const FORMAT_VERSION: u32 = 1;

/// Log sequence number: the position of a record in its audit trail. Dense: each record's LSN is
/// one more than the previous one's; the first record of a trail has LSN 1.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl std::fmt::Display for Lsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Rises at every change of owner; only the holder of the current epoch may write the LSG.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct OwnerEpoch(pub u64);

impl std::fmt::Display for OwnerEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Names an LSG in the cluster.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct LsgId(pub u64);

impl std::fmt::Display for LsgId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Sizes and limits of an LSG. `max_batch_bytes` bounds how much one flush writes and with it
/// the window in which recovery takes an invalid record for a torn tail. The limits an LSG was
/// written with are kept in its manifest; opening raises a smaller configuration to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LsgConfig {
    pub audit_segment_bytes: u64,
    pub volume_segment_bytes: u64,
    pub max_batch_bytes: usize,
    /// Largest audit record payload.
    pub max_record_bytes: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
}

impl Default for LsgConfig {
    fn default() -> Self {
        LsgConfig {
            audit_segment_bytes: 16 << 20,
            volume_segment_bytes: 64 << 20,
            max_batch_bytes: 4 << 20,
            max_record_bytes: (2 << 20) + (4 << 10),
            max_key_bytes: 1 << 10,
            max_value_bytes: 1 << 20,
        }
    }
}

/// How this process runs an LSG, apart from what its files hold: choices that change no byte of
/// the format and may differ between openers. Kept apart from [`LsgConfig`] (sizes and limits)
/// so a new choice never changes how a configuration is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct LsgOptions {
    /// A background thread zero-fills the next audit segment ahead of need (the default), so a
    /// flush rolling over to it rarely waits for one. Off, no thread is started: the flush that
    /// first needs a segment creates it inline (or [`AuditTrail::preallocate_next`] does when
    /// asked), so every write happens on a caller's thread, in an order the callers decide, and a
    /// [`SimStore`] simulation replays its crash points exactly for a seed.
    pub preallocate_in_background: bool,
}

impl Default for LsgOptions {
    fn default() -> Self {
        LsgOptions {
            preallocate_in_background: true,
        }
    }
}

impl LsgOptions {
    /// Options with no background thread: for deterministic simulation.
    pub fn deterministic() -> Self {
        LsgOptions {
            preallocate_in_background: false,
        }
    }
}

impl LsgConfig {
    /// Checks that every record that passes the limits fits in a segment.
    pub fn validate(&self) -> Result<()> {
        let header = segment::SEGMENT_HEADER_BYTES;
        let audit_room = self.audit_segment_bytes.saturating_sub(header);
        let volume_room = self.volume_segment_bytes.saturating_sub(header);
        let problems = [
            (
                record::encoded_len(self.max_record_bytes) as u64 > audit_room,
                "an audit record of max_record_bytes does not fit in an audit segment",
            ),
            (
                (record::encoded_len(self.max_volume_payload_bytes()) + record::RECORD_HEADER_BYTES)
                    as u64
                    > volume_room,
                "a volume record of max_key_bytes + max_value_bytes and the segment's end marker do not fit in a volume segment",
            ),
            (
                self.max_key_bytes > u16::MAX as usize,
                "max_key_bytes must be below 65536",
            ),
            (
                self.max_batch_bytes == 0,
                "max_batch_bytes must be positive",
            ),
            (
                self.max_record_bytes > u32::MAX as usize,
                "max_record_bytes must fit in 32 bits",
            ),
        ];
        match problems.iter().find(|(bad, _)| *bad) {
            Some((_, why)) => Err(LsgError::InvalidConfig((*why).to_string())),
            None => Ok(()),
        }
    }

    /// The most bytes one flush writes: a full batch, or one record larger than that alone.
    pub(crate) fn torn_window_bytes(&self) -> u64 {
        self.max_batch_bytes
            .max(record::encoded_len(self.max_record_bytes)) as u64
    }

    pub(crate) fn max_volume_payload_bytes(&self) -> usize {
        2 + self.max_key_bytes + self.max_value_bytes
    }
}
