//! How a backup becomes the owner: when to go for the LSG's lock and how (`acquire_mode`),
//! the attempt on a thread of its own, the fence and the gathering of the backups' copies, and
//! `take_over` on a blocking thread (the module docs of `driver` say why each step is so).

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use duplex_lsg::{FileStore, LogStorageGroup, LsgError, Lsn, OpenMode};
use duplex_owner::takeover::{Chain, Copies, StartKind, TakeoverError, Taker, take_over};
use duplex_pair::{Clock, PairMessage, PairTag};
use duplex_transport::{EndpointId, Transport};
use tracing::{debug, info, warn};

use super::{
    Acquire, BackupState, Exit, Gathering, Host, Internal, MAX_TIMELINES, ReplyTo, Report, Role,
    TakenOver, unix_ms,
};
use crate::config::PAIR_STREAM;
use crate::wire::Timeline;

impl Host {
    /// Whether this backup should go for the LSG's lock now, and how.
    pub(super) fn acquire_mode(&self, now: Duration, b: &BackupState) -> Option<OpenMode> {
        if b.gathering.is_some() || b.acquire != Acquire::Idle || now < b.next_try_at {
            return None;
        }
        if self.recover {
            return Some(OpenMode::WriteWaiting);
        }
        let Some(primary) = self.primary else {
            // A cold start: nobody announced a primary in time; whoever holds no lock may
            // recover (the lock says whether anybody owns the LSG).
            return self
                .cold_start_at
                .is_some_and(|at| now >= at)
                .then_some(OpenMode::Write);
        };
        if primary == self.config.local {
            return None;
        }
        if primary.node == self.config.local.node {
            return Some(OpenMode::WriteWaiting);
        }
        // The kernel's release of the node's liveness file is the fast signal; the backup
        // node's designated CPU (the one the primary streams to) acts on it, the others wait
        // for the detector, so the CPU with the copy of the stream normally takes over.
        let released = self.config.backup_node_of(primary) == Some(self.config.local)
            && self
                .nodes_dead
                .get(&primary.node)
                .is_some_and(|at| *at >= self.primary_since);
        let node_down = self
            .config
            .cpus
            .iter()
            .filter(|c| c.node == primary.node)
            .all(|c| !self.peers_up.contains_key(c));
        (released || node_down).then_some(OpenMode::Write)
    }

    pub(super) fn maybe_acquire(&mut self, now: Duration) {
        let Role::Backup(b) = &self.role else { return };
        let Some(mode) = self.acquire_mode(now, b) else {
            return;
        };
        let (dir, lsg_config) = (self.config.lsg_dir.clone(), self.config.lsg_config);
        let done = self.inbox.clone();
        // A thread of its own: a `WriteWaiting` open may wait for as long as the owner lives,
        // and must not hold a runtime thread (or the runtime's shutdown) meanwhile.
        let spawned = std::thread::Builder::new()
            .name("lsg-acquire".into())
            .spawn(move || {
                let started = Instant::now();
                let result = LogStorageGroup::open(&dir, lsg_config, mode);
                done.send(Internal::Acquired {
                    result: Box::new(result),
                    waited: started.elapsed(),
                });
            });
        let Role::Backup(b) = &mut self.role else {
            return;
        };
        match spawned {
            Ok(_) => {
                b.acquire = if mode == OpenMode::WriteWaiting {
                    Acquire::Waiting
                } else {
                    Acquire::Trying
                };
            }
            Err(e) => {
                warn!(error = %e, "cannot start a thread to acquire the LSG");
                b.next_try_at = now + self.config.timing.acquire_poll;
            }
        }
    }

