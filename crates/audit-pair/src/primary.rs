//! The primary half of an audit pair: assigns LSNs, streams every record to the backups in LSN
//! order, and decides when a commit may be acknowledged (SPEC §2, seed 001).
//!
//! A sans-IO state machine: the owner feeds it appends, acknowledgements from backups, flush
//! completions, peer failures and ticks, each with `now`, and drains [`PrimaryAction`]s: write
//! this record to the trail at this LSN, flush through this LSN, send this message, acknowledge
//! this commit. It never waits; durability and backup acknowledgements come back as events, so
//! one event loop has many commits in flight.
//!
//! The acknowledgement rule. A commit at LSN `c` is acknowledged once either
//! - the trail is durable through `c` (always enough), or
//! - the state is normal, the pair is not paranoid, the backup node's pairs hold the stream
//!   through `c`, and so does the same-node backup half while it counts.
//!
//! Counting changes are made safe by the trail itself:
//! - Losing the backup node switches to primary-only at once (a stricter rule: flush first) and
//!   logs a [`StateChange`]; records written while not normal carry the communications flag.
//! - Losing the same-node half logs a [`StateChange`] that drops it, and the half stops counting
//!   only once that record is durable. So a half that takes over later finds in the trail (or
//!   its own stream) whether every acknowledgement went through it.
//! - A backup that joins catches up to the end of the stream as it was when it joined; only
//!   then does it count again (a [`StateChange`] says so; back to normal once that record is
//!   durable and held by the backup node).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;

use duplex_lsg::{Lsn, OwnerEpoch, RecordFlags};
use duplex_pair::records::{AuditBody, RecordError, StateChange};
use duplex_pair::stream::{PairMessage, PairTag, StreamRecord, batches};
use duplex_pair::{CommitState, Receipt};
use duplex_transport::EndpointId;

/// Which backup a link feeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum BackupRole {
    /// The backup half of the pair, on another CPU of the home node.
    Home,
    /// The backup node's pairs.
    Remote,
}

#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    pub tag: PairTag,
    /// Flush before every acknowledgement, in every state.
    pub paranoid: bool,
    /// The LSG's largest audit record payload.
    pub max_record_bytes: usize,
    pub home: Option<EndpointId>,
    pub remote: Option<EndpointId>,
    /// A backup that holds nothing new for this long while records wait for it stops counting.
    pub ack_timeout: Duration,
    /// The largest stream message; a larger batch goes as several.
    pub max_message_bytes: usize,
    /// Records sent to a backup and not yet acknowledged, at most.
    pub max_unacked_records: u64,
    /// Group flush in normal state: flush when this many bytes are waiting ...
    pub flush_bytes: usize,
    /// ... or when the oldest waiting record is this old.
    pub flush_interval: Duration,
}

/// What the primary wants done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Append this record to the trail; the trail's next LSN must be `lsn`.
    Append { lsn: Lsn, record: StreamRecord },
    /// Make the trail durable through `through`, then call [`AuditPrimary::on_durable`].
    Flush { through: Lsn },
    Send {
        to: EndpointId,
        message: PairMessage,
    },
    /// The commit at `commit_lsn` may be acknowledged to its client.
    Acknowledge { commit_lsn: Lsn, receipt: Receipt },
    /// The commit state or the counting of the same-node half changed (for status and logs).
    StateChanged {
        state: CommitState,
        home_counts: bool,
    },
    /// A higher epoch owns the LSG: this primary acknowledges nothing more and must stop.
    Fenced { by: OwnerEpoch },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkState {
    /// Not joined (never, or dropped): nothing is sent.
    Absent,
    /// Joined: records are streamed. It counts once `held` reaches `catch_up_to`.
    Streaming {
        incarnation: u64,
        sent: Lsn,
        held: Lsn,
        catch_up_to: Lsn,
        /// When `held` last moved, or when records started waiting for it.
        progress_at: Duration,
    },
}

#[derive(Debug, Clone)]
struct BackupLink {
    endpoint: EndpointId,
    role: BackupRole,
    state: LinkState,
}

