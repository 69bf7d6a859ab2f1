//! Data volumes: key → value records, each with the LSN (generation) of the change that last
//! wrote it, so redo is idempotent and a fuzzy copy can later be filtered by generation.
//!
//! A volume is a log-structured record store: every put or delete appends a record (the same
//! frame as the audit trail, `record.rs`) to the volume's segment files, and an ordered in-memory
//! index maps each key to its newest record. Values stay on disk and are read through the memory
//! maps, so the page cache holds the working set and the rest stays on disk; the index (keys plus
//! about 40 bytes each) must fit in memory. That is the decision for this version, written down in
//! `docs/storage-format.md`. [`DataVolume::compact`] reclaims the space of overwritten records by
//! copying the newest record of every key to new segments and dropping the old ones.
//!
//! Writes follow steal/no-force under the write-ahead rule: a change's audit record is appended
//! before the change ([`DataVolume::put`] refuses an LSN the trail has not given out), a volume
//! flush first makes the trail durable up to the newest change it holds, and at open every
//! record whose LSN the recovered trail does not hold (the page cache wrote the volume page, the
//! audit record was lost) ends the volume there. A flush records a checkpoint: the position up to
//! which the files are durable and the LSN below which every change is in them. Records before
//! that position must be valid at open (else corruption is reported); after it, the first
//! invalid record ends the volume, and redo from the audit trail restores the rest.
//!
//! A read-only volume is a view that can catch up with a live owner ([`DataVolume`]'s
//! `catch_up`, driven by `LogStorageGroup::catch_up`): records before the checkpoint never
//! change, so the view keeps the index entries each later record replaced and can rewind to
//! the checkpoint and read on. At takeover the view is adopted: rewound to its checkpoint and
//! read from there with the writer's rules (the write-ahead cut against the recovered trail),
//! which gives the index a fresh open would build, reading only what follows the checkpoint.

//!
//! Split by job: `open` (rebuilding the index, the write-ahead cut), `adopt` (a warm backup's
//! view and its hand-over), `compact`; this file holds the volume's state, reads and writes.

mod adopt;
mod compact;
mod open;

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tracing::warn;

use crate::audit::AuditHandle;
use crate::error::{Corruption, LsgError, Result};
use crate::manifest::Fence;
use crate::record::{self, Decoded, RecordFlags, RecordType};
use crate::segment::{self, SEGMENT_HEADER_BYTES, SegmentKind};
use crate::slots;
use crate::store::{self, Store, StoreFile};
use crate::{LsgConfig, LsgId, Lsn};

pub(crate) const VOLUMES_DIR: &str = "volumes";
const CHECKPOINT_NAME: &str = "CHECKPOINT";
const CHECKPOINT_MAGIC: [u8; 8] = *b"DPLXVCP1";
const KEY_LEN_BYTES: usize = 2;
/// Bytes of the end marker that closes a segment (a record with an empty payload).
const SEGMENT_END_BYTES: usize = record::RECORD_HEADER_BYTES;

/// A key's newest value and the LSN of the change that wrote it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub lsn: Lsn,
}

#[derive(Debug, Clone, Copy)]
struct Location {
    segment: u64,
    /// Offset of the value's first byte in the segment file.
    value_offset: u64,
    value_len: u32,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    lsn: Lsn,
    /// `None`: deleted (kept so that an older put replayed by redo stays deleted).
    value: Option<Location>,
    /// Bytes the entry's record takes in its segment.
    record_bytes: u32,
}

/// How much of a volume's files is still needed: to decide when to [`compact`](DataVolume::compact).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VolumeStats {
    pub live_keys: usize,
    /// Bytes of the newest record of every key (deletion markers included).
    pub live_bytes: u64,
    /// Bytes of all records in the volume's segments.
    pub written_bytes: u64,
    pub segments: usize,
}

/// What one compaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    pub bytes_before: u64,
    pub bytes_after: u64,
    pub segments_removed: usize,
    pub deletion_markers_dropped: usize,
}

/// How many records were read from a volume's files into its index since this handle was
/// opened (by the open, catch-ups and adoption): the cost a takeover pays for the volume.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VolumeScanStats {
    /// Records read from the files and applied to the index.
    pub records_scanned: u64,
    /// The bytes of those records.
    pub bytes_scanned: u64,
    /// Times the volume was read whole, from its first segment: at open, and when a catch-up or
    /// an adoption found that a compaction had replaced the segments it had read.
    pub full_scans: u64,
}

