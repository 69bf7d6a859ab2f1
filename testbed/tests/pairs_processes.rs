//! An LSG's process pairs as real processes (`lsg-cpu`): real files in a temporary directory
//! (shared storage: every CPU opens the same LSG), QUIC on loopback, bank transfers from a
//! client thread in the test process, and CPUs killed, partitioned and stopped under load. Each test ends
//! with the bank oracle of the simulation: total conserved, every balance what the markers make
//! it, every acknowledged transfer present exactly once (`duplex_testbed::bank`).
//!
//! Layout: CPUs 1.0 and 1.1 on the home node, 2.0 on the backup node; 1.0 creates the LSG and
//! owns it; clients are endpoints of node 0. Every spawned process is killed when its guard
//! drops; waits are on the processes' report lines and the clients' commits, each bounded.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use duplex_pair::CommitState;
use duplex_testbed::bank::{self, BankRun, Committed};
use duplex_testbed::cluster::{Cluster, ClusterOptions, is_event, is_state};
use duplex_transport::EndpointId;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};

const HOME: EndpointId = EndpointId::new(1, 0);
const HOME_BACKUP: EndpointId = EndpointId::new(1, 1);
const REMOTE: EndpointId = EndpointId::new(2, 0);
const ACCOUNTS: usize = 16;
const CLIENTS: usize = 4;
const WAIT: Duration = Duration::from_secs(15);

/// The tests run one at a time: each starts several processes on a 2-CPU machine, and the
/// failure detector's 300 ms must not be eaten by another test's load.
static SERIAL: Mutex<()> = Mutex::new(());

/// The three CPUs, 1.0 owning, and the owner in normal state with its same-node half counting.
fn start_normal() -> Cluster {
    let mut c = Cluster::new(ClusterOptions {
        bin: env!("CARGO_BIN_EXE_lsg-cpu").into(),
        cpus: vec![HOME, HOME_BACKUP, REMOTE],
        accounts: ACCOUNTS,
        paranoid: false,
        echo: true,
    })
    .expect("a cluster directory");
    c.spawn(HOME, "create-and-own").expect("the first owner");
    c.spawn(HOME_BACKUP, "backup").expect("the same-node half");
    c.spawn(REMOTE, "backup").expect("the backup node");
    c.proc(HOME)
        .expect("owner")
        .wait_for("normal state", WAIT, |v| is_state(v, "Normal", true))
        .expect("normal state");
    c
}

fn owner_line(c: &Cluster, id: EndpointId) -> serde_json::Value {
    c.proc(id)
        .expect("a running CPU")
        .wait_for("takeover", WAIT, |v| is_event(v, "owner"))
        .expect("takeover")
}

fn epoch_of(owner_line: &serde_json::Value) -> u64 {
    owner_line["epoch"]
        .as_u64()
        .expect("epoch in the owner line")
}

fn of_epoch(epoch: u64) -> impl Fn(&Committed) -> bool {
    move |c: &Committed| c.receipt.epoch.0 == epoch
}

/// Finishes the clients and checks the bank; nothing acknowledged may be missing unless
/// `excused`.
fn finish_and_check(run: BankRun, excused: impl Fn(&Committed) -> bool) -> bank::BankReport {
    let (committed, state) = run.finish().expect("clients finish and read the bank");
    let report =
        bank::check_bank(&state, ACCOUNTS, &committed, excused).expect("the bank oracle holds");
    eprintln!("bank: {report:?}");
    report
}

/// (a) Warm CPU takeover: the primary CPU is SIGKILLed while clients run; its same-node backup
/// half takes the lock the kernel released at once (well inside the detector's 300 ms) and
/// starts warm from its copy of the stream; the clients' unanswered requests are resent to it.
#[test]
fn a_killed_primary_cpu_is_taken_over_warm_by_its_same_node_half() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_normal();
    let run = c.bank(CLIENTS, 1).expect("clients");
    run.wait_commits(30, WAIT, |_| true)
        .expect("commits before the kill");
    let killed_at = c.kill(HOME).expect("kill the primary CPU");
    let owner = owner_line(&c, HOME_BACKUP);
    let took = killed_at.elapsed();
    eprintln!("owner after {took:?}: {owner}");
    assert_eq!(
        owner["start"], "warm",
        "the same-node half starts warm: {owner}"
    );
    assert!(
        took < Duration::from_millis(300),
        "the same-host takeover waited for the detector: {took:?}"
    );
    run.wait_commits(30, WAIT, of_epoch(epoch_of(&owner)))
        .expect("commits on the new primary");
    let report = finish_and_check(run, |_| false);
    assert!(report.acknowledged >= 60, "{report:?}");
}

