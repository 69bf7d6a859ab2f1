//! The storage boundary: an LSG's files behind one small trait, with two implementations.
//!
//! [`FileStore`] is the real thing: files in a directory, `pwrite` + `fdatasync` for durable
//! writes (measured faster than map + `msync` on these machines, see `docs/storage-format.md`), and
//! read-only memory maps for reads. [`crate::SimStore`] (`sim_store.rs`) keeps files in memory and
//! models a process kill (unsynced writes stay visible to the next opener) and a power loss (what
//! was synced survives, and any sector of what was not may or may not). Later issues crash
//! storage inside deterministic whole-cluster simulations through it.
//!
//! Names are relative to the LSG's root, with `/` separating directories (`audit/…seg`).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::error::{LsgError, Result};

/// A directory of files: the LSG's stable storage.
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    type File: StoreFile;
    type Lock: Send + Sync + std::fmt::Debug + 'static;

    /// Where this store lives, for error messages.
    fn root(&self) -> &Path;
    /// Creates `name` durably (file and directory entry): `initial` at offset 0, zeros up to
    /// `size_bytes`. With `preallocate` the zeros are written, so later writes overwrite allocated
    /// blocks (no unwritten extents to convert on the durable path). Fails if `name` exists.
    fn create(
        &self,
        name: &str,
        initial: &[u8],
        size_bytes: u64,
        preallocate: bool,
    ) -> Result<Self::File>;
    fn open(&self, name: &str) -> Result<Self::File>;
    fn exists(&self, name: &str) -> Result<bool>;
    /// Names of the files directly inside directory `dir` ("" for the root), sorted.
    fn list(&self, dir: &str) -> Result<Vec<String>>;
    /// Removes `name` durably. Open handles (and maps) of it stay valid.
    fn remove(&self, name: &str) -> Result<()>;
    /// Creates directory `dir` and any missing parents, each entry durable in its parent.
    fn create_dir(&self, dir: &str) -> Result<()>;
    /// Makes the entries of directory `dir` durable: after a `create` that failed after its file
    /// got its name (the directory sync failed), the file exists but may vanish in a power loss
    /// until this succeeds.
    fn sync_dir(&self, dir: &str) -> Result<()>;
    /// Takes the exclusive ownership lock `name`, released when the guard drops or the process
    /// dies. Without `wait`, returns `None` if another owner holds it.
    fn lock(&self, name: &str, wait: bool) -> Result<Option<Self::Lock>>;
}

/// One fixed-size file of a [`Store`].
pub trait StoreFile: Send + Sync + std::fmt::Debug + 'static {
    fn path(&self) -> &Path;
    fn len_bytes(&self) -> u64;
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()>;
    /// Makes every completed write of this file durable.
    fn sync(&self) -> Result<()>;
    /// Copies bytes out (a system call on real files): safe against concurrent writers anywhere,
    /// and a media error is an [`LsgError::Unreadable`] naming the offset, not a signal.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Lends the bytes `offset..offset + len` without copying where the store can. Callers only ask
    /// for ranges that no one writes while they look (below the durable tail of an append-only file).
    /// On real files this is a memory map: a media error under it kills the process (SIGBUS), so
    /// recovery reads through [`read_checked`] instead.
    fn with_bytes<R>(&self, offset: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R>;
}

pub(crate) fn check_range(path: &Path, offset: u64, len: usize, file_len: u64) -> Result<()> {
    let end = offset.checked_add(len as u64);
    match end {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(LsgError::Corrupt {
            path: path.to_path_buf(),
            offset,
            what: crate::error::Corruption::Truncated {
                needed: len as u64,
                available: file_len.saturating_sub(offset),
            },
        }),
    }
}

/// Reads `len` bytes at `offset` with `read_at`, a chunk at a time so that a media error names
/// where it is: what recovery judges is read this way, never through a map.
pub(crate) fn read_checked<F: StoreFile>(file: &F, offset: u64, len: usize) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    read_checked_into(file, offset, &mut buf)?;
    Ok(buf)
}

