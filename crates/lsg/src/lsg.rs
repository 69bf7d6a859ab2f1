//! A log storage group: the manifest, the ownership lock, the audit trail and the data volumes
//! of one directory, opened together.
//!
//! Opening for writing takes the exclusive lock (released by the kernel when the process dies),
//! then raises the owner epoch and the boot sequence in the manifest. The audit trail checks the
//! manifest before every flush and refuses to write once it sees a higher epoch than its own.

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
            OpenMode::Write | OpenMode::WriteWaiting => {
                match store.lock(LOCK_NAME, mode == OpenMode::WriteWaiting)? {
                    Some(lock) => Some(lock),
                    None => {
                        let file = store.open(MANIFEST_NAME)?;
                        let epoch = manifest::read(&file)?.owner_epoch.0;
                        return Err(LsgError::OwnedBy {
                            path: store.root().to_path_buf(),
                            epoch,
                        });
                    }
                }
            }
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
            let bump = |v: u64, what| {
                v.checked_add(1).ok_or_else(|| LsgError::Corrupt {
                    path: store.root().join(MANIFEST_NAME),
                    offset: 0,
                    what: Corruption::Malformed(what),
                })
            };
            let next = Manifest {
                owner_epoch: OwnerEpoch(bump(
                    manifest.owner_epoch.0,
                    "owner epoch at its maximum",
                )?),
                boot_sequence: bump(manifest.boot_sequence, "boot sequence at its maximum")?,
                ..manifest
            };
            manifest = manifest::write(&manifest_file, &manifest, next)?;
            Some(Arc::new(Fence::new(
                manifest_file,
                manifest.owner_epoch,
                lock,
            )))
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
}
