//! Real processes, real files, real SIGKILL: the audit trail across writer crashes, LSG
//! ownership handed from a killed holder to a waiting one, and the system calls that make an
//! LSG's directory entries durable.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use duplex_lsg::{LogStorageGroup, LsgConfig, Lsn, OpenMode};
use rand::{Rng, SeedableRng};

const DUPLEX: &str = env!("CARGO_BIN_EXE_duplex");
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// The writer's payload for an LSN, derived here independently of the writer's code.
fn expected_payload(lsn: u64) -> Vec<u8> {
    let len = 8 + (lsn.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 52) as usize;
    let mut p = lsn.to_le_bytes().to_vec();
    p.extend((0..len - 8).map(|i| (lsn as usize).wrapping_mul(31).wrapping_add(i) as u8));
    p
}

/// Creates the LSG the way an operator does, with the CLI's own configuration.
fn create_lsg(dir: &Path) {
    let out = Command::new(DUPLEX)
        .args(["lsg", "create", "--dir"])
        .arg(dir)
        .output()
        .expect("run duplex lsg create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A child process that is SIGKILLed and reaped however the test ends.
struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(args: &[&str], dir: &Path) -> Proc {
        let mut child = Command::new(DUPLEX)
            .args(args)
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn duplex");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    fn line(&self) -> String {
        self.lines.recv_timeout(LINE_TIMEOUT).expect("child line")
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn every_acknowledged_record_survives_sigkill_at_random_points() {
    let seed: u64 = std::env::var("DUPLEX_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("seed {seed} (rerun with DUPLEX_TEST_SEED={seed})");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    create_lsg(dir.path());
    let kill_points = 50;
    let mut unacked_kept = 0u64;
    let mut last_epoch = 1;
    for round in 0..kill_points {
        let writer_seed = rng.random::<u64>().to_string();
        let mut writer = Proc::spawn(&["lsg", "write", "--seed", &writer_seed], dir.path());
        let ready = writer.line();
        assert!(ready.starts_with("ready "), "{ready}");
        let acks = rng.random_range(0..20u32);
        let mut acked = 0u64;
        for _ in 0..acks {
            let line = writer.line();
            acked = line
                .strip_prefix("durable ")
                .and_then(|l| l.parse().ok())
                .unwrap_or_else(|| panic!("unexpected line {line:?}"));
        }
        std::thread::sleep(Duration::from_micros(rng.random_range(0..2000)));
        writer.kill();
        while let Ok(line) = writer.lines.try_recv() {
            if let Some(lsn) = line.strip_prefix("durable ") {
                acked = lsn.parse().expect("lsn");
            }
        }
        // Any configuration opens it: the LSG's own limits are in its manifest.
        let lsg = LogStorageGroup::open(dir.path(), LsgConfig::default(), OpenMode::Write)
            .expect("recover");
        assert!(
            lsg.owner_epoch().0 > last_epoch,
            "round {round}: epoch did not rise"
        );
        last_epoch = lsg.owner_epoch().0;
        let mut expected = 1u64;
        for record in lsg.audit().reader(Lsn(1)).expect("reader") {
            let record = record.unwrap_or_else(|e| panic!("round {round}: {e}"));
            assert_eq!(record.lsn, Lsn(expected), "round {round}: out of order");
            assert_eq!(
                record.payload,
                expected_payload(expected),
                "round {round}: LSN {expected} damaged"
            );
            expected += 1;
        }
        let recovered = expected - 1;
        assert!(
            recovered >= acked,
            "round {round}: acknowledged up to {acked}, only {recovered} recovered"
        );
        assert_eq!(
            lsg.audit().next_lsn(),
            Lsn(expected),
            "round {round}: records past the tail"
        );
        unacked_kept += recovered - acked;
    }
    println!(
        "{kill_points} kill points exercised; {unacked_kept} unacknowledged records survived (allowed)"
    );
}

#[test]
fn a_waiter_owns_the_lsg_with_a_higher_epoch_after_the_holder_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    create_lsg(dir.path());
    let mut holder = Proc::spawn(&["lsg", "hold"], dir.path());
    let owned = holder.line();
    let holder_epoch: u64 = owned
        .strip_prefix("owned ")
        .and_then(|e| e.parse().ok())
        .expect("owned line");

    // A non-waiting opener is refused, naming the owner's epoch.
    let refused = Command::new(DUPLEX)
        .args(["lsg", "hold", "--dir"])
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains(&format!("owned by epoch {holder_epoch}")),
        "{stderr}"
    );

    let waiter = Proc::spawn(&["lsg", "hold", "--wait"], dir.path());
    assert_eq!(waiter.line(), "waiting");
    let killed_at = Instant::now();
    holder.kill();
    let owned = waiter.line();
    let took = killed_at.elapsed();
    let waiter_epoch: u64 = owned
        .strip_prefix("owned ")
        .and_then(|e| e.parse().ok())
        .expect("owned line");
    assert!(
        waiter_epoch > holder_epoch,
        "{waiter_epoch} <= {holder_epoch}"
    );
    println!("ownership moved from epoch {holder_epoch} to {waiter_epoch} in {took:?}");
}

#[test]
fn the_readme_drill_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(DUPLEX)
        .args(["lsg", "drill", "--kills", "3", "--seed", "7", "--dir"])
        .arg(dir.path().join("lsg"))
        .output()
        .expect("run drill");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("drill passed: 3 kill points"), "{stdout}");
}

