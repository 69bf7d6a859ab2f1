//! The primary and two backups exchanging the checkpoint stream over a lossy, seeded network,
//! with flushes that complete late, backups that restart and a backup node that is cut off.
//! After every step both halves' `validate()` holds, and every acknowledged commit is durable
//! or held in the memory of the backup node's pairs (and of the same-node half while it counts):
//! the rule SPEC §2 states.

use std::collections::VecDeque;
use std::time::Duration;

use duplex_audit_pair::{AuditBackup, AuditPrimary, BackupAction, PrimaryAction, PrimaryConfig};
use duplex_lsg::{LsgId, Lsn, OwnerEpoch, RecordType};
use duplex_pair::records::{AuditBody, StateChange, TxEnd, Update};
use duplex_pair::stream::{PairMessage, PairTag, StreamRecord};
use duplex_pair::{CommitState, TxId};
use duplex_transport::EndpointId;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const PRIMARY: EndpointId = EndpointId::new(1, 0);
const HOME: EndpointId = EndpointId::new(1, 1);
const REMOTE: EndpointId = EndpointId::new(2, 0);
const LSG: LsgId = LsgId(7);
const REJOIN: Duration = Duration::from_millis(40);

struct World {
    rng: ChaCha8Rng,
    now: Duration,
    primary: AuditPrimary,
    home: AuditBackup,
    home_incarnation: u64,
    remote: AuditBackup,
    /// Messages in flight, in order per link: (from, to, message).
    wire: VecDeque<(EndpointId, EndpointId, PairMessage)>,
    remote_cut: bool,
    trail: Vec<StreamRecord>,
    durable: Lsn,
    flushes: VecDeque<Lsn>,
    acked: Vec<Lsn>,
    paranoid: bool,
    memory_acks: std::cell::Cell<usize>,
}

fn tag(epoch: u64, incarnation: u64) -> PairTag {
    PairTag {
        lsg: LSG,
        epoch: OwnerEpoch(epoch),
        incarnation,
    }
}

impl World {
    fn new(seed: u64, paranoid: bool) -> Self {
        let config = PrimaryConfig {
            tag: tag(1, 100),
            paranoid,
            max_record_bytes: 1 << 20,
            home: Some(HOME),
            remote: Some(REMOTE),
            ack_timeout: Duration::from_millis(50),
            max_message_bytes: 400,
            max_unacked_records: 16,
            flush_bytes: 4096,
            flush_interval: Duration::from_millis(20),
        };
        let mut w = World {
            rng: ChaCha8Rng::seed_from_u64(seed),
            now: Duration::ZERO,
            primary: AuditPrimary::new(
                config,
                CommitState::PrimaryOnly,
                Vec::new(),
                Lsn(1),
                Lsn(0),
            ),
            home: AuditBackup::new(LSG, 1, REJOIN),
            home_incarnation: 1,
            remote: AuditBackup::new(LSG, 2, REJOIN),
            wire: VecDeque::new(),
            remote_cut: false,
            trail: Vec::new(),
            durable: Lsn(0),
            flushes: VecDeque::new(),
            acked: Vec::new(),
            paranoid,
            memory_acks: Default::default(),
        };
        w.home.join(PRIMARY);
        w.remote.join(PRIMARY);
        w.drain();
        w
    }

