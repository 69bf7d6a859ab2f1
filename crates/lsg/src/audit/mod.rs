//! The audit trail: the write-ahead log of an LSG.
//!
//! Appenders encode their record into an in-memory batch under one short lock and get its LSN.
//! Durability is by **group flush** with a leader: a caller of [`AuditTrail::wait_durable`] that
//! finds no flush running takes the whole batch, writes it with `pwrite`, syncs it, and wakes
//! everyone it made durable; callers that arrive meanwhile wait for that flush or lead the next.
//! No thread hop sits on the path of a lone committer (each hop costs tens of microseconds on
//! these machines), and one sync serves every record written before it.
//!
//! Segments are preallocated (zero-filled) by a background thread one ahead of need, unless the
//! LSG was opened without it ([`crate::LsgOptions`]): then the flusher creates a segment inline
//! when a batch first needs it, and no write depends on thread timing. A batch that
//! spans two segments syncs the older one before writing the newer, so data found in a later
//! segment proves the earlier one whole. That, and batches bounded by `max_batch_bytes`, is what
//! lets recovery tell a torn tail (cut off) from corruption inside durable data (reported): see
//! [`AuditTrail::open`] and `docs/storage-format.md`.

//!
//! Split by job: `flush` (the group flush and segment files), `reader` (reading records
//! back), `scan` (the recovery scan at open); this file holds the trail's state and API.

mod flush;
mod reader;
mod scan;

pub use reader::AuditReader;
use reader::{Slot, read_record, zeros_inside};
use scan::{scan_tail, zero_range};

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use tracing::{debug, warn};

use crate::error::{Corruption, LsgError, Result};
use crate::manifest::{Fence, Manifest};
use crate::record::{self, Decoded, RecordFlags, RecordType, RecordView};
use crate::segment::{self, SEGMENT_HEADER_BYTES, SegmentKind};
use crate::store::{self, Store, StoreFile};
use crate::{LsgConfig, LsgId, Lsn};

pub(crate) const AUDIT_DIR: &str = "audit";

/// The page size the rewrite of the tail at open is aligned to.
const PAGE_BYTES: u64 = 4096;

/// A catch-up reads a few records at a time: no need for the whole-scan window of megabytes.
const CATCH_UP_WINDOW_BYTES: usize = 256 << 10;

/// Flushed chunk buffers kept for reuse (each at most one torn window).
const MAX_SPARE_BUFFERS: usize = 4;

/// One record read from the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub lsn: Lsn,
    pub record_type: RecordType,
    pub flags: RecordFlags,
    pub payload: Vec<u8>,
}

/// Counters of the trail since it was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AuditStats {
    /// Flushes that made records durable (each one write pass and its syncs).
    pub flushes: u64,
    pub bytes_flushed: u64,
}

/// Bytes appended but not yet handed to a flush, all in one segment and contiguous.
#[derive(Debug)]
struct Chunk {
    segment: u64,
    offset: u64,
    bytes: Vec<u8>,
    /// The LSN of the last record in `bytes`.
    last_lsn: Lsn,
}

/// A position in the trail: segment number and byte offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Position {
    segment: u64,
    offset: u64,
}

#[derive(Debug)]
struct State<F> {
    next_lsn: Lsn,
    /// Where the next record will be encoded.
    tail: Position,
    /// Size of the tail segment's file (a segment keeps the size it was created with).
    tail_capacity: u64,
    pending: Vec<Chunk>,
    pending_bytes: usize,
    flushing: bool,
    /// Counts flushes started; the one running (if any) has this number.
    flush_generation: u64,
    /// The last LSN in the flush running.
    flushing_upto: Lsn,
    /// Every record up to this LSN is on stable storage.
    durable_lsn: Lsn,
    /// The byte position just after the durable records; readers never look past it.
    durable_end: Position,
    /// A write or sync failed in a way that retrying cannot fix; nothing more is accepted.
    failure: Option<String>,
    files: BTreeMap<u64, Arc<F>>,
    /// The LSN of the first record of each segment that has one.
    first_lsns: BTreeMap<u64, Lsn>,
    preallocated_up_to: u64,
    stats: AuditStats,
    /// Buffers of flushed chunks, kept for the next ones: no allocation per flush.
    spare_buffers: Vec<Vec<u8>>,
    /// Segments from this number on were found at open without records: an owner that died
    /// between naming one and syncing the directory leaves a name that may not be durable, so
    /// the directory is synced before the first record goes into one of them.
    names_unsure_from: Option<u64>,
}