/// (b) The backup node is cut off: the primary goes primary-only (flushing before every
/// acknowledgement); then the whole home node dies, and the backup node's CPU, whose copy of
/// the stream is stale, recovers cold from the trail. Nothing acknowledged is lost.
#[test]
fn a_cut_off_backup_node_takes_over_cold_from_the_trail_after_the_home_node_dies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_normal();
    let run = c.bank(CLIENTS, 2).expect("clients");
    run.wait_commits(20, WAIT, |_| true)
        .expect("commits before the partition");
    let remote = c.proc_mut(REMOTE).expect("the backup node");
    remote
        .command(&format!("partition {HOME}"))
        .expect("partition");
    remote
        .command(&format!("partition {HOME_BACKUP}"))
        .expect("partition");
    c.proc(HOME)
        .expect("owner")
        .wait_for("primary-only state", WAIT, |v| {
            is_state(v, "PrimaryOnly", false)
        })
        .expect("primary-only");
    run.wait_commits(20, WAIT, |c| c.receipt.state == CommitState::PrimaryOnly)
        .expect("primary-only commits");
    c.kill(HOME_BACKUP).expect("kill the home node");
    let killed_at = c.kill(HOME).expect("kill the home node");
    let owner = owner_line(&c, REMOTE);
    eprintln!("owner after {:?}: {owner}", killed_at.elapsed());
    assert_eq!(
        owner["start"], "cold",
        "a stale copy is never the warm state: {owner}"
    );
    run.wait_commits(20, WAIT, of_epoch(epoch_of(&owner)))
        .expect("commits on the backup node");
    finish_and_check(run, |_| false);
}

/// (c) Both pairs lost: every CPU is SIGKILLed; a fresh process recovers from the trail. What
/// was acknowledged after a flush survives; what was acknowledged from memory in normal state
/// (two failure domains, both lost) may be gone, and only beyond the recovered trail's end.
#[test]
fn after_every_cpu_is_killed_a_fresh_process_recovers_from_the_trail() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_normal();
    let run = c.bank(CLIENTS, 3).expect("clients");
    let before = run
        .wait_commits(30, WAIT, |_| true)
        .expect("commits before the kill");
    let old_epoch = before[0].receipt.epoch;
    for id in [REMOTE, HOME_BACKUP, HOME] {
        c.kill(id).expect("kill");
    }
    c.spawn(HOME, "recover").expect("a fresh process");
    let owner = owner_line(&c, HOME);
    assert_eq!(owner["start"], "cold", "{owner}");
    let trail_end = owner["trail_end"].as_u64().expect("trail end");
    run.wait_commits(20, WAIT, of_epoch(epoch_of(&owner)))
        .expect("commits after recovery");
    let report = finish_and_check(run, |c| {
        c.receipt.state == CommitState::Normal
            && c.receipt.epoch == old_epoch
            && c.receipt.commit_lsn.0 > trail_end
    });
    eprintln!(
        "acknowledged from memory and lost with every copy: {}",
        report.lost_excused
    );
}

/// (d) A stopped primary: SIGSTOP keeps its process and its lock. After the detector's silence
/// the same-node half's node service ends it (SIGKILL ends a stopped process) and takes over;
/// continued afterwards, the old primary neither acknowledges nor writes: it is gone, no client
/// heard from it after the takeover, and the bank holds.
#[test]
fn a_stopped_primary_is_ended_after_the_detection_time_and_taken_over() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_normal();
    let run = c.bank(CLIENTS, 4).expect("clients");
    run.wait_commits(30, WAIT, |_| true)
        .expect("commits before the stop");
    let old = c.procs.remove(&HOME).expect("home CPU");
    let pid = old.pid();
    let stopped_at = Instant::now();
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP");
    let ended = c
        .proc(HOME_BACKUP)
        .expect("the same-node half")
        .wait_for("the stopped CPU ended", WAIT, |v| {
            is_event(v, "ended_local_cpu")
        })
        .expect("the node service ends the stopped CPU");
    let ended_after = stopped_at.elapsed();
    assert_eq!(ended["cpu"], HOME.to_string());
    assert_eq!(ended["pid"].as_i64(), Some(i64::from(pid.as_raw())));
    let owner = owner_line(&c, HOME_BACKUP);
    let owner_at = Instant::now();
    eprintln!(
        "ended after {ended_after:?}, owner after {:?}: {owner}",
        stopped_at.elapsed()
    );
    assert!(
        ended_after >= Duration::from_millis(200),
        "a stopped CPU is ended only once the detector declared it down: {ended_after:?}"
    );
    // Continue it: it was killed while stopped, so it is gone and never runs again.
    let _ = kill(pid, Signal::SIGCONT);
    let status = waitpid(pid, None).expect("reap the old primary");
    assert_eq!(
        status,
        WaitStatus::Signaled(pid, Signal::SIGKILL, false),
        "the old primary was ended by SIGKILL"
    );
    // Reaped here: its guard must not signal the pid again.
    std::mem::forget(old);
    run.wait_commits(20, WAIT, of_epoch(epoch_of(&owner)))
        .expect("commits on the new primary");
    let (committed, state) = run.finish().expect("clients finish");
    // A commit the new primary answers with the old epoch's receipt is a resend answered from
    // the message table: the original answer, as it must be.
    for c in &committed {
        assert!(
            !(c.by == HOME && c.at > owner_at),
            "the old primary answered a commit after the takeover: {c:?}"
        );
    }
    let report = bank::check_bank(&state, ACCOUNTS, &committed, |_| false).expect("oracle");
    eprintln!("bank: {report:?}");
}
