//! The manifest: who the LSG is, who owns it and where its audit trail starts, in a two-slot file
//! (`slots.rs`) whose body is four little-endian u64: LSG id, owner epoch, boot sequence id, first
//! retained audit segment.

use std::sync::Mutex;

use crate::error::{LsgError, Result};
use crate::slots;
use crate::store::{Store, StoreFile};
use crate::{LsgId, OwnerEpoch};

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
    pub(crate) sequence: u64,
}

impl Manifest {
    fn body(&self) -> Vec<u8> {
        slots::body_of(&[
            self.lsg_id.0,
            self.owner_epoch.0,
            self.boot_sequence,
            self.first_segment,
        ])
    }
}

/// Creates the manifest of a new LSG, owned by epoch 1 from boot 1.
pub(crate) fn create<S: Store>(store: &S, lsg_id: LsgId) -> Result<(S::File, Manifest)> {
    let m = Manifest {
        lsg_id,
        owner_epoch: OwnerEpoch(1),
        boot_sequence: 1,
        first_segment: 1,
        sequence: 0,
    };
    let file = slots::create(store, MANIFEST_NAME, &MAGIC, &m.body())?;
    Ok((file, m))
}

pub(crate) fn read<F: StoreFile>(file: &F) -> Result<Manifest> {
    let (sequence, body) = slots::read(file, &MAGIC)?;
    let [lsg_id, epoch, boot, first_segment] = slots::u64s::<4>(&body, file.path())?;
    Ok(Manifest {
        lsg_id: LsgId(lsg_id),
        owner_epoch: OwnerEpoch(epoch),
        boot_sequence: boot,
        first_segment,
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

/// An owner's claim on its LSG: the epoch it opened with and the manifest to check it against.
/// Every write that could clash with a newer owner (each audit flush, each volume flush and
/// segment, each manifest update) checks the manifest on disk first and stops for good with
/// [`LsgError::Fenced`] once the epoch there is higher than its own.
#[derive(Debug)]
pub(crate) struct Fence<F> {
    file: F,
    epoch: OwnerEpoch,
    /// Serialises this owner's own manifest updates.
    updating: Mutex<()>,
}

impl<F: StoreFile> Fence<F> {
    pub(crate) fn new(file: F, epoch: OwnerEpoch) -> Self {
        Fence {
            file,
            epoch,
            updating: Mutex::new(()),
        }
    }

    /// The manifest on disk, if it still names this owner's epoch.
    pub(crate) fn check(&self) -> Result<Manifest> {
        let found = read(&self.file)?;
        if found.owner_epoch > self.epoch {
            return Err(LsgError::Fenced {
                path: self.file.path().to_path_buf(),
                ours: self.epoch.0,
                found: found.owner_epoch.0,
            });
        }
        Ok(found)
    }

    /// Replaces the manifest on disk by `change(current)`, after checking the fence against it.
    pub(crate) fn update(&self, change: impl FnOnce(Manifest) -> Manifest) -> Result<Manifest> {
        let _one_at_a_time = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.check()?;
        write(&self.file, &current, change(current))
    }
}