#[derive(Debug)]
struct Shared<S: Store> {
    store: Arc<S>,
    lsg_id: LsgId,
    config: LsgConfig,
    fence: Option<Arc<Fence<S::File>>>,
    state: Mutex<State<S::File>>,
    /// Asks the preallocator for a segment number, ahead of need.
    preallocate: Mutex<Option<mpsc::Sender<u64>>>,
    /// Waiters of flush generation g sleep on `flushed[g % 2]`: a finished flush wakes its own
    /// waiters and one waiter of the next batch to lead it, not every appender.
    flushed: [Condvar; 2],
    /// Serialises segment creation between the flusher and the preallocator.
    creating: Mutex<()>,
}

/// The audit trail of one LSG. Cheap to share: clone the [`Arc`] around it.
#[derive(Debug)]
pub struct AuditTrail<S: Store> {
    shared: Arc<Shared<S>>,
    preallocator: Option<JoinHandle<()>>,
}

/// A segment to read from: its file, where its durable bytes end, and whether the durable end
/// of the whole trail lies in it.
struct Readable<F> {
    file: Arc<F>,
    end: u64,
    is_tail: bool,
}

/// What the tail scan of one segment found.
#[derive(Debug)]
struct TailScan {
    last_lsn: Option<Lsn>,
    end_offset: u64,
    /// Why the scan stopped before the zeros, if it did: the record at `end_offset` is invalid.
    bad: Option<Corruption>,
    /// Offset just past the last non-zero byte of the segment.
    written_end: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Holders only run plain bookkeeping; a panic there leaves consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: Store> AuditTrail<S> {
    /// Opens the trail and finds the end of its valid log.
    ///
    /// From the newest segment backwards, each segment is scanned to the end of its valid records
    /// until one holds records. If the scan stops at offset X at an invalid record, or at zeros
    /// with written bytes after them, that is a **torn tail** only when nothing was written at or
    /// beyond X + the torn window in that segment and nothing was written in a later segment: it
    /// can only be the unfinished last flush, which nobody was told is durable. Otherwise a later
    /// flush started after X was synced: that is **corruption**, reported with file, offset and
    /// what was found. With `fence` (opening for writing) torn bytes are zeroed so nothing after
    /// the tail can ever be taken for a record, and the tail segment is synced, so every record
    /// recovery accepted is durable before the new owner acknowledges anything; without it
    /// nothing is changed. With `preallocate_in_background` (and `fence`) a thread makes the
    /// next segment ahead of need.
    pub(crate) fn open(
        store: Arc<S>,
        lsg_id: LsgId,
        first_segment: u64,
        config: LsgConfig,
        recovery_window: u64,
        fence: Option<Arc<Fence<S::File>>>,
        preallocate_in_background: bool,
    ) -> Result<Self> {
        let writable = fence.is_some();
        let mut numbers = segment::list(&*store, AUDIT_DIR)?;
        // Segments below the first retained one are leftovers of an interrupted truncation.
        let leftovers: Vec<u64> = numbers
            .iter()
            .copied()
            .filter(|&n| n < first_segment)
            .collect();
        numbers.retain(|&n| n >= first_segment);
        let missing = numbers
            .iter()
            .enumerate()
            .find(|(i, have)| first_segment.checked_add(*i as u64) != Some(**have))
            .map(|(i, _)| first_segment.saturating_add(i as u64))
            .or_else(|| numbers.is_empty().then_some(first_segment));
        if let Some(n) = missing {
            return Err(LsgError::Missing {
                path: store.root().join(segment::segment_name(AUDIT_DIR, n)),
                what: "audit trail segment",
            });
        }
        if writable {
            for n in leftovers {
                store.remove(&segment::segment_name(AUDIT_DIR, n))?;
            }
        }
        let mut files = BTreeMap::new();
        let mut first_lsns = BTreeMap::new();
        let max_payload = config.max_record_bytes;
        let window = recovery_window;
        for &n in &numbers {
            let file = segment::open(&*store, AUDIT_DIR, SegmentKind::AuditTrail, lsg_id, n)?;
            let end = file.len_bytes();
            let first = match read_record(&file, SEGMENT_HEADER_BYTES, end, max_payload)? {
                Slot::Record(r) => Some(r.lsn),
                Slot::Zero | Slot::Invalid(_) => None,
            };
            if let Some(lsn) = first {
                first_lsns.insert(n, lsn);
            }
            files.insert(n, Arc::new(file));
        }

        let mut tail = None;
        let mut later_written = false;
        for &n in numbers.iter().rev() {
            let file = &files[&n];
            let scan = scan_tail(&**file, max_payload)?;
            let stop = scan.end_offset;
            let leftover = scan.written_end > stop;
            let problem = scan.bad.clone().or_else(|| {
                leftover.then_some(Corruption::Malformed(
                    "zeros where a record header should be, with data after them",
                ))
            });
            if let Some(what) = problem {
                if later_written || scan.written_end > stop.saturating_add(window) {
                    return Err(LsgError::Corrupt {
                        path: file.path().to_path_buf(),
                        offset: stop,
                        what,
                    });
                }
                warn!(
                    path = %file.path().display(),
                    offset = stop,
                    %what,
                    "audit trail: torn tail cut off at the last whole record"
                );
            }
            if writable && leftover {
                zero_range(&**file, stop, scan.written_end)?;
            }
            later_written |= scan.written_end > SEGMENT_HEADER_BYTES;
            if let Some(last) = scan.last_lsn {
                tail = Some((n, last, stop));
                break;
            }
            first_lsns.remove(&n);
        }
        let (tail_segment, last_lsn, end) = match tail {
            Some(t) => t,
            None if first_segment > 1 => {
                // Truncation keeps the segment after the last one it deletes only once its first
                // record is durable, so a truncated trail always holds a record.
                return Err(LsgError::Corrupt {
                    path: store
                        .root()
                        .join(segment::segment_name(AUDIT_DIR, first_segment)),
                    offset: SEGMENT_HEADER_BYTES,
                    what: Corruption::Malformed("no whole record in a truncated audit trail"),
                });
            }
            None => (numbers[0], Lsn(0), SEGMENT_HEADER_BYTES),
        };
        if writable {
            // What recovery accepted may sit only in the page cache of an owner killed before its
            // flush synced; this owner vouches for it from now on, so make it durable first.
            // Segments before the tail were synced before anything was written after them, and
            // in the tail only the last flush can be unsynced: the torn window before the end.
            // Later segments hold no records (zeroed above, or spares synced when made).
            // Those bytes are written again before the sync, because a page whose writeback
            // failed (an earlier opener's sync) is clean though not on disk, and a sync alone
            // would not write it.
            let tail_file = &files[&tail_segment];
            let from =
                (end.saturating_sub(window) / PAGE_BYTES * PAGE_BYTES).max(SEGMENT_HEADER_BYTES);
            if end > from {
                let bytes = store::read_checked(&**tail_file, from, (end - from) as usize)?;
                tail_file.write_at(from, &bytes)?;
            }
            tail_file.sync()?;
        }
        let names_unsure_from = if last_lsn == Lsn(0) || end == SEGMENT_HEADER_BYTES {
            Some(tail_segment)
        } else {
            files.range(tail_segment + 1..).map(|(&n, _)| n).next()
        };
        let tail_capacity = files[&tail_segment].len_bytes();
        let tail_pos = Position {
            segment: tail_segment,
            offset: end,
        };
        let next_lsn = Lsn(last_lsn.0.checked_add(1).ok_or_else(|| LsgError::Corrupt {
            path: store
                .root()
                .join(segment::segment_name(AUDIT_DIR, tail_segment)),
            offset: end,
            what: Corruption::Malformed("LSN at the end of the number range"),
        })?);
        debug!(%next_lsn, segment = tail_segment, offset = end, "audit trail opened");
        let preallocated_up_to = tail_segment;
        let shared = Arc::new(Shared {
            store,
            lsg_id,
            config,
            fence,
            preallocate: Mutex::new(None),
            state: Mutex::new(State {
                next_lsn,
                tail: tail_pos,
                tail_capacity,
                pending: Vec::new(),
                pending_bytes: 0,
                flushing: false,
                flush_generation: 0,
                flushing_upto: last_lsn,
                durable_lsn: last_lsn,
                durable_end: tail_pos,
                failure: None,
                files,
                first_lsns,
                preallocated_up_to,
                stats: AuditStats::default(),
                spare_buffers: Vec::new(),
                names_unsure_from,
            }),
            flushed: [Condvar::new(), Condvar::new()],
            creating: Mutex::new(()),
        });
        let preallocator = if writable && preallocate_in_background {
            let (tx, rx) = mpsc::channel::<u64>();
            let weak = Arc::downgrade(&shared);
            let handle = std::thread::Builder::new()
                .name("audit-prealloc".into())
                .spawn(move || {
                    while let Ok(number) = rx.recv() {
                        let Some(shared) = weak.upgrade() else { break };
                        if let Err(e) = shared.segment_file(number) {
                            warn!(number, error = %e, "audit trail: preallocating segment failed; the flusher will retry");
                        }
                    }
                })
                .map_err(|e| LsgError::io("spawn preallocator for", AUDIT_DIR, e))?;
            *lock(&shared.preallocate) = Some(tx);
            shared.preallocate_after(tail_segment);
            Some(handle)
        } else {
            None
        };
        Ok(AuditTrail {
            shared,
            preallocator,
        })
    }

    /// Appends a record to the in-memory batch and returns its LSN. It is durable once
    /// [`wait_durable`](Self::wait_durable) for that LSN (or a later one) returns.
    pub fn append(
        &self,
        record_type: RecordType,
        flags: RecordFlags,
        payload: &[u8],
    ) -> Result<Lsn> {
        self.append_expecting(None, record_type, flags, payload)
    }

    /// Appends a record only if it gets LSN `expected`, that is if the trail's next LSN is
    /// exactly `expected`; otherwise appends nothing and fails with
    /// [`LsgError::UnexpectedLsn`]. A backup taking over re-appends the tail of the trail only
    /// it holds with this: a record whose LSN the trail already has is never written twice, and
    /// one that would leave a gap is refused.
    pub fn append_at(
        &self,
        expected: Lsn,
        record_type: RecordType,
        flags: RecordFlags,
        payload: &[u8],
    ) -> Result<Lsn> {
        self.append_expecting(Some(expected), record_type, flags, payload)
    }

    fn append_expecting(
        &self,
        expected: Option<Lsn>,
        record_type: RecordType,
        flags: RecordFlags,
        payload: &[u8],
    ) -> Result<Lsn> {
        let shared = &*self.shared;
        if shared.fence.is_none() {
            return Err(LsgError::ReadOnly {
                op: "append to",
                path: shared.store.root().join(AUDIT_DIR),
            });
        }
        let limit = shared.config.max_record_bytes;
        if payload.len() > limit {
            return Err(LsgError::RecordTooLarge {
                length: payload.len(),
                limit,
            });
        }
        let len = record::encoded_len(payload.len());
        let mut st = lock(&shared.state);
        let mut rounds = 0u32;
        loop {
            if let Some(f) = &st.failure {
                return Err(LsgError::Failed(f.clone()));
            }
            if st.pending_bytes == 0 || st.pending_bytes + len <= shared.config.max_batch_bytes {
                break;
            }
            // Backpressure: the batch is full; flush it (or wait for the flush under way).
            let upto = Lsn(st.next_lsn.0 - 1);
            st = shared.flush_locked(st, upto)?;
            rounds += 1;
            debug_assert!(
                rounds < 1_000_000,
                "append backpressure loop did not converge"
            );
        }
        // Checked last, under the same lock as the LSN is given out: backpressure above may
        // have let other appenders in.
        if let Some(expected) = expected
            && expected != st.next_lsn
        {
            return Err(LsgError::UnexpectedLsn {
                path: shared.store.root().join(AUDIT_DIR),
                expected,
                next: st.next_lsn,
            });
        }
        if st.tail.offset + len as u64 > st.tail_capacity {
            // A segment made earlier (a spare preallocated under another configuration) keeps
            // the size it was made with; one too small for this record is left empty. New
            // segments take the configured size, which holds any record (`LsgConfig::validate`).
            let mut next = st.tail.segment + 1;
            loop {
                let capacity = st
                    .files
                    .get(&next)
                    .map_or(shared.config.audit_segment_bytes, |f| f.len_bytes());
                if SEGMENT_HEADER_BYTES + len as u64 <= capacity || !st.files.contains_key(&next) {
                    st.tail_capacity = capacity;
                    break;
                }
                next += 1;
            }
            st.tail = Position {
                segment: next,
                offset: SEGMENT_HEADER_BYTES,
            };
        }
        let lsn = st.next_lsn;
        st.next_lsn = Lsn(lsn.0 + 1);
        let at = st.tail;
        if at.offset == SEGMENT_HEADER_BYTES {
            st.first_lsns.insert(at.segment, lsn);
        }
        let extend = matches!(st.pending.last(), Some(c) if c.segment == at.segment
            && c.offset + c.bytes.len() as u64 == at.offset);
        if !extend {
            let bytes = match st.spare_buffers.pop() {
                Some(mut spare) => {
                    spare.clear();
                    spare
                }
                None => Vec::with_capacity(len.max(64 << 10)),
            };
            st.pending.push(Chunk {
                segment: at.segment,
                offset: at.offset,
                bytes,
                last_lsn: lsn,
            });
        }
        if let Some(chunk) = st.pending.last_mut() {
            record::encode_into(&mut chunk.bytes, lsn, record_type, flags, payload);
            chunk.last_lsn = lsn;
        }
        st.tail.offset += len as u64;
        st.pending_bytes += len;
        Ok(lsn)
    }

    /// Blocks until every record up to `lsn` is on stable storage. One flush serves every record
    /// written before it.
    pub fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        self.shared.wait_durable(lsn)
    }

