//! Compaction: copying the newest record of every key to new segments and dropping the old.

use super::*;

impl<S: Store> DataVolume<S> {
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
