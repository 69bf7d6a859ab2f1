//! The simulated store: files in memory that survive a simulated process kill or power loss
//! only as far as the real page cache and disk would, with injectable faults (failed syncs, a
//! name that may vanish, media errors, a full disk, flipped bits, a death in the middle of I/O).
//! It implements the same [`Store`] trait as [`crate::FileStore`] and passes the same conformance
//! suite (`tests/store_conformance.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{LsgError, Result};
use crate::store::{Store, StoreFile, check_range};

const SECTOR_BYTES: usize = 512;

/// An in-memory store whose files survive a simulated power loss only as far as they were synced.
///
/// Every handle belongs to one incarnation of the simulated process. After
/// [`SimStore::kill_process`] old handles fail with [`LsgError::Crashed`] and locks are free, but
/// unsynced writes stay visible (the page cache outlives the process). After
/// [`SimStore::power_loss`] each file holds what syncs made durable, plus any subset of the
/// sectors written since. A sync makes every write of the file durable, whichever incarnation
/// made it.
#[derive(Debug, Clone)]
pub struct SimStore {
    root: PathBuf,
    inner: Arc<Mutex<SimInner>>,
}

#[derive(Debug)]
struct SimInner {
    files: BTreeMap<String, SimFileData>,
    dirs: BTreeSet<String>,
    locks: BTreeSet<String>,
    incarnation: u64,
    capacity_bytes: Option<u64>,
    /// Writes left before the simulated process dies right after one (see `crash_after_writes`).
    writes_until_death: Option<u64>,
    /// Injected faults, by file name: syncs left to fail, and byte ranges that cannot be read.
    failing_syncs: BTreeMap<String, u64>,
    unreadable: BTreeMap<String, (u64, u64)>,
    /// Files whose `create` names them but fails to make the name durable.
    failing_entry_syncs: BTreeSet<String>,
    dead: bool,
    rng: ChaCha8Rng,
}

#[derive(Debug)]
struct SimFileData {
    /// Whether the file's directory entry is durable; a power loss removes it otherwise.
    entry_durable: bool,
    durable: Vec<u8>,
    current: Vec<u8>,
    /// Writes since the last sync, oldest first: (offset, length).
    unsynced: Vec<(u64, usize)>,
}

impl SimStore {
    /// A new empty store; `seed` decides how crashes tear unsynced writes.
    pub fn new(seed: u64) -> Self {
        SimStore {
            root: PathBuf::from(format!("sim://{seed}")),
            inner: Arc::new(Mutex::new(SimInner {
                files: BTreeMap::new(),
                dirs: BTreeSet::new(),
                locks: BTreeSet::new(),
                incarnation: 0,
                capacity_bytes: None,
                writes_until_death: None,
                failing_syncs: BTreeMap::new(),
                unreadable: BTreeMap::new(),
                failing_entry_syncs: BTreeSet::new(),
                dead: false,
                rng: ChaCha8Rng::seed_from_u64(seed),
            })),
        }
    }

    fn inner(&self) -> MutexGuard<'_, SimInner> {
        // A panic while holding this lock leaves plain data behind; the state is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Limits the total size of all files: creating past it fails with "disk full".
    pub fn set_capacity_bytes(&self, capacity: Option<u64>) {
        self.inner().capacity_bytes = capacity;
    }

    /// Arms a crash in the middle of I/O: the `n`-th write from now lands (unsynced) and then the
    /// simulated process is dead, every later operation failing with [`LsgError::Crashed`] until
    /// [`kill_process`](Self::kill_process) or [`power_loss`](Self::power_loss) is called.
    pub fn crash_after_writes(&self, n: u64) {
        self.inner().writes_until_death = Some(n.max(1));
    }

    /// Simulates `kill -9` of the process: its handles and locks die with it, but every write it
    /// made stays in the (shared) page cache, visible to the next opener and still not durable:
    /// a later [`power_loss`](Self::power_loss) can lose it, unless someone syncs the file first.
    pub fn kill_process(&self) {
        let mut inner = self.inner();
        inner.incarnation += 1;
        inner.locks.clear();
        inner.dead = false;
        inner.writes_until_death = None;
    }

    /// Simulates the loss of power (the process dies and the machine's volatile caches with it):
    /// each 512-byte sector written since the file's last sync independently survives (with its
    /// newest bytes) or not, seeded: kernel writeback may have written any dirty page before the
    /// power failed, in any order, and a disk may tear a write at any sector.
    pub fn power_loss(&self) {
        self.kill_process();
        let mut inner = self.inner();
        let SimInner { files, rng, .. } = &mut *inner;
        files.retain(|_, data| data.entry_durable);
        for data in files.values_mut() {
            for &(offset, len) in &data.unsynced {
                let end = offset as usize + len;
                let mut start = offset as usize;
                while start < end {
                    let sector_end = ((start / SECTOR_BYTES) + 1) * SECTOR_BYTES;
                    let stop = sector_end.min(end);
                    if rng.random_bool(0.5) {
                        let kept = data.current[start..stop].to_vec();
                        data.durable[start..stop].copy_from_slice(&kept);
                    }
                    start = stop;
                }
            }
            data.current = data.durable.clone();
            data.unsynced.clear();
        }
    }