fn read_checked_into<F: StoreFile>(file: &F, offset: u64, buf: &mut [u8]) -> Result<()> {
    const CHUNK_BYTES: usize = 1 << 20;
    for (i, chunk) in buf.chunks_mut(CHUNK_BYTES).enumerate() {
        file.read_at(offset + (i * CHUNK_BYTES) as u64, chunk)?;
    }
    Ok(())
}

/// Reads a file for recovery through one reused window with `pread` (see [`read_checked`]): a
/// segment is scanned without mapping it and without a buffer (and page faults) the size of it.
#[derive(Debug)]
pub(crate) struct ScanReader<'f, F> {
    file: &'f F,
    buf: Vec<u8>,
    /// File offset of `buf[0]`, and how many bytes of `buf` hold file data.
    base: u64,
    filled: usize,
}

impl<'f, F: StoreFile> ScanReader<'f, F> {
    /// A reader for records of at most `max_record_bytes`: its window holds a few of the largest.
    pub(crate) fn new(file: &'f F, max_record_bytes: usize) -> Self {
        Self::with_window(
            file,
            max_record_bytes,
            max_record_bytes.saturating_mul(4).max(SCAN_WINDOW_BYTES),
        )
    }

    /// A reader that reads `window_bytes` at a time (at least two of the largest records): a
    /// small window for a catch-up that expects a few new records, not megabytes of zeros.
    pub(crate) fn with_window(file: &'f F, max_record_bytes: usize, window_bytes: usize) -> Self {
        let window = max_record_bytes
            .saturating_mul(2)
            .max(window_bytes)
            .min(usize::try_from(file.len_bytes()).unwrap_or(usize::MAX));
        ScanReader {
            file,
            buf: vec![0u8; window],
            base: 0,
            filled: 0,
        }
    }

    /// The bytes of the record frame at `offset` (as far as its header's length says, within
    /// `max_payload_bytes`), for [`crate::record::decode`] to judge.
    pub(crate) fn record_at(&mut self, offset: u64, max_payload_bytes: usize) -> Result<&[u8]> {
        let header = self.bytes_at(offset, crate::record::RECORD_HEADER_BYTES)?;
        let want = match header.get(4..8) {
            Some(len) => {
                let payload = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
                crate::record::encoded_len(payload.min(max_payload_bytes))
            }
            None => crate::record::RECORD_HEADER_BYTES,
        };
        self.bytes_at(offset, want)
    }

    /// The file's bytes from `offset` on: at least `want` of them, or all up to the file's end.
    fn bytes_at(&mut self, offset: u64, want: usize) -> Result<&[u8]> {
        let file_end = self.file.len_bytes();
        let want_end = offset.saturating_add(want as u64).min(file_end);
        let held_end = self.base + self.filled as u64;
        if offset < self.base || want_end > held_end {
            let n = (file_end.saturating_sub(offset) as usize).min(self.buf.len());
            read_checked_into(self.file, offset, &mut self.buf[..n])?;
            self.base = offset;
            self.filled = n;
        }
        let from = (offset - self.base) as usize;
        Ok(&self.buf[from..self.filled])
    }

    /// Offset just past the last non-zero byte in `from..` of the file (`from` if all are
    /// zero), read backwards from the end a window at a time.
    pub(crate) fn written_end(&mut self, from: u64) -> Result<u64> {
        let mut hi = self.file.len_bytes();
        let chunk = self.buf.len().min(ZERO_SCAN_CHUNK_BYTES) as u64;
        while hi > from {
            let lo = hi.saturating_sub(chunk).max(from);
            let n = (hi - lo) as usize;
            read_checked_into(self.file, lo, &mut self.buf[..n])?;
            self.base = lo;
            self.filled = n;
            let written = crate::segment::written_len(&self.buf[..n]);
            if written > 0 {
                return Ok(lo + written as u64);
            }
            hi = lo;
        }
        Ok(from)
    }
}

/// The window of a whole-segment scan: few system calls per segment.
pub(crate) const SCAN_WINDOW_BYTES: usize = 4 << 20;
/// Zeros are checked in pieces that stay in the CPU cache: copying into a cold 4 MiB window ran
/// at half the speed here.
const ZERO_SCAN_CHUNK_BYTES: usize = 128 << 10;

