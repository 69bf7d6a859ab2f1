//! The owner's outbox: pair messages held back for a moment, so a transaction's records reach
//! each backup in one message with one acknowledgement.

use std::collections::BTreeMap;
use std::time::Duration;

use duplex_lsg::RecordType;
use duplex_pair::{PairMessage, StreamRecord};
use duplex_transport::EndpointId;

/// Pair messages held back for a moment (see [`Outbox::hold`]).
#[derive(Debug, Default)]
pub(super) struct Outbox {
    held: BTreeMap<EndpointId, Vec<PairMessage>>,
    /// When the oldest held message was held.
    pub(super) since: Option<Duration>,
}

/// The largest message the outbox makes by merging held ones.
const MAX_MERGED_BYTES: usize = 256 << 10;

/// Whether the primary waits for a backup to hold this message's records: commits and
/// prepares wait for the rule, a state change back to normal waits for the backup node.
fn awaited(message: &PairMessage) -> bool {
    match message {
        PairMessage::Records { records, .. } => records.iter().any(|r| {
            matches!(
                RecordType::try_from(r.record_type),
                Ok(RecordType::Commit | RecordType::Prepare | RecordType::StateChange) | Err(_)
            )
        }),
        _ => true,
    }
}

impl Outbox {
    /// Records nothing waits for (a transaction's updates) are held until something that is
    /// waited for goes to the same backup, the trail is flushed, or `pair_delay` passes: a
    /// transaction's records then reach each backup in one message with one acknowledgement,
    /// not one per request. Order per backup is kept: a message is sent only after what is
    /// held for its backup.
    pub(super) fn hold(
        &mut self,
        now: Duration,
        to: EndpointId,
        message: PairMessage,
    ) -> Option<PairMessage> {
        if awaited(&message) {
            return Some(message);
        }
        let queue = self.held.entry(to).or_default();
        match (queue.last_mut(), message) {
            (
                Some(PairMessage::Records {
                    tag,
                    records,
                    retain_from,
                }),
                PairMessage::Records {
                    tag: next_tag,
                    records: next,
                    retain_from: next_retain,
                },
            ) if *tag == next_tag
                && records.last().map(|r| r.lsn.0 + 1) == next.first().map(|r| r.lsn.0)
                && records
                    .iter()
                    .chain(&next)
                    .map(StreamRecord::size_bytes)
                    .sum::<usize>()
                    <= MAX_MERGED_BYTES =>
            {
                records.extend(next);
                *retain_from = next_retain;
            }
            (_, message) => queue.push(message),
        }
        self.since.get_or_insert(now);
        None
    }

    pub(super) fn take(&mut self, to: EndpointId) -> Vec<PairMessage> {
        let held = self.held.remove(&to).unwrap_or_default();
        if self.held.is_empty() {
            self.since = None;
        }
        held
    }

    pub(super) fn take_all(&mut self) -> Vec<(EndpointId, PairMessage)> {
        self.since = None;
        std::mem::take(&mut self.held)
            .into_iter()
            .flat_map(|(to, messages)| messages.into_iter().map(move |m| (to, m)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_lsg::{LsgId, Lsn, OwnerEpoch};
    use duplex_pair::PairTag;

    fn records(tag: PairTag, from: u64, types: &[RecordType]) -> PairMessage {
        PairMessage::Records {
            tag,
            records: types
                .iter()
                .enumerate()
                .map(|(i, t)| StreamRecord {
                    lsn: Lsn(from + i as u64),
                    record_type: *t as u8,
                    flags: 0,
                    payload: vec![1, 2, 3],
                })
                .collect(),
            retain_from: Lsn(from),
        }
    }

    fn lsns(m: &PairMessage) -> Vec<u64> {
        match m {
            PairMessage::Records { records, .. } => records.iter().map(|r| r.lsn.0).collect(),
            _ => Vec::new(),
        }
    }

    #[test]
    fn the_outbox_holds_updates_until_something_awaited_and_keeps_their_order() {
        let tag = PairTag {
            lsg: LsgId(1),
            epoch: OwnerEpoch(2),
            incarnation: 7,
        };
        let (a, b) = (EndpointId::new(1, 1), EndpointId::new(2, 0));
        let mut out = Outbox::default();
        let now = Duration::from_millis(10);
        // Two requests' updates to two backups: held, and merged per backup.
        for to in [a, b] {
            assert!(
                out.hold(now, to, records(tag, 5, &[RecordType::Update]))
                    .is_none()
            );
            assert!(
                out.hold(now, to, records(tag, 6, &[RecordType::Update]))
                    .is_none()
            );
        }
        assert_eq!(out.since, Some(now));
        // A commit is awaited: it goes at once, after what is held for its backup.
        let commit = records(tag, 7, &[RecordType::Commit]);
        let passed = out.hold(now, a, commit.clone());
        assert_eq!(passed, Some(commit));
        let held = out.take(a);
        assert_eq!(held.len(), 1, "contiguous updates merge into one message");
        assert_eq!(lsns(&held[0]), vec![5, 6]);
        // The other backup's records stay held until a flush or the delay takes them.
        assert!(out.since.is_some());
        let rest = out.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!((rest[0].0, lsns(&rest[0].1)), (b, vec![5, 6]));
        assert_eq!(out.since, None);
        // Anything but records (a resync) is never held.
        let resync = PairMessage::Resync { tag, from: Lsn(1) };
        assert_eq!(out.hold(now, a, resync.clone()), Some(resync));
        // Records that do not continue the held ones are not merged with them.
        assert!(
            out.hold(now, a, records(tag, 9, &[RecordType::Update]))
                .is_none()
        );
        assert!(
            out.hold(now, a, records(tag, 12, &[RecordType::Update]))
                .is_none()
        );
        assert_eq!(out.take(a).len(), 2);
    }
}