    /// Appends one record and waits until it is durable.
    pub fn append_durable(
        &self,
        record_type: RecordType,
        flags: RecordFlags,
        payload: &[u8],
    ) -> Result<Lsn> {
        let lsn = self.append(record_type, flags, payload)?;
        self.wait_durable(lsn)?;
        Ok(lsn)
    }

    /// Makes everything appended so far durable; returns the last durable LSN.
    pub fn flush(&self) -> Result<Lsn> {
        let shared = &*self.shared;
        let st = lock(&shared.state);
        let upto = Lsn(st.next_lsn.0 - 1);
        let st = shared.flush_locked(st, upto)?;
        Ok(st.durable_lsn)
    }

    /// Makes sure the segment after the tail exists (preallocated), waiting for the background
    /// preallocator if it is at work: for benchmarks that must charge its cost to the trail, and
    /// before a period where a rollover must not wait for one.
    pub fn preallocate_next(&self) -> Result<()> {
        let next = lock(&self.shared.state).tail.segment + 1;
        self.shared.segment_file(next).map(drop)
    }

    pub(crate) fn handle(&self) -> AuditHandle<S> {
        AuditHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// The LSN the next append will get.
    pub fn next_lsn(&self) -> Lsn {
        lock(&self.shared.state).next_lsn
    }

    /// Every record up to this LSN is on stable storage.
    pub fn durable_lsn(&self) -> Lsn {
        lock(&self.shared.state).durable_lsn
    }

    pub fn stats(&self) -> AuditStats {
        lock(&self.shared.state).stats
    }

    /// The first retained LSN (records below it were truncated), or the next LSN if none is.
    pub fn first_lsn(&self) -> Lsn {
        let st = lock(&self.shared.state);
        st.first_lsns
            .values()
            .next()
            .copied()
            .unwrap_or(st.next_lsn)
    }

    /// Reads durable records in LSN order, from `from` on. The reader sees records that become
    /// durable while it runs.
    pub fn reader(&self, from: Lsn) -> Result<AuditReader<S>> {
        let pos = self.shared.locate(from)?;
        Ok(AuditReader::new(Arc::clone(&self.shared), pos, from))
    }

    /// Calls `f` on every durable record from `from` on, in place (no copies, through the memory
    /// maps): the fast scan for inspection and shipping. Returns the last LSN seen. `f` must not
    /// call into this LSG. A media error under a map kills the process (SIGBUS); recovery that
    /// must survive one reads with [`reader`](Self::reader), which copies with `pread`.
    pub fn scan(
        &self,
        from: Lsn,
        mut f: impl FnMut(RecordView<'_>) -> ControlFlow<()>,
    ) -> Result<Option<Lsn>> {
        let shared = &*self.shared;
        let mut pos = shared.locate(from)?;
        let max_payload = shared.config.max_record_bytes;
        let mut last: Option<Lsn> = None;
        let mut ended_at: Option<(std::path::PathBuf, u64)> = None;
        let segments = lock(&shared.state).files.len() + 1;
        for _ in 0..=segments {
            let Some(Readable { file, end, is_tail }) = shared.readable(pos)? else {
                return Ok(last);
            };
            let start = pos.offset;
            let mut stop = false;
            let outcome = file.with_bytes(start, (end - start) as usize, |bytes| {
                let mut at = 0usize;
                while at < bytes.len() {
                    match record::decode(&bytes[at..], max_payload) {
                        Decoded::Record(v) => {
                            if let Some(prev) = last
                                && prev.0.checked_add(1) != Some(v.lsn.0)
                            {
                                let what = Corruption::LsnOutOfSequence {
                                    expected: Lsn(prev.0.saturating_add(1)),
                                    found: v.lsn,
                                };
                                return Err((start + at as u64, what));
                            }
                            last = Some(v.lsn);
                            at += v.encoded_len();
                            if v.lsn >= from && f(v).is_break() {
                                stop = true;
                                break;
                            }
                        }
                        Decoded::Zero => break,
                        Decoded::Invalid(what) => return Err((start + at as u64, what)),
                    }
                }
                Ok(start + at as u64)
            })?;
            let offset = match outcome {
                Ok(offset) => offset,
                Err((offset, what)) => {
                    // A break in sequence at a segment's first record is reported where the
                    // previous segment's records stopped.
                    let (path, offset) = match (&what, ended_at.take()) {
                        (Corruption::LsnOutOfSequence { .. }, Some(prev)) if offset == start => {
                            prev
                        }
                        _ => (file.path().to_path_buf(), offset),
                    };
                    return Err(LsgError::Corrupt { path, offset, what });
                }
            };
            if stop || (is_tail && offset == end) {
                return Ok(last);
            }
            if is_tail {
                return Err(zeros_inside(&*file, offset));
            }
            ended_at = Some((file.path().to_path_buf(), offset));
            pos = Position {
                segment: pos.segment + 1,
                offset: SEGMENT_HEADER_BYTES,
            };
        }
        Ok(last)
    }

    /// Reads the records appended since the last look into a read-only trail, so that its
    /// readers see them and its next LSN follows the owner's: from where the records it knows
    /// end, record after record, on into a later segment once that segment's first record is
    /// the next LSN (an empty segment before it is a spare the owner skipped). Stops at the
    /// first zero, invalid or out-of-sequence record: the owner may be writing it. Forgets the
    /// segments below `first_segment` (truncated by the owner).
    ///
    /// A new owner may cut and rewrite what follows the durable records; the caller reopens the
    /// trail instead when the boot sequence moved.
    pub(crate) fn catch_up(&self, first_segment: u64) -> Result<()> {
        let shared = &*self.shared;
        debug_assert!(shared.fence.is_none(), "only a read-only trail catches up");
        let max_payload = shared.config.max_record_bytes;
        let max_record = record::encoded_len(max_payload);
        let (mut pos, mut next, mut files) = {
            let st = lock(&shared.state);
            (st.durable_end, st.next_lsn, st.files.clone())
        };
        let mut first_lsns = BTreeMap::new();
        let numbers = segment::list(&*shared.store, AUDIT_DIR)?;
        while let Some(file) = files.get(&pos.segment).cloned() {
            let mut reader =
                store::ScanReader::with_window(&*file, max_record, CATCH_UP_WINDOW_BYTES);
            while pos.offset < file.len_bytes() {
                match record::decode(reader.record_at(pos.offset, max_payload)?, max_payload) {
                    Decoded::Record(v) if v.lsn == next => {
                        if pos.offset == SEGMENT_HEADER_BYTES {
                            first_lsns.insert(pos.segment, v.lsn);
                        }
                        pos.offset += v.encoded_len() as u64;
                        next = Lsn(next.0.saturating_add(1));
                    }
                    _ => break,
                }
            }
            // The owner goes on in a later segment once a record does not fit in this one.
            let mut later = None;
            for &n in numbers.iter().filter(|&&n| n > pos.segment) {
                let file = match files.get(&n) {
                    Some(f) => Arc::clone(f),
                    None => {
                        let f = Arc::new(segment::open(
                            &*shared.store,
                            AUDIT_DIR,
                            SegmentKind::AuditTrail,
                            shared.lsg_id,
                            n,
                        )?);
                        files.insert(n, Arc::clone(&f));
                        f
                    }
                };
                match read_record(&*file, SEGMENT_HEADER_BYTES, file.len_bytes(), max_payload)? {
                    Slot::Record(r) if r.lsn == next => {
                        later = Some(n);
                        break;
                    }
                    Slot::Zero => continue,
                    Slot::Record(_) | Slot::Invalid(_) => break,
                }
            }
            match later {
                Some(n) => {
                    pos = Position {
                        segment: n,
                        offset: SEGMENT_HEADER_BYTES,
                    }
                }
                None => break,
            }
        }
        let mut st = lock(&shared.state);
        files.retain(|&n, _| n >= first_segment);
        st.first_lsns.retain(|&n, _| n >= first_segment);
        st.first_lsns.extend(first_lsns);
        st.tail_capacity = files
            .get(&pos.segment)
            .map_or(st.tail_capacity, |f| f.len_bytes());
        st.files = files;
        st.next_lsn = next;
        st.tail = pos;
        st.durable_lsn = Lsn(next.0.saturating_sub(1));
        st.flushing_upto = st.durable_lsn;
        st.durable_end = pos;
        Ok(())
    }

    /// Deletes the segments that hold only records below `lsn`: archived, or older than the
    /// penultimate checkpoint. A segment goes only when the first record of the segment after it
    /// is durable, so the trail never loses track of its next LSN. Returns how many were deleted.
    pub fn truncate_below(&self, lsn: Lsn) -> Result<usize> {
        let shared = &*self.shared;
        // The first segment to keep: the newest one whose first record is durable and at or
        // below `lsn`. Everything before it goes, empty skipped segments included.
        let (keep_from, victims): (u64, Vec<u64>) = {
            let st = lock(&shared.state);
            let limit = lsn.min(Lsn(st.durable_lsn.0 + 1));
            let firsts: Vec<(u64, Lsn)> = st.first_lsns.iter().map(|(&s, &l)| (s, l)).collect();
            let keep_from = firsts
                .windows(2)
                .take_while(|w| w[1].1 <= limit && w[1].0 <= st.durable_end.segment)
                .last()
                .map(|w| w[1].0);
            let Some(keep_from) = keep_from else {
                return Ok(0);
            };
            let victims = st.files.range(..keep_from).map(|(&n, _)| n).collect();
            (keep_from, victims)
        };
        let fence = shared.fence.as_ref().ok_or_else(|| LsgError::ReadOnly {
            op: "truncate",
            path: shared.store.root().join(AUDIT_DIR),
        })?;
        fence.update(|m| Manifest {
            first_segment: keep_from,
            ..m
        })?;
        for number in &victims {
            shared
                .store
                .remove(&segment::segment_name(AUDIT_DIR, *number))?;
            let mut st = lock(&shared.state);
            st.files.remove(number);
            st.first_lsns.remove(number);
        }
        Ok(victims.len())
    }
}

impl<S: Store> Drop for AuditTrail<S> {
    fn drop(&mut self) {
        lock(&self.shared.preallocate).take();
        if let Some(handle) = self.preallocator.take() {
            let _ = handle.join();
        }
    }
}

/// Removes what a creation stopped before its manifest can leave in the audit directory: an
/// empty first segment and temporary files. Anything else means an audit trail whose manifest is
/// missing, refused with [`LsgError::ManifestMissing`] and left untouched.
pub(crate) fn remove_creation_leftovers<S: Store>(store: &S) -> Result<()> {
    let names = store.list(AUDIT_DIR)?;
    let first = segment::segment_name(AUDIT_DIR, 1);
    for name in &names {
        let path = format!("{AUDIT_DIR}/{name}");
        let leftover = if name.ends_with(".tmp") {
            true
        } else if path == first {
            let file = store.open(&path)?;
            let probe = (record::RECORD_HEADER_BYTES as u64)
                .min(file.len_bytes().saturating_sub(SEGMENT_HEADER_BYTES));
            store::read_checked(&file, SEGMENT_HEADER_BYTES, probe as usize)?
                .iter()
                .all(|&b| b == 0)
        } else {
            false
        };
        if !leftover {
            return Err(LsgError::ManifestMissing {
                path: store.root().join(&path),
            });
        }
    }
    for name in names {
        store.remove(&format!("{AUDIT_DIR}/{name}"))?;
    }
    Ok(())
}

/// Creates the audit directory and the first segment of a new, empty trail.
pub(crate) fn create_first_segment<S: Store>(
    store: &S,
    lsg_id: LsgId,
    config: &LsgConfig,
) -> Result<()> {
    store.create_dir(AUDIT_DIR)?;
    segment::create(
        store,
        AUDIT_DIR,
        SegmentKind::AuditTrail,
        lsg_id,
        1,
        config.audit_segment_bytes,
        true,
    )
    .map(drop)
}

/// What a data volume needs of its trail: the next LSN (a change must be logged first) and a
/// way to make the trail durable up to a change before the volume's copy of it is.
#[derive(Debug)]
pub(crate) struct AuditHandle<S: Store> {
    shared: Arc<Shared<S>>,
}

impl<S: Store> Clone for AuditHandle<S> {
    fn clone(&self) -> Self {
        AuditHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: Store> AuditHandle<S> {
    pub(crate) fn next_lsn(&self) -> Lsn {
        lock(&self.shared.state).next_lsn
    }

    pub(crate) fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        self.shared.wait_durable(lsn)
    }
}
