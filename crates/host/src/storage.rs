//! The owner's storage threads. The event loop never waits on a disk: it hands each job to a
//! thread and hears the completion as an event.
//!
//! - The flush thread makes the trail durable (`AuditTrail::wait_durable`). Requests that
//!   queued while a flush ran are merged into one (the highest LSN), which is the group commit
//!   at this level; the trail groups concurrent flushes again below.
//! - The checkpoint thread flushes the volumes (which makes the trail durable first), compacts
//!   a volume that is mostly overwritten records, and truncates the trail, so a slow volume
//!   flush never holds a commit's trail flush back.
//!
//! A failed job is reported once and ends its thread: the owner stops on the first storage
//! failure, and nothing may be written after it.

use std::sync::Arc;
use std::sync::mpsc;

use duplex_lsg::{FileStore, LogStorageGroup, Lsn};
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, debug_span};

/// What a storage thread reports back to the event loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageDone {
    /// The trail is durable through this LSN.
    TrailDurable(Lsn),
    /// Every volume was flushed with this checkpoint LSN.
    VolumesFlushed(Lsn),
    /// A flush, volume flush or truncation failed.
    Failed(String),
}

#[derive(Debug)]
enum CheckpointJob {
    FlushVolumes(Lsn),
    Truncate(Lsn),
}

/// The two storage threads of one owner. Dropping it ends them once their queues are empty.
#[derive(Debug)]
pub struct StorageWorkers {
    flush: mpsc::Sender<Lsn>,
    checkpoint: mpsc::Sender<CheckpointJob>,
}

impl StorageWorkers {
    /// Starts the threads for `lsg`; completions go to `done`, wrapped by `wrap`.
    pub fn start<E: Send + 'static, W: Fn(StorageDone) -> E + Send + Clone + 'static>(
        lsg: Arc<LogStorageGroup<FileStore>>,
        done: UnboundedSender<E>,
        wrap: W,
    ) -> Result<Self, std::io::Error> {
        let (flush, flush_rx) = mpsc::channel::<Lsn>();
        let (checkpoint, checkpoint_rx) = mpsc::channel::<CheckpointJob>();
        {
            let lsg = Arc::clone(&lsg);
            let done = done.clone();
            let wrap = wrap.clone();
            std::thread::Builder::new()
                .name("trail-flush".into())
                .spawn(move || flush_loop(&lsg, &flush_rx, &done, wrap))?;
        }
        std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || checkpoint_loop(&lsg, &checkpoint_rx, &done, wrap))?;
        Ok(StorageWorkers { flush, checkpoint })
    }

    /// Make the trail durable through `through`.
    pub fn flush_trail(&self, through: Lsn) {
        // A send fails only after the thread ended on a failure it already reported.
        let _ = self.flush.send(through);
    }

    pub fn flush_volumes(&self, checkpoint_lsn: Lsn) {
        let _ = self
            .checkpoint
            .send(CheckpointJob::FlushVolumes(checkpoint_lsn));
    }

    pub fn truncate_trail(&self, below: Lsn) {
        let _ = self.checkpoint.send(CheckpointJob::Truncate(below));
    }
}

fn flush_loop<E>(
    lsg: &LogStorageGroup<FileStore>,
    jobs: &mpsc::Receiver<Lsn>,
    done: &UnboundedSender<E>,
    wrap: impl Fn(StorageDone) -> E,
) {
    while let Ok(mut through) = jobs.recv() {
        while let Ok(more) = jobs.try_recv() {
            through = through.max(more);
        }
        let _span = debug_span!("trail_flush", through = through.0).entered();
        let result = match lsg.audit().wait_durable(through) {
            Ok(()) => StorageDone::TrailDurable(lsg.audit().durable_lsn()),
            Err(e) => StorageDone::Failed(format!("flushing the trail through {through}: {e}")),
        };
        let failed = matches!(result, StorageDone::Failed(_));
        if done.send(wrap(result)).is_err() || failed {
            return;
        }
    }
}