/// The system calls `duplex lsg create --dir DIR` makes, traced with strace: (index, path) of each
/// name made or removed (mkdir, rename, unlink), and of each directory fsync'ed.
type Traced = (Vec<(usize, String)>, Vec<(usize, String)>, String);

fn trace_create(lsg: &Path, trace: &Path) -> Traced {
    let out = Command::new("strace")
        .args(["-f", "-y", "-o"])
        .arg(trace)
        .args([
            "-e",
            "trace=mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,fsync,fdatasync",
            DUPLEX,
            "lsg",
            "create",
            "--dir",
        ])
        .arg(lsg)
        .output()
        .expect("run strace");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(trace).expect("trace");
    // (index, path) of each new or removed name, and of each fsync'ed directory.
    let mut names = Vec::new();
    let mut synced = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let Some(call) = line.split_whitespace().nth(1) else {
            continue;
        };
        if !line.trim_end().ends_with("= 0") {
            continue;
        }
        let quoted: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        if call.starts_with("mkdir") || call.starts_with("unlink") {
            names.extend(quoted.first().map(|p| (i, p.to_string())));
        } else if call.starts_with("rename") {
            names.extend(quoted.last().map(|p| (i, p.to_string())));
        } else if call.starts_with("fsync(") {
            let fd_path = call
                .split_once('<')
                .and_then(|(_, rest)| rest.split_once('>'))
                .map(|(p, _)| p.to_string());
            synced.extend(fd_path.map(|p| (i, p)));
        }
    }
    (names, synced, text)
}

fn has_strace() -> bool {
    let found = Command::new("strace")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        println!("strace not installed: directory sync test not run (.ci/run installs it)");
    }
    found
}

fn parent_of(path: &str) -> String {
    Path::new(path)
        .parent()
        .expect("parent")
        .to_string_lossy()
        .into_owned()
}

/// Every directory, rename and unlink of an LSG is followed by an fsync of its parent directory,
/// from a directory whose parents do not exist yet.
#[test]
fn every_new_name_is_made_durable_by_syncing_its_directory() {
    if !has_strace() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (names, synced, text) = trace_create(
        &dir.path().join("new/parents/lsg"),
        &dir.path().join("trace"),
    );
    let root = dir.path().to_string_lossy().into_owned();
    let ours: Vec<_> = names.iter().filter(|(_, p)| p.starts_with(&root)).collect();
    assert!(ours.len() >= 6, "too few names traced:\n{text}");
    for (i, path) in ours {
        let parent = parent_of(path);
        assert!(
            synced.iter().any(|(j, p)| j > i && *p == parent),
            "{path} (trace line {i}) is not followed by an fsync of {parent}:\n{text}"
        );
    }
}

/// An LSG directory the operator made beforehand (or an earlier attempt left) may have an entry
/// that is not durable: creating the LSG in it syncs its parent too.
#[test]
fn creating_in_an_existing_directory_syncs_its_parent() {
    if !has_strace() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let lsg = dir.path().join("lsg");
    std::fs::create_dir(&lsg).expect("mkdir by the operator");
    let (_, synced, text) = trace_create(&lsg, &dir.path().join("trace"));
    let parent = dir.path().to_string_lossy().into_owned();
    assert!(
        synced.iter().any(|(_, p)| *p == parent),
        "no fsync of {parent}:\n{text}"
    );
}