/// A volume checkpoint as stored in `CHECKPOINT`.
#[derive(Debug, Clone, Copy)]
struct Checkpoint {
    sequence: u64,
    lsn: Lsn,
    /// (segment, offset) up to which the files are durable.
    position: (u64, u64),
    first_segment: u64,
}

fn read_checkpoint<F: StoreFile>(file: &F) -> Result<Checkpoint> {
    let (sequence, body) = slots::read(file, &CHECKPOINT_MAGIC)?;
    let [lsn, segment, offset, first_segment] = slots::u64s::<4>(&body, file.path())?;
    Ok(Checkpoint {
        sequence,
        lsn: Lsn(lsn),
        position: (segment, offset),
        first_segment,
    })
}

/// What a read-only volume knows of how far its index can be trusted, so that
/// [`DataVolume::catch_up`] reads only what is new and adoption reuses the index.
///
/// Records before the checkpoint position are durable and never change (a compaction replaces
/// whole segments and names a new first one, which is noticed). Records after it can: a new
/// owner cuts those whose audit record it did not recover and writes others in their place, and
/// a failed sync scrubs them. So each record read past the checkpoint is kept with the index
/// entry it replaced, and the index can be rewound to `tentative_from` and read again from
/// there when the checkpoint moves, the owner changes, or a writer takes over.
#[derive(Debug)]
struct View {
    /// Records from here on were read while no checkpoint covered them.
    tentative_from: (u64, u64),
    /// One entry per record read at or after `tentative_from`, oldest first.
    undo: Vec<Undo>,
    /// The manifest's boot sequence when the view was last brought up to date: a new one means
    /// a new owner, who may have cut and rewritten what follows the checkpoint.
    boot_sequence: u64,
    /// What the view read after `tentative_from` may no longer be in the files (a catch-up or an
    /// adoption failed part way): read it again next time.
    stale: bool,
    /// Where the first tentative record is and its header (its checksum covers the record): if
    /// it changed, the records after the checkpoint were scrubbed after a failed sync (the
    /// owner stays the same, and a failed volume takes no checkpoint), so they are read again.
    first_tentative: Option<((u64, u64), [u8; record::RECORD_HEADER_BYTES])>,
}

/// What indexing one record replaced: `key`'s previous entry, if it had one.
#[derive(Debug)]
struct Undo {
    key: Vec<u8>,
    replaced: Option<Entry>,
}

/// How a scan of a volume's records judges what it finds: the rules of `DataVolume::open`.
#[derive(Debug, Clone, Copy)]
struct Rules {
    checkpoint: (u64, u64),
    /// The recovered trail's next LSN: a record at or above it ends the volume (write-ahead).
    audit_next_lsn: Lsn,
    max_payload: usize,
    /// Opening for writing: find where writing stopped after the end, to zero it, and say so
    /// when an end after the checkpoint is cut.
    writer: bool,
    /// The read window of the scan: large for whole scans, small for a catch-up of a few records.
    window_bytes: usize,
}

/// Where a scan found the end of a volume's records.
#[derive(Debug, Clone)]
struct Tail {
    segment: u64,
    offset: u64,
    /// The segment ends in its end marker at `offset`.
    closed: bool,
    /// Just past the last non-zero byte of the segment (only looked for where needed, else
    /// `offset`).
    written_end: u64,
    /// The segments before the tail's that the scan read at or past the checkpoint position,
    /// each with the offset just past its end marker.
    closed_after_checkpoint: Vec<(u64, u64)>,
}

/// A catch-up reads a few records at a time: no need for the whole-scan window of megabytes.
const CATCH_UP_WINDOW_BYTES: usize = 256 << 10;

/// What a read-only volume answers once adoption handed its index to the owner's volume.
const HANDED_OVER: &str = "this read-only volume handle was handed over to the owner by adopt_for_write; use the adopted LSG's volume";

/// The first step of adopting a read-only volume, done: what the second step hands over.
#[derive(Debug)]
pub(crate) struct Adopting<F> {
    checkpoint_file: F,
    checkpoint: Checkpoint,
}

