//! Forced paths of takeover and recovery, each a scripted run of the simulation
//! (`duplex_owner::sim::run_script`) with an oracle of its own on top of the simulation's
//! (the bank, every owner's and backup's `validate()`, and the final trail recovering).
//!
//! | scenario | test | a break it catches |
//! |---|---|---|
//! | 1 warm CPU takeover | `a_killed_primary_cpu_is_taken_over_warm_…` | no re-append of the backup's tail |
//! | 2 partition, then node loss | `after_a_partition_the_backup_node_recovers_cold_…` | warm start from a stale copy; primary-only acks before the flush |
//! | 3 every CPU killed | `when_every_cpu_dies_…` (two) | no undo of losers |
//! | 4 crash during recovery | `a_taker_that_dies_in_the_middle_of_its_takeover_…` | recovery aborts not ending losers; no flush after the re-append |
//! | 5 a stopped owner wakes up | `a_stopped_owner_that_wakes_up_…` | backups accepting a lower epoch; an owner ignoring that it is fenced |
//! | 6 in doubt | `an_in_doubt_transfer_keeps_its_locks_…` (two) | no relock; prepared undone as a loser; a decision that keeps the locks; an abort without undo |
//! | 7 exactly once | `a_commit_resent_after_…` (two) | a takeover that loses the message table; a resent commit not looked up |
//!
//! Each test prints its seed; `DUPLEX_SCENARIO_SEED=<n>` runs every scenario with seed `n`
//! instead (they hold for seeds 1-40).

use std::time::Duration;

use duplex_audit_pair::recovery::Outcome;
use duplex_owner::sim::{
    Fault, ProbeKey, ProbeReport, Restart, ScriptStep, SimOptions, SimReport, SimTakeover, Target,
    When, run_script,
};
use duplex_owner::takeover::{StartKind, TakeoverReport};
use duplex_owner::{ClientReply, OpError};
use duplex_pair::CommitState;
use duplex_pair::{AbortReason, Reply};
use duplex_transport::EndpointId;

