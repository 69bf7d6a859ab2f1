//! An LSG's process pairs as real processes (`lsg-cpu`): real files in a temporary directory
//! (shared storage: every CPU opens the same LSG), QUIC on loopback, bank transfers from a
//! client process-thread, and CPUs killed, partitioned and stopped under load. Each test ends
//! with the bank oracle of the simulation: total conserved, every balance what the markers make
//! it, every acknowledged transfer present exactly once (`duplex_testbed::bank`).
//!
//! Layout: CPUs 1.0 and 1.1 on the home node, 2.0 on the backup node; 1.0 creates the LSG and
//! owns it; clients are endpoints of node 0. Every spawned process is killed when its guard
//! drops; waits are on the processes' report lines and the clients' commits, each bounded.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use duplex_pair::CommitState;
use duplex_testbed::bank::{self, BankOptions, BankRun, Committed};
use duplex_transport::certs::ensure_cluster_certs;
use duplex_transport::{EndpointId, PeerAddrs};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;
use serde_json::Value;

const HOME: EndpointId = EndpointId::new(1, 0);
const HOME_BACKUP: EndpointId = EndpointId::new(1, 1);
const REMOTE: EndpointId = EndpointId::new(2, 0);
const CPUS: [EndpointId; 3] = [HOME, HOME_BACKUP, REMOTE];
const ACCOUNTS: usize = 16;
const CLIENTS: usize = 4;
const WAIT: Duration = Duration::from_secs(15);

/// The tests run one at a time: each starts several processes on a 2-CPU machine, and the
/// failure detector's 300 ms must not be eaten by another test's load.
static SERIAL: Mutex<()> = Mutex::new(());

/// A child process that is SIGKILLed when the guard drops, whatever the test did.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One `lsg-cpu` process and its report lines.
struct CpuProcess {
    id: EndpointId,
    child: KillOnDrop,
    stdin: ChildStdin,
    lines: mpsc::Receiver<Value>,
}

impl CpuProcess {
    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.0.id() as i32)
    }

    /// Waits for the next report line matching `want`, at most `limit` (lines before it are
    /// passed over).
    fn wait_for(&self, what: &str, limit: Duration, want: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if want(&v) => return v,
                Ok(_) => {}
                Err(_) => panic!("{}: no {what} within {limit:?}", self.id),
            }
        }
    }

    fn command(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").expect("write command");
        self.stdin.flush().expect("flush command");
    }
}

fn event(v: &Value, name: &str) -> bool {
    v["event"] == name
}

struct Cluster {
    _dir: tempfile::TempDir,
    certs: PathBuf,
    data: PathBuf,
    addrs: BTreeMap<EndpointId, SocketAddr>,
    procs: BTreeMap<EndpointId, CpuProcess>,
}

impl Cluster {
    fn new() -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let certs = dir.path().join("certs");
        ensure_cluster_certs(&certs, &[0, 1, 2]).expect("cluster certs");
        let data = dir.path().join("data");
        // Each CPU keeps its address across restarts: reserve one port per CPU.
        let addrs = CPUS
            .iter()
            .map(|id| {
                let s = UdpSocket::bind("127.0.0.1:0").expect("reserve a port");
                (*id, s.local_addr().expect("address"))
            })
            .collect();
        Cluster {
            _dir: dir,
            certs,
            data,
            addrs,
            procs: BTreeMap::new(),
        }
    }

    /// Starts CPU `id` in `role` and waits for its ready line.
    fn spawn(&mut self, id: EndpointId, role: &str) -> &mut CpuProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_lsg-cpu"));
        cmd.args(["--node", &id.node.to_string(), "--cpu", &id.cpu.to_string()])
            .args(["--role", role, "--accounts", &ACCOUNTS.to_string()])
            .arg("--data-dir")
            .arg(&self.data)
            .arg("--certs")
            .arg(&self.certs)
            .args(["--listen", &self.addrs[&id].to_string()]);
        for (other, addr) in &self.addrs {
            if *other != id {
                cmd.args(["--peer", &format!("{other}={addr}")]);
            }
        }
        let mut child = KillOnDrop(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn lsg-cpu"),
        );
        let stdin = child.0.stdin.take().expect("piped stdin");
        let stdout = child.0.stdout.take().expect("piped stdout");
        let stderr = child.0.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                eprintln!("[{id}] {line}");
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    return;
                }
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                eprintln!("[{id} stderr] {line}");
            }
        });
        let p = CpuProcess {
            id,
            child,
            stdin,
            lines,
        };
        p.wait_for("ready line", WAIT, |v| event(v, "ready"));
        self.procs.insert(id, p);
        self.procs.get_mut(&id).expect("just inserted")
    }

    fn proc(&self, id: EndpointId) -> &CpuProcess {
        self.procs.get(&id).expect("a running CPU")
    }

    /// The three CPUs, 1.0 owning, and the owner in normal state with its same-node half
    /// counting.
    fn start_normal() -> Cluster {
        let mut c = Cluster::new();
        c.spawn(HOME, "create-and-own");
        c.spawn(HOME_BACKUP, "backup");
        c.spawn(REMOTE, "backup");
        c.proc(HOME).wait_for("normal state", WAIT, |v| {
            event(v, "state") && v["state"] == "Normal" && v["home_counts"] == true
        });
        c
    }

    /// SIGKILLs CPU `id` and reaps it.
    fn kill(&mut self, id: EndpointId) -> Instant {
        let p = self.procs.remove(&id).expect("a running CPU");
        let at = Instant::now();
        kill(p.pid(), Signal::SIGKILL).expect("kill");
        let mut p = p;
        let _ = p.child.0.wait();
        at
    }

    fn bank(&self, seed: u64) -> BankRun {
        BankRun::start(BankOptions {
            certs: self.certs.clone(),
            endpoint: EndpointId::new(0, 0),
            cpus: self
                .addrs
                .iter()
                .map(|(id, main)| {
                    (
                        *id,
                        PeerAddrs {
                            main: *main,
                            failsafe: None,
                        },
                    )
                })
                .collect(),
            clients: CLIENTS,
            accounts: ACCOUNTS,
            seed,
        })
        .expect("start the clients")
    }
}

