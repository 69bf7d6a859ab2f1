//! A log storage group: the manifest, the ownership lock, the audit trail and the data volumes
//! of one directory, opened together.
//!
//! Opening for writing takes the exclusive lock (released by the kernel when the process dies),
//! then raises the owner epoch and the boot sequence in the manifest. The audit trail checks the
//! manifest before every flush and refuses to write once it sees a higher epoch than its own.
//!
//! A read-only LSG can follow a live owner (`catch_up`) and become the owner itself
//! (`adopt_for_write_in`) with the same claim and the same recovery as opening, reusing what
//! it has read: a warm backup's takeover then costs what was written since the volumes' last
//! checkpoints, not the volumes' size.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use crate::audit::{self, AuditTrail};
use crate::error::{Corruption, LsgError, Result};
use crate::manifest::{self, Fence, Limits, MANIFEST_NAME, Manifest};
use crate::store::{self, FileStore, Store};
use crate::volume::{self, DataVolume, VOLUMES_DIR, VolumeOwner};
use crate::{LsgConfig, LsgId, LsgOptions, OwnerEpoch};

const LOCK_NAME: &str = "LOCK";

/// How to open an existing LSG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Take ownership now, or fail with [`LsgError::OwnedBy`].
    Write,
    /// Take ownership, blocking until the current owner releases it or dies.
    WriteWaiting,
    /// Read what is there without taking ownership or changing a byte.
    ReadOnly,
}

/// One LSG, open for writing (owned) or read-only.
#[derive(Debug)]
pub struct LogStorageGroup<S: Store = FileStore> {
    store: Arc<S>,
    config: LsgConfig,
    options: LsgOptions,
    manifest: Manifest,
    mode: OpenMode,
    audit: AuditTrail<S>,
    volumes: BTreeMap<String, Arc<DataVolume<S>>>,
    /// This owner's claim, holding the ownership lock; `None` when open read-only.
    fence: Option<Arc<Fence<S::File>>>,
}

impl LogStorageGroup<FileStore> {
    /// Creates a new LSG in `dir` (created if missing; must not hold an LSG) and owns it.
    pub fn create(dir: impl AsRef<Path>, lsg_id: LsgId, config: LsgConfig) -> Result<Self> {
        let dir = dir.as_ref();
        store::create_dir_durably(dir)?;
        Self::create_in(FileStore::new(dir), lsg_id, config)
    }

    /// Opens the LSG in `dir`.
    pub fn open(dir: impl AsRef<Path>, config: LsgConfig, mode: OpenMode) -> Result<Self> {
        let dir = dir.as_ref();
        let store = match mode {
            OpenMode::ReadOnly => FileStore::without_maps(dir),
            OpenMode::Write | OpenMode::WriteWaiting => FileStore::new(dir),
        };
        Self::open_in(store, config, mode)
    }
}

impl<S: Store> LogStorageGroup<S> {
    /// Creates a new LSG in `store`. The manifest is written last, under its final name in one
    /// rename: it is the commit point. A creation stopped before it (crash, full disk) leaves no
    /// LSG, and its leftovers are removed by the next creation.
    pub fn create_in(store: S, lsg_id: LsgId, config: LsgConfig) -> Result<Self> {
        Self::create_in_with(store, lsg_id, config, LsgOptions::default())
    }

    /// [`create_in`](Self::create_in) with `options` for how this process runs it.
    pub fn create_in_with(
        store: S,
        lsg_id: LsgId,
        config: LsgConfig,
        options: LsgOptions,
    ) -> Result<Self> {
        config.validate()?;
        let store = Arc::new(store);
        if store.exists(MANIFEST_NAME)? {
            return Err(LsgError::AlreadyExists {
                path: store.root().to_path_buf(),
            });
        }
        let lock = store
            .lock(LOCK_NAME, false)?
            .ok_or_else(|| LsgError::OwnedBy {
                path: store.root().to_path_buf(),
                epoch: 0,
            })?;
        // Another creator may have finished between the check above and the lock.
        if store.exists(MANIFEST_NAME)? {
            return Err(LsgError::AlreadyExists {
                path: store.root().to_path_buf(),
            });
        }
        audit::remove_creation_leftovers(&*store)?;
        audit::create_first_segment(&*store, lsg_id, &config)?;
        store.create_dir(VOLUMES_DIR)?;
        let (manifest_file, manifest) = manifest::create(&*store, lsg_id, &config)?;
        let fence = Arc::new(Fence::new(manifest_file, manifest.owner_epoch, lock));
        let audit = AuditTrail::open(
            Arc::clone(&store),
            lsg_id,
            manifest.first_segment,
            config,
            config.torn_window_bytes(),
            Some(Arc::clone(&fence)),
            options.preallocate_in_background,
        )?;
        info!(lsg = %lsg_id, path = %store.root().display(), "LSG created");
        Ok(LogStorageGroup {
            store,
            config,
            options,
            manifest,
            mode: OpenMode::Write,
            audit,
            volumes: BTreeMap::new(),
            fence: Some(fence),
        })
    }