    pub(super) fn on_acquired(
        &mut self,
        now: Duration,
        result: Result<LogStorageGroup<FileStore>, LsgError>,
        waited: Duration,
    ) {
        let retry = self.config.timing.acquire_poll;
        let Role::Backup(b) = &mut self.role else {
            // Owning already (cannot happen: one attempt at a time); the handle is dropped.
            return;
        };
        b.acquire = Acquire::Idle;
        let cold_start = self.primary.is_none() && self.cold_start_at.is_some();
        let lsg = match result {
            Ok(lsg) => lsg,
            Err(LsgError::OwnedBy { .. }) if cold_start => {
                // A live owner holds the LSG: it announces itself to us; no cold start.
                self.cold_start_at = None;
                return;
            }
            Err(LsgError::OwnedBy { .. }) => {
                b.next_try_at = now + retry;
                return;
            }
            Err(e) => {
                warn!(error = %e, "opening the LSG for writing failed");
                b.next_try_at = now + retry;
                return;
            }
        };
        if cold_start {
            // Nobody held the LSG and nobody announced a primary: every CPU that held it is
            // gone, and with it every copy of the stream.
            info!("no primary and nobody holds the LSG: recovering it from the trail");
            self.cold_start_at = None;
            self.recover = true;
        }
        let epoch = lsg.owner_epoch();
        self.epoch_seen = self.epoch_seen.max(epoch);
        b.backup.take_over(epoch);
        let fenced_at = SystemTime::now();
        let detected = self.detected.take().unwrap_or(fenced_at).min(fenced_at);
        self.timelines.push_back(Timeline {
            detected_unix_ms: unix_ms(detected),
            fenced_unix_ms: unix_ms(fenced_at),
            recovered_unix_ms: None,
            ready_unix_ms: None,
            epoch,
            from: self.primary.filter(|p| *p != self.config.local),
            start: None,
        });
        if self.timelines.len() > MAX_TIMELINES {
            self.timelines.pop_front();
        }
        let from = Lsn(lsg.audit().next_lsn().0.saturating_sub(1).max(1));
        let tag = PairTag {
            lsg: self.config.lsg_id,
            epoch,
            incarnation: self.transport.incarnation(),
        };
        let fence = match (PairMessage::Fence { tag, from }).encode() {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => {
                warn!(error = %e, "cannot encode a fence");
                return;
            }
        };
        // The backups up, not the owner we take over from: holding its lock, we know it is
        // dead (the detector may not have said so yet).
        let local = self.config.local;
        let previous = self.primary;
        let waiting_for: BTreeSet<EndpointId> = self
            .config
            .cpus
            .iter()
            .copied()
            .filter(|c| {
                *c != local
                    && Some(*c) != previous
                    && self.peers_up.contains_key(c)
                    && !self.nodes_dead.contains_key(&c.node)
            })
            .collect();
        info!(%epoch, waited_ms = waited.as_secs_f64() * 1e3, ?waiting_for, "holding the LSG: gathering the backups' copies");
        (self.report)(Report::Acquired {
            epoch: epoch.0,
            waited_ms: waited.as_secs_f64() * 1e3,
        });
        b.gathering = Some(Box::new(Gathering {
            lsg,
            copies: Copies::new(waiting_for),
            fence,
            resend_at: now,
            deadline: now + self.config.timing.fence_deadline,
            acquired_at: now,
        }));
        self.gather(now);
    }

    /// Sends the fence to the backups that have not answered; takes over once all have (or at
    /// the deadline).
    pub(super) fn gather(&mut self, now: Duration) {
        let Role::Backup(b) = &mut self.role else {
            return;
        };
        let Some(g) = b.gathering.as_mut() else {
            return;
        };
        if now >= g.resend_at {
            g.resend_at = now + self.config.timing.fence_resend;
            for other in g.copies.waiting_for() {
                if let Err(e) = self
                    .transport
                    .stream_send(*other, PAIR_STREAM, g.fence.clone())
                {
                    debug!(to = %other, error = %e, "fence not sent");
                }
            }
        }
        if g.copies.all_in() || now >= g.deadline {
            self.start_takeover();
        }
    }