/// The primary half's state. See the module docs for the rules it keeps.
#[derive(Debug)]
pub struct AuditPrimary {
    config: PrimaryConfig,
    state: CommitState,
    /// Records from `retained_from` to the newest, kept for backups that join or lag.
    retained: VecDeque<StreamRecord>,
    retained_from: Lsn,
    retained_bytes: usize,
    /// Oldest record recovery may need, told to backups.
    horizon: Lsn,
    durable: Lsn,
    flush_requested: Lsn,
    /// When the oldest record not yet durable was appended (for the group flush interval).
    oldest_unflushed_at: Option<Duration>,
    links: Vec<BackupLink>,
    /// The incarnation of the same-node half whose acknowledgements count.
    home_counts: Option<u64>,
    /// A logged drop of the same-node half: it counts until this LSN is durable.
    home_drop_at: Option<Lsn>,
    /// A logged return to normal: effective once durable and held by the backup node.
    normal_at: Option<Lsn>,
    commits: BTreeSet<Lsn>,
    /// The highest LSN an acknowledgement was given for (validate checks the rule held).
    acknowledged_through: Lsn,
    fenced: Option<OwnerEpoch>,
    actions: VecDeque<PrimaryAction>,
}

impl AuditPrimary {
    /// A primary over a trail whose next LSN is `next_lsn` and durable through `durable`, with
    /// `retained` the records from the truncation horizon on that backups may need (in order,
    /// ending at `next_lsn - 1`). A new LSG starts primary-only; a takeover starts backup-only.
    pub fn new(
        config: PrimaryConfig,
        state: CommitState,
        retained: Vec<StreamRecord>,
        next_lsn: Lsn,
        durable: Lsn,
    ) -> Self {
        let retained_from = Lsn(next_lsn.0 - retained.len() as u64);
        let retained_bytes = retained.iter().map(StreamRecord::size_bytes).sum();
        let mut links = Vec::new();
        for (endpoint, role) in [
            (config.home, BackupRole::Home),
            (config.remote, BackupRole::Remote),
        ] {
            if let Some(endpoint) = endpoint {
                links.push(BackupLink {
                    endpoint,
                    role,
                    state: LinkState::Absent,
                });
            }
        }
        AuditPrimary {
            state: if state == CommitState::Normal {
                CommitState::PrimaryOnly
            } else {
                state
            },
            retained: retained.into(),
            retained_from,
            retained_bytes,
            horizon: retained_from,
            durable,
            flush_requested: durable,
            oldest_unflushed_at: None,
            links,
            home_counts: None,
            home_drop_at: None,
            normal_at: None,
            commits: BTreeSet::new(),
            acknowledged_through: Lsn(0),
            fenced: None,
            actions: VecDeque::new(),
            config,
        }
    }

    pub fn tag(&self) -> PairTag {
        self.config.tag
    }

    pub fn state(&self) -> CommitState {
        self.state
    }

    pub fn next_lsn(&self) -> Lsn {
        Lsn(self.retained_from.0 + self.retained.len() as u64)
    }

    pub fn durable(&self) -> Lsn {
        self.durable
    }

    pub fn home_counts(&self) -> bool {
        self.home_counts.is_some()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced.is_some()
    }

    /// Commits written and not yet acknowledged.
    pub fn commits_waiting(&self) -> usize {
        self.commits.len()
    }

    /// How far a backup holds the stream, if it is joined.
    pub fn backup_held(&self, role: BackupRole) -> Option<Lsn> {
        self.links
            .iter()
            .find(|l| l.role == role)
            .and_then(|l| match l.state {
                LinkState::Streaming { held, .. } => Some(held),
                LinkState::Absent => None,
            })
    }

    /// Writes `body` as the next record and streams it; returns its LSN.
    pub fn append(&mut self, now: Duration, body: &AuditBody) -> Result<Lsn, RecordError> {
        let payload = body.encode(self.config.max_record_bytes)?;
        // In communication from the state change to normal on: the backup node holds
        // everything by then, and a takeover reading the trail's last record must see that
        // commits may be acknowledged from memory as soon as that change takes effect.
        let flags = if self.state.out_of_communication() && self.normal_at.is_none() {
            RecordFlags::OUT_OF_COMMUNICATION
        } else {
            RecordFlags::NONE
        };
        let lsn = self.next_lsn();
        let record = StreamRecord {
            lsn,
            record_type: body.record_type() as u8,
            flags: flags.bits(),
            payload,
        };
        self.retained_bytes += record.size_bytes();
        self.retained.push_back(record.clone());
        self.oldest_unflushed_at.get_or_insert(now);
        self.actions
            .push_back(PrimaryAction::Append { lsn, record });
        for link in &mut self.links {
            if let LinkState::Streaming {
                sent,
                held,
                progress_at,
                ..
            } = &mut link.state
                && *held == *sent
            {
                // Nothing was waiting for this backup until now.
                *progress_at = now;
            }
        }
        Ok(lsn)
    }