/// Each scenario has a fixed seed; `DUPLEX_SCENARIO_SEED=<n>` runs them all with another.
fn options(seed: u64) -> SimOptions {
    let seed = std::env::var("DUPLEX_SCENARIO_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(seed);
    exact_options(seed)
}

fn exact_options(seed: u64) -> SimOptions {
    let mut options = SimOptions::new(seed);
    options.paranoid = false;
    options.loss_probability = 0.0;
    options.max_faults = 0;
    options.fault_time = Duration::ZERO;
    options.transfers_per_client = 8;
    options.time_limit = Duration::from_secs(20);
    options
}

fn run(name: &str, options: SimOptions, script: Vec<ScriptStep>) -> SimReport {
    println!("{name}: seed {}", options.seed);
    match run_script(options, script) {
        Ok(report) => report,
        Err(f) => panic!("{name}: {f}"),
    }
}

fn succeeded(t: &SimTakeover) -> &TakeoverReport {
    match &t.outcome {
        Ok(r) => r,
        Err(e) => panic!("takeover by {} failed: {e}", t.taker),
    }
}

/// The first primary runs on CPU 1.0; its same-node backup half is the other CPU of node 1.
const FIRST_PRIMARY: EndpointId = EndpointId::new(1, 0);
const HOME_HALF: EndpointId = EndpointId::new(1, 1);

/// Scenario 1 (SPEC §3, CPU failure). The primary's CPU is killed while a commit it
/// acknowledged from memory (normal state) is beyond the trail's end. The same-node half takes
/// over warm, re-appends what only the backups held (which includes that commit), and nothing
/// acknowledged is lost.
///
/// Catches: a takeover that does not re-append a backup's tail (the acknowledged commit is
/// lost), and a same-node half that recovers cold or is not the one chosen.
#[test]
fn a_killed_primary_cpu_is_taken_over_warm_by_its_same_node_half_which_reappends_what_only_it_held()
{
    let report = run(
        "warm CPU takeover",
        options(11),
        vec![
            // Past the start (primary-only until the backups caught up): the trail's end is
            // written in normal state.
            ScriptStep::new(When::Committed(8), Fault::Note("steady".into())),
            ScriptStep::new(
                When::AckedBeyondTrail,
                Fault::Kill {
                    target: Target::Primary,
                    restart: Restart::Auto,
                },
            ),
        ],
    );
    let [t] = report.takeovers.as_slice() else {
        panic!("one takeover expected: {:#?}", report.takeovers);
    };
    let r = succeeded(t);
    assert_eq!(
        t.taker, HOME_HALF,
        "the same-node half takes over a CPU failure"
    );
    assert_eq!(r.start, StartKind::Warm, "{t:#?}");
    assert!(
        t.own.as_ref().and_then(|c| c.last) >= Some(t.trail_end),
        "the warm copy reaches the trail's end: {t:#?}"
    );
    assert!(r.reappended > 0, "nothing re-appended: {t:#?}");
    let tail_end = t.trail_end.0 + r.reappended;
    let needed: Vec<_> = t
        .acked_beyond_trail_end
        .iter()
        .filter(|lsn| lsn.0 <= tail_end)
        .collect();
    assert!(
        !needed.is_empty(),
        "no acknowledged commit was in the re-appended tail {}..={tail_end}: {t:#?}",
        t.trail_end.0 + 1
    );
    assert_eq!(report.transfers_lost_to_power_loss, 0);
    assert!(report.acknowledged.iter().any(|a| a.epoch == r.epoch));
}

fn kill(target: Target, restart: Restart) -> Fault {
    Fault::Kill { target, restart }
}

/// Scenario 2 (SPEC §2-3, node failure out of communication). The backup node is cut off, the
/// primary goes primary-only and acknowledges commits after flushing them, then the home node
/// dies. The backup node's pairs take over cold: their copy of the stream is stale (it ends
/// where the partition began), so it must not be used, neither as warm state nor as a tail to
/// re-append; every commit acknowledged primary-only is there.
///
/// Catches: a taker that trusts a stale copy (warm start from it: the primary-only commits and
/// their losers are unknown to recovery) and a primary-only state that acknowledges before the
/// flush (the commits are lost with the node).
#[test]
fn after_a_partition_the_backup_node_recovers_cold_without_its_stale_copy() {
    let mut options = options(12);
    // The primary notices the cut after its ack timeout (100 ms): enough work to outlast it.
    options.transfers_per_client = 24;
    let report = run(
        "partition, then the home node dies",
        options,
        vec![
            ScriptStep::new(When::Committed(8), Fault::Partition),
            ScriptStep::new(
                When::CommittedIn {
                    state: CommitState::PrimaryOnly,
                    count: 4,
                },
                kill(Target::HomeNode, Restart::Held),
            ),
            ScriptStep::new(When::OwnerReady, Fault::Heal),
            ScriptStep::new(When::After(Duration::from_millis(50)), Fault::Restart),
        ],
    );
    let [t] = report.takeovers.as_slice() else {
        panic!("one takeover expected: {:#?}", report.takeovers);
    };
    let r = succeeded(t);
    assert_eq!(t.taker.node, 2, "the backup node takes over: {t:#?}");
    assert_eq!(r.start, StartKind::Cold, "{t:#?}");
    let own = t
        .own
        .as_ref()
        .expect("the backup node's pairs held the stream");
    assert!(
        own.last < Some(t.trail_end),
        "its copy is stale (ends before the trail): {t:#?}"
    );
    assert_eq!(r.reappended, 0, "a stale copy was re-appended: {t:#?}");
    let primary_only: Vec<_> = report
        .acknowledged
        .iter()
        .filter(|a| a.state == CommitState::PrimaryOnly && a.epoch < r.epoch)
        .collect();
    assert!(primary_only.len() >= 4, "{primary_only:?}");
    assert!(
        primary_only.iter().all(|a| a.commit_lsn <= t.trail_end),
        "a primary-only commit was acknowledged before it was in the trail: {primary_only:?}"
    );
    assert_eq!(report.transfers_lost_to_power_loss, 0);
}

/// Scenario 3 (SPEC §3, no backup pairs left). Every CPU of both nodes is killed at once, with
/// no power loss: the page cache keeps what was written, every process's memory is gone. The
/// CPUs restart as fresh pairs with nothing in memory, and one recovers the LSG cold from the
/// retained trail: redo, and undo of the transactions that were in flight.
fn every_cpu_killed(name: &str, options: SimOptions) -> (SimReport, TakeoverReport) {
    let report = run(
        name,
        options,
        vec![
            ScriptStep::new(When::Committed(8), Fault::Note("steady".into())),
            ScriptStep::new(When::LoserInTrail, kill(Target::AllCpus, Restart::Auto)),
        ],
    );
    let [t] = report.takeovers.as_slice() else {
        panic!("one takeover expected: {:#?}", report.takeovers);
    };
    let r = succeeded(t).clone();
    assert_eq!(t.own, None, "a fresh CPU holds no copy: {t:#?}");
    assert!(
        t.gathered.iter().all(|c| c.last.is_none()),
        "fresh CPUs hold no copies: {t:#?}"
    );
    assert_eq!(r.start, StartKind::Cold, "{t:#?}");
    assert_eq!(r.reappended, 0);
    assert!(
        r.undone > 0,
        "transfers in flight were undone (else the scenario tests less): {t:#?}"
    );
    (report, r)
}

/// Catches: recovery that skips the undo of losers (half a transfer stays in the volumes: the
/// bank's balances disagree with its markers), and a fresh taker that waits for a copy no
/// process can hold any more (the run never finishes).
#[test]
fn when_every_cpu_dies_fresh_pairs_recover_from_the_trail() {
    let (report, _) = every_cpu_killed("every CPU killed", options(13));
    // Commits acknowledged from memory and not yet written were in no process any more: their
    // receipts said normal (two failure domains), and both were lost. The bank oracle allowed
    // only those; count them here.
    println!(
        "{} acknowledged from memory were lost with every CPU",
        report.transfers_lost_to_power_loss
    );
}

/// Paranoid mode flushes before every acknowledgement: losing every CPU loses nothing.
#[test]
fn when_every_cpu_dies_in_paranoid_mode_no_acknowledged_commit_is_lost() {
    let mut options = options(14);
    options.paranoid = true;
    let (report, _) = every_cpu_killed("every CPU killed, paranoid", options);
    assert_eq!(report.transfers_lost_to_power_loss, 0);
}

/// Scenario 4 (SPEC §3, a crash during recovery). The primary's CPU is killed with a tail
/// only the backups hold and transfers in flight; its same-node half takes over, and its
/// process dies at its n-th file write from the start of `take_over`: while re-appending the
/// tail, while redoing, while undoing, or at its first flushes after it. The next taker
/// recovers from whatever the dead one left (a re-appended tail, compensations in the page
/// cache of the volumes beyond the trail's end, part of the undo in the trail).
///
/// Oracles: the bank; the final trail recovers (no update undone twice, no transaction ended
/// twice); across the sweep, some taker died after its re-append landed and before its undo
/// was in the trail (the next one re-appended nothing more and still had losers to undo), and
/// some died after `take_over` returned, with undo records written or on their way.
///
/// Catches: a recovery that undoes again what an earlier taker's compensations in the trail
/// already undid, and volumes that keep a dead taker's compensation beyond the trail's end
/// (the next taker's compensation at the same LSN would be skipped as already applied).
#[test]
fn a_taker_that_dies_in_the_middle_of_its_takeover_is_taken_over_again_without_a_double_undo() {
    // Where the first taker died, by phase; the sweep goes on until it has seen all three.
    let mut before_undo = None;
    let mut during_undo = None;
    let mut after_undo_written = None;
    for after_writes in 1..=100 {
        let report = run(
            &format!("crash during recovery, at write {after_writes}"),
            options(15),
            vec![
                ScriptStep::new(When::Committed(8), Fault::Note("steady".into())),
                ScriptStep::new(
                    When::All(vec![When::AckedBeyondTrail, When::WriteInFlight]),
                    Fault::CrashNextTaker { after_writes },
                ),
                ScriptStep::new(
                    When::After(Duration::ZERO),
                    kill(Target::Primary, Restart::Auto),
                ),
            ],
        );
        let first = &report.takeovers[0];
        assert_eq!(first.crash_armed, Some(after_writes));
        assert_eq!(first.taker, HOME_HALF);
        let Some(next) = report.takeovers[1..].iter().find(|t| t.outcome.is_ok()) else {
            panic!("nobody took over after the crash: {:#?}", report.takeovers);
        };
        let next_report = succeeded(next);
        println!(
            "  write {after_writes}: first {:?} at trail end {}; next {} at trail end {}: {:?}, re-appended {}, undid {}",
            first
                .outcome
                .as_ref()
                .map(|r| (r.start, r.reappended, r.undone)),
            first.trail_end,
            next.taker,
            next.trail_end,
            next_report.start,
            next_report.reappended,
            next_report.undone
        );
        match &first.outcome {
            Err(e) if e.contains("finishing recovery") => {
                // Its compensations went to the volumes (page cache) at LSNs the trail never
                // got: the next taker undoes the same losers again, from the trail.
                assert!(next_report.undone > 0, "{:#?}", report.takeovers);
                during_undo.get_or_insert(after_writes);
            }
            Err(_) => {
                if next.trail_end > first.trail_end && next_report.undone > 0 {
                    // Its re-append landed; the next taker found the tail in the trail.
                    before_undo.get_or_insert(after_writes);
                }
            }
            Ok(r) if r.undone > 0 => {
                // Records it wrote after its re-append (its undo) reached the trail.
                if next.trail_end.0 > first.trail_end.0 + r.reappended {
                    after_undo_written.get_or_insert(after_writes);
                }
            }
            Ok(_) => {}
        }
        // Later crash points kill the new owner after it ran transfers of its own.
        if after_writes >= 40
            && before_undo.is_some()
            && during_undo.is_some()
            && after_undo_written.is_some()
        {
            break;
        }
    }
    println!(
        "died after the re-append, before the undo: from write {before_undo:?}; during the undo: from write {during_undo:?}; after writing it: from write {after_undo_written:?}"
    );
    assert!(
        before_undo.is_some(),
        "no taker died between re-append and undo"
    );
    assert!(during_undo.is_some(), "no taker died during its undo");
    assert!(
        after_undo_written.is_some(),
        "no taker died after its undo reached the trail"
    );
}

/// Scenario 5 (SPEC §5, fencing). The owner's process is stopped (SIGSTOP) while in normal
/// state with only the backup node counting (its same-node half was killed and dropped). The
/// node service gives up on it and lets the restarted same-node CPU take over; then the old
/// owner resumes (SIGCONT) with its memory, its open LSG, its transactions and a queue of
/// client requests and pair messages that arrived while it slept.
///
/// The model of the node service (documented in `Fault::StealLock`): on one host the old
/// owner's `flock` would still be held, so the node service must end its hold first. A real
/// one kills it (SIGKILL ends a stopped process too, and the kernel frees the lock), and
/// across hosts its lease lapses. The sim takes the lock from it by killing its store handle
/// only: its lock is free, its file operations fail, but its memory and its transport live on,
/// as a process that wakes up after losing its lease has them. The taker opens the LSG with a
/// raised epoch and fences the backups with it.
///
/// Oracles: after it resumes, the old owner acknowledges nothing: none of its replies is a
/// commit, a prepare, a write or a read (only errors, and `Began`, which touches nothing: the
/// new owner answers `UnknownTransaction` for that transaction); it stops within a few
/// milliseconds, fenced by its backups refusing its epoch (the epoch they name is the
/// taker's) or by the storage it lost with its lock; and the bank holds.
///
/// Catches: an owner that goes on after it was fenced (it answers from memory), a backup that
/// follows a fenced primary (a commit acknowledged from memory that the new owner never saw),
/// and a stale owner that could still write.
#[test]
fn a_stopped_owner_that_wakes_up_after_a_takeover_acknowledges_nothing() {
    // Which of the two fences stops it first depends on what it finds queued when it wakes
    // (a write meets the lost storage at once; a stream message meets a backup's refusal a
    // round trip later): a few seeds, so that both are seen.
    let mut fenced_by_backups = 0;
    let first = options(16).seed;
    for seed in first..first + 8 {
        if stopped_owner_wakes_up(seed) {
            fenced_by_backups += 1;
        }
    }
    assert!(
        fenced_by_backups > 0,
        "no old owner was fenced by its backups refusing its epoch"
    );
}

/// Whether the old owner was stopped by its backups naming the new epoch.
fn stopped_owner_wakes_up(seed: u64) -> bool {
    let mut options = exact_options(seed);
    options.transfers_per_client = 16;
    let report = run(
        "stopped primary wakes up",
        options,
        vec![
            ScriptStep::new(When::Committed(8), kill(Target::HomeBackup, Restart::Held)),
            ScriptStep::new(When::HomeNotCounting, Fault::StopPrimary),
            ScriptStep::new(When::After(Duration::from_millis(20)), Fault::Restart),
            ScriptStep::new(When::After(Duration::from_millis(150)), Fault::StealLock),
            ScriptStep::new(When::OwnerReady, Fault::Note("taken over".into())),
            ScriptStep::new(When::After(Duration::from_millis(30)), Fault::Resume),
        ],
    );
    let [t] = report.takeovers.as_slice() else {
        panic!("one takeover expected: {:#?}", report.takeovers);
    };
    let r = succeeded(t);
    assert_eq!(t.taker, HOME_HALF, "{t:#?}");
    assert!(
        !report.replies_after_resume.is_empty(),
        "the old owner had requests to answer when it woke up (else the test proves little)"
    );
    for (at, from, reply) in &report.replies_after_resume {
        assert_eq!(*from, FIRST_PRIMARY);
        assert!(
            matches!(reply, ClientReply::Error(_) | ClientReply::Began(_)),
            "the old owner answered {reply:?} at {at:?} after it woke up"
        );
    }
    let [(stopped_at, who, reason)] = report.resumed_owner_stopped.as_slice() else {
        panic!(
            "the old owner did not stop after it woke up: {:?}",
            report.resumed_owner_stopped
        );
    };
    assert_eq!(*who, FIRST_PRIMARY);
    let first_reply_at = report.replies_after_resume[0].0;
    assert!(
        *stopped_at <= first_reply_at + Duration::from_millis(5),
        "the old owner ran on for {:?} after it woke up: {reason}",
        *stopped_at - first_reply_at
    );
    let fenced_by_backups = *reason == format!("fenced: epoch {} owns the LSG", r.epoch);
    let lost_storage = reason.contains("crashed");
    assert!(
        fenced_by_backups || lost_storage,
        "the old owner stopped for another reason: {reason}"
    );
    println!("  the old owner stopped at {stopped_at:?}: {reason}");
    assert_eq!(report.transfers_lost_to_power_loss, 0);
    fenced_by_backups
}

/// Scenario 6 (SPEC §3, seed 004: in-doubt transactions). A transfer is prepared (its
/// coordinator is another LSG) and the primary dies before the coordinator's decision. After
/// the takeover the transfer is in doubt: its write set stays locked (a probe reading the
/// debited account waits, and times out), every other key is open at once (a probe of an
/// untouched account is answered at once); the decision, applied with
/// `LsgOwner::resolve_in_doubt`, releases the locks (the same probe is answered at once) and
/// the bank holds either way: a committed transfer counts once, an aborted one is undone and
/// the client runs it again.
///
/// Catches: a takeover that does not relock in-doubt write sets (the first probe reads), that
/// undoes a prepared transaction as a loser (nothing in doubt), a decision that does not
/// release the locks (the last probe times out and the clients never finish) or that does not
/// undo an abort (the transfer counts twice: balances and markers disagree).
fn in_doubt(name: &str, options: SimOptions, failure: Fault, start: StartKind, outcome: Outcome) {
    let wait = Duration::from_millis(300);
    let report = run(
        name,
        options,
        vec![
            ScriptStep::new(When::Committed(8), Fault::PrepareNext { client: 0 }),
            ScriptStep::new(When::Prepared, failure),
            ScriptStep::new(
                When::OwnerReady,
                Fault::Probe {
                    key: ProbeKey::InDoubt,
                },
            ),
            ScriptStep::new(
                When::After(Duration::ZERO),
                Fault::Probe {
                    key: ProbeKey::Free,
                },
            ),
            ScriptStep::new(When::After(wait), Fault::Resolve(outcome)),
            ScriptStep::new(
                When::After(Duration::ZERO),
                Fault::Probe {
                    key: ProbeKey::InDoubt,
                },
            ),
        ],
    );
    let t = report
        .takeovers
        .iter()
        .find(|t| t.outcome.is_ok())
        .expect("a takeover");
    assert_eq!(succeeded(t).in_doubt, 1, "{t:#?}");
    assert_eq!(succeeded(t).start, start, "{t:#?}");
    let prepared = report.prepared.as_ref().expect("a prepared transfer");
    assert_eq!(prepared.in_doubt_at_resolve, vec![prepared.tx]);
    let Some((resolved_at, _)) = prepared.resolved else {
        panic!("not resolved: {prepared:?}");
    };
    let [locked, free, released] = report.probes.as_slice() else {
        panic!("three probes expected: {:#?}", report.probes);
    };
    let waited = |p: &ProbeReport| -> Duration {
        match (p.read_sent_at, p.answered_at) {
            (Some(sent), Some(answered)) => answered - sent,
            _ => panic!("probe not answered: {p:?}"),
        }
    };
    // The in-doubt write set is locked until the decision.
    match &locked.reply {
        Some(ClientReply::Error(OpError::Aborted {
            reason: AbortReason::LockTimeout,
            ..
        })) => {}
        Some(ClientReply::Value(_)) => assert!(
            locked.answered_at >= Some(resolved_at),
            "the in-doubt key was read before the decision: {locked:?}"
        ),
        other => panic!("the in-doubt probe got {other:?}"),
    }
    assert!(
        waited(locked) >= Duration::from_millis(150),
        "the in-doubt key was not locked: {locked:?}"
    );
    // Everything else is open at once.
    assert!(
        matches!(free.reply, Some(ClientReply::Value(_))),
        "{free:?}"
    );
    assert!(waited(free) < Duration::from_millis(10), "{free:?}");
    // The decision released the write set.
    assert!(
        matches!(released.reply, Some(ClientReply::Value(_))),
        "{released:?}"
    );
    assert!(
        waited(released) < Duration::from_millis(100),
        "{released:?}"
    );
    let acknowledged = report
        .acknowledged
        .iter()
        .filter(|a| a.transfer == prepared.transfer)
        .count();
    assert_eq!(acknowledged, 1, "the prepared transfer ends committed once");
}

#[test]
fn an_in_doubt_transfer_keeps_its_locks_through_a_warm_takeover_until_it_commits() {
    in_doubt(
        "in doubt, warm takeover, commit",
        options(17),
        kill(Target::Primary, Restart::Auto),
        StartKind::Warm,
        Outcome::Commit,
    );
}

#[test]
fn an_in_doubt_transfer_keeps_its_locks_through_a_cold_recovery_until_it_aborts() {
    let mut options = options(18);
    // The prepare is flushed before it is acknowledged, so fresh pairs find it in the trail.
    options.paranoid = true;
    in_doubt(
        "in doubt, every CPU killed, abort",
        options,
        kill(Target::AllCpus, Restart::Auto),
        StartKind::Cold,
        Outcome::Abort,
    );
}

/// Scenario 7 (SPEC §4, exactly once). A commit's acknowledgement is lost on the wire, then
/// the owner dies; the client resends the commit request (same client, same sequence number)
/// to whoever took over. The new owner answers from its message table, recovered with the
/// LSG: the original receipt (the old owner's epoch and commit LSN), with exactly one commit
/// record of the transaction in the trail: it did not run the commit again.
///
/// Catches: a takeover that loses the message table (the new owner does not know the
/// transaction, answers that it aborted, and the client runs the transfer again: it counts
/// twice), and an owner that executes a resent commit instead of looking it up.
fn resend_after(name: &str, options: SimOptions, failure: Fault, start: Option<StartKind>) {
    let report = run(
        name,
        options,
        vec![
            ScriptStep::new(When::Committed(8), Fault::LoseNextCommitReply),
            ScriptStep::new(When::ReplyLost, failure),
        ],
    );
    let t = report
        .takeovers
        .iter()
        .find(|t| t.outcome.is_ok())
        .expect("a takeover");
    if let Some(start) = start {
        assert_eq!(succeeded(t).start, start, "{t:#?}");
    }
    let lost = report.lost_reply.as_ref().expect("a reply was lost");
    let answer = report
        .resent_answer
        .as_ref()
        .expect("the client resent and was answered");
    println!("lost: {lost:?}\nanswered: {answer:?}");
    assert_eq!(
        answer.reply,
        Reply::Committed(lost.receipt),
        "the resend is answered with the original receipt"
    );
    assert!(
        answer.owner_epoch > Some(lost.receipt.epoch),
        "a new owner answered (the CPU may be the old one's, restarted)"
    );
    assert_eq!(
        answer.commit_records_in_trail, 1,
        "one commit record of {} in the trail",
        lost.tx
    );
    let transfer = report
        .acknowledged
        .iter()
        .find(|a| a.commit_lsn == lost.receipt.commit_lsn && a.epoch == lost.receipt.epoch)
        .expect("the client saw the transfer committed");
    let times = report
        .acknowledged
        .iter()
        .filter(|a| a.transfer == transfer.transfer)
        .count();
    assert_eq!(times, 1, "the transfer was acknowledged {times} times");
}

#[test]
fn a_commit_resent_after_a_cpu_takeover_is_answered_from_the_message_table() {
    resend_after(
        "resend after a CPU takeover",
        options(19),
        kill(Target::Primary, Restart::Auto),
        // Warm, unless the same-node half lagged behind the trail's end (then cold).
        None,
    );
}

#[test]
fn a_commit_resent_after_a_cold_recovery_is_answered_from_the_message_table() {
    let mut options = options(20);
    options.paranoid = true;
    resend_after(
        "resend after fresh pairs recovered cold",
        options,
        kill(Target::AllCpus, Restart::Auto),
        Some(StartKind::Cold),
    );
}