#[derive(Debug)]
struct Inner<F> {
    index: BTreeMap<Vec<u8>, Entry>,
    live_keys: usize,
    live_bytes: u64,
    written_bytes: u64,
    /// The oldest segment in use; compaction raises it.
    first_segment: u64,
    files: BTreeMap<u64, Arc<F>>,
    tail_segment: u64,
    tail_offset: u64,
    /// The tail segment ends in its end marker: the next record goes to a new segment.
    tail_closed: bool,
    /// A sync failed: what was written may not be on disk, so nothing more is accepted.
    failure: Option<String>,
    /// The highest LSN written since the last flush (the trail must be durable up to it first).
    newest_lsn: Lsn,
    dirty: BTreeSet<u64>,
    checkpoint_file: F,
    checkpoint_sequence: u64,
    checkpoint_lsn: Lsn,
    /// (segment, offset) up to which the last checkpoint vouches the files are durable.
    checkpoint_position: (u64, u64),
    /// The tail segment was found at open without records: an owner that died between naming
    /// it and syncing the directory leaves a name that may not be durable, so the directory is
    /// synced before a checkpoint can name it.
    tail_name_unsure: bool,
    /// Read-only volumes: how far the index can be trusted (see [`View`]); `None` for owners.
    view: Option<View>,
    scan_stats: VolumeScanStats,
}

impl<F> Inner<F> {
    fn new(checkpoint_file: F, checkpoint: Checkpoint, view: Option<View>) -> Self {
        Inner {
            index: BTreeMap::new(),
            live_keys: 0,
            live_bytes: 0,
            written_bytes: 0,
            first_segment: checkpoint.first_segment,
            files: BTreeMap::new(),
            tail_segment: checkpoint.first_segment,
            tail_offset: SEGMENT_HEADER_BYTES,
            tail_closed: false,
            failure: None,
            newest_lsn: Lsn(0),
            dirty: BTreeSet::new(),
            checkpoint_file,
            checkpoint_sequence: checkpoint.sequence,
            checkpoint_lsn: checkpoint.lsn,
            checkpoint_position: checkpoint.position,
            tail_name_unsure: false,
            view,
            scan_stats: VolumeScanStats::default(),
        }
    }

    /// Puts `entry` in the index for `key`, keeping the counters; returns the entry it replaced.
    fn index_insert(&mut self, key: Vec<u8>, entry: Entry) -> Option<Entry> {
        let replaced = self.index.insert(key, entry);
        self.live_bytes += u64::from(entry.record_bytes);
        if let Some(old) = replaced {
            self.live_bytes -= u64::from(old.record_bytes);
        }
        match (
            replaced.is_some_and(|e| e.value.is_some()),
            entry.value.is_some(),
        ) {
            (false, true) => self.live_keys += 1,
            (true, false) => self.live_keys -= 1,
            _ => {}
        }
        replaced
    }

    /// Applies one record read from the files at (`segment`, `offset`) to the index. In a
    /// read-only view a record the checkpoint does not cover is kept undoable.
    fn index_record(
        &mut self,
        segment: u64,
        offset: u64,
        v: &record::RecordView<'_>,
        header: [u8; record::RECORD_HEADER_BYTES],
        checkpoint: (u64, u64),
    ) -> std::result::Result<(), Corruption> {
        let (key, entry) = entry_of(segment, offset, v)?;
        let len = v.encoded_len() as u64;
        self.written_bytes += len;
        self.scan_stats.records_scanned += 1;
        self.scan_stats.bytes_scanned += len;
        let tentative = (segment, offset) >= checkpoint;
        match self.view.is_some() && tentative {
            true => {
                let replaced = self.index_insert(key.clone(), entry);
                if let Some(view) = self.view.as_mut() {
                    if view.undo.is_empty() {
                        view.first_tentative = Some(((segment, offset), header));
                    }
                    view.undo.push(Undo { key, replaced });
                }
            }
            false => {
                self.index_insert(key, entry);
                if let Some(view) = self.view.as_mut() {
                    debug_assert!(
                        view.undo.is_empty(),
                        "a durable record after a tentative one"
                    );
                    view.tentative_from = (segment, offset + len);
                }
            }
        }
        Ok(())
    }

    /// Takes back every record a read-only view read past its `tentative_from`, newest first,
    /// and returns that position: the index is as it was when the view had read up to there.
    fn rewind(&mut self) -> (u64, u64) {
        let Some(view) = self.view.as_mut() else {
            return self.checkpoint_position;
        };
        let undo = std::mem::take(&mut view.undo);
        view.first_tentative = None;
        let from = view.tentative_from;
        for Undo { key, replaced } in undo.into_iter().rev() {
            let undone = match replaced {
                Some(previous) => self.index.insert(key, previous),
                None => self.index.remove(&key),
            };
            if let Some(e) = undone {
                self.live_bytes -= u64::from(e.record_bytes);
                self.written_bytes -= u64::from(e.record_bytes);
                if e.value.is_some() {
                    self.live_keys -= 1;
                }
            }
            if let Some(previous) = replaced {
                self.live_bytes += u64::from(previous.record_bytes);
                if previous.value.is_some() {
                    self.live_keys += 1;
                }
            }
        }
        from
    }

