//! The volume pair's one boundary to its data: [`VolumeAccess`], implemented by the real
//! [`DataVolume`] and by [`MemoryVolume`], a plain model that tests and simulation oracles use.
//! `tests/volume_conformance.rs` runs one script against both and requires the same answers.
//!
//! Access is synchronous and never syncs: reads and writes go to the page cache, and durability
//! is the audit trail's (write-ahead, steal/no-force).

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use duplex_lsg::{DataVolume, LsgError, Lsn, Store};
use duplex_pair::TxId;
use thiserror::Error;

/// A live key and its value, as scans return them.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// key → (generation, value or `None` for a deletion).
type Records = BTreeMap<Vec<u8>, (Lsn, Option<Vec<u8>>)>;

#[derive(Debug, Error)]
pub enum VolumeError {
    #[error(transparent)]
    Storage(#[from] LsgError),
    #[error(
        "transaction {tx} asked for an update record of key {key:?} in volume {volume} without holding its exclusive lock"
    )]
    NotLockedForWrite {
        tx: TxId,
        volume: String,
        key: Vec<u8>,
    },
}

/// Synchronous access to the volume's data (page-cache reads and writes; no syncs).
pub trait VolumeAccess {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, VolumeError>;
    /// Live keys in [start, end) order, at most `limit`. An empty or inverted range is empty.
    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, VolumeError>;
    /// Writes (Some) or deletes (None) `key` as the change with `lsn`. A change at or below the
    /// key's generation (the LSN of its last change) changes nothing, so redo is idempotent.
    fn apply(&self, key: &[u8], value: Option<&[u8]>, lsn: Lsn) -> Result<(), VolumeError>;
}

/// Whether no key lies between `start` and `end`. `BTreeMap::range` panics on such bounds, so
/// both implementations answer them here, before reaching a map.
fn range_is_empty(start: Bound<&[u8]>, end: Bound<&[u8]>) -> bool {
    match (start, end) {
        (Bound::Unbounded, _) | (_, Bound::Unbounded) => false,
        (Bound::Included(s), Bound::Included(e)) => s > e,
        (Bound::Included(s) | Bound::Excluded(s), Bound::Excluded(e))
        | (Bound::Excluded(s), Bound::Included(e)) => s >= e,
    }
}

impl<S: Store> VolumeAccess for DataVolume<S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, VolumeError> {
        Ok(DataVolume::get(self, key)?.map(|r| r.value))
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, VolumeError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        let records = self.scan_range((start, end), limit)?;
        Ok(records.into_iter().map(|r| (r.key, r.value)).collect())
    }

    fn apply(&self, key: &[u8], value: Option<&[u8]>, lsn: Lsn) -> Result<(), VolumeError> {
        // `false` (already at or past `lsn`) is the idempotent skip, not an error.
        match value {
            Some(v) => self.put(key, v, lsn)?,
            None => self.delete(key, lsn)?,
        };
        Ok(())
    }
}

/// A volume in a `BTreeMap`: key → (generation, value or deletion), the same rules as
/// [`DataVolume`] without files, limits or the write-ahead check (those are the store's).
#[derive(Debug, Default)]
pub struct MemoryVolume {
    records: Mutex<Records>,
}

impl MemoryVolume {
    pub fn new() -> Self {
        Self::default()
    }

    fn records(&self) -> MutexGuard<'_, Records> {
        // A panic elsewhere cannot leave the map half-changed: every change is one insert.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The LSN of the last change to `key`, deletes included (as [`DataVolume::generation`]).
    pub fn generation(&self, key: &[u8]) -> Option<Lsn> {
        self.records().get(key).map(|(lsn, _)| *lsn)
    }
}

impl VolumeAccess for MemoryVolume {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, VolumeError> {
        Ok(self.records().get(key).and_then(|(_, v)| v.clone()))
    }

    fn scan(
        &self,
        start: Bound<&[u8]>,
        end: Bound<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, VolumeError> {
        if range_is_empty(start, end) {
            return Ok(Vec::new());
        }
        Ok(self
            .records()
            .range::<[u8], _>((start, end))
            .filter_map(|(k, (_, v))| v.as_ref().map(|v| (k.clone(), v.clone())))
            .take(limit)
            .collect())
    }

    fn apply(&self, key: &[u8], value: Option<&[u8]>, lsn: Lsn) -> Result<(), VolumeError> {
        let mut records = self.records();
        if records
            .get(key)
            .is_some_and(|(generation, _)| *generation >= lsn)
        {
            return Ok(());
        }
        records.insert(key.to_vec(), (lsn, value.map(<[u8]>::to_vec)));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_and_inverted_ranges_are_empty_not_a_panic() {
        let k = |s: &'static str| s.as_bytes();
        assert!(range_is_empty(
            Bound::Included(k("b")),
            Bound::Included(k("a"))
        ));
        assert!(range_is_empty(
            Bound::Included(k("a")),
            Bound::Excluded(k("a"))
        ));
        assert!(range_is_empty(
            Bound::Excluded(k("a")),
            Bound::Excluded(k("a"))
        ));
        assert!(range_is_empty(
            Bound::Excluded(k("a")),
            Bound::Included(k("a"))
        ));
        assert!(!range_is_empty(
            Bound::Included(k("a")),
            Bound::Included(k("a"))
        ));
        assert!(!range_is_empty(Bound::Excluded(k("a")), Bound::Unbounded));

        let vol = MemoryVolume::new();
        vol.apply(b"a", Some(b"1"), Lsn(1)).expect("apply");
        let got = vol
            .scan(Bound::Excluded(k("a")), Bound::Excluded(k("a")), 10)
            .expect("scan");
        assert!(got.is_empty());
    }
}
