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

/// Volume names become directory names: keep them plain.
pub(crate) fn validate_name(name: &str) -> Result<()> {
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
        Self::open(store, lsg_id, config, name, Some(owner), next_lsn)
    }

    /// Opens a volume and rebuilds its index from its records. `audit_next_lsn` is the next LSN
    /// of the recovered audit trail: no change at or above it may survive (write-ahead rule).
    pub(crate) fn open(
        store: Arc<S>,
        lsg_id: LsgId,
        config: LsgConfig,
        name: &str,
        owner: Option<VolumeOwner<S>>,
        audit_next_lsn: Lsn,
    ) -> Result<Self> {
        validate_name(name)?;
        let writable = owner.is_some();
        let dir = format!("{VOLUMES_DIR}/{name}");
        let checkpoint_file = store.open(&format!("{dir}/{CHECKPOINT_NAME}"))?;
        let (checkpoint_sequence, body) = slots::read(&checkpoint_file, &CHECKPOINT_MAGIC)?;
        let [checkpoint_lsn, synced_segment, synced_offset, first_segment] =
            slots::u64s::<4>(&body, checkpoint_file.path())?;
        let synced = (synced_segment, synced_offset);
        let mut numbers = segment::list(&*store, &dir)?;
        // Segments below the first one are leftovers of a compaction that completed.
        let leftovers: Vec<u64> = numbers
            .iter()
            .copied()
            .filter(|&n| n < first_segment)
            .collect();
        numbers.retain(|&n| n >= first_segment);
        // From the first segment on, segments are numbered without a gap.
        let gap = (first_segment..)
            .zip(numbers.iter().copied().chain(std::iter::once(u64::MAX)))
            .find(|(want, have)| want != have)
            .map(|(want, _)| want);
        if let Some(want) = gap
            && (numbers.is_empty() || want - first_segment < numbers.len() as u64)
        {
            return Err(LsgError::Missing {
                path: store.root().join(segment::segment_name(&dir, want)),
                what: "data volume segment",
            });
        }
        if writable {
            for n in leftovers {
                store.remove(&segment::segment_name(&dir, n))?;
            }
        }
        let max_payload = config.max_volume_payload_bytes();
        let mut index = BTreeMap::new();
        let mut files = BTreeMap::new();
        let mut tail = None;
        let mut written_bytes = 0u64;
        let last_number = numbers[numbers.len() - 1];
        for &n in &numbers {
            let file = Arc::new(segment::open(
                &*store,
                &dir,
                SegmentKind::DataVolume,
                lsg_id,
                n,
            )?);
            files.insert(n, Arc::clone(&file));
            if tail.is_some() {
                // After the end everything is redone from the audit trail.
                continue;
            }
            let max_record = record::encoded_len(max_payload);
            let mut reader = store::ScanReader::new(&*file, max_record);
            let mut end = SEGMENT_HEADER_BYTES;
            let mut problem = None;
            let mut closed = false;
            while end < file.len_bytes() {
                match record::decode(reader.record_at(end, max_payload)?, max_payload) {
                    Decoded::Record(v) if v.record_type == RecordType::SegmentEnd => {
                        closed = true;
                        break;
                    }
                    Decoded::Record(v) if v.lsn >= audit_next_lsn => {
                        problem = Some(Corruption::LsnOutOfSequence {
                            expected: Lsn(audit_next_lsn.0.saturating_sub(1)),
                            found: v.lsn,
                        });
                        break;
                    }
                    Decoded::Record(v) => {
                        apply_to_index(&mut index, n, end, &v).map_err(|what| {
                            LsgError::Corrupt {
                                path: file.path().to_path_buf(),
                                offset: end,
                                what,
                            }
                        })?;
                        end += v.encoded_len() as u64;
                        written_bytes += v.encoded_len() as u64;
                    }
                    Decoded::Zero => break,
                    Decoded::Invalid(what) => {
                        problem = Some(what);
                        break;
                    }
                }
            }
            let marker = if closed { SEGMENT_END_BYTES as u64 } else { 0 };
            // Where writing stopped in this segment (the end marker counts as written).
            let written_end = reader.written_end(end + marker)?.max(end + marker);
            let written_after = written_end > end + marker;
            if problem.is_none() && written_after {
                problem = Some(Corruption::Malformed(if closed {
                    "data after the segment's end marker"
                } else {
                    "zeros where a record header should be, with data after them"
                }));
            }
            let corrupt = |what| LsgError::Corrupt {
                path: file.path().to_path_buf(),
                offset: end,
                what,
            };
            if n < synced.0 {
                // Every record of a segment before the checkpoint's is durable, and the segment
                // was closed with its end marker before the checkpoint was written.
                match problem {
                    Some(what) => return Err(corrupt(what)),
                    None if !closed => {
                        return Err(corrupt(Corruption::Malformed(
                            "volume segment before the checkpoint ends without its end marker",
                        )));
                    }
                    None => continue,
                }
            }
            if n == synced.0 && end < synced.1 {
                return Err(corrupt(problem.unwrap_or(Corruption::Truncated {
                    needed: synced.1 - SEGMENT_HEADER_BYTES,
                    available: end - SEGMENT_HEADER_BYTES,
                })));
            }
            // At or past the checkpoint position: the first thing amiss ends the volume.
            match problem {
                Some(what) => {
                    warn!(path = %file.path().display(), offset = end, %what,
                        "data volume: end after its checkpoint cut off; redo restores it");
                    tail = Some((n, end, false, written_end));
                }
                None if closed && n != last_number => {}
                None => tail = Some((n, end, closed, written_end)),
            }
        }
        // Every segment was closed and before the checkpoint's: the checkpoint's segment is gone.
        let Some((tail_segment, tail_offset, tail_closed, written_end)) = tail else {
            return Err(LsgError::Missing {
                path: store.root().join(segment::segment_name(&dir, synced.0)),
                what: "the data volume segment its checkpoint names",
            });
        };
        if writable {
            // Nothing after the end may ever be taken for a record: zero it, drop later files.
            let file = &files[&tail_segment];
            if !tail_closed && written_end > tail_offset {
                let zeros = vec![0u8; (written_end - tail_offset) as usize];
                file.write_at(tail_offset, &zeros)?;
                file.sync()?;
            }
            let later: Vec<u64> = files.range(tail_segment + 1..).map(|(&n, _)| n).collect();
            for n in later.into_iter().rev() {
                store.remove(&segment::segment_name(&dir, n))?;
                files.remove(&n);
            }
            // Records after the checkpoint position may be only in the page cache of an earlier
            // owner (killed, or closed without a flush); the next checkpoint vouches for them.
            for file in files.range(synced.0..).map(|(_, f)| f) {
                if let Err(e) = file.sync() {
                    let end = tail_offset
                        + if tail_closed {
                            SEGMENT_END_BYTES as u64
                        } else {
                            0
                        };
                    scrub_after(&files, synced, tail_segment, end);
                    return Err(e);
                }
            }
        }
        let live_keys = index
            .values()
            .filter(|e: &&Entry| e.value.is_some())
            .count();
        let live_bytes = index.values().map(|e| e.record_bytes as u64).sum();
        Ok(DataVolume {
            name: name.to_string(),
            dir,
            store,
            lsg_id,
            config,
            owner,
            inner: RwLock::new(Inner {
                index,
                live_keys,
                live_bytes,
                written_bytes,
                first_segment,
                files,
                tail_segment,
                tail_offset,
                tail_closed,
                failure: None,
                newest_lsn: Lsn(0),
                dirty: BTreeSet::new(),
                checkpoint_file,
                checkpoint_sequence,
                checkpoint_lsn: Lsn(checkpoint_lsn),
                checkpoint_position: synced,
                tail_name_unsure: writable && tail_offset == SEGMENT_HEADER_BYTES && !tail_closed,
            }),
        })
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
        let value_is_live = entry.value.is_some();
        inner.live_bytes += entry.record_bytes as u64;
        let replaced = inner.index.insert(key.to_vec(), entry);
        if let Some(old) = replaced {
            inner.live_bytes -= old.record_bytes as u64;
        }
        match (replaced.is_some_and(|e| e.value.is_some()), value_is_live) {
            (false, true) => inner.live_keys += 1,
            (true, false) => inner.live_keys -= 1,
            _ => {}
        }
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

    /// Reclaims the space of overwritten records: copies the newest record of every key to new
    /// segments, syncs them, records a checkpoint naming the first new segment, then deletes the
    /// old segments. Deletion markers at or below the checkpoint LSN are dropped (redo never
    /// replays anything older). A crash before the checkpoint leaves the old segments in charge
    /// (the copies after them are ordinary records after the checkpoint position); after it, the
    /// old segments are leftovers removed at the next open. The volume is locked meanwhile.
    pub fn compact(&self) -> Result<Compaction> {
        let owner = self.owner()?;
        let mut inner = self.write();
        check_not_failed(&inner)?;
        let bytes_before = inner.written_bytes;
        self.make_durable(owner, &mut inner)?;
        self.start_segment(&mut inner)?;
        let new_first = inner.tail_segment;
        let keep_markers_above = inner.checkpoint_lsn;
        // The index in use stays whole until the copies are checkpointed: a compaction that
        // fails half way leaves the volume as it was, plus copies that read the same.
        let entries: Vec<(Vec<u8>, Entry)> =
            inner.index.iter().map(|(k, e)| (k.clone(), *e)).collect();
        let mut copies = BTreeMap::new();
        let (mut dropped, mut copied_bytes, mut live_bytes) = (0, 0u64, 0u64);
        for (key, entry) in entries {
            let value = match entry.value {
                Some(loc) => Some(self.read_value(&inner, loc)?),
                None if entry.lsn <= keep_markers_above => {
                    dropped += 1;
                    continue;
                }
                None => None,
            };
            let copy = self.append_record(&mut inner, &key, value.as_deref(), entry.lsn)?;
            copied_bytes += copy.record_bytes as u64;
            live_bytes += copy.record_bytes as u64;
            copies.insert(key, copy);
        }
        self.make_durable(owner, &mut inner)?;
        let lsn = inner.checkpoint_lsn;
        self.write_checkpoint(&mut inner, lsn, new_first)?;
        inner.index = copies;
        inner.live_bytes = live_bytes;
        inner.written_bytes = copied_bytes;
        let old: Vec<u64> = inner.files.range(..new_first).map(|(&n, _)| n).collect();
        for n in &old {
            self.store.remove(&segment::segment_name(&self.dir, *n))?;
            inner.files.remove(n);
        }
        Ok(Compaction {
            bytes_before,
            bytes_after: copied_bytes,
            segments_removed: old.len(),
            deletion_markers_dropped: dropped,
        })
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

fn check_not_failed<F>(inner: &Inner<F>) -> Result<()> {
    match &inner.failure {
        Some(f) => Err(LsgError::Failed(f.clone())),
        None => Ok(()),
    }
}

/// Applies one record read back from a volume file to the index.
fn apply_to_index(
    index: &mut BTreeMap<Vec<u8>, Entry>,
    segment: u64,
    offset: u64,
    v: &record::RecordView<'_>,
) -> std::result::Result<(), Corruption> {
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
    index.insert(
        key.to_vec(),
        Entry {
            lsn: v.lsn,
            value,
            record_bytes: v.encoded_len() as u32,
        },
    );
    Ok(())
}
