//! Opening a volume: rebuilding its index from the files, the write-ahead cut of changes the
//! recovered trail does not hold, and vouching for what was recovered before anything is
//! acknowledged.

use super::*;

impl<S: Store> DataVolume<S> {
    /// Opens a volume and rebuilds its index from its records. `audit_next_lsn` is the next LSN
    /// of the recovered audit trail: no change at or above it may survive (write-ahead rule).
    /// Read-only (`owner` is `None`), the volume keeps a [`View`] for catch-ups, taken under the
    /// manifest's `boot_sequence`.
    pub(crate) fn open(
        store: Arc<S>,
        lsg_id: LsgId,
        config: LsgConfig,
        name: &str,
        owner: Option<VolumeOwner<S>>,
        audit_next_lsn: Lsn,
        boot_sequence: u64,
    ) -> Result<Self> {
        validate_name(name)?;
        let writer = owner.is_some();
        let dir = format!("{VOLUMES_DIR}/{name}");
        let checkpoint_file = store.open(&format!("{dir}/{CHECKPOINT_NAME}"))?;
        let checkpoint = read_checkpoint(&checkpoint_file)?;
        let view = (!writer).then(|| View {
            tentative_from: (checkpoint.first_segment, SEGMENT_HEADER_BYTES),
            undo: Vec::new(),
            boot_sequence,
            stale: false,
            first_tentative: None,
        });
        let volume = DataVolume {
            name: name.to_string(),
            dir,
            store: Arc::clone(&store),
            lsg_id,
            config,
            owner,
            inner: RwLock::new(Inner::new(checkpoint_file, checkpoint, view)),
        };
        let rules = Rules {
            checkpoint: checkpoint.position,
            audit_next_lsn,
            max_payload: config.max_volume_payload_bytes(),
            writer,
            window_bytes: store::SCAN_WINDOW_BYTES,
        };
        {
            let mut inner = volume.write();
            let tail = volume.rebuild(&mut inner, &*store, &checkpoint, &rules)?;
            inner.take_tail(&tail, &checkpoint, writer);
            if writer {
                volume.vouch_for(&mut inner, &*store, &tail, checkpoint.position)?;
            }
        }
        Ok(volume)
    }

    /// Reads the whole volume from its first segment into an empty index, as opening does.
    pub(super) fn rebuild(
        &self,
        inner: &mut Inner<S::File>,
        store: &S,
        checkpoint: &Checkpoint,
        rules: &Rules,
    ) -> Result<Tail> {
        inner.index.clear();
        inner.live_keys = 0;
        inner.live_bytes = 0;
        inner.written_bytes = 0;
        inner.files.clear();
        inner.first_segment = checkpoint.first_segment;
        let from = (checkpoint.first_segment, SEGMENT_HEADER_BYTES);
        if let Some(view) = inner.view.as_mut() {
            view.undo.clear();
            view.first_tentative = None;
            view.tentative_from = from;
        }
        inner.scan_stats.full_scans += 1;
        self.refresh_files(inner, store, checkpoint.first_segment, rules.writer)?;
        self.scan_records(inner, from, rules)
    }

    /// Brings `inner.files` up to the volume's segments from its first one on: opens new ones,
    /// opens again those from `reopen_from` on (a new owner may have replaced them; a writer
    /// needs handles that write) and forgets removed ones. From the first segment on, segments
    /// are numbered without a gap; a `writer` removes those below it, leftovers of a compaction
    /// that completed.
    pub(super) fn refresh_files(
        &self,
        inner: &mut Inner<S::File>,
        store: &S,
        reopen_from: u64,
        writer: bool,
    ) -> Result<()> {
        let first_segment = inner.first_segment;
        let mut numbers = segment::list(store, &self.dir)?;
        let leftovers: Vec<u64> = numbers
            .iter()
            .copied()
            .filter(|&n| n < first_segment)
            .collect();
        numbers.retain(|&n| n >= first_segment);
        let gap = (first_segment..)
            .zip(numbers.iter().copied().chain(std::iter::once(u64::MAX)))
            .find(|(want, have)| want != have)
            .map(|(want, _)| want);
        if let Some(want) = gap
            && (numbers.is_empty() || want - first_segment < numbers.len() as u64)
        {
            return Err(LsgError::Missing {
                path: store.root().join(segment::segment_name(&self.dir, want)),
                what: "data volume segment",
            });
        }
        if writer {
            for n in leftovers {
                store.remove(&segment::segment_name(&self.dir, n))?;
            }
        }
        inner.files.retain(|n, _| numbers.binary_search(n).is_ok());
        for n in numbers {
            if n >= reopen_from || !inner.files.contains_key(&n) {
                let file =
                    segment::open(store, &self.dir, SegmentKind::DataVolume, self.lsg_id, n)?;
                inner.files.insert(n, Arc::new(file));
            }
        }
        Ok(())
    }