    /// Makes a file's unsynced writes durable, as the kernel's writeback may at any time without
    /// being asked: for tests of what must hold even when it does.
    pub fn write_back(&self, name: &str) -> Result<()> {
        let mut inner = self.inner();
        let path = self.root.join(name);
        let data = inner.files.get_mut(name).ok_or(LsgError::Missing {
            path,
            what: "file not found",
        })?;
        data.durable = data.current.clone();
        data.unsynced.clear();
        Ok(())
    }

    /// Makes the next `n` syncs of file `name` fail with an I/O error. As on Linux, the failed
    /// sync's data stays readable but is no longer pending: a later successful sync does not make
    /// it durable, and a power loss loses it.
    pub fn fail_syncs(&self, name: &str, n: u64) {
        self.inner().failing_syncs.insert(name.to_string(), n);
    }

    /// Makes `len` bytes at `offset` of file `name` unreadable, as a media error does: `read_at`
    /// fails with an I/O error, and lending them (a memory map on real files) kills the process
    /// (SIGBUS), here a panic.
    pub fn fail_reads(&self, name: &str, offset: u64, len: u64) {
        self.inner()
            .unreadable
            .insert(name.to_string(), (offset, offset.saturating_add(len)));
    }

    /// The `create` of `name` names the file but fails to make the name durable, as when the
    /// directory sync fails after the rename: the file exists until a power loss, unless
    /// [`Store::sync_dir`] of its directory succeeds first.
    pub fn fail_entry_sync(&self, name: &str) {
        self.inner().failing_entry_syncs.insert(name.to_string());
    }

    /// Flips one bit of a file as it is on "disk": for corruption tests.
    pub fn flip_bit(&self, name: &str, offset: u64, bit: u8) -> Result<()> {
        let mut inner = self.inner();
        let path = self.root.join(name);
        let data = inner.files.get_mut(name).ok_or(LsgError::Missing {
            path,
            what: "file not found",
        })?;
        let i = offset as usize;
        if i < data.current.len() {
            data.current[i] ^= 1 << (bit % 8);
            data.durable[i] ^= 1 << (bit % 8);
        }
        Ok(())
    }

    fn used_bytes(inner: &SimInner) -> u64 {
        inner.files.values().map(|f| f.current.len() as u64).sum()
    }
}

impl Store for SimStore {
    type File = SimFile;
    type Lock = SimLock;

    fn root(&self) -> &Path {
        &self.root
    }

    fn create(
        &self,
        name: &str,
        initial: &[u8],
        size_bytes: u64,
        _preallocate: bool,
    ) -> Result<SimFile> {
        let mut inner = self.inner();
        let path = self.root.join(name);
        if inner.files.contains_key(name) {
            return Err(LsgError::AlreadyExists { path });
        }
        if let Some(cap) = inner.capacity_bytes
            && Self::used_bytes(&inner) + size_bytes > cap
        {
            return Err(LsgError::DiskFull { op: "create", path });
        }
        let mut bytes = vec![0u8; size_bytes.max(initial.len() as u64) as usize];
        bytes[..initial.len()].copy_from_slice(initial);
        let entry_durable = !inner.failing_entry_syncs.remove(name);
        inner.files.insert(
            name.to_string(),
            SimFileData {
                entry_durable,
                durable: bytes.clone(),
                current: bytes,
                unsynced: Vec::new(),
            },
        );
        if !entry_durable {
            return Err(LsgError::Io {
                op: "fsync directory",
                path,
                error: io::Error::other("injected directory sync failure"),
            });
        }
        Ok(SimFile {
            store: self.clone(),
            name: name.to_string(),
            path,
            len: size_bytes.max(initial.len() as u64),
            incarnation: inner.incarnation,
        })
    }

    fn open(&self, name: &str) -> Result<SimFile> {
        let inner = self.inner();
        let path = self.root.join(name);
        let data = inner.files.get(name).ok_or(LsgError::Missing {
            path: path.clone(),
            what: "file not found",
        })?;
        Ok(SimFile {
            store: self.clone(),
            name: name.to_string(),
            path,
            len: data.current.len() as u64,
            incarnation: inner.incarnation,
        })
    }