/// A volume is compacted when at least two segments' worth of records were written and three
/// quarters of them are overwritten: a log-structured volume otherwise grows with every update,
/// and with it the time a new owner takes to open it (it reads every segment to build its index).
/// Compaction holds the volume's lock while it copies the live records and syncs them, so it
/// runs rarely, after a checkpoint, on this thread.
fn compact_if_due(lsg: &LogStorageGroup<FileStore>) -> Result<(), String> {
    let segment_bytes = lsg.config().volume_segment_bytes;
    for name in lsg.volume_names() {
        let volume = lsg
            .volume(&name)
            .map_err(|e| format!("volume {name}: {e}"))?;
        let stats = volume.stats();
        if stats.written_bytes >= 2 * segment_bytes && stats.written_bytes >= 4 * stats.live_bytes {
            let _span = debug_span!("volume_compaction", volume = %name).entered();
            let done = volume
                .compact()
                .map_err(|e| format!("compacting volume {name}: {e}"))?;
            debug!(volume = %name, ?done, "volume compacted");
        }
    }
    Ok(())
}

fn checkpoint_loop<E>(
    lsg: &LogStorageGroup<FileStore>,
    jobs: &mpsc::Receiver<CheckpointJob>,
    done: &UnboundedSender<E>,
    wrap: impl Fn(StorageDone) -> E,
) {
    while let Ok(job) = jobs.recv() {
        let result = match job {
            CheckpointJob::FlushVolumes(lsn) => {
                let _span = debug_span!("volume_flush", checkpoint_lsn = lsn.0).entered();
                let mut failed = None;
                for name in lsg.volume_names() {
                    if let Err(e) = lsg.volume(&name).and_then(|v| v.flush(lsn)) {
                        failed = Some(format!("flushing volume {name} at checkpoint {lsn}: {e}"));
                        break;
                    }
                }
                if failed.is_none() {
                    failed = compact_if_due(lsg).err();
                }
                match failed {
                    None => Some(StorageDone::VolumesFlushed(lsn)),
                    Some(e) => Some(StorageDone::Failed(e)),
                }
            }
            CheckpointJob::Truncate(below) => {
                let _span = debug_span!("trail_truncate", below = below.0).entered();
                match lsg.audit().truncate_below(below) {
                    Ok(_) => None,
                    Err(e) => Some(StorageDone::Failed(format!(
                        "truncating the trail below {below}: {e}"
                    ))),
                }
            }
        };
        let Some(result) = result else { continue };
        let failed = matches!(result, StorageDone::Failed(_));
        if done.send(wrap(result)).is_err() || failed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_lsg::{LsgConfig, LsgId, RecordFlags, RecordType};

    #[test]
    fn a_mostly_overwritten_volume_is_compacted_and_a_live_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LsgConfig {
            audit_segment_bytes: 1 << 20,
            volume_segment_bytes: 64 << 10,
            max_batch_bytes: 64 << 10,
            max_record_bytes: 16 << 10,
            max_key_bytes: 64,
            max_value_bytes: 1 << 10,
        };
        let mut lsg = LogStorageGroup::create(dir.path(), LsgId(1), config).expect("create");
        let hot = lsg.create_volume("hot").expect("volume");
        let cold = lsg.create_volume("cold").expect("volume");
        let value = vec![5u8; 200];
        for i in 0..1200u32 {
            let lsn = lsg
                .audit()
                .append(RecordType::Update, RecordFlags::NONE, b"change")
                .expect("append");
            hot.put(b"the-key", &value, lsn).expect("put");
            cold.put(&i.to_be_bytes(), &value, lsn).expect("put");
        }
        let through = Lsn(lsg.audit().next_lsn().0 - 1);
        lsg.audit().wait_durable(through).expect("durable");
        let (hot_before, cold_before) = (hot.stats(), cold.stats());
        assert!(hot_before.written_bytes >= 2 * config.volume_segment_bytes);
        compact_if_due(&lsg).expect("compaction");
        let (hot_after, cold_after) = (hot.stats(), cold.stats());
        assert!(
            hot_after.written_bytes < hot_before.written_bytes / 10,
            "{hot_before:?} -> {hot_after:?}"
        );
        assert_eq!(cold_after.written_bytes, cold_before.written_bytes);
        let read = hot.get(b"the-key").expect("read").map(|r| r.value);
        assert_eq!(read, Some(value));
    }
}
