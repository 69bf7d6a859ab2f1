//! The simulated store: files in memory that survive a simulated process kill or power loss
//! only as far as the real page cache and disk would, with injectable faults (failed syncs, a
//! name that may vanish, media errors, a full disk, flipped bits, a death in the middle of I/O).
//! It implements the same [`Store`] trait as [`crate::FileStore`] and passes the same conformance
//! suite (`tests/store_conformance.rs`).
//!
//! One store is one host: its files and page cache are shared by simulated processes. A handle
//! belongs to one process ([`SimStore::another_process`] makes a handle of a new one, as a warm
//! backup on the same host is), so one process can be killed while another reads on. The whole
//! state is plain data, seeded, with no clock and no threads: [`SimStore::fork`] copies a world
//! to run two futures of it side by side, and [`SimStore::image`] shows every byte of it.

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
/// Every handle belongs to one incarnation of one simulated process (clones share it). After
/// [`SimStore::kill_process`] that process's old handles fail with [`LsgError::Crashed`] and
/// its locks are free, but unsynced writes stay visible (the page cache outlives the process).
/// After [`SimStore::power_loss`] every process is dead and each file holds what syncs made
/// durable, plus any subset of the sectors written since. A sync makes every write of the file
/// durable, whichever process made it.
#[derive(Debug, Clone)]
pub struct SimStore {
    root: PathBuf,
    inner: Arc<Mutex<SimInner>>,
    /// The simulated process this handle belongs to: an index into `SimInner::incarnations`.
    process: usize,
}

/// One file of a [`SimStore`] as it stands: what readers see, what a power loss would keep of
/// it for sure, and whether its name survives a power loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFileImage {
    pub current: Vec<u8>,
    pub durable: Vec<u8>,
    pub entry_durable: bool,
}

#[derive(Debug, Clone)]
struct SimInner {
    files: BTreeMap<String, SimFileData>,
    dirs: BTreeSet<String>,
    /// Lock name → the process holding it.
    locks: BTreeMap<String, usize>,
    /// The current incarnation of each process; a kill gives the process a new one.
    incarnations: Vec<u64>,
    next_incarnation: u64,
    capacity_bytes: Option<u64>,
    /// The process that dies right after its n-th write from now (see `crash_after_writes`).
    writes_until_death: Option<(usize, u64)>,
    /// Injected faults, by file name: syncs left to fail, and byte ranges that cannot be read.
    failing_syncs: BTreeMap<String, u64>,
    /// Files whose failing syncs also kill the process that syncs (`fail_syncs_and_crash`).
    crashing_syncs: BTreeSet<String>,
    unreadable: BTreeMap<String, (u64, u64)>,
    /// Files whose `create` names them but fails to make the name durable.
    failing_entry_syncs: BTreeSet<String>,
    /// Processes that died in the middle of I/O and were not yet killed (see `crash_after_writes`).
    dead: BTreeSet<usize>,
    rng: ChaCha8Rng,
}