    /// Writes a commit (or abort) record that a client waits on: it is acknowledged by a
    /// [`PrimaryAction::Acknowledge`] once the rule allows.
    pub fn append_commit(&mut self, now: Duration, body: &AuditBody) -> Result<Lsn, RecordError> {
        let lsn = self.append(now, body)?;
        self.commits.insert(lsn);
        self.request_flush_if_needed();
        Ok(lsn)
    }

    /// The oldest record recovery may still need moved (a checkpoint); records before it are
    /// forgotten once no joined backup still needs them.
    pub fn set_horizon(&mut self, horizon: Lsn) {
        self.horizon = self.horizon.max(horizon);
        self.trim_retained();
    }

    /// The trail is durable through `through`.
    pub fn on_durable(&mut self, now: Duration, through: Lsn) {
        if through <= self.durable {
            return;
        }
        self.durable = through.min(Lsn(self.next_lsn().0 - 1));
        if self.durable.0 + 1 >= self.next_lsn().0 {
            self.oldest_unflushed_at = None;
        } else {
            self.oldest_unflushed_at.get_or_insert(now);
        }
        if let Some(at) = self.home_drop_at
            && self.durable >= at
        {
            self.home_drop_at = None;
            self.home_counts = None;
            self.state_changed();
        }
        self.check_normal();
        self.acknowledge();
    }

    /// A message from a backup.
    pub fn on_message(&mut self, now: Duration, from: EndpointId, message: PairMessage) {
        let tag = message.tag();
        if tag.lsg != self.config.tag.lsg || self.fenced.is_some() {
            return;
        }
        if tag.epoch > self.config.tag.epoch {
            self.on_fenced(tag.epoch);
            return;
        }
        let Some(index) = self.links.iter().position(|l| l.endpoint == from) else {
            return;
        };
        match message {
            PairMessage::Join { tag, held } => self.on_join(now, index, tag, held),
            PairMessage::Ack { tag, held } => self.on_ack(now, index, tag, held),
            PairMessage::Records { .. }
            | PairMessage::Resync { .. }
            | PairMessage::Fence { .. }
            | PairMessage::FenceAck { .. } => {}
        }
    }

    /// The transport says `peer` is down (or its incarnation is gone).
    pub fn on_peer_down(&mut self, now: Duration, peer: EndpointId, incarnation: u64) {
        if let Some(index) = self.links.iter().position(|l| l.endpoint == peer)
            && matches!(self.links[index].state,
                LinkState::Streaming { incarnation: i, .. } if i == incarnation)
        {
            self.drop_backup(now, index);
        }
    }

    /// Time passed: drop backups that stopped acknowledging, start a group flush that is due.
    pub fn tick(&mut self, now: Duration) {
        if self.fenced.is_some() {
            return;
        }
        for index in 0..self.links.len() {
            if let LinkState::Streaming {
                sent,
                held,
                progress_at,
                ..
            } = self.links[index].state
                && held < sent
                && now.saturating_sub(progress_at) >= self.config.ack_timeout
            {
                self.drop_backup(now, index);
            }
        }
        let unflushed_bytes = self.unflushed_bytes();
        let due = self
            .oldest_unflushed_at
            .is_some_and(|at| now.saturating_sub(at) >= self.config.flush_interval);
        if unflushed_bytes > 0 && (due || unflushed_bytes >= self.config.flush_bytes) {
            self.request_flush(Lsn(self.next_lsn().0 - 1));
        }
    }

    /// The next thing to do. Records appended since the last poll are streamed first, batched.
    pub fn poll_action(&mut self) -> Option<PrimaryAction> {
        if self.actions.is_empty() {
            // Any event may have widened what the rule allows; acknowledge before streaming on.
            self.check_normal();
            self.acknowledge();
            self.pump();
        }
        self.actions.pop_front()
    }