    /// Takes the end a scan found, under the checkpoint it was judged by.
    fn take_tail(&mut self, tail: &Tail, checkpoint: &Checkpoint, writer: bool) {
        self.tail_segment = tail.segment;
        self.tail_offset = tail.offset;
        self.tail_closed = tail.closed;
        self.tail_name_unsure = writer && tail.offset == SEGMENT_HEADER_BYTES && !tail.closed;
        self.checkpoint_sequence = checkpoint.sequence;
        self.checkpoint_lsn = checkpoint.lsn;
        self.checkpoint_position = checkpoint.position;
        self.first_segment = checkpoint.first_segment;
        if let Some(view) = self.view.as_mut() {
            // The scan passed the checkpoint: everything before it was read as durable.
            view.tentative_from = checkpoint.position;
        }
    }
}

/// What a volume of an owned LSG writes under: the owner's fence and the trail it logs to.
#[derive(Debug)]
pub(crate) struct VolumeOwner<S: Store> {
    pub(crate) fence: Arc<Fence<S::File>>,
    pub(crate) audit: AuditHandle<S>,
}

impl<S: Store> Clone for VolumeOwner<S> {
    fn clone(&self) -> Self {
        VolumeOwner {
            fence: Arc::clone(&self.fence),
            audit: self.audit.clone(),
        }
    }
}

/// One data volume of an LSG.
#[derive(Debug)]
pub struct DataVolume<S: Store> {
    name: String,
    dir: String,
    store: Arc<S>,
    lsg_id: LsgId,
    config: LsgConfig,
    /// `None` when the LSG is open read-only.
    owner: Option<VolumeOwner<S>>,
    inner: RwLock<Inner<S::File>>,
}

/// Whether volume `name` was fully created (its checkpoint file exists).
pub(crate) fn is_complete<S: Store>(store: &S, name: &str) -> Result<bool> {
    store.exists(&format!("{VOLUMES_DIR}/{name}/{CHECKPOINT_NAME}"))
}

/// Volume names become directory names: keep them plain. Public so a cluster configuration
/// refuses at load time the names the storage layer would refuse at creation.
pub fn validate_name(name: &str) -> Result<()> {
    let why = if name.is_empty() || name.len() > 64 {
        Some("must be 1 to 64 characters")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Some("may hold only ASCII letters, digits, '-' and '_'")
    } else {
        None
    };
    match why {
        Some(why) => Err(LsgError::InvalidName {
            name: name.to_string(),
            why,
        }),
        None => Ok(()),
    }
}

impl<S: Store> DataVolume<S> {
    pub(crate) fn create(
        store: Arc<S>,
        lsg_id: LsgId,
        config: LsgConfig,
        name: &str,
        owner: VolumeOwner<S>,
    ) -> Result<Self> {
        validate_name(name)?;
        owner.fence.check()?;
        let dir = format!("{VOLUMES_DIR}/{name}");
        if store.exists(&format!("{dir}/{CHECKPOINT_NAME}"))? {
            return Err(LsgError::AlreadyExists {
                path: store.root().join(&dir),
            });
        }
        store.create_dir(&dir)?;
        // Leftovers of a creation that crashed before its checkpoint file existed.
        for n in segment::list(&*store, &dir)? {
            store.remove(&segment::segment_name(&dir, n))?;
        }
        segment::create(
            &*store,
            &dir,
            SegmentKind::DataVolume,
            lsg_id,
            1,
            config.volume_segment_bytes,
            false,
        )?;
        slots::create(
            &*store,
            &format!("{dir}/{CHECKPOINT_NAME}"),
            &CHECKPOINT_MAGIC,
            &slots::body_of(&[0, 1, SEGMENT_HEADER_BYTES, 1]),
        )?;
        let next_lsn = owner.audit.next_lsn();
        Self::open(store, lsg_id, config, name, Some(owner), next_lsn, 0)
    }