    pub(super) fn start_takeover(&mut self) {
        let role = std::mem::replace(&mut self.role, Role::Stopped);
        let Role::Backup(mut b) = role else {
            self.role = role;
            return;
        };
        let Some(g) = b.gathering.take() else {
            self.role = Role::Backup(b);
            return;
        };
        let mut g = *g;
        // A copy still arriving when the time ran out is incomplete: it cannot vouch.
        let gathered = std::mem::take(&mut g.copies).into_complete();
        let own = Chain::of_backup(&b.backup);
        let own = (!own.records.is_empty()).then_some(own);
        let incarnation = self.transport.incarnation();
        let owner_config = self.config.owner_config(
            g.lsg.owner_epoch(),
            incarnation,
            g.lsg.config().max_record_bytes,
        );
        let local = self.config.local;
        let backup_node = self
            .primary
            .filter(|p| *p != local)
            .and_then(|p| self.config.backup_node_of(p))
            .filter(|b| *b != local);
        let taker = Taker {
            incarnation,
            backup_node,
            memory_lost_everywhere: self.recover,
        };
        let copies = gathered.len();
        let done = self.inbox.clone();
        self.acquired_at = Some(g.acquired_at);
        debug!(?taker, copies, own = own.is_some(), "taking over");
        self.role = Role::TakingOver(b);
        let clock = self.clock;
        tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let result = take_over::<FileStore, ReplyTo>(
                g.lsg,
                taker,
                own,
                gathered,
                owner_config,
                clock.now(),
            )
            .map(|(owner, report)| (owner, report, copies, t0.elapsed()));
            done.send(Internal::TakeoverDone(Box::new(result)));
        });
    }

    pub(super) fn on_takeover_done(&mut self, result: Result<TakenOver, TakeoverError>) {
        let now = self.now();
        let role = std::mem::replace(&mut self.role, Role::Stopped);
        let Role::TakingOver(mut b) = role else {
            self.role = role;
            return;
        };
        match result {
            Ok((owner, report, copies, recovery)) => {
                let recovered_at = SystemTime::now();
                let start = match report.start {
                    StartKind::Warm => "warm",
                    StartKind::Cold => "cold",
                };
                let owner = Box::new(owner);
                if let Err(e) = self.start_owner(owner) {
                    let reason = format!("cannot start the storage threads: {e}");
                    (self.report)(Report::Stopped {
                        reason: reason.clone(),
                    });
                    self.exit = Some(Exit::Stopped(reason));
                    return;
                }
                self.recover = false;
                let lsg = self.config.lsg_id.to_string();
                metrics::counter!("duplex_takeovers_total", "lsg" => lsg.clone(), "start" => start)
                    .increment(1);
                if let Some(at) = self.acquired_at {
                    metrics::histogram!("duplex_takeover_seconds", "lsg" => lsg)
                        .record(now.saturating_sub(at).as_secs_f64());
                }
                if let Some(t) = self.timelines.back_mut() {
                    t.recovered_unix_ms = Some(unix_ms(recovered_at));
                    t.ready_unix_ms = Some(unix_ms(SystemTime::now()));
                    t.start = Some(start.to_string());
                }
                (self.report)(Report::Owner {
                    epoch: report.epoch.0,
                    start: start.into(),
                    trail_end: report.trail_end.0,
                    reappended: report.reappended,
                    records_read: report.records_read,
                    redone: report.redone,
                    undone: report.undone,
                    in_doubt: report.in_doubt,
                    copies,
                    recovery_ms: recovery.as_secs_f64() * 1e3,
                    takeover_ms: self
                        .acquired_at
                        .take()
                        .map_or(0.0, |at| now.saturating_sub(at).as_secs_f64() * 1e3),
                });
                let buffered = std::mem::take(&mut self.buffered);
                if let Role::Owner(o) = &mut self.role {
                    for (from, message) in buffered {
                        o.owner.on_pair_message(now, from, message);
                    }
                }
            }
            Err(TakeoverError::CopyMissing { from }) => {
                // Let the LSG go (the handle was dropped with the error) and try again: the
                // backup node's pairs may answer, or take it over themselves.
                let reason = format!(
                    "no complete copy of the stream at hand (backup node {from:?} did not answer)"
                );
                warn!(%reason, "takeover deferred");
                (self.report)(Report::TakeoverDeferred { reason });
                self.buffered.clear();
                b.next_try_at = now + self.config.timing.copy_missing_retry;
                self.role = Role::Backup(b);
            }
            Err(e) => {
                let reason = format!("takeover failed: {e}");
                warn!(%reason);
                (self.report)(Report::Stopped {
                    reason: reason.clone(),
                });
                self.exit = Some(Exit::Stopped(reason));
            }
        }
    }
}