    /// Checks the invariants; tests call it after every step.
    pub fn validate(&self) -> Result<(), String> {
        let last = Lsn(self.next_lsn().0 - 1);
        for (i, r) in self.retained.iter().enumerate() {
            if r.lsn.0 != self.retained_from.0 + i as u64 {
                return Err(format!("retained record {} at position {i}", r.lsn));
            }
        }
        if self.durable > last {
            return Err(format!(
                "durable {} beyond the last record {last}",
                self.durable
            ));
        }
        for link in &self.links {
            if let LinkState::Streaming { sent, held, .. } = link.state {
                if held > sent || sent > last {
                    return Err(format!(
                        "{:?} backup: held {held}, sent {sent}, last {last}",
                        link.role
                    ));
                }
                if sent.0 + 1 < self.retained_from.0 {
                    return Err(format!(
                        "{:?} backup needs {} but records start at {}",
                        link.role,
                        sent.0 + 1,
                        self.retained_from
                    ));
                }
            }
        }
        if self.state == CommitState::Normal && !self.remote_counts() {
            return Err("normal state without a counting backup node".into());
        }
        if let Some(inc) = self.home_counts
            && self.home_drop_at.is_none() && !self.links.iter().any(|l| {
            l.role == BackupRole::Home
                && matches!(l.state, LinkState::Streaming { incarnation, .. } if incarnation == inc)
        }) {
            return Err("the same-node half counts but is not streaming".into());
        }
        if self.acknowledged_through > last {
            return Err(format!(
                "acknowledged through {} beyond the last record {last}",
                self.acknowledged_through
            ));
        }
        if let Some(&first) = self.commits.first()
            && first <= self.ackable_through()
            && self.fenced.is_none()
        {
            return Err(format!("commit {first} may be acknowledged but waits"));
        }
        Ok(())
    }

    fn on_join(&mut self, now: Duration, index: usize, tag: PairTag, held: Lsn) {
        let last = Lsn(self.next_lsn().0 - 1);
        // A backup's records continue ours only if it holds our own stream; anything else it
        // holds may be a stale history, so it starts over from what we retain.
        let from = if tag.epoch == self.config.tag.epoch
            && held <= last
            && held.0 + 1 >= self.retained_from.0
        {
            Lsn(held.0 + 1)
        } else {
            self.retained_from
        };
        let link = &mut self.links[index];
        if let LinkState::Streaming {
            incarnation,
            sent,
            held: link_held,
            progress_at,
            ..
        } = &mut link.state
            && *incarnation == tag.incarnation
            && tag.epoch == self.config.tag.epoch
            && held >= *link_held
            && held <= *sent
        {
            // The same backup lost frames or heard nothing for a while: resend from what it
            // holds. It keeps counting; its acknowledgements only ever move forward.
            *link_held = held;
            *sent = held;
            *progress_at = now;
            self.actions.push_back(PrimaryAction::Send {
                to: link.endpoint,
                message: PairMessage::Resync {
                    tag: self.config.tag,
                    from: Lsn(held.0 + 1),
                },
            });
            self.on_caught_up(now, index);
            self.check_normal();
            self.acknowledge();
            return;
        }
        if self.counts(index) {
            self.drop_backup(now, index);
        }
        let link = &mut self.links[index];
        link.state = LinkState::Streaming {
            incarnation: tag.incarnation,
            sent: Lsn(from.0 - 1),
            held: Lsn(from.0 - 1),
            catch_up_to: last,
            progress_at: now,
        };
        self.actions.push_back(PrimaryAction::Send {
            to: link.endpoint,
            message: PairMessage::Resync {
                tag: self.config.tag,
                from,
            },
        });
        self.on_caught_up(now, index);
    }

    fn on_ack(&mut self, now: Duration, index: usize, tag: PairTag, acked: Lsn) {
        if tag.epoch != self.config.tag.epoch {
            return;
        }
        let LinkState::Streaming {
            incarnation,
            sent,
            held,
            progress_at,
            ..
        } = &mut self.links[index].state
        else {
            return;
        };
        if *incarnation != tag.incarnation || acked <= *held || acked > *sent {
            return;
        }
        *held = acked;
        *progress_at = now;
        self.on_caught_up(now, index);
        self.check_normal();
        self.acknowledge();
    }