/// Real files in a directory.
#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    maps: bool,
}

impl FileStore {
    /// A store that writes and serves reads from memory maps.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileStore {
            root: root.into(),
            maps: true,
        }
    }

    /// A store that opens files read-only and reads with `pread` only: for looking at an LSG
    /// another process may be writing, where a map could observe bytes mid-write.
    pub fn without_maps(root: impl Into<PathBuf>) -> Self {
        FileStore {
            root: root.into(),
            maps: false,
        }
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn open_path(&self, path: PathBuf, write: bool) -> Result<RealFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => LsgError::Missing {
                    path: path.clone(),
                    what: "file not found",
                },
                _ => LsgError::io("open", &path, e),
            })?;
        let len = file
            .metadata()
            .map_err(|e| LsgError::io("stat", &path, e))?
            .len();
        Ok(RealFile {
            file,
            path,
            len,
            map: OnceLock::new(),
            maps: self.maps,
        })
    }
}

impl Store for FileStore {
    type File = RealFile;
    type Lock = FileLock;

    fn root(&self) -> &Path {
        &self.root
    }

    fn create(
        &self,
        name: &str,
        initial: &[u8],
        size_bytes: u64,
        preallocate: bool,
    ) -> Result<RealFile> {
        let path = self.path_of(name);
        if path.exists() {
            return Err(LsgError::AlreadyExists { path });
        }
        let tmp = path.with_extension("tmp");
        let result = (|| {
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| LsgError::io("create", &tmp, e))?;
            f.write_all(initial)
                .map_err(|e| LsgError::io("write", &tmp, e))?;
            if preallocate {
                let zeros = vec![0u8; 1 << 20];
                let mut at = initial.len() as u64;
                while at < size_bytes {
                    let n = (size_bytes - at).min(zeros.len() as u64) as usize;
                    f.write_all(&zeros[..n])
                        .map_err(|e| LsgError::io("preallocate", &tmp, e))?;
                    at += n as u64;
                }
            } else {
                f.set_len(size_bytes)
                    .map_err(|e| LsgError::io("set length of", &tmp, e))?;
            }
            f.sync_all().map_err(|e| LsgError::io("fsync", &tmp, e))?;
            fs::rename(&tmp, &path).map_err(|e| LsgError::io("rename", &tmp, e))?;
            sync_dir_path(path.parent().unwrap_or(&self.root))
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.open_path(path, true)
    }

    fn open(&self, name: &str) -> Result<RealFile> {
        let path = self.path_of(name);
        if !self.maps {
            return self.open_path(path, false);
        }
        match self.open_path(path.clone(), true) {
            Err(LsgError::ReadOnly { .. }) => self.open_path(path, false),
            other => other,
        }
    }

    fn exists(&self, name: &str) -> Result<bool> {
        let path = self.path_of(name);
        path.try_exists().map_err(|e| LsgError::io("stat", path, e))
    }

    fn list(&self, dir: &str) -> Result<Vec<String>> {
        let path = self.path_of(dir);
        let entries = match fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(LsgError::io("list", &path, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| LsgError::io("list", &path, e))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn remove(&self, name: &str) -> Result<()> {
        let path = self.path_of(name);
        fs::remove_file(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LsgError::Missing {
                path: path.clone(),
                what: "file not found",
            },
            _ => LsgError::io("remove", &path, e),
        })?;
        sync_dir_path(path.parent().unwrap_or(&self.root))
    }

    fn create_dir(&self, dir: &str) -> Result<()> {
        create_dir_durably(&self.path_of(dir))
    }

    fn sync_dir(&self, dir: &str) -> Result<()> {
        sync_dir_path(&self.path_of(dir))
    }

    fn lock(&self, name: &str, wait: bool) -> Result<Option<FileLock>> {
        let path = self.path_of(name);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| LsgError::io("open lock file", &path, e))?;
        if wait {
            file.lock().map_err(|e| LsgError::io("lock", &path, e))?;
        } else {
            match file.try_lock() {
                Ok(()) => {}
                Err(fs::TryLockError::WouldBlock) => return Ok(None),
                Err(fs::TryLockError::Error(e)) => return Err(LsgError::io("lock", &path, e)),
            }
        }
        Ok(Some(FileLock { _file: file, path }))
    }
}

fn sync_dir_path(dir: &Path) -> Result<()> {
    let d = File::open(dir).map_err(|e| LsgError::io("open directory", dir, e))?;
    d.sync_all()
        .map_err(|e| LsgError::io("fsync directory", dir, e))
}

/// Creates `dir` and its missing ancestors, syncing the parent of each new one and of `dir`
/// itself even when it existed (an earlier attempt or the operator may have made it without a
/// sync), so that after a crash `dir` is there.
pub(crate) fn create_dir_durably(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut at = dir;
    while !at.try_exists().map_err(|e| LsgError::io("stat", at, e))? {
        missing.push(at);
        match at.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => at = parent,
            _ => break,
        }
    }
    let parent_of = |p: &Path| -> PathBuf {
        p.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf()
    };
    let mut to_sync = BTreeSet::new();
    for created in missing.into_iter().rev() {
        match fs::create_dir(created) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(LsgError::io("create directory", created, e)),
        }
        to_sync.insert(parent_of(created));
    }
    to_sync.insert(parent_of(dir));
    for parent in to_sync {
        sync_dir_path(&parent)?;
    }
    Ok(())
}