#[derive(Debug, Clone)]
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
                locks: BTreeMap::new(),
                incarnations: vec![0],
                next_incarnation: 1,
                capacity_bytes: None,
                writes_until_death: None,
                failing_syncs: BTreeMap::new(),
                crashing_syncs: BTreeSet::new(),
                unreadable: BTreeMap::new(),
                failing_entry_syncs: BTreeSet::new(),
                dead: BTreeSet::new(),
                rng: ChaCha8Rng::seed_from_u64(seed),
            })),
            process: 0,
        }
    }

    /// A handle of a new simulated process on the same host: it shares the files and the page
    /// cache, and lives on when the process of `self` is killed (a warm backup next to its
    /// primary).
    pub fn another_process(&self) -> SimStore {
        let mut inner = self.inner();
        let incarnation = inner.next_incarnation;
        inner.next_incarnation += 1;
        inner.incarnations.push(incarnation);
        SimStore {
            root: self.root.clone(),
            inner: Arc::clone(&self.inner),
            process: inner.incarnations.len() - 1,
        }
    }

    /// An independent copy of the whole simulated host as it is now (files, page cache, faults
    /// armed, the seeded generator), with this handle's process: to run two futures of one
    /// world and compare them. Handles of the original do not reach the copy.
    pub fn fork(&self) -> SimStore {
        let copy = self.inner().clone();
        SimStore {
            root: self.root.clone(),
            inner: Arc::new(Mutex::new(copy)),
            process: self.process,
        }
    }

    /// Every file as it stands, by name.
    pub fn image(&self) -> BTreeMap<String, SimFileImage> {
        self.inner()
            .files
            .iter()
            .map(|(name, data)| {
                (
                    name.clone(),
                    SimFileImage {
                        current: data.current.clone(),
                        durable: data.durable.clone(),
                        entry_durable: data.entry_durable,
                    },
                )
            })
            .collect()
    }

    fn inner(&self) -> MutexGuard<'_, SimInner> {
        // A panic while holding this lock leaves plain data behind; the state is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Limits the total size of all files: creating past it fails with "disk full".
    pub fn set_capacity_bytes(&self, capacity: Option<u64>) {
        self.inner().capacity_bytes = capacity;
    }

    /// Arms a crash in the middle of I/O: the `n`-th write from now by this handle's process
    /// lands (unsynced) and then that process is dead, every later file operation of it failing
    /// with [`LsgError::Crashed`] until [`kill_process`](Self::kill_process) or
    /// [`power_loss`](Self::power_loss) is called.
    pub fn crash_after_writes(&self, n: u64) {
        self.inner().writes_until_death = Some((self.process, n.max(1)));
    }

    /// Simulates `kill -9` of this handle's process: its handles and locks die with it (a new
    /// incarnation of it starts with this handle and its clones), but every write it made stays
    /// in the (shared) page cache, visible to the next opener and still not durable: a later
    /// [`power_loss`](Self::power_loss) can lose it, unless someone syncs the file first. Other
    /// processes live on.
    pub fn kill_process(&self) {
        let mut inner = self.inner();
        inner.kill(self.process);
    }

    /// Simulates the loss of power (the process dies and the machine's volatile caches with it):
    /// each 512-byte sector written since the file's last sync independently survives (with its
    /// newest bytes) or not, seeded: kernel writeback may have written any dirty page before the
    /// power failed, in any order, and a disk may tear a write at any sector.
    pub fn power_loss(&self) {
        let mut inner = self.inner();
        for process in 0..inner.incarnations.len() {
            inner.kill(process);
        }
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
        let mut inner = self.inner();
        inner.failing_syncs.insert(name.to_string(), n);
        inner.crashing_syncs.remove(name);
    }

    /// Like [`fail_syncs`](Self::fail_syncs), and the process whose sync fails dies at once, as
    /// one killed before it could act on the error: whatever it would do about the failure
    /// (scrub the unwritten data, record it) never happens, and the failed data stays readable
    /// in the page cache though it will not reach the disk.
    pub fn fail_syncs_and_crash(&self, name: &str, n: u64) {
        let mut inner = self.inner();
        inner.failing_syncs.insert(name.to_string(), n);
        inner.crashing_syncs.insert(name.to_string());
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

impl SimInner {
    fn kill(&mut self, process: usize) {
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        if let Some(current) = self.incarnations.get_mut(process) {
            *current = incarnation;
        }
        self.locks.retain(|_, holder| *holder != process);
        self.dead.remove(&process);
        if self
            .writes_until_death
            .is_some_and(|(dying, _)| dying == process)
        {
            self.writes_until_death = None;
        }
    }

    fn incarnation(&self, process: usize) -> Option<u64> {
        self.incarnations.get(process).copied()
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
            process: self.process,
            incarnation: inner.incarnation(self.process).unwrap_or(u64::MAX),
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
            process: self.process,
            incarnation: inner.incarnation(self.process).unwrap_or(u64::MAX),
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
        if inner.locks.contains_key(name) {
            return Ok(None);
        }
        inner.locks.insert(name.to_string(), self.process);
        Ok(Some(SimLock {
            store: self.clone(),
            name: name.to_string(),
            incarnation: inner.incarnation(self.process).unwrap_or(u64::MAX),
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
        let process = self.store.process;
        if inner.incarnation(process) == Some(self.incarnation)
            && inner.locks.get(&self.name) == Some(&process)
        {
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
    process: usize,
    incarnation: u64,
}

impl SimFile {
    fn data<'a>(&self, inner: &'a mut SimInner) -> Result<&'a mut SimFileData> {
        if inner.incarnation(self.process) != Some(self.incarnation)
            || inner.dead.contains(&self.process)
        {
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
            Some((process, 1)) if process == self.process => {
                inner.writes_until_death = None;
                inner.dead.insert(process);
                Err(LsgError::Crashed)
            }
            Some((process, n)) if process == self.process => {
                inner.writes_until_death = Some((process, n - 1));
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn sync(&self) -> Result<()> {
        let mut inner = self.store.inner();
        if let Some(left) = inner.failing_syncs.get_mut(&self.name)
            && *left > 0
        {
            *left -= 1;
            self.data(&mut inner)?.unsynced.clear();
            if inner.crashing_syncs.contains(&self.name) {
                inner.dead.insert(self.process);
            }
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
