//! A warm backup's read-only view kept current (`catch_up`) and handed over to the owner at a
//! takeover without rescanning the volume.

use super::*;

impl<S: Store> DataVolume<S> {
    /// Brings a read-only volume up to what its files hold now: reads only the records appended
    /// since the last look, under `audit_next_lsn` (the read-only trail's, just caught up) and
    /// the manifest's `boot_sequence`, judged by `config`'s limits. When the checkpoint moved
    /// past what the view read as tentative, or a new owner came, it rewinds to the view's
    /// `tentative_from` and reads on from there; after a compaction it reads the volume whole.
    /// Stops at the first zero or invalid record of the tail, which the owner may be writing.
    /// An owner's volume is current already: nothing to do.
    pub(crate) fn catch_up(
        &self,
        audit_next_lsn: Lsn,
        boot_sequence: u64,
        config: &LsgConfig,
    ) -> Result<()> {
        let mut inner = self.write();
        if inner.view.is_none() {
            return Ok(());
        }
        let result = self.catch_up_locked(&mut inner, audit_next_lsn, boot_sequence, config);
        if let Some(view) = inner.view.as_mut() {
            match result {
                Ok(()) => {
                    view.boot_sequence = boot_sequence;
                    view.stale = false;
                }
                Err(_) => view.stale = true,
            }
        }
        result
    }

    pub(super) fn catch_up_locked(
        &self,
        inner: &mut Inner<S::File>,
        audit_next_lsn: Lsn,
        boot_sequence: u64,
        config: &LsgConfig,
    ) -> Result<()> {
        let checkpoint = read_checkpoint(&inner.checkpoint_file)?;
        let mut rules = Rules {
            checkpoint: checkpoint.position,
            audit_next_lsn,
            max_payload: config.max_volume_payload_bytes(),
            writer: false,
            window_bytes: CATCH_UP_WINDOW_BYTES,
        };
        let (tentative_from, seen_boot, stale, first_tentative) = match &inner.view {
            Some(v) => (
                v.tentative_from,
                v.boot_sequence,
                v.stale,
                v.first_tentative,
            ),
            None => return Ok(()),
        };

        let tail = if checkpoint.first_segment != inner.first_segment {
            // Compacted: the segments read so far are gone.
            rules.window_bytes = store::SCAN_WINDOW_BYTES;
            self.rebuild(inner, &*self.store, &checkpoint, &rules)?
        } else {
            let replaced = boot_sequence != seen_boot
                || stale
                || first_tentative.is_some_and(|(at, header)| !holds(inner, at, &header));
            let from = if replaced || checkpoint.position > tentative_from {
                let from = inner.rewind();
                let reopen_from = if replaced { from.0 } else { u64::MAX };
                self.refresh_files(inner, &*self.store, reopen_from, false)?;
                from
            } else {
                self.refresh_files(inner, &*self.store, u64::MAX, false)?;
                (inner.tail_segment, inner.tail_offset)
            };
            self.scan_records(inner, from, &rules)?
        };
        inner.take_tail(&tail, &checkpoint, false);
        Ok(())
    }

    /// The first step of adoption (with the ownership lock held and the trail recovered): makes
    /// this read-only view what opening for writing would make of the volume, reusing the index
    /// up to the view's `tentative_from` and reading with the writer's rules only what follows
    /// it, with handles of the writer's `store`. On failure the view stays a read-only view
    /// (read again at its next catch-up).
    pub(crate) fn prepare_adoption(
        &self,
        store: &S,
        config: &LsgConfig,
        audit_next_lsn: Lsn,
    ) -> Result<Adopting<S::File>> {
        let mut inner = self.write();
        let result = self.prepare_adoption_locked(&mut inner, store, config, audit_next_lsn);
        if result.is_err()
            && let Some(view) = inner.view.as_mut()
        {
            view.stale = true;
        }
        result
    }

    pub(super) fn prepare_adoption_locked(
        &self,
        inner: &mut Inner<S::File>,
        store: &S,
        config: &LsgConfig,
        audit_next_lsn: Lsn,
    ) -> Result<Adopting<S::File>> {
        let checkpoint_file = store.open(&format!("{}/{CHECKPOINT_NAME}", self.dir))?;
        let checkpoint = read_checkpoint(&checkpoint_file)?;
        let rules = Rules {
            checkpoint: checkpoint.position,
            audit_next_lsn,
            max_payload: config.max_volume_payload_bytes(),
            writer: true,
            window_bytes: store::SCAN_WINDOW_BYTES,
        };
        let tail = if checkpoint.first_segment != inner.first_segment {
            self.rebuild(inner, store, &checkpoint, &rules)?
        } else {
            let from = inner.rewind();
            self.refresh_files(inner, store, from.0, true)?;
            self.scan_records(inner, from, &rules)?
        };
        inner.take_tail(&tail, &checkpoint, true);
        self.vouch_for(inner, store, &tail, checkpoint.position)?;
        Ok(Adopting {
            checkpoint_file,
            checkpoint,
        })
    }

    /// The second step of adoption: moves the prepared index and files into the owner's volume.
    /// This handle answers [`LsgError::Failed`] from now on.
    pub(crate) fn hand_over(
        &self,
        adopting: Adopting<S::File>,
        store: Arc<S>,
        config: LsgConfig,
        owner: VolumeOwner<S>,
    ) -> DataVolume<S> {
        let mut inner = self.write();
        let checkpoint = adopting.checkpoint;
        let mut taken = Inner::new(adopting.checkpoint_file, checkpoint, None);
        taken.index = std::mem::take(&mut inner.index);
        taken.live_keys = std::mem::take(&mut inner.live_keys);
        taken.live_bytes = std::mem::take(&mut inner.live_bytes);
        taken.written_bytes = std::mem::take(&mut inner.written_bytes);
        taken.files = std::mem::take(&mut inner.files);
        taken.scan_stats = inner.scan_stats;
        let tail = Tail {
            segment: inner.tail_segment,
            offset: inner.tail_offset,
            closed: inner.tail_closed,
            written_end: inner.tail_offset,
            closed_after_checkpoint: Vec::new(),
        };
        taken.take_tail(&tail, &checkpoint, true);
        inner.view = None;
        inner.failure = Some(HANDED_OVER.to_string());
        DataVolume {
            name: self.name.clone(),
            dir: self.dir.clone(),
            store,
            lsg_id: self.lsg_id,
            config,
            owner: Some(owner),
            inner: RwLock::new(taken),
        }
    }
}