    fn exists(&self, name: &str) -> Result<bool> {
        let inner = self.inner();
        Ok(inner.files.contains_key(name) || inner.dirs.contains(name))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let inner = self.inner();
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        let mut names: Vec<String> = inner
            .files
            .keys()
            .chain(inner.dirs.iter())
            .filter_map(|n| n.strip_prefix(&prefix))
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
            .map(str::to_string)
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn remove(&self, name: &str) -> Result<()> {
        let mut inner = self.inner();
        match inner.files.remove(name) {
            Some(_) => Ok(()),
            None => Err(LsgError::Missing {
                path: self.root.join(name),
                what: "file not found",
            }),
        }
    }

    fn create_dir(&self, dir: &str) -> Result<()> {
        let mut inner = self.inner();
        let mut at = String::new();
        for part in dir.split('/') {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            inner.dirs.insert(at.clone());
        }
        Ok(())
    }

    fn sync_dir(&self, dir: &str) -> Result<()> {
        let mut inner = self.inner();
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        for (name, data) in inner.files.iter_mut() {
            if name
                .strip_prefix(&prefix)
                .is_some_and(|rest| !rest.contains('/'))
            {
                data.entry_durable = true;
            }
        }
        Ok(())
    }

    fn lock(&self, name: &str, _wait: bool) -> Result<Option<SimLock>> {
        let mut inner = self.inner();
        if !inner.locks.insert(name.to_string()) {
            return Ok(None);
        }
        Ok(Some(SimLock {
            store: self.clone(),
            name: name.to_string(),
            incarnation: inner.incarnation,
        }))
    }
}

/// The ownership lock of a [`SimStore`]; the death of its process releases it.
#[derive(Debug)]
pub struct SimLock {
    store: SimStore,
    name: String,
    incarnation: u64,
}

impl Drop for SimLock {
    fn drop(&mut self) {
        let mut inner = self.store.inner();
        if inner.incarnation == self.incarnation {
            inner.locks.remove(&self.name);
        }
    }
}

/// A file of a [`SimStore`].
#[derive(Debug)]
pub struct SimFile {
    store: SimStore,
    name: String,
    path: PathBuf,
    len: u64,
    incarnation: u64,
}

impl SimFile {
    fn data<'a>(&self, inner: &'a mut SimInner) -> Result<&'a mut SimFileData> {
        if inner.incarnation != self.incarnation || inner.dead {
            return Err(LsgError::Crashed);
        }
        inner.files.get_mut(&self.name).ok_or(LsgError::Missing {
            path: self.path.clone(),
            what: "file removed",
        })
    }
}

impl StoreFile for SimFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(&self.path, offset, data.len(), self.len)?;
        let mut inner = self.store.inner();
        let file = self.data(&mut inner)?;
        let start = offset as usize;
        file.current[start..start + data.len()].copy_from_slice(data);
        file.unsynced.push((offset, data.len()));
        match inner.writes_until_death {
            Some(1) => {
                inner.writes_until_death = None;
                inner.dead = true;
                Err(LsgError::Crashed)
            }
            Some(n) => {
                inner.writes_until_death = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn sync(&self) -> Result<()> {
        let mut inner = self.store.inner();
        if let Some(left) = inner.failing_syncs.get_mut(&self.name)
            && *left > 0
        {
            *left -= 1;
            self.data(&mut inner)?.unsynced.clear();
            return Err(LsgError::Io {
                op: "fdatasync",
                path: self.path.clone(),
                error: io::Error::other("injected sync failure"),
            });
        }
        let file = self.data(&mut inner)?;
        for &(offset, len) in &file.unsynced {
            let start = offset as usize;
            file.durable[start..start + len].copy_from_slice(&file.current[start..start + len]);
        }
        file.unsynced.clear();
        Ok(())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.unreadable(offset, buf.len()) {
            return Err(LsgError::Unreadable {
                path: self.path.clone(),
                offset,
                len: buf.len() as u64,
                error: io::Error::other("injected media error"),
            });
        }
        self.lend(offset, buf.len(), |bytes| buf.copy_from_slice(bytes))
    }

    fn with_bytes<R>(&self, offset: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        assert!(
            !self.unreadable(offset, len),
            "SIGBUS: {} has a media error in {offset}..{}",
            self.path.display(),
            offset + len as u64
        );
        self.lend(offset, len, f)
    }
}

impl SimFile {
    fn unreadable(&self, offset: u64, len: usize) -> bool {
        let inner = self.store.inner();
        inner
            .unreadable
            .get(&self.name)
            .is_some_and(|&(from, to)| offset < to && offset + (len as u64) > from)
    }

    fn lend<R>(&self, offset: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        check_range(&self.path, offset, len, self.len)?;
        let mut inner = self.store.inner();
        let file = self.data(&mut inner)?;
        let start = offset as usize;
        Ok(f(&file.current[start..start + len]))
    }
}
