//! The writing side's shared state: the group flush (leader and followers), segment files
//! made ahead of need and rolled over, the fence check before every write, and what readers
//! may read.

use super::*;

impl<S: Store> Shared<S> {
    /// The file holding `pos` and the end of its durable bytes, and whether it is the segment
    /// the durable end lies in; `None` when `pos` is at or past the durable end.
    pub(super) fn readable(&self, pos: Position) -> Result<Option<Readable<S::File>>> {
        let st = lock(&self.state);
        if pos >= st.durable_end {
            return Ok(None);
        }
        let is_tail = pos.segment == st.durable_end.segment;
        match st.files.get(&pos.segment) {
            Some(f) => Ok(Some(Readable {
                file: Arc::clone(f),
                end: if is_tail {
                    st.durable_end.offset
                } else {
                    f.len_bytes()
                },
                is_tail,
            })),
            None => Err(LsgError::Missing {
                path: self
                    .store
                    .root()
                    .join(segment::segment_name(AUDIT_DIR, pos.segment)),
                what: "audit segment deleted while being read",
            }),
        }
    }

    pub(super) fn wait_durable(&self, lsn: Lsn) -> Result<()> {
        let st = lock(&self.state);
        if lsn >= st.next_lsn {
            return Err(LsgError::LsnNotAppended {
                lsn,
                next: st.next_lsn,
            });
        }
        self.flush_locked(st, lsn).map(drop)
    }

