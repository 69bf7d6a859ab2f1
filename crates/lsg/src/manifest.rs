//! The manifest: who the LSG is, who owns it, where its audit trail starts and the record limits
//! its files were written with, in a two-slot file (`slots.rs`) whose body is eight little-endian
//! u64: LSG id, owner epoch, boot sequence id, first retained audit segment, max batch bytes, max
//! record bytes, max key bytes, max value bytes.
//!
//! The limits live here because recovery depends on them (what a valid record is, how far a torn
//! flush can reach): an opener with smaller limits than the files were written with would take
//! good records for corruption or corruption for a torn tail. Stored limits only ever grow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use crate::error::{LsgError, Result};
use crate::slots;
use crate::store::{Store, StoreFile};
use crate::{LsgConfig, LsgId, OwnerEpoch};

pub const MANIFEST_NAME: &str = "MANIFEST";
const MAGIC: [u8; 8] = *b"DPLXMAN1";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Manifest {
    pub lsg_id: LsgId,
    pub owner_epoch: OwnerEpoch,
    /// Rises at every open for writing: a changed value tells that the previous owner stopped
    /// (crashed or not) since it was last seen (seed 004).
    pub boot_sequence: u64,
    /// The oldest audit segment still retained; truncation raises it before deleting files, so a
    /// missing segment is always noticed.
    pub first_segment: u64,
    /// The largest `max_batch_bytes`, `max_record_bytes`, `max_key_bytes` and `max_value_bytes`
    /// any owner has written with.
    pub limits: Limits,
    pub(crate) sequence: u64,
}

/// The record limits an LSG's files were written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_batch_bytes: u64,
    pub max_record_bytes: u64,
    pub max_key_bytes: u64,
    pub max_value_bytes: u64,
}

impl Limits {
    pub(crate) fn of(config: &LsgConfig) -> Self {
        Limits {
            max_batch_bytes: config.max_batch_bytes as u64,
            max_record_bytes: config.max_record_bytes as u64,
            max_key_bytes: config.max_key_bytes as u64,
            max_value_bytes: config.max_value_bytes as u64,
        }
    }

    /// The larger of each limit.
    pub(crate) fn max(self, other: Limits) -> Limits {
        Limits {
            max_batch_bytes: self.max_batch_bytes.max(other.max_batch_bytes),
            max_record_bytes: self.max_record_bytes.max(other.max_record_bytes),
            max_key_bytes: self.max_key_bytes.max(other.max_key_bytes),
            max_value_bytes: self.max_value_bytes.max(other.max_value_bytes),
        }
    }

    /// How far one flush of files written under these limits can reach.
    pub(crate) fn torn_window_bytes(&self) -> u64 {
        self.max_batch_bytes
            .max(crate::record::encoded_len(self.max_record_bytes as usize) as u64)
    }

    /// `config` with its limits raised to these: what the files may hold.
    pub(crate) fn applied_to(self, config: LsgConfig) -> Result<LsgConfig> {
        let size = |v: u64| {
            usize::try_from(v).map_err(|_| {
                LsgError::InvalidConfig(format!("stored limit {v} does not fit this machine"))
            })
        };
        let raised = LsgConfig {
            max_batch_bytes: size(self.max_batch_bytes)?.max(config.max_batch_bytes),
            max_record_bytes: size(self.max_record_bytes)?.max(config.max_record_bytes),
            max_key_bytes: size(self.max_key_bytes)?.max(config.max_key_bytes),
            max_value_bytes: size(self.max_value_bytes)?.max(config.max_value_bytes),
            ..config
        };
        raised.validate()?;
        Ok(raised)
    }
}

impl Manifest {
    fn body(&self) -> Vec<u8> {
        slots::body_of(&[
            self.lsg_id.0,
            self.owner_epoch.0,
            self.boot_sequence,
            self.first_segment,
            self.limits.max_batch_bytes,
            self.limits.max_record_bytes,
            self.limits.max_key_bytes,
            self.limits.max_value_bytes,
        ])
    }
}

/// Creates the manifest of a new LSG, owned by epoch 1 from boot 1.
pub(crate) fn create<S: Store>(
    store: &S,
    lsg_id: LsgId,
    config: &LsgConfig,
) -> Result<(S::File, Manifest)> {
    let m = Manifest {
        lsg_id,
        owner_epoch: OwnerEpoch(1),
        boot_sequence: 1,
        first_segment: 1,
        limits: Limits::of(config),
        sequence: 0,
    };
    let file = slots::create(store, MANIFEST_NAME, &MAGIC, &m.body())?;
    Ok((file, m))
}