    fn drain(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(a) = self.primary.poll_action() {
                moved = true;
                match a {
                    PrimaryAction::Append { lsn, record } => {
                        assert_eq!(lsn.0, self.trail.len() as u64 + 1, "LSNs are dense");
                        self.trail.push(record);
                    }
                    PrimaryAction::Flush { through } => self.flushes.push_back(through),
                    PrimaryAction::Send { to, message } => {
                        self.wire.push_back((PRIMARY, to, message))
                    }
                    PrimaryAction::Acknowledge {
                        commit_lsn,
                        receipt,
                    } => {
                        self.check_acknowledgement(commit_lsn, receipt.state);
                        self.acked.push(commit_lsn);
                    }
                    PrimaryAction::StateChanged { .. } => {}
                    PrimaryAction::Fenced { by } => panic!("fenced by {by} with one primary"),
                }
            }
            for (from, backup) in [(HOME, &mut self.home), (REMOTE, &mut self.remote)] {
                while let Some(BackupAction::Send { to, message }) = backup.poll_action() {
                    moved = true;
                    self.wire.push_back((from, to, message));
                }
            }
            if !moved {
                return;
            }
        }
        panic!("actions did not settle");
    }

    /// The rule, checked against the backups' real memory and the model trail.
    fn check_acknowledgement(&self, lsn: Lsn, state: CommitState) {
        if lsn <= self.durable {
            return;
        }
        assert!(
            !self.paranoid,
            "paranoid acknowledged {lsn} before it was durable"
        );
        assert_eq!(
            state,
            CommitState::Normal,
            "{lsn} acknowledged from memory outside normal"
        );
        let holds = |b: &AuditBackup| {
            b.record(lsn)
                .is_some_and(|r| Some(r) == self.trail.get(lsn.0 as usize - 1))
        };
        assert!(
            holds(&self.remote),
            "{lsn} acknowledged, not durable, not held by the backup node"
        );
        self.memory_acks.set(self.memory_acks.get() + 1);
        // The same-node half must hold it too unless a durable record dropped it.
        let dropped = self.trail[..self.durable.0 as usize]
            .iter()
            .rev()
            .find_map(|r| {
                (r.record_type == RecordType::StateChange as u8).then(|| {
                    let body = AuditBody::decode(r.lsn, RecordType::StateChange, &r.payload)
                        .expect("decodes");
                    match body {
                        AuditBody::StateChange(StateChange { home_backup, .. }) => {
                            home_backup != Some(self.home_incarnation)
                        }
                        _ => unreachable!(),
                    }
                })
            });
        if dropped != Some(true) {
            assert!(
                holds(&self.home) || !self.primary.home_counts(),
                "{lsn} acknowledged without the counting same-node half"
            );
        }
    }

    /// Delivers the oldest message of one randomly chosen link (order holds per link only).
    fn deliver_one(&mut self) {
        if self.wire.is_empty() {
            return;
        }
        let pick = self.rng.random_range(0..self.wire.len());
        let (from, to, _) = &self.wire[pick];
        let (from, to) = (*from, *to);
        let Some(index) = self
            .wire
            .iter()
            .position(|(f, t, _)| (*f, *t) == (from, to))
        else {
            return;
        };
        let Some((from, to, message)) = self.wire.remove(index) else {
            return;
        };
        if self.remote_cut && (from == REMOTE || to == REMOTE) {
            return;
        }
        if self.rng.random_ratio(1, 40) {
            return; // lost
        }
        match to {
            PRIMARY => self.primary.on_message(self.now, from, message),
            HOME => self.home.on_message(self.now, from, message),
            REMOTE => self.remote.on_message(self.now, from, message),
            _ => unreachable!(),
        }
    }

    fn step(&mut self, tx: &mut u64) {
        match self.rng.random_range(0..100) {
            0..30 => {
                *tx += 1;
                let body = AuditBody::Update(Update {
                    tx: TxId {
                        epoch: OwnerEpoch(1),
                        number: *tx,
                    },
                    volume: "v".into(),
                    key: tx.to_le_bytes().to_vec(),
                    before: None,
                    after: Some(vec![1; self.rng.random_range(0..200)]),
                });
                self.primary.append(self.now, &body).expect("appends");
            }
            30..45 => {
                let body = AuditBody::Commit(TxEnd {
                    tx: TxId {
                        epoch: OwnerEpoch(1),
                        number: *tx,
                    },
                    epoch: OwnerEpoch(1),
                    request: None,
                });
                self.primary
                    .append_commit(self.now, &body)
                    .expect("appends");
            }
            45..80 => {
                for _ in 0..self.rng.random_range(1..12) {
                    self.deliver_one();
                }
            }
            80..88 => {
                if let Some(through) = self.flushes.pop_front() {
                    self.durable = self.durable.max(through);
                    self.primary.on_durable(self.now, through);
                }
            }
            88..95 => {
                self.now += Duration::from_millis(self.rng.random_range(1..30));
                self.primary.tick(self.now);
                self.home.tick(self.now);
                if !self.remote_cut {
                    self.remote.tick(self.now);
                }
            }
            95..96 => {
                // The same-node half restarts with a new incarnation and joins again.
                self.primary
                    .on_peer_down(self.now, HOME, self.home_incarnation);
                self.home_incarnation += 10;
                self.home = AuditBackup::new(LSG, self.home_incarnation, REJOIN);
                self.home.join(PRIMARY);
            }
            96..97 => {
                self.remote_cut = !self.remote_cut;
                if !self.remote_cut {
                    self.remote.join(PRIMARY);
                }
            }
            _ => {
                if self.remote_cut {
                    self.primary.on_peer_down(self.now, REMOTE, 2);
                }
            }
        }
        self.drain();
        self.primary.validate().expect("primary valid");
        self.home.validate().expect("home valid");
        self.remote.validate().expect("remote valid");
    }
}