    /// How many records were read from the files into the index since this handle was opened.
    pub fn scan_stats(&self) -> VolumeScanStats {
        self.read().scan_stats
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner<S::File>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner<S::File>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_key(&self, key: &[u8]) -> Result<()> {
        let limit = self.config.max_key_bytes;
        if key.len() > limit {
            return Err(LsgError::KeyTooLarge {
                length: key.len(),
                limit,
            });
        }
        Ok(())
    }

    fn owner(&self) -> Result<&VolumeOwner<S>> {
        self.owner.as_ref().ok_or_else(|| LsgError::ReadOnly {
            op: "write to volume",
            path: self.store.root().join(&self.dir),
        })
    }

    /// A change must come after its audit record: refuse LSNs the trail has not given out.
    fn check_logged(&self, lsn: Lsn) -> Result<()> {
        let owner = self.owner()?;
        owner.fence.check_not_fenced()?;
        let next = owner.audit.next_lsn();
        if lsn >= next || lsn == Lsn(0) {
            return Err(LsgError::LsnNotAppended { lsn, next });
        }
        Ok(())
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        let limit = self.config.max_value_bytes;
        if value.len() > limit {
            return Err(LsgError::ValueTooLarge {
                length: value.len(),
                limit,
            });
        }
        Ok(())
    }

    /// Writes `key` = `value` as the change with LSN `lsn`. Returns `false` and changes nothing
    /// if the volume already holds a change to `key` at `lsn` or later (redo is idempotent).
    pub fn put(&self, key: &[u8], value: &[u8], lsn: Lsn) -> Result<bool> {
        self.check_logged(lsn)?;
        self.check_key(key)?;
        self.check_value(value)?;
        self.write_record(key, Some(value), lsn)
    }

    /// Deletes `key` as the change with LSN `lsn`; idempotent like [`put`](Self::put).
    pub fn delete(&self, key: &[u8], lsn: Lsn) -> Result<bool> {
        self.check_logged(lsn)?;
        self.check_key(key)?;
        self.write_record(key, None, lsn)
    }

    /// Applies a batch of changes, each `(key, Some(value))` a put and `(key, None)` a delete at
    /// its LSN, under one write lock: redo of many changes without a lock round trip each.
    /// Idempotent like [`put`](Self::put): a change at or below its key's generation (including
    /// one earlier in the same batch) is skipped. Returns how many were applied.
    ///
    /// Every change is checked first (key and value limits, the LSN given out by the trail,
    /// the fence), so a batch with one bad change writes nothing; a write failing part way
    /// leaves the changes before it applied, and the batch can simply be redone.
    pub fn apply_redo<K, V>(
        &self,
        changes: impl IntoIterator<Item = (K, Option<V>, Lsn)>,
    ) -> Result<usize>
    where
        K: AsRef<[u8]>,
        V: AsRef<[u8]>,
    {
        let changes: Vec<(K, Option<V>, Lsn)> = changes.into_iter().collect();
        for (key, value, lsn) in &changes {
            self.check_logged(*lsn)?;
            self.check_key(key.as_ref())?;
            if let Some(value) = value {
                self.check_value(value.as_ref())?;
            }
        }
        let mut inner = self.write();
        let mut applied = 0;
        for (key, value, lsn) in &changes {
            let value = value.as_ref().map(AsRef::as_ref);
            if self.apply_locked(&mut inner, key.as_ref(), value, *lsn)? {
                applied += 1;
            }
        }
        Ok(applied)
    }

    fn write_record(&self, key: &[u8], value: Option<&[u8]>, lsn: Lsn) -> Result<bool> {
        let mut inner = self.write();
        self.apply_locked(&mut inner, key, value, lsn)
    }

    /// Writes one change under the volume's write lock, unless the key's generation is at or
    /// above `lsn`; returns whether it was written.
    fn apply_locked(
        &self,
        inner: &mut Inner<S::File>,
        key: &[u8],
        value: Option<&[u8]>,
        lsn: Lsn,
    ) -> Result<bool> {
        check_not_failed(inner)?;
        if inner.index.get(key).is_some_and(|e| e.lsn >= lsn) {
            return Ok(false);
        }
        let entry = self.append_record(inner, key, value, lsn)?;
        inner.index_insert(key.to_vec(), entry);
        Ok(true)
    }

    /// Appends the record of `key` at `lsn` to the tail (rolling to a new segment when full) and
    /// returns its index entry.
    fn append_record(
        &self,
        inner: &mut Inner<S::File>,
        key: &[u8],
        value: Option<&[u8]>,
        lsn: Lsn,
    ) -> Result<Entry> {
        let mut payload =
            Vec::with_capacity(KEY_LEN_BYTES + key.len() + value.map_or(0, <[u8]>::len));
        payload.extend_from_slice(&(key.len() as u16).to_le_bytes());
        payload.extend_from_slice(key);
        let record_type = match value {
            Some(v) => {
                payload.extend_from_slice(v);
                RecordType::VolumePut
            }
            None => RecordType::VolumeDelete,
        };
        let mut buf = Vec::with_capacity(record::encoded_len(payload.len()));
        record::encode_into(&mut buf, lsn, record_type, RecordFlags::NONE, &payload);
        let capacity = inner
            .files
            .get(&inner.tail_segment)
            .map_or(self.config.volume_segment_bytes, |f| f.len_bytes());
        if inner.tail_closed
            || inner.tail_offset + (buf.len() + SEGMENT_END_BYTES) as u64 > capacity
        {
            self.start_segment(inner)?;
        }
        let (segment, offset) = (inner.tail_segment, inner.tail_offset);
        let file = inner
            .files
            .get(&segment)
            .cloned()
            .ok_or_else(|| LsgError::Missing {
                path: self
                    .store
                    .root()
                    .join(segment::segment_name(&self.dir, segment)),
                what: "volume tail segment",
            })?;
        file.write_at(offset, &buf)?;
        inner.tail_offset += buf.len() as u64;
        inner.written_bytes += buf.len() as u64;
        inner.newest_lsn = inner.newest_lsn.max(lsn);
        inner.dirty.insert(segment);
        Ok(Entry {
            lsn,
            value: value.map(|v| Location {
                segment,
                value_offset: offset
                    + (record::RECORD_HEADER_BYTES + KEY_LEN_BYTES + key.len()) as u64,
                value_len: v.len() as u32,
            }),
            record_bytes: buf.len() as u32,
        })
    }

    /// Closes the tail segment with its end marker, creates the next segment and makes it the
    /// tail.
    fn start_segment(&self, inner: &mut Inner<S::File>) -> Result<()> {
        self.owner()?.fence.check()?;
        if !inner.tail_closed {
            let mut marker = Vec::with_capacity(SEGMENT_END_BYTES);
            record::encode_into(
                &mut marker,
                Lsn(0),
                RecordType::SegmentEnd,
                RecordFlags::NONE,
                &[],
            );
            let tail = inner.tail_segment;
            let file = inner
                .files
                .get(&tail)
                .cloned()
                .ok_or_else(|| LsgError::Missing {
                    path: self
                        .store
                        .root()
                        .join(segment::segment_name(&self.dir, tail)),
                    what: "volume tail segment",
                })?;
            file.write_at(inner.tail_offset, &marker)?;
            inner.dirty.insert(tail);
            inner.tail_closed = true;
        }
        let next = inner.tail_segment + 1;
        let created = segment::create(
            &*self.store,
            &self.dir,
            SegmentKind::DataVolume,
            self.lsg_id,
            next,
            self.config.volume_segment_bytes,
            false,
        );
        let file = match created {
            // An earlier attempt named it but its directory sync failed: make the name durable
            // before records go in. (Segments after the tail are removed at open.)
            Err(LsgError::AlreadyExists { .. }) => {
                self.store.sync_dir(&self.dir)?;
                segment::open(
                    &*self.store,
                    &self.dir,
                    SegmentKind::DataVolume,
                    self.lsg_id,
                    next,
                )?
            }
            other => other?,
        };
        inner.files.insert(next, Arc::new(file));
        inner.tail_segment = next;
        inner.tail_offset = SEGMENT_HEADER_BYTES;
        inner.tail_closed = false;
        Ok(())
    }

    /// The value of `key` and the LSN that wrote it, or `None` if absent or deleted.
    pub fn get(&self, key: &[u8]) -> Result<Option<VolumeRecord>> {
        self.check_key(key)?;
        let inner = self.read();
        // After a failed sync the records after the checkpoint were scrubbed.
        check_not_failed(&inner)?;
        let Some(entry) = inner.index.get(key) else {
            return Ok(None);
        };
        let Some(loc) = entry.value else {
            return Ok(None);
        };
        let value = self.read_value(&inner, loc)?;
        Ok(Some(VolumeRecord {
            key: key.to_vec(),
            value,
            lsn: entry.lsn,
        }))
    }

    /// The generation of `key`: the LSN of the last change to it, deletes included.
    pub fn generation(&self, key: &[u8]) -> Option<Lsn> {
        self.read().index.get(key).map(|e| e.lsn)
    }

    fn read_value(&self, inner: &Inner<S::File>, loc: Location) -> Result<Vec<u8>> {
        let file = inner
            .files
            .get(&loc.segment)
            .ok_or_else(|| LsgError::Missing {
                path: self
                    .store
                    .root()
                    .join(segment::segment_name(&self.dir, loc.segment)),
                what: "volume segment of an indexed record",
            })?;
        file.with_bytes(loc.value_offset, loc.value_len as usize, <[u8]>::to_vec)
    }

    /// Up to `limit` live records with keys in `range`, in key order. Callers page through a
    /// large range by starting the next call after the last key returned.
    pub fn scan(
        &self,
        range: (Bound<&[u8]>, Bound<&[u8]>),
        limit: usize,
    ) -> Result<Vec<VolumeRecord>> {
        let inner = self.read();
        check_not_failed(&inner)?;
        let mut out = Vec::new();
        // `BTreeMap::range` panics on an inverted or empty-exclusive range; such a range (which
        // a client may send) holds no key.
        let empty = match range {
            (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
            (Bound::Included(s), Bound::Included(e)) => s > e,
            (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e))
            | (Bound::Excluded(s), Bound::Included(e)) => s >= e,
        };
        if empty {
            return Ok(out);
        }
        for (key, entry) in inner.index.range::<[u8], _>(range) {
            if out.len() >= limit {
                break;
            }
            if let Some(loc) = entry.value {
                out.push(VolumeRecord {
                    key: key.clone(),
                    value: self.read_value(&inner, loc)?,
                    lsn: entry.lsn,
                });
            }
        }
        Ok(out)
    }

    /// Like [`scan`](Self::scan) for any `RangeBounds` over byte strings.
    pub fn scan_range<'k>(
        &self,
        range: impl RangeBounds<&'k [u8]>,
        limit: usize,
    ) -> Result<Vec<VolumeRecord>> {
        let start = range.start_bound().map(|k| *k);
        let end = range.end_bound().map(|k| *k);
        self.scan((start, end), limit)
    }