fn epoch_of(owner_line: &Value) -> u64 {
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
/// half takes the lock the kernel released at once and starts warm from its copy of the
/// stream; the clients' unanswered requests are resent to it.
#[test]
fn a_killed_primary_cpu_is_taken_over_warm_by_its_same_node_half() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start_normal();
    let run = c.bank(1);
    run.wait_commits(30, WAIT, |_| true)
        .expect("commits before the kill");
    let killed_at = c.kill(HOME);
    let owner = c
        .proc(HOME_BACKUP)
        .wait_for("takeover", WAIT, |v| event(v, "owner"));
    let took = killed_at.elapsed();
    assert_eq!(
        owner["start"], "warm",
        "the same-node half starts warm: {owner}"
    );
    let epoch = epoch_of(&owner);
    run.wait_commits(30, WAIT, of_epoch(epoch))
        .expect("commits on the new primary");
    eprintln!("owner after {took:?}: {owner}");
    // Well inside the detector's 300 ms: the lock's release is the signal.
    assert!(
        took < Duration::from_millis(300),
        "the same-host takeover waited for the detector: {took:?}"
    );
    let report = finish_and_check(run, |_| false);
    assert!(report.acknowledged >= 60, "{report:?}");
}

/// (b) The backup node is cut off: the primary goes primary-only (flushing before every
/// acknowledgement); then the whole home node dies, and the backup node's CPU, whose copy of
/// the stream is stale, recovers cold from the trail. Nothing acknowledged is lost.
#[test]
fn a_cut_off_backup_node_takes_over_cold_from_the_trail_after_the_home_node_dies() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start_normal();
    let run = c.bank(2);
    run.wait_commits(20, WAIT, |_| true)
        .expect("commits before the partition");
    let remote = c.procs.get_mut(&REMOTE).expect("remote CPU");
    remote.command(&format!("partition {HOME}"));
    remote.command(&format!("partition {HOME_BACKUP}"));
    c.proc(HOME).wait_for("primary-only state", WAIT, |v| {
        event(v, "state") && v["state"] == "PrimaryOnly"
    });
    run.wait_commits(20, WAIT, |c| c.receipt.state == CommitState::PrimaryOnly)
        .expect("primary-only commits");
    c.kill(HOME_BACKUP);
    let killed_at = c.kill(HOME);
    let owner = c
        .proc(REMOTE)
        .wait_for("takeover", WAIT, |v| event(v, "owner"));
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
/// (two failure domains, both lost) may be gone, only beyond the recovered trail's end.
#[test]
fn after_every_cpu_is_killed_a_fresh_process_recovers_from_the_trail() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = Cluster::start_normal();
    let run = c.bank(3);
    let before = run
        .wait_commits(30, WAIT, |_| true)
        .expect("commits before the kill");
    let old_epoch = before[0].receipt.epoch;
    for id in [REMOTE, HOME_BACKUP, HOME] {
        c.kill(id);
    }
    let fresh = c.spawn(HOME, "recover");
    let owner = fresh.wait_for("recovery", WAIT, |v| event(v, "owner"));
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
    let mut c = Cluster::start_normal();
    let run = c.bank(4);
    run.wait_commits(30, WAIT, |_| true)
        .expect("commits before the stop");
    let old = c.procs.remove(&HOME).expect("home CPU");
    let stopped_at = Instant::now();
    kill(old.pid(), Signal::SIGSTOP).expect("SIGSTOP");
    let ended = c
        .proc(HOME_BACKUP)
        .wait_for("the stopped CPU ended", WAIT, |v| {
            event(v, "ended_local_cpu")
        });
    let ended_after = stopped_at.elapsed();
    assert_eq!(ended["cpu"], HOME.to_string());
    assert_eq!(ended["pid"].as_i64(), Some(i64::from(old.pid().as_raw())));
    let owner = c
        .proc(HOME_BACKUP)
        .wait_for("takeover", WAIT, |v| event(v, "owner"));
    let owner_at = Instant::now();
    eprintln!(
        "ended after {ended_after:?}, owner after {:?}: {owner}",
        stopped_at.elapsed()
    );
    assert!(
        ended_after >= Duration::from_millis(200),
        "a stopped CPU must be declared down by the detector before it is ended: {ended_after:?}"
    );
    // Continue it: it was killed while stopped, so it is gone and never runs again.
    let _ = kill(old.pid(), Signal::SIGCONT);
    let status = waitpid(old.pid(), None).expect("reap the old primary");
    assert_eq!(
        status,
        WaitStatus::Signaled(old.pid(), Signal::SIGKILL, false),
        "the old primary was ended by SIGKILL"
    );
    std::mem::forget(old.child);
    let epoch = epoch_of(&owner);
    run.wait_commits(20, WAIT, of_epoch(epoch))
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