    /// Makes records up to `lsn` durable, leading a flush or waiting for the one under way.
    pub(super) fn flush_locked<'a>(
        &'a self,
        mut st: MutexGuard<'a, State<S::File>>,
        lsn: Lsn,
    ) -> Result<MutexGuard<'a, State<S::File>>> {
        loop {
            if let Some(f) = &st.failure {
                return Err(LsgError::Failed(f.clone()));
            }
            if st.durable_lsn >= lsn {
                return Ok(st);
            }
            if st.flushing {
                let g = st.flush_generation;
                let turn = if lsn <= st.flushing_upto { g } else { g + 1 };
                st = self.flushed[(turn % 2) as usize]
                    .wait(st)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // One flush writes at most one torn window (recovery relies on it), even when a
            // batch put back after a full disk sits in front of newer appends.
            let window = self.config.torn_window_bytes() as usize;
            let mut take = 0;
            let mut batch_bytes = 0;
            for chunk in &st.pending {
                if take > 0 && batch_bytes + chunk.bytes.len() > window {
                    break;
                }
                batch_bytes += chunk.bytes.len();
                take += 1;
            }
            let batch: Vec<Chunk> = st.pending.drain(..take).collect();
            let Some(last) = batch.last() else {
                return Err(LsgError::Failed(format!(
                    "internal: LSN {lsn} is neither durable nor pending"
                )));
            };
            let batch_last = last.last_lsn;
            let batch_end = Position {
                segment: last.segment,
                offset: last.offset + last.bytes.len() as u64,
            };
            st.pending_bytes -= batch_bytes;
            st.flushing = true;
            st.flush_generation += 1;
            st.flushing_upto = batch_last;
            let g = st.flush_generation;
            let sync_names_first = st
                .names_unsure_from
                .is_some_and(|first| batch.iter().any(|c| c.segment >= first));
            drop(st);
            let _span =
                tracing::trace_span!("audit_flush", bytes = batch_bytes, upto = %batch_last)
                    .entered();
            let result = self.write_batch(&batch, sync_names_first);
            st = lock(&self.state);
            st.flushing = false;
            match result {
                Ok(()) => {
                    if sync_names_first {
                        st.names_unsure_from = None;
                    }
                    st.durable_lsn = batch_last;
                    st.durable_end = batch_end;
                    st.stats.flushes += 1;
                    st.stats.bytes_flushed += batch_bytes as u64;
                    for chunk in batch {
                        if st.spare_buffers.len() < MAX_SPARE_BUFFERS {
                            st.spare_buffers.push(chunk.bytes);
                        }
                    }
                    // The next leader first, so its flush starts before the woken commit.
                    self.flushed[((g + 1) % 2) as usize].notify_one();
                    self.flushed[(g % 2) as usize].notify_all();
                }
                Err(e) if e.is_retriable() => {
                    // Nothing is lost: the batch goes back in front of what came since; a later
                    // flush rewrites the same bytes at the same offsets.
                    let mut batch = batch;
                    batch.append(&mut st.pending);
                    st.pending = batch;
                    st.pending_bytes += batch_bytes;
                    self.wake_all();
                    return Err(e);
                }
                Err(e) => {
                    if matches!(e, LsgError::Io { .. }) {
                        self.scrub(&st, &batch);
                    }
                    st.failure = Some(e.to_string());
                    self.wake_all();
                    return Err(e);
                }
            }
        }
    }

    /// Overwrites the bytes of a batch whose write or sync failed with zeros, best effort. They
    /// may still be readable in the page cache though not on disk (Linux keeps a page whose
    /// writeback failed, marked clean); the next owner must find the trail's end before them,
    /// not take them for records and build on them. Not once a newer owner is seen in the
    /// manifest (on one host the ownership lock already keeps it out).
    pub(super) fn scrub(&self, st: &State<S::File>, batch: &[Chunk]) {
        match self.fence.as_ref().map(|f| f.check()) {
            None | Some(Err(LsgError::Fenced { .. })) => return,
            Some(_) => {}
        }
        for chunk in batch {
            if let Some(file) = st.files.get(&chunk.segment) {
                let zeros = vec![0u8; chunk.bytes.len()];
                if let Err(e) = file.write_at(chunk.offset, &zeros) {
                    warn!(path = %file.path().display(), offset = chunk.offset, error = %e,
                        "audit trail: could not scrub a failed flush");
                }
            }
        }
    }

    pub(super) fn wake_all(&self) {
        for cv in &self.flushed {
            cv.notify_all();
        }
    }

    /// Writes and syncs a batch; with `sync_names_first`, first makes the names of segments found
    /// at open durable (see `names_unsure_from`).
    pub(super) fn write_batch(&self, batch: &[Chunk], sync_names_first: bool) -> Result<()> {
        if let Some(fence) = &self.fence {
            fence.check()?;
        }
        if sync_names_first {
            self.store.sync_dir(AUDIT_DIR)?;
        }
        for (i, chunk) in batch.iter().enumerate() {
            let file = self.segment_file(chunk.segment)?;
            if chunk.offset == SEGMENT_HEADER_BYTES {
                self.preallocate_after(chunk.segment);
            }
            file.write_at(chunk.offset, &chunk.bytes)?;
            let last_in_segment = batch.get(i + 1).is_none_or(|n| n.segment != chunk.segment);
            if last_in_segment {
                file.sync()?;
            }
        }
        Ok(())
    }

    /// Asks the preallocator for the segment after `number`, once.
    pub(super) fn preallocate_after(&self, number: u64) {
        let next = number + 1;
        {
            let mut st = lock(&self.state);
            if st.preallocated_up_to >= next {
                return;
            }
            st.preallocated_up_to = next;
        }
        if let Some(tx) = lock(&self.preallocate).as_ref() {
            let _ = tx.send(next);
        }
    }

    /// The file of segment `number`, created (preallocated) if it does not exist yet.
    pub(super) fn segment_file(self: &Shared<S>, number: u64) -> Result<Arc<S::File>> {
        if let Some(f) = lock(&self.state).files.get(&number) {
            return Ok(Arc::clone(f));
        }
        let _creating = lock(&self.creating);
        if let Some(f) = lock(&self.state).files.get(&number) {
            return Ok(Arc::clone(f));
        }
        let created = segment::create(
            &*self.store,
            AUDIT_DIR,
            SegmentKind::AuditTrail,
            self.lsg_id,
            number,
            self.config.audit_segment_bytes,
            true,
        );
        let file = Arc::new(match created {
            // Made by an earlier attempt whose directory sync failed (or by an earlier owner
            // after we listed the directory): complete, as segments are created under a
            // temporary name and renamed, but its name must be durable before records go in.
            Err(LsgError::AlreadyExists { .. }) => {
                self.store.sync_dir(AUDIT_DIR)?;
                segment::open(
                    &*self.store,
                    AUDIT_DIR,
                    SegmentKind::AuditTrail,
                    self.lsg_id,
                    number,
                )?
            }
            other => other?,
        });
        debug!(number, "audit trail: segment created");
        lock(&self.state).files.insert(number, Arc::clone(&file));
        Ok(file)
    }

    /// Where the record `from` is, or the durable end if `from` is not durable yet.
    pub(super) fn locate(&self, from: Lsn) -> Result<Position> {
        let st = lock(&self.state);
        let first = st
            .first_lsns
            .values()
            .next()
            .copied()
            .unwrap_or(st.next_lsn);
        if from < first && from.0 > 0 {
            return Err(LsgError::LsnTruncated { lsn: from, first });
        }
        let segment = st
            .first_lsns
            .range(..)
            .rev()
            .find(|(_, l)| **l <= from)
            .map(|(s, _)| *s)
            .unwrap_or_else(|| st.files.keys().next().copied().unwrap_or(st.tail.segment));
        Ok(Position {
            segment,
            offset: SEGMENT_HEADER_BYTES,
        })
    }
}