    /// Reads records into the index from position `from` on, through the segments of
    /// `inner.files`, and returns where they end, judged by `rules`:
    ///
    /// - before the checkpoint position every record must be valid, LSNs below the trail's
    ///   next, segments closed by their end marker (else `Corrupt`), and the checkpoint's
    ///   segment must reach its position;
    /// - at or after it, the first thing amiss ends the volume: an invalid record, zeros with
    ///   data after them, data after an end marker, or a record whose LSN the trail does not
    ///   hold (write-ahead: its audit record was lost, or is not written yet).
    ///
    /// A read-only scan of the tail segment stops at the first zero or invalid record without
    /// searching the rest of the segment: it may be a record the owner is still writing.
    pub(super) fn scan_records(
        &self,
        inner: &mut Inner<S::File>,
        from: (u64, u64),
        rules: &Rules,
    ) -> Result<Tail> {
        let synced = rules.checkpoint;
        let max_record = record::encoded_len(rules.max_payload);
        let numbers: Vec<u64> = inner.files.range(from.0..).map(|(&n, _)| n).collect();
        let last_number = numbers.last().copied();
        let mut closed_after_checkpoint = Vec::new();
        for n in numbers {
            let Some(file) = inner.files.get(&n).cloned() else {
                continue;
            };
            let mut reader = store::ScanReader::with_window(&*file, max_record, rules.window_bytes);
            let mut end = if n == from.0 {
                from.1
            } else {
                SEGMENT_HEADER_BYTES
            };
            let mut problem = None;
            let mut closed = false;
            while end < file.len_bytes() {
                let bytes = reader.record_at(end, rules.max_payload)?;
                let mut header = [0u8; record::RECORD_HEADER_BYTES];
                if let Some(h) = bytes.get(..record::RECORD_HEADER_BYTES) {
                    header.copy_from_slice(h);
                }
                match record::decode(bytes, rules.max_payload) {
                    Decoded::Record(v) if v.record_type == RecordType::SegmentEnd => {
                        closed = true;
                        break;
                    }
                    Decoded::Record(v) if v.lsn >= rules.audit_next_lsn => {
                        problem = Some(Corruption::LsnOutOfSequence {
                            expected: Lsn(rules.audit_next_lsn.0.saturating_sub(1)),
                            found: v.lsn,
                        });
                        break;
                    }
                    Decoded::Record(v) => {
                        inner
                            .index_record(n, end, &v, header, synced)
                            .map_err(|what| LsgError::Corrupt {
                                path: file.path().to_path_buf(),
                                offset: end,
                                what,
                            })?;
                        end += v.encoded_len() as u64;
                    }
                    Decoded::Zero => break,
                    Decoded::Invalid(what) => {
                        problem = Some(what);
                        break;
                    }
                }
            }
            let marker = if closed { SEGMENT_END_BYTES as u64 } else { 0 };
            let covered = n < synced.0 || (n == synced.0 && end < synced.1);
            // Where writing stopped in this segment (the end marker counts as written): to
            // tell a closed segment from one with data after its marker, to judge what the
            // checkpoint covers, and for a writer to zero what follows the end.
            let written_end = if closed || covered || rules.writer {
                reader.written_end(end + marker)?.max(end + marker)
            } else {
                end
            };
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
                    if rules.writer {
                        warn!(path = %file.path().display(), offset = end, %what,
                            "data volume: end after its checkpoint cut off; redo restores it");
                    }
                    return Ok(Tail {
                        segment: n,
                        offset: end,
                        closed: false,
                        written_end,
                        closed_after_checkpoint,
                    });
                }
                None if closed && Some(n) != last_number => {
                    closed_after_checkpoint.push((n, end + marker));
                }
                None => {
                    return Ok(Tail {
                        segment: n,
                        offset: end,
                        closed,
                        written_end,
                        closed_after_checkpoint,
                    });
                }
            }
        }
        // Every segment was closed and before the checkpoint's: the checkpoint's segment is gone.
        Err(LsgError::Missing {
            path: self
                .store
                .root()
                .join(segment::segment_name(&self.dir, synced.0)),
            what: "the data volume segment its checkpoint names",
        })
    }

    /// What opening for writing does once the end is found: the new owner vouches for what it
    /// found from now on. Nothing after the end may ever be taken for a record, so it is zeroed
    /// and later segments are removed. The records after the checkpoint position may be only in
    /// the page cache of an earlier owner (killed, or closed without a flush), and the next
    /// checkpoint vouches for them, so they are written again and synced: a page whose
    /// writeback failed under an owner killed before it could scrub it is clean though not on
    /// disk, and a sync alone would not write it (as the trail rewrites its last torn window).
    pub(super) fn vouch_for(
        &self,
        inner: &mut Inner<S::File>,
        store: &S,
        tail: &Tail,
        synced: (u64, u64),
    ) -> Result<()> {
        let missing = |n: u64| LsgError::Missing {
            path: store.root().join(segment::segment_name(&self.dir, n)),
            what: "volume segment after the checkpoint",
        };
        let file = inner
            .files
            .get(&tail.segment)
            .cloned()
            .ok_or_else(|| missing(tail.segment))?;
        if !tail.closed && tail.written_end > tail.offset {
            let zeros = vec![0u8; (tail.written_end - tail.offset) as usize];
            file.write_at(tail.offset, &zeros)?;
            file.sync()?;
        }
        let later: Vec<u64> = inner
            .files
            .range(tail.segment + 1..)
            .map(|(&n, _)| n)
            .collect();
        for n in later.into_iter().rev() {
            store.remove(&segment::segment_name(&self.dir, n))?;
            inner.files.remove(&n);
        }
        let marker = if tail.closed {
            SEGMENT_END_BYTES as u64
        } else {
            0
        };
        let ends = tail
            .closed_after_checkpoint
            .iter()
            .copied()
            .chain(std::iter::once((tail.segment, tail.offset + marker)))
            .filter(|&(n, _)| n >= synced.0);
        for (n, end) in ends {
            let file = inner.files.get(&n).cloned().ok_or_else(|| missing(n))?;
            let start = if n == synced.0 {
                synced.1
            } else {
                SEGMENT_HEADER_BYTES
            };
            if let Err(e) = rewrite(&*file, start, end).and_then(|()| file.sync()) {
                scrub_after(&inner.files, synced, tail.segment, tail.offset + marker);
                return Err(e);
            }
        }
        Ok(())
    }
}