#[test]
fn every_acknowledged_commit_is_durable_or_in_the_memory_that_counts() {
    let base = std::env::var("DUPLEX_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1u64);
    let mut normal_acks = 0;
    let mut all_acks = 0;
    for seed in base..base + 200 {
        println!("seed {seed}");
        let mut w = World::new(seed, seed % 7 == 0);
        let mut tx = 0;
        for _ in 0..600 {
            w.step(&mut tx);
        }
        // Heal and settle: every commit is acknowledged in the end.
        w.remote_cut = false;
        w.remote.join(PRIMARY);
        for _ in 0..5_000 {
            if w.primary.commits_waiting() == 0 {
                break;
            }
            w.deliver_one();
            if let Some(through) = w.flushes.pop_front() {
                w.durable = w.durable.max(through);
                w.primary.on_durable(w.now, through);
            }
            w.now += Duration::from_millis(1);
            w.primary.tick(w.now);
            w.home.tick(w.now);
            w.remote.tick(w.now);
            w.drain();
            w.primary.validate().expect("primary valid");
        }
        assert_eq!(
            w.primary.commits_waiting(),
            0,
            "seed {seed}: commits never acknowledged"
        );
        all_acks += w.acked.len();
        normal_acks += w.memory_acks.get();
    }
    assert!(
        all_acks > 1000,
        "the workload acknowledged too little: {all_acks}"
    );
    assert!(
        normal_acks > 1000,
        "too few acknowledgements from memory: {normal_acks}"
    );
    println!("{all_acks} acknowledgements, {normal_acks} from memory before a flush");
}

#[test]
fn a_backup_refuses_a_fenced_primary_and_tells_it_who_owns_the_lsg() {
    let mut backup = AuditBackup::new(LSG, 5, REJOIN);
    backup.join(PRIMARY);
    while backup.poll_action().is_some() {}
    backup.take_over(OwnerEpoch(3));
    let stale = PairMessage::Records {
        tag: tag(2, 100),
        records: vec![StreamRecord {
            lsn: Lsn(1),
            record_type: 2,
            flags: 0,
            payload: vec![],
        }],
        retain_from: Lsn(1),
    };
    backup.on_message(Duration::ZERO, PRIMARY, stale);
    assert_eq!(
        backup.held(),
        Lsn(0),
        "records of a fenced epoch are refused"
    );
    let Some(BackupAction::Send { to, message }) = backup.poll_action() else {
        panic!("the stale primary is told");
    };
    assert_eq!(to, PRIMARY);
    assert_eq!(message.tag().epoch, OwnerEpoch(3));

    let config = PrimaryConfig {
        tag: tag(2, 100),
        paranoid: false,
        max_record_bytes: 1 << 20,
        home: None,
        remote: Some(REMOTE),
        ack_timeout: Duration::from_millis(50),
        max_message_bytes: 1 << 16,
        max_unacked_records: 16,
        flush_bytes: 1 << 20,
        flush_interval: Duration::from_secs(1),
    };
    let mut primary = AuditPrimary::new(config, CommitState::Normal, Vec::new(), Lsn(1), Lsn(0));
    primary.on_message(Duration::ZERO, REMOTE, message);
    assert!(primary.is_fenced());
    assert_eq!(
        primary.poll_action(),
        Some(PrimaryAction::Fenced { by: OwnerEpoch(3) })
    );
}

#[test]
fn a_copy_larger_than_one_frame_is_answered_in_parts_the_last_marked_complete() {
    use duplex_audit_pair::backup::FENCE_ACK_BYTES;
    let mut backup = AuditBackup::new(LSG, 5, REJOIN);
    backup.join(PRIMARY);
    while backup.poll_action().is_some() {}
    let now = Duration::ZERO;
    backup.on_message(
        now,
        PRIMARY,
        PairMessage::Resync {
            tag: tag(1, 100),
            from: Lsn(1),
        },
    );
    let record_bytes = 256 << 10;
    let count = (3 * FENCE_ACK_BYTES / record_bytes) as u64;
    for lsn in 1..=count {
        let records = vec![StreamRecord {
            lsn: Lsn(lsn),
            record_type: RecordType::Update as u8,
            flags: 0,
            payload: vec![lsn as u8; record_bytes],
        }];
        backup.on_message(
            now,
            PRIMARY,
            PairMessage::Records {
                tag: tag(1, 100),
                records,
                retain_from: Lsn(1),
            },
        );
    }
    while backup.poll_action().is_some() {}
    assert_eq!(backup.held(), Lsn(count));
    backup.on_message(
        now,
        HOME,
        PairMessage::Fence {
            tag: tag(2, 7),
            from: Lsn(1),
        },
    );
    let mut parts = Vec::new();
    while let Some(BackupAction::Send { to, message }) = backup.poll_action() {
        assert_eq!(to, HOME);
        let PairMessage::FenceAck {
            records, complete, ..
        } = message
        else {
            panic!("a fence is answered with FenceAck");
        };
        let bytes: usize = records.iter().map(|r| r.size_bytes()).sum();
        assert!(bytes <= FENCE_ACK_BYTES, "a part of {bytes} bytes");
        parts.push((records, complete));
    }
    assert!(parts.len() >= 3, "{} parts", parts.len());
    assert!(parts[..parts.len() - 1].iter().all(|(_, c)| !c));
    assert!(parts.last().is_some_and(|(_, c)| *c));
    let lsns: Vec<u64> = parts
        .iter()
        .flat_map(|(r, _)| r.iter().map(|r| r.lsn.0))
        .collect();
    assert_eq!(
        lsns,
        (1..=count).collect::<Vec<_>>(),
        "every record once, in order"
    );
}