pub(crate) fn read<F: StoreFile>(file: &F) -> Result<Manifest> {
    let (sequence, body) = slots::read(file, &MAGIC)?;
    let [
        lsg_id,
        epoch,
        boot,
        first_segment,
        batch,
        record,
        key,
        value,
    ] = slots::u64s::<8>(&body, file.path())?;
    Ok(Manifest {
        lsg_id: LsgId(lsg_id),
        owner_epoch: OwnerEpoch(epoch),
        boot_sequence: boot,
        first_segment,
        limits: Limits {
            max_batch_bytes: batch,
            max_record_bytes: record,
            max_key_bytes: key,
            max_value_bytes: value,
        },
        sequence,
    })
}

/// Durably replaces `current` with `next`; returns what is now stored.
pub(crate) fn write<F: StoreFile>(
    file: &F,
    current: &Manifest,
    next: Manifest,
) -> Result<Manifest> {
    let sequence = slots::write(file, &MAGIC, current.sequence, &next.body())?;
    Ok(Manifest { sequence, ..next })
}

/// An owner's claim on its LSG: the ownership lock, the epoch it opened with and the manifest to
/// check it against. The audit trail and every volume share it, so the lock is held while any
/// handle that writes lives. Every write that could clash with a newer owner (each audit flush,
/// each volume flush and segment, each manifest update) checks the manifest on disk first and
/// stops for good with [`LsgError::Fenced`] once the epoch there is higher than its own; single
/// volume writes check the sticky flag that leaves behind.
#[derive(Debug)]
pub(crate) struct Fence<F> {
    file: F,
    epoch: OwnerEpoch,
    /// Serialises this owner's own manifest updates.
    updating: Mutex<()>,
    /// The newer epoch a check found in the manifest (0: none yet).
    fenced_by: AtomicU64,
    /// Why a manifest update failed, if one did.
    failure: OnceLock<String>,
    _lock: Box<dyn std::fmt::Debug + Send + Sync>,
}

impl<F: StoreFile> Fence<F> {
    pub(crate) fn new(
        file: F,
        epoch: OwnerEpoch,
        lock: impl std::fmt::Debug + Send + Sync + 'static,
    ) -> Self {
        Fence {
            file,
            epoch,
            updating: Mutex::new(()),
            fenced_by: AtomicU64::new(0),
            failure: OnceLock::new(),
            _lock: Box::new(lock),
        }
    }

    fn fenced_error(&self, found: u64) -> LsgError {
        LsgError::Fenced {
            path: self.file.path().to_path_buf(),
            ours: self.epoch.0,
            found,
        }
    }

    fn check_not_failed(&self) -> Result<()> {
        match self.failure.get() {
            Some(why) => Err(LsgError::Failed(format!("manifest update failed: {why}"))),
            None => Ok(()),
        }
    }

    /// The manifest on disk, if it still names this owner's epoch.
    pub(crate) fn check(&self) -> Result<Manifest> {
        self.check_not_failed()?;
        let found = read(&self.file)?;
        if found.owner_epoch > self.epoch {
            self.fenced_by.store(found.owner_epoch.0, Ordering::Release);
            return Err(self.fenced_error(found.owner_epoch.0));
        }
        Ok(found)
    }

    /// Fails if an earlier check found a newer owner: a cheap test for every single write.
    pub(crate) fn check_not_fenced(&self) -> Result<()> {
        self.check_not_failed()?;
        match self.fenced_by.load(Ordering::Acquire) {
            0 => Ok(()),
            found => Err(self.fenced_error(found)),
        }
    }

    /// Replaces the manifest on disk by `change(current)`, after checking the fence against it.
    pub(crate) fn update(&self, change: impl FnOnce(Manifest) -> Manifest) -> Result<Manifest> {
        let _one_at_a_time = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.check()?;
        write(&self.file, &current, change(current)).inspect_err(|e| {
            let _first_failure_wins = self.failure.set(e.to_string());
            slots::scrub_failed_write(&self.file, current.sequence);
        })
    }
}
