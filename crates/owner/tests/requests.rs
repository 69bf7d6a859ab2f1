//! One owner without backups (primary-only), driven request by request: replies, bad input and
//! the message table, with flushes run as a driver would.

use std::ops::Bound;
use std::time::Duration;

use duplex_audit_pair::PrimaryConfig;
use duplex_lsg::{LogStorageGroup, LsgConfig, LsgId, LsgOptions, Lsn, OwnerEpoch, SimStore};
use duplex_owner::{
    ClientReply, ClientRequest, LsgOwner, Op, OpError, OwnerAction, OwnerConfig, OwnerStart,
};
use duplex_pair::stream::PairTag;
use duplex_pair::{
    ClientId, CommitState, MessageTable, MessageTableLimits, Reply, RequestSeq, TxId,
};
use duplex_volume_pair::LockConfig;

type Owner = LsgOwner<SimStore, u32>;

fn lsg_config() -> LsgConfig {
    LsgConfig {
        audit_segment_bytes: 64 << 10,
        volume_segment_bytes: 64 << 10,
        max_batch_bytes: 16 << 10,
        max_record_bytes: 8 << 10,
        max_key_bytes: 64,
        max_value_bytes: 1 << 10,
    }
}

fn owner() -> Owner {
    let mut lsg = LogStorageGroup::create_in_with(
        SimStore::new(1),
        LsgId(1),
        lsg_config(),
        LsgOptions::deterministic(),
    )
    .expect("create");
    lsg.create_volume("v").expect("volume");
    let config = OwnerConfig {
        primary: PrimaryConfig {
            tag: PairTag {
                lsg: LsgId(1),
                epoch: lsg.owner_epoch(),
                incarnation: 1,
            },
            paranoid: false,
            max_record_bytes: lsg_config().max_record_bytes,
            home: None,
            remote: None,
            ack_timeout: Duration::from_millis(100),
            max_message_bytes: 32 << 10,
            max_unacked_records: 64,
            flush_bytes: 8 << 10,
            flush_interval: Duration::from_millis(5),
        },
        locks: LockConfig::default(),
        messages: MessageTableLimits::default(),
        checkpoint_interval: Duration::from_secs(3600),
        max_active_transactions: 2,
        tx_idle_timeout: Duration::from_secs(1),
        max_scan_rows: 100,
    };
    let start = OwnerStart {
        state: CommitState::PrimaryOnly,
        retained: Vec::new(),
        durable: Lsn(0),
        table: MessageTable::new(MessageTableLimits::default()),
        in_doubt: Vec::new(),
        last_checkpoint: Lsn(0),
        penultimate_checkpoint: Lsn(0),
    };
    LsgOwner::new(config, lsg, start, Duration::ZERO)
}

struct Client {
    id: ClientId,
    seq: u64,
}

impl Client {
    fn request(&mut self, tx: Option<TxId>, op: Op) -> ClientRequest {
        self.seq += 1;
        ClientRequest {
            client: self.id,
            seq: RequestSeq(self.seq),
            seen_below: RequestSeq(1),
            tx,
            op,
        }
    }
}

/// Runs the owner's actions as a driver would (flushes at once) and returns the replies.
fn settle(owner: &mut Owner, now: Duration) -> Vec<(u32, ClientReply)> {
    let mut replies = Vec::new();
    for _ in 0..1000 {
        let mut moved = false;
        while let Some(action) = owner.poll_action() {
            moved = true;
            match action {
                OwnerAction::Reply { to, reply } => replies.push((to, reply)),
                OwnerAction::FlushTrail { through } => {
                    let lsg = std::sync::Arc::clone(owner.lsg());
                    lsg.audit().wait_durable(through).expect("flush");
                    owner.on_trail_durable(now, lsg.audit().durable_lsn());
                }
                OwnerAction::FlushVolumes { checkpoint_lsn } => {
                    owner.on_volumes_flushed(now, checkpoint_lsn);
                }
                OwnerAction::Send { .. }
                | OwnerAction::TruncateTrail { .. }
                | OwnerAction::StateChanged { .. } => {}
                OwnerAction::Stopped { reason } => panic!("owner stopped: {reason}"),
            }
        }
        if !moved {
            owner.validate().expect("valid");
            return replies;
        }
    }
    panic!("the owner's actions did not settle");
}

fn ask(owner: &mut Owner, now: Duration, request: ClientRequest) -> ClientReply {
    owner.on_request(now, 7, request);
    let mut replies = settle(owner, now);
    assert_eq!(replies.len(), 1, "one reply: {replies:?}");
    replies.remove(0).1
}