    /// Live keys in the volume.
    pub fn len(&self) -> usize {
        self.read().live_keys
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The LSN recorded by the last flush: every change at or below it is in the volume's files.
    pub fn checkpoint_lsn(&self) -> Lsn {
        self.read().checkpoint_lsn
    }

    /// Makes every record written so far durable and records `checkpoint_lsn`: the caller
    /// vouches that every change with an LSN at or below it has been applied to this volume.
    pub fn flush(&self, checkpoint_lsn: Lsn) -> Result<()> {
        let owner = self.owner()?;
        let mut inner = self.write();
        check_not_failed(&inner)?;
        self.make_durable(owner, &mut inner)?;
        let lsn = checkpoint_lsn.max(inner.checkpoint_lsn);
        let first = inner.first_segment;
        self.write_checkpoint(&mut inner, lsn, first)
    }

    /// Syncs what was written since the last flush, after the trail is durable up to it
    /// (write-ahead: no change reaches the volume's durable part before its audit record).
    fn make_durable(&self, owner: &VolumeOwner<S>, inner: &mut Inner<S::File>) -> Result<()> {
        if inner.newest_lsn > Lsn(0) {
            owner.audit.wait_durable(inner.newest_lsn)?;
        }
        owner.fence.check()?;
        if inner.tail_name_unsure {
            self.store.sync_dir(&self.dir)?;
            inner.tail_name_unsure = false;
        }
        let dirty: Vec<u64> = inner.dirty.iter().copied().collect();
        for n in dirty {
            if let Some(file) = inner.files.get(&n)
                && let Err(e) = file.sync()
            {
                // After a failed sync the page cache cannot be trusted: stop for good, and leave
                // no record after the checkpoint for a next owner to take as written.
                inner.failure = Some(e.to_string());
                let end = inner.tail_offset
                    + if inner.tail_closed {
                        SEGMENT_END_BYTES as u64
                    } else {
                        0
                    };
                scrub_after(
                    &inner.files,
                    inner.checkpoint_position,
                    inner.tail_segment,
                    end,
                );
                return Err(e);
            }
            inner.dirty.remove(&n);
        }
        Ok(())
    }

    fn write_checkpoint(&self, inner: &mut Inner<S::File>, lsn: Lsn, first: u64) -> Result<()> {
        let body = slots::body_of(&[lsn.0, inner.tail_segment, inner.tail_offset, first]);
        let next = slots::write(
            &inner.checkpoint_file,
            &CHECKPOINT_MAGIC,
            inner.checkpoint_sequence,
            &body,
        )
        .inspect_err(|e| {
            inner.failure = Some(e.to_string());
            slots::scrub_failed_write(&inner.checkpoint_file, inner.checkpoint_sequence);
        })?;
        inner.checkpoint_sequence = next;
        inner.checkpoint_lsn = lsn;
        inner.checkpoint_position = (inner.tail_segment, inner.tail_offset);
        inner.first_segment = first;
        inner.newest_lsn = Lsn(0);
        Ok(())
    }

    pub fn stats(&self) -> VolumeStats {
        let inner = self.read();
        VolumeStats {
            live_keys: inner.live_keys,
            live_bytes: inner.live_bytes,
            written_bytes: inner.written_bytes,
            segments: inner.files.len(),
        }
    }
}

/// Overwrites every record after the checkpoint `position` up to `tail_end` in `tail_segment`
/// with zeros, best effort, after a sync failed. Their pages may stay readable though they never
/// reached the disk (Linux marks a page whose writeback failed clean); a next owner on this host
/// must end the volume at the checkpoint and redo the rest from the audit trail, not vouch for
/// them in its own checkpoint. Nothing after the checkpoint position is needed: redo restores it.
fn scrub_after<F: StoreFile>(
    files: &BTreeMap<u64, Arc<F>>,
    position: (u64, u64),
    tail_segment: u64,
    tail_end: u64,
) {
    for (&n, file) in files.range(position.0..=tail_segment) {
        let from = if n == position.0 {
            position.1
        } else {
            SEGMENT_HEADER_BYTES
        };
        let to = if n == tail_segment {
            tail_end.min(file.len_bytes())
        } else {
            file.len_bytes()
        };
        if to > from {
            let zeros = vec![0u8; (to - from) as usize];
            if let Err(e) = file.write_at(from, &zeros) {
                warn!(path = %file.path().display(), offset = from, error = %e,
                    "data volume: could not scrub records after a failed sync");
            }
        }
    }
}

/// Writes the bytes `from..to` of `file` again, as they are, a window at a time: so that pages a
/// failed writeback left clean but not on disk are dirty again and the next sync writes them.
fn rewrite<F: StoreFile>(file: &F, from: u64, to: u64) -> Result<()> {
    const WINDOW_BYTES: u64 = 1 << 20;
    let mut at = from;
    while at < to {
        let len = (to - at).min(WINDOW_BYTES);
        let bytes = store::read_checked(file, at, len as usize)?;
        file.write_at(at, &bytes)?;
        at += len;
    }
    Ok(())
}

/// Whether the files still hold a record with `header` at `at` (a read that fails says no: the
/// records are read again, and the scan reports what is wrong).
fn holds<F: StoreFile>(
    inner: &Inner<F>,
    at: (u64, u64),
    header: &[u8; record::RECORD_HEADER_BYTES],
) -> bool {
    let mut now = [0u8; record::RECORD_HEADER_BYTES];
    inner
        .files
        .get(&at.0)
        .is_some_and(|file| file.read_at(at.1, &mut now).is_ok() && now == *header)
}

fn check_not_failed<F>(inner: &Inner<F>) -> Result<()> {
    match &inner.failure {
        Some(f) => Err(LsgError::Failed(f.clone())),
        None => Ok(()),
    }
}

/// The index entry of one record read back from a volume file, and its key.
fn entry_of(
    segment: u64,
    offset: u64,
    v: &record::RecordView<'_>,
) -> std::result::Result<(Vec<u8>, Entry), Corruption> {
    let p = v.payload;
    if p.len() < KEY_LEN_BYTES {
        return Err(Corruption::Malformed("volume record without a key length"));
    }
    let key_len = u16::from_le_bytes([p[0], p[1]]) as usize;
    let Some(key) = p.get(KEY_LEN_BYTES..KEY_LEN_BYTES + key_len) else {
        return Err(Corruption::Malformed(
            "volume record key longer than its payload",
        ));
    };
    let value = match v.record_type {
        RecordType::VolumePut => Some(Location {
            segment,
            value_offset: offset + (record::RECORD_HEADER_BYTES + KEY_LEN_BYTES + key_len) as u64,
            value_len: (p.len() - KEY_LEN_BYTES - key_len) as u32,
        }),
        RecordType::VolumeDelete => None,
        _ => return Err(Corruption::UnknownRecordType(v.record_type as u8)),
    };
    Ok((
        key.to_vec(),
        Entry {
            lsn: v.lsn,
            value,
            record_bytes: v.encoded_len() as u32,
        },
    ))
}