    /// Opens the LSG in `store`: for writing, it takes the ownership lock, raises the owner epoch
    /// and the boot sequence, and recovers the audit trail and every volume (see the crate docs).
    pub fn open_in(store: S, config: LsgConfig, mode: OpenMode) -> Result<Self> {
        Self::open_in_with(store, config, mode, LsgOptions::default())
    }

    /// [`open_in`](Self::open_in) with `options` for how this process runs it.
    pub fn open_in_with(
        store: S,
        config: LsgConfig,
        mode: OpenMode,
        options: LsgOptions,
    ) -> Result<Self> {
        config.validate()?;
        let store = Arc::new(store);
        if !store.exists(MANIFEST_NAME)? {
            return Err(LsgError::Missing {
                path: store.root().join(MANIFEST_NAME),
                what: "no LSG here (manifest not found)",
            });
        }
        let lock = match mode {
            OpenMode::ReadOnly => None,
            OpenMode::Write | OpenMode::WriteWaiting => Some(lock_for_write(&*store, mode)?),
        };
        let manifest_file = store.open(MANIFEST_NAME)?;
        let mut manifest = manifest::read(&manifest_file)?;
        // Appends may use the larger of the stored limits and ours; recovery must judge the files
        // by the limits they were written with (a larger torn window would take corruption for
        // a torn tail), so the manifest is raised only after recovery.
        let stored = manifest.limits;
        let config = stored.applied_to(config)?;
        let recovery_window = stored.torn_window_bytes();
        let fence = if let Some(lock) = lock {
            let (claimed, fence) = claim(&*store, manifest_file, manifest, lock)?;
            manifest = claimed;
            Some(fence)
        } else {
            None
        };
        let audit = AuditTrail::open(
            Arc::clone(&store),
            manifest.lsg_id,
            manifest.first_segment,
            config,
            recovery_window,
            fence.clone(),
            options.preallocate_in_background,
        )?;
        let mut volumes = BTreeMap::new();
        for name in store.list(VOLUMES_DIR)? {
            if !volume::is_complete(&*store, &name)? {
                warn!(volume = %name, "data volume creation did not finish before a crash; ignored");
                continue;
            }
            let owner = fence.as_ref().map(|fence| VolumeOwner {
                fence: Arc::clone(fence),
                audit: audit.handle(),
            });
            let v = DataVolume::open(
                Arc::clone(&store),
                manifest.lsg_id,
                config,
                &name,
                owner,
                audit.next_lsn(),
                manifest.boot_sequence,
            )?;
            volumes.insert(name, Arc::new(v));
        }
        if let Some(fence) = &fence {
            let raised = stored.max(Limits::of(&config));
            if raised != stored {
                manifest = fence.update(|m| Manifest {
                    limits: raised,
                    ..m
                })?;
            }
        }
        info!(
            lsg = %manifest.lsg_id,
            epoch = %manifest.owner_epoch,
            boot = manifest.boot_sequence,
            next_lsn = %audit.next_lsn(),
            ?mode,
            "LSG opened"
        );
        Ok(LogStorageGroup {
            store,
            config,
            options,
            manifest,
            mode,
            audit,
            volumes,
            fence,
        })
    }

    pub fn lsg_id(&self) -> LsgId {
        self.manifest.lsg_id
    }

    /// The epoch this handle owns the LSG with (the manifest's epoch when read-only).
    pub fn owner_epoch(&self) -> OwnerEpoch {
        self.manifest.owner_epoch
    }

    pub fn boot_sequence(&self) -> u64 {
        self.manifest.boot_sequence
    }

    pub fn mode(&self) -> OpenMode {
        self.mode
    }

    pub fn config(&self) -> &LsgConfig {
        &self.config
    }

    pub fn options(&self) -> &LsgOptions {
        &self.options
    }