    /// A streaming backup that reached its catch-up point starts counting.
    fn on_caught_up(&mut self, now: Duration, index: usize) {
        let link = &self.links[index];
        let LinkState::Streaming {
            incarnation,
            held,
            catch_up_to,
            ..
        } = link.state
        else {
            return;
        };
        if held < catch_up_to {
            return;
        }
        match link.role {
            BackupRole::Home => {
                if self.home_counts != Some(incarnation) || self.home_drop_at.is_some() {
                    self.home_counts = Some(incarnation);
                    self.home_drop_at = None;
                    self.log_state_change(now);
                }
            }
            BackupRole::Remote => {
                if self.state != CommitState::Normal && self.normal_at.is_none() {
                    let at = self.log_state_change_to(now, CommitState::Normal);
                    self.normal_at = Some(at);
                    self.request_flush(at);
                }
            }
        }
    }

    fn check_normal(&mut self) {
        let Some(at) = self.normal_at else { return };
        let remote_holds = self.links.iter().any(|l| {
            l.role == BackupRole::Remote
                && matches!(l.state, LinkState::Streaming { held, .. } if held >= at)
        });
        if self.durable >= at && remote_holds {
            self.normal_at = None;
            self.state = CommitState::Normal;
            self.state_changed();
        }
    }

    fn drop_backup(&mut self, now: Duration, index: usize) {
        let link = &mut self.links[index];
        let incarnation = match link.state {
            LinkState::Streaming { incarnation, .. } => incarnation,
            LinkState::Absent => return,
        };
        link.state = LinkState::Absent;
        match link.role {
            BackupRole::Home => {
                if self.home_counts == Some(incarnation) && self.home_drop_at.is_none() {
                    // Keeps counting (the rule stays strict) until the drop is durable.
                    let at = self.log_state_change(now);
                    self.home_drop_at = Some(at);
                    self.request_flush(at);
                }
            }
            BackupRole::Remote => {
                self.normal_at = None;
                if self.state == CommitState::Normal {
                    self.state = CommitState::PrimaryOnly;
                    self.log_state_change(now);
                    self.state_changed();
                }
                self.request_flush_if_needed();
            }
        }
        self.trim_retained();
    }

    fn log_state_change(&mut self, now: Duration) -> Lsn {
        self.log_state_change_to(now, self.state)
    }

    fn log_state_change_to(&mut self, now: Duration, state: CommitState) -> Lsn {
        let body = AuditBody::StateChange(StateChange {
            epoch: self.config.tag.epoch,
            state,
            home_backup: if self.home_drop_at.is_some() {
                None
            } else {
                self.home_counts
            },
        });
        match self.append(now, &body) {
            Ok(lsn) => lsn,
            // A state change record is a few bytes: encoding cannot fail.
            Err(_) => Lsn(self.next_lsn().0 - 1),
        }
    }

    fn state_changed(&mut self) {
        self.actions.push_back(PrimaryAction::StateChanged {
            state: self.state,
            home_counts: self.home_counts.is_some(),
        });
    }

    /// A higher epoch owns the LSG (a backup said so, or the trail refused a flush): stop.
    pub fn on_fenced(&mut self, by: OwnerEpoch) {
        self.fenced = Some(by);
        self.commits.clear();
        self.actions.clear();
        self.actions.push_back(PrimaryAction::Fenced { by });
    }

    fn counts(&self, index: usize) -> bool {
        let link = &self.links[index];
        match (link.role, link.state) {
            (BackupRole::Home, LinkState::Streaming { incarnation, .. }) => {
                self.home_counts == Some(incarnation)
            }
            (BackupRole::Remote, LinkState::Streaming { .. }) => self.state == CommitState::Normal,
            (_, LinkState::Absent) => false,
        }
    }

    fn remote_counts(&self) -> bool {
        self.links
            .iter()
            .any(|l| l.role == BackupRole::Remote && matches!(l.state, LinkState::Streaming { .. }))
    }

    /// The highest LSN the rule allows acknowledging now.
    fn ackable_through(&self) -> Lsn {
        if self.config.paranoid || self.state != CommitState::Normal {
            return self.durable;
        }
        let held_by = |role: BackupRole, of: Option<u64>| {
            self.links.iter().find_map(|l| match l.state {
                LinkState::Streaming {
                    incarnation, held, ..
                } if l.role == role && of.is_none_or(|i| i == incarnation) => Some(held),
                _ => None,
            })
        };
        let Some(remote) = held_by(BackupRole::Remote, None) else {
            return self.durable;
        };
        // A counting same-node half vouches only in the incarnation that counts.
        let home = match self.home_counts {
            Some(incarnation) => held_by(BackupRole::Home, Some(incarnation)).unwrap_or(Lsn(0)),
            None => Lsn(u64::MAX),
        };
        self.durable.max(remote.min(home))
    }