fn begin(owner: &mut Owner, client: &mut Client) -> TxId {
    match ask(owner, Duration::ZERO, client.request(None, Op::Begin)) {
        ClientReply::Began(tx) => tx,
        other => panic!("begin: {other:?}"),
    }
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let mut owner = owner();
    let now = Duration::ZERO;
    let mut c = Client {
        id: ClientId(1),
        seq: 0,
    };
    let tx = begin(&mut owner, &mut c);
    let put = |volume: &str, key: Vec<u8>, value: Vec<u8>| Op::Put {
        volume: volume.into(),
        key,
        value,
    };
    let cases = [
        (
            c.request(Some(tx), put("nope", b"k".to_vec(), b"v".to_vec())),
            "no data volume nope",
        ),
        (
            c.request(Some(tx), put("v", vec![1; 65], b"v".to_vec())),
            "key of 65 bytes",
        ),
        (
            c.request(Some(tx), put("v", b"k".to_vec(), vec![1; 5000])),
            "value of 5000 bytes",
        ),
        (
            c.request(None, put("v", b"k".to_vec(), b"v".to_vec())),
            "needs a transaction",
        ),
        (
            c.request(
                Some(TxId {
                    epoch: OwnerEpoch(9),
                    number: 9,
                }),
                Op::Get {
                    volume: "v".into(),
                    key: b"k".to_vec(),
                },
            ),
            "is not known here",
        ),
    ];
    for (request, expected) in cases {
        match ask(&mut owner, now, request) {
            ClientReply::Error(e) => {
                assert!(e.to_string().contains(expected), "{e} lacks {expected:?}")
            }
            other => panic!("expected an error naming {expected:?}, got {other:?}"),
        }
    }
    // Another client cannot drive this transaction.
    let mut other = Client {
        id: ClientId(2),
        seq: 0,
    };
    let reply = ask(&mut owner, now, other.request(Some(tx), Op::Commit));
    assert!(
        matches!(
            reply,
            ClientReply::Outcome(Reply::Aborted(_))
                | ClientReply::Error(OpError::UnknownTransaction { .. })
        ),
        "{reply:?}"
    );
    // Nothing was written: the transaction still commits, and the volume is empty.
    let scan = ask(
        &mut owner,
        now,
        c.request(
            Some(tx),
            Op::Scan {
                volume: "v".into(),
                start: Bound::Unbounded,
                end: Bound::Unbounded,
                limit: 10,
            },
        ),
    );
    assert_eq!(scan, ClientReply::Rows(Vec::new()));
    let reply = ask(&mut owner, now, c.request(Some(tx), Op::Commit));
    assert!(
        matches!(reply, ClientReply::Outcome(Reply::Committed(_))),
        "{reply:?}"
    );
}

#[test]
fn a_resent_commit_is_answered_from_the_message_table_and_a_resent_begin_gets_the_same_transaction()
{
    let mut owner = owner();
    let now = Duration::ZERO;
    let mut c = Client {
        id: ClientId(1),
        seq: 0,
    };
    let begin_request = c.request(None, Op::Begin);
    let ClientReply::Began(tx) = ask(&mut owner, now, begin_request.clone()) else {
        panic!("begin")
    };
    assert_eq!(
        ask(&mut owner, now, begin_request),
        ClientReply::Began(tx),
        "a resent begin"
    );
    let put = c.request(
        Some(tx),
        Op::Put {
            volume: "v".into(),
            key: b"k".to_vec(),
            value: b"1".to_vec(),
        },
    );
    assert_eq!(ask(&mut owner, now, put), ClientReply::Written);
    let commit = c.request(Some(tx), Op::Commit);
    let first = ask(&mut owner, now, commit.clone());
    let ClientReply::Outcome(Reply::Committed(receipt)) = first else {
        panic!("commit: {first:?}")
    };
    assert_eq!(
        receipt.state,
        CommitState::PrimaryOnly,
        "no backup: flushed before the acknowledgement"
    );
    assert!(owner.lsg().audit().durable_lsn() >= receipt.commit_lsn);
    let next = owner.lsg().audit().next_lsn();
    assert_eq!(
        ask(&mut owner, now, commit),
        first,
        "the resend gets the same receipt"
    );
    assert_eq!(owner.lsg().audit().next_lsn(), next, "and writes nothing");
}

#[test]
fn a_full_house_of_transactions_refuses_a_begin_and_an_idle_one_is_aborted() {
    let mut owner = owner();
    let mut c = Client {
        id: ClientId(1),
        seq: 0,
    };
    let a = begin(&mut owner, &mut c);
    let _b = begin(&mut owner, &mut c);
    let reply = ask(&mut owner, Duration::ZERO, c.request(None, Op::Begin));
    assert!(
        matches!(
            reply,
            ClientReply::Error(OpError::TooManyTransactions { active: 2 })
        ),
        "{reply:?}"
    );
    let put = c.request(
        Some(a),
        Op::Put {
            volume: "v".into(),
            key: b"k".to_vec(),
            value: b"1".to_vec(),
        },
    );
    assert_eq!(ask(&mut owner, Duration::ZERO, put), ClientReply::Written);
    owner.tick(Duration::from_secs(2));
    settle(&mut owner, Duration::from_secs(2));
    assert_eq!(
        owner.active_transactions(),
        0,
        "idle transactions are aborted"
    );
    let lsg = std::sync::Arc::clone(owner.lsg());
    assert_eq!(
        lsg.volume("v").expect("volume").get(b"k").expect("get"),
        None,
        "and undone"
    );
}