    pub fn audit(&self) -> &AuditTrail<S> {
        &self.audit
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    /// Adds an empty data volume.
    pub fn create_volume(&mut self, name: &str) -> Result<Arc<DataVolume<S>>> {
        let Some(fence) = &self.fence else {
            return Err(LsgError::ReadOnly {
                op: "create volume in",
                path: self.store.root().to_path_buf(),
            });
        };
        let owner = VolumeOwner {
            fence: Arc::clone(fence),
            audit: self.audit.handle(),
        };
        let v = Arc::new(DataVolume::create(
            Arc::clone(&self.store),
            self.manifest.lsg_id,
            self.config,
            name,
            owner,
        )?);
        self.volumes.insert(name.to_string(), Arc::clone(&v));
        Ok(v)
    }

    pub fn volume(&self, name: &str) -> Result<Arc<DataVolume<S>>> {
        self.volumes
            .get(name)
            .cloned()
            .ok_or_else(|| LsgError::UnknownVolume {
                name: name.to_string(),
            })
    }

    pub fn volume_names(&self) -> Vec<String> {
        self.volumes.keys().cloned().collect()
    }

    /// Brings a read-only LSG up to what its files hold now, reading only what was appended
    /// since the last look: the audit trail's new records (its readers see them), each volume's
    /// new records into its index, and volumes created since. A warm backup on the same storage
    /// calls it periodically, so that [`adopt_for_write_in`](Self::adopt_for_write_in) has
    /// little left to read. Reading stops cleanly at the first zero or invalid record of each
    /// tail (the owner may be writing it) and at volume records whose audit record the trail
    /// does not show yet. After a new owner came (the boot sequence moved) or the limits grew,
    /// the trail is read again from its tail window and each volume from its checkpoint; after
    /// a compaction, that volume whole. An owned LSG is current: nothing to do.
    pub fn catch_up(&mut self) -> Result<()> {
        if self.fence.is_some() {
            return Ok(());
        }
        let manifest_file = self.store.open(MANIFEST_NAME)?;
        let manifest = manifest::read(&manifest_file)?;
        let config = manifest.limits.applied_to(self.config)?;
        if manifest.boot_sequence != self.manifest.boot_sequence || config != self.config {
            self.audit = AuditTrail::open(
                Arc::clone(&self.store),
                manifest.lsg_id,
                manifest.first_segment,
                config,
                manifest.limits.torn_window_bytes(),
                None,
                self.options.preallocate_in_background,
            )?;
        } else {
            self.audit.catch_up(manifest.first_segment)?;
        }
        let next_lsn = self.audit.next_lsn();
        for name in self.store.list(VOLUMES_DIR)? {
            if let Some(v) = self.volumes.get(&name) {
                v.catch_up(next_lsn, manifest.boot_sequence, &config)?;
            } else if volume::is_complete(&*self.store, &name)? {
                let v = DataVolume::open(
                    Arc::clone(&self.store),
                    manifest.lsg_id,
                    config,
                    &name,
                    None,
                    next_lsn,
                    manifest.boot_sequence,
                )?;
                self.volumes.insert(name, Arc::new(v));
            }
        }
        self.manifest = manifest;
        self.config = config;
        Ok(())
    }

    /// Turns this read-only LSG into its owner, as [`open_in`](Self::open_in) with `mode` would
    /// open it, without reading the volumes again: the takeover of a warm backup that kept the
    /// LSG open read-only (paying the scan of the volumes then, off the takeover path) and
    /// caught up with [`catch_up`](Self::catch_up). `store` is the same directory, able to write
    /// (for files: [`FileStore::new`]; [`adopt_for_write`](LogStorageGroup::adopt_for_write)
    /// makes it).
    ///
    /// Exactly as opening: takes the ownership lock (`Write` fails at once with
    /// [`LsgError::OwnedBy`], `WriteWaiting` blocks meanwhile), raises the owner epoch and the
    /// boot sequence, recovers the audit trail from its tail window, and for each volume does
    /// what opening for writing does (the write-ahead cut of records the recovered trail does
    /// not hold, zeroing what follows the end, syncing the segments from the checkpoint's on),
    /// but keeps each volume's index up to what its view read before its checkpoint position
    /// and reads only the records from there on, with the writer's rules. A volume that a
    /// compaction replaced since the last look is read whole; one created since is opened.
    ///
    /// On success this LSG is the owner (epoch, mode and handles are new; volume handles taken
    /// from it before answer [`LsgError::Failed`]: take them again). On failure it stays a
    /// read-only LSG that can catch up and adopt again; the lock, if taken, is released.
    pub fn adopt_for_write_in(&mut self, store: S, mode: OpenMode) -> Result<()> {
        if mode == OpenMode::ReadOnly || self.fence.is_some() {
            return Err(LsgError::WrongMode {
                path: self.store.root().to_path_buf(),
                what: "adopting for writing needs a read-only LSG and OpenMode::Write or WriteWaiting",
            });
        }
        let store = Arc::new(store);
        let lock = lock_for_write(&*store, mode)?;
        let manifest_file = store.open(MANIFEST_NAME)?;
        let manifest = manifest::read(&manifest_file)?;
        if manifest.lsg_id != self.manifest.lsg_id {
            return Err(LsgError::Corrupt {
                path: store.root().join(MANIFEST_NAME),
                offset: 0,
                what: Corruption::WrongOwner {
                    what: "LSG id of the store given to adopt_for_write_in",
                    expected: self.manifest.lsg_id.0,
                    found: manifest.lsg_id.0,
                },
            });
        }
        let stored = manifest.limits;
        let config = stored.applied_to(self.config)?;
        let recovery_window = stored.torn_window_bytes();
        let (mut manifest, fence) = claim(&*store, manifest_file, manifest, lock)?;
        let audit = AuditTrail::open(
            Arc::clone(&store),
            manifest.lsg_id,
            manifest.first_segment,
            config,
            recovery_window,
            Some(Arc::clone(&fence)),
            self.options.preallocate_in_background,
        )?;
        let owner = VolumeOwner {
            fence: Arc::clone(&fence),
            audit: audit.handle(),
        };
        // First every volume is made ready, each one failing alone leaving it a read-only view;
        // then, once nothing can fail, the read-only views hand their indexes over.
        let mut prepared = Vec::new();
        let mut opened = BTreeMap::new();
        for name in store.list(VOLUMES_DIR)? {
            if !volume::is_complete(&*store, &name)? {
                warn!(volume = %name, "data volume creation did not finish before a crash; ignored");
                continue;
            }
            match self.volumes.get(&name) {
                Some(view) => {
                    let adopting = view.prepare_adoption(&*store, &config, audit.next_lsn())?;
                    prepared.push((name, Arc::clone(view), adopting));
                }
                None => {
                    let v = DataVolume::open(
                        Arc::clone(&store),
                        manifest.lsg_id,
                        config,
                        &name,
                        Some(owner.clone()),
                        audit.next_lsn(),
                        manifest.boot_sequence,
                    )?;
                    opened.insert(name, Arc::new(v));
                }
            }
        }
        let raised = stored.max(Limits::of(&config));
        if raised != stored {
            manifest = fence.update(|m| Manifest {
                limits: raised,
                ..m
            })?;
        }
        for (name, view, adopting) in prepared {
            let v = view.hand_over(adopting, Arc::clone(&store), config, owner.clone());
            opened.insert(name, Arc::new(v));
        }
        info!(
            lsg = %manifest.lsg_id,
            epoch = %manifest.owner_epoch,
            boot = manifest.boot_sequence,
            next_lsn = %audit.next_lsn(),
            ?mode,
            "LSG adopted for writing"
        );
        self.store = store;
        self.config = config;
        self.manifest = manifest;
        self.mode = mode;
        self.audit = audit;
        self.volumes = opened;
        self.fence = Some(fence);
        Ok(())
    }
}

impl LogStorageGroup<FileStore> {
    /// [`adopt_for_write_in`](LogStorageGroup::adopt_for_write_in) for an LSG of files: the
    /// owner writes them through a [`FileStore`] with maps, where the read-only LSG read with
    /// `pread` only.
    pub fn adopt_for_write(&mut self, mode: OpenMode) -> Result<()> {
        let store = FileStore::new(self.store.root());
        self.adopt_for_write_in(store, mode)
    }
}

/// Takes the ownership lock of the LSG in `store` (blocking with `WriteWaiting`), or says who
/// holds it.
fn lock_for_write<S: Store>(store: &S, mode: OpenMode) -> Result<S::Lock> {
    match store.lock(LOCK_NAME, mode == OpenMode::WriteWaiting)? {
        Some(lock) => Ok(lock),
        None => {
            let file = store.open(MANIFEST_NAME)?;
            let epoch = manifest::read(&file)?.owner_epoch.0;
            Err(LsgError::OwnedBy {
                path: store.root().to_path_buf(),
                epoch,
            })
        }
    }
}

/// The claim of a new owner holding the lock: raises the owner epoch and the boot sequence in
/// the manifest (synced) and returns it with the owner's fence.
fn claim<S: Store>(
    store: &S,
    manifest_file: S::File,
    manifest: Manifest,
    lock: S::Lock,
) -> Result<(Manifest, Arc<Fence<S::File>>)> {
    let bump = |v: u64, what| {
        v.checked_add(1).ok_or_else(|| LsgError::Corrupt {
            path: store.root().join(MANIFEST_NAME),
            offset: 0,
            what: Corruption::Malformed(what),
        })
    };
    let next = Manifest {
        owner_epoch: OwnerEpoch(bump(manifest.owner_epoch.0, "owner epoch at its maximum")?),
        boot_sequence: bump(manifest.boot_sequence, "boot sequence at its maximum")?,
        ..manifest
    };
    let manifest = manifest::write(&manifest_file, &manifest, next)?;
    let fence = Arc::new(Fence::new(manifest_file, manifest.owner_epoch, lock));
    Ok((manifest, fence))
}