    fn acknowledge(&mut self) {
        if self.fenced.is_some() {
            return;
        }
        let through = self.ackable_through();
        while let Some(&lsn) = self.commits.first() {
            if lsn > through {
                break;
            }
            self.commits.remove(&lsn);
            let state = if lsn <= self.durable {
                self.state
            } else {
                CommitState::Normal
            };
            self.acknowledged_through = self.acknowledged_through.max(lsn);
            self.actions.push_back(PrimaryAction::Acknowledge {
                commit_lsn: lsn,
                receipt: Receipt {
                    commit_lsn: lsn,
                    epoch: self.config.tag.epoch,
                    state,
                },
            });
        }
        self.request_flush_if_needed();
    }

    /// Commits that only the disk can vouch for need a flush.
    fn request_flush_if_needed(&mut self) {
        if let Some(&last) = self.commits.last()
            && (self.config.paranoid || self.state != CommitState::Normal)
        {
            self.request_flush(last);
        }
    }

    fn request_flush(&mut self, through: Lsn) {
        if through > self.flush_requested && self.fenced.is_none() {
            self.flush_requested = through;
            self.actions.push_back(PrimaryAction::Flush { through });
        }
    }

    fn unflushed_bytes(&self) -> usize {
        let first_unflushed = self.durable.0 + 1;
        self.retained
            .iter()
            .rev()
            .take_while(|r| r.lsn.0 >= first_unflushed)
            .map(StreamRecord::size_bytes)
            .sum()
    }

    /// Streams what each joined backup still lacks, within its window.
    fn pump(&mut self) {
        if self.fenced.is_some() {
            return;
        }
        let last = Lsn(self.next_lsn().0 - 1);
        for link in &mut self.links {
            let LinkState::Streaming { sent, held, .. } = &mut link.state else {
                continue;
            };
            let window_end = Lsn(held.0 + self.config.max_unacked_records).min(last);
            if *sent >= window_end {
                continue;
            }
            let start = (sent.0 + 1 - self.retained_from.0) as usize;
            let end = (window_end.0 + 1 - self.retained_from.0) as usize;
            let records: Vec<StreamRecord> = self.retained.range(start..end).cloned().collect();
            for batch in batches(&records, self.config.max_message_bytes) {
                self.actions.push_back(PrimaryAction::Send {
                    to: link.endpoint,
                    message: PairMessage::Records {
                        tag: self.config.tag,
                        records: batch.to_vec(),
                        // Never past the durable end: a backup's copy always overlaps the
                        // trail, so a takeover can check it continues the trail.
                        retain_from: self.horizon.min(self.durable),
                    },
                });
            }
            *sent = window_end;
        }
    }

    /// Forgets records before both the horizon and what every joined backup holds.
    fn trim_retained(&mut self) {
        let mut keep_from = self.horizon;
        for link in &self.links {
            if let LinkState::Streaming { held, .. } = link.state {
                keep_from = keep_from.min(Lsn(held.0 + 1));
            }
        }
        while self.retained_from < keep_from {
            let Some(r) = self.retained.pop_front() else {
                break;
            };
            self.retained_bytes -= r.size_bytes();
            self.retained_from = Lsn(self.retained_from.0 + 1);
        }
    }

    /// Records kept for backups, from the oldest.
    pub fn retained(&self) -> impl Iterator<Item = &StreamRecord> {
        self.retained.iter()
    }

    pub fn retained_bytes(&self) -> usize {
        self.retained_bytes
    }
}

/// The commits acknowledged so far and the rule's inputs, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryStatus {
    pub state: CommitState,
    pub home_counts: bool,
    pub durable: Lsn,
    pub next_lsn: Lsn,
    pub held: BTreeMap<BackupRole, Lsn>,
}

impl AuditPrimary {
    pub fn status(&self) -> PrimaryStatus {
        let mut held = BTreeMap::new();
        for link in &self.links {
            if let LinkState::Streaming { held: h, .. } = link.state {
                held.insert(link.role, h);
            }
        }
        PrimaryStatus {
            state: self.state,
            home_counts: self.home_counts.is_some(),
            durable: self.durable,
            next_lsn: self.next_lsn(),
            held,
        }
    }
}