/// An exclusive `flock` on a file of the LSG; the kernel drops it when the process dies.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
    path: PathBuf,
}

impl FileLock {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A file of a [`FileStore`]. Writes go through `pwrite`; zero-copy reads through a read-only
/// shared map of the whole (fixed-size) file, made on first use.
#[derive(Debug)]
pub struct RealFile {
    file: File,
    path: PathBuf,
    len: u64,
    map: OnceLock<memmap2::Mmap>,
    maps: bool,
}

impl RealFile {
    #[allow(unsafe_code)]
    fn map(&self) -> Result<&memmap2::Mmap> {
        if let Some(m) = self.map.get() {
            return Ok(m);
        }
        // SAFETY: `Mmap::map` is unsafe because the mapped bytes may change underneath the
        // program. Duplex files are fixed-size and append-only: the owner process writes only
        // above the durable tail and callers of `with_bytes` only read below it, so no byte is
        // written while a slice over it is alive. Files are never shortened by Duplex while
        // mapped (removal unlinks; the mapping keeps the inode). If another process truncates a
        // mapped file anyway, touching the lost pages raises SIGBUS and this process dies; its
        // backup takes over and the bytes still on disk are unaffected (docs/storage-format.md).
        let map = unsafe { memmap2::MmapOptions::new().map(&self.file) }
            .map_err(|e| LsgError::io("mmap", &self.path, e))?;
        Ok(self.map.get_or_init(|| map))
    }
}

impl StoreFile for RealFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn len_bytes(&self) -> u64 {
        self.len
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(&self.path, offset, data.len(), self.len)?;
        self.file
            .write_all_at(data, offset)
            .map_err(|e| LsgError::io("write", &self.path, e))
    }

    fn sync(&self) -> Result<()> {
        // Never "disk full" (retriable): after a failed sync the page cache cannot be trusted.
        self.file.sync_data().map_err(|error| LsgError::Io {
            op: "fdatasync",
            path: self.path.clone(),
            error,
        })
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(&self.path, offset, buf.len(), self.len)?;
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| LsgError::Unreadable {
                path: self.path.clone(),
                offset,
                len: buf.len() as u64,
                error,
            })
    }

    fn with_bytes<R>(&self, offset: u64, len: usize, f: impl FnOnce(&[u8]) -> R) -> Result<R> {
        check_range(&self.path, offset, len, self.len)?;
        if !self.maps {
            let mut buf = vec![0u8; len];
            self.read_at(offset, &mut buf)?;
            return Ok(f(&buf));
        }
        let map = self.map()?;
        let start = offset as usize;
        Ok(f(&map[start..start + len]))
    }
}
