//! Creating an LSG with its data volumes and first rows, ready for its first owner. The rows go
//! in as one committed transaction written straight to the trail and the volumes, flushed, so
//! any later owner recovers them like any other commit.

use std::path::Path;

use duplex_lsg::{FileStore, LogStorageGroup, LsgConfig, LsgId, Lsn, RecordFlags};
use duplex_owner::OwnerStart;
use duplex_pair::{
    AuditBody, CommitState, MessageTable, MessageTableLimits, StreamRecord, TxEnd, TxId, Update,
};

use crate::HostError;

/// One row to create: volume, key, value.
pub type Row = (String, Vec<u8>, Vec<u8>);

/// Creates the LSG `lsg_id` in `dir` with `volumes` and `rows`, owned by this process, and the
/// start its first owner runs from (primary-only until a backup node joins).
pub fn create_lsg(
    dir: &Path,
    lsg_id: LsgId,
    config: LsgConfig,
    volumes: &[&str],
    rows: &[Row],
    messages: MessageTableLimits,
) -> Result<(LogStorageGroup<FileStore>, OwnerStart), HostError> {
    let lsg_error = |source| HostError::Lsg {
        path: dir.to_path_buf(),
        source,
    };
    let mut lsg = LogStorageGroup::create(dir, lsg_id, config).map_err(lsg_error)?;
    for name in volumes {
        lsg.create_volume(name).map_err(lsg_error)?;
    }
    let epoch = lsg.owner_epoch();
    let tx = TxId { epoch, number: 0 };
    let mut retained = Vec::new();
    let mut append =
        |lsg: &LogStorageGroup<FileStore>, body: &AuditBody| -> Result<Lsn, HostError> {
            let payload = body
                .encode(config.max_record_bytes)
                .map_err(|e| HostError::Create(e.to_string()))?;
            let lsn = lsg
                .audit()
                .append(body.record_type(), RecordFlags::NONE, &payload)
                .map_err(lsg_error)?;
            retained.push(StreamRecord {
                lsn,
                record_type: body.record_type() as u8,
                flags: 0,
                payload,
            });
            Ok(lsn)
        };
    for (volume, key, value) in rows {
        let body = AuditBody::Update(Update {
            tx,
            volume: volume.clone(),
            key: key.clone(),
            before: None,
            after: Some(value.clone()),
        });
        let lsn = append(&lsg, &body)?;
        lsg.volume(volume)
            .and_then(|v| v.put(key, value, lsn))
            .map_err(lsg_error)?;
    }
    let commit = AuditBody::Commit(TxEnd {
        tx,
        epoch,
        request: None,
    });
    let durable = append(&lsg, &commit)?;
    lsg.audit().flush().map_err(lsg_error)?;
    let start = OwnerStart {
        state: CommitState::PrimaryOnly,
        retained,
        durable,
        table: MessageTable::new(messages),
        in_doubt: Vec::new(),
        last_checkpoint: Lsn(0),
        penultimate_checkpoint: Lsn(0),
    };
    Ok((lsg, start))
}
