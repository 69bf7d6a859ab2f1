//! `duplex certs`: what an operator sees of a cluster's certificates, through the real binary,
//! and what a crash at any system call of `ensure` or `renew` leaves (run under `strace`, which
//! kills the process on entry to the N-th call of a kind).

use std::fs::{self, File};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use duplex_transport::certs::{ClusterCa, NodeCredentials};

const DUPLEX: &str = env!("CARGO_BIN_EXE_duplex");
const DAY: Duration = Duration::from_secs(86_400);

/// Runs `duplex certs <args> --dir <dir>` and returns its stdout; panics with stderr on failure.
fn certs(args: &[&str], dir: &Path) -> String {
    let out = Command::new(DUPLEX)
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run duplex certs");
    assert!(
        out.status.success(),
        "duplex certs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The row of `file` in a `show` table.
fn row<'a>(table: &'a str, file: &str) -> &'a str {
    table
        .lines()
        .find(|line| line.starts_with(&format!("{file} ")))
        .unwrap_or_else(|| panic!("no row for {file} in:\n{table}"))
}

#[test]
fn certs_show_lists_every_certificate_with_its_expiry_and_renew_replaces_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs_dir = dir.path().join("certs");
    let created = certs(&["ensure", "--nodes", "1,2"], &certs_dir);
    println!("{created}");
    let shown = certs(&["show"], &certs_dir);
    for (file, subject, days_left) in [
        ("ca.pem", "CN=Duplex cluster CA ", 3649),
        ("node-1.pem", "CN=node-1.duplex", 364),
        ("node-2.pem", "CN=node-2.duplex", 364),
    ] {
        let line = row(&shown, file);
        assert!(
            line.contains(subject)
                && line.matches(" UTC").count() == 2
                && line.ends_with(&format!("valid, {days_left} days left")),
            "{line}"
        );
    }

    let read = |name: &str| fs::read(certs_dir.join(name)).expect("read");
    let (ca, node_1, node_2) = (read("ca.pem"), read("node-1.pem"), read("node-2.pem"));
    let renewed = certs(&["renew", "--node", "2"], &certs_dir);
    assert!(renewed.starts_with("renewed node 2"), "{renewed}");
    assert_eq!(read("ca.pem"), ca);
    assert_eq!(read("node-1.pem"), node_1);
    assert_ne!(read("node-2.pem"), node_2);
}

#[test]
fn certs_ensure_refuses_a_ca_key_without_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(&["ensure", "--nodes", "1"], dir.path());
    fs::remove_file(dir.path().join("ca.pem")).expect("lose ca.pem");
    let out = Command::new(DUPLEX)
        .args(["certs", "ensure", "--nodes", "1", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run duplex certs ensure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("ca.key exists but") && stderr.lines().count() == 1,
        "one line naming the files: {stderr}"
    );
}

/// Writes a private key file with mode 0600.
fn write_key(path: &Path, pem: &str) {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(pem.as_bytes()))
        .expect("write key");
}

#[test]
fn certs_show_marks_certificates_that_expire_soon_have_expired_or_are_not_yet_valid() {
    let now = SystemTime::now();
    let dir = tempfile::tempdir().expect("tempdir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700)).expect("chmod");
    let ca = ClusterCa::generate_at(now - DAY * 400).expect("CA");
    fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("ca.pem");
    write_key(&dir.path().join("ca.key"), &ca.key_pem);
    for (node, issued) in [
        (1, now - DAY * 350),
        (2, now - DAY * 380),
        (3, now + DAY * 2),
    ] {
        let cert = ca.issue_node_at(node, issued).expect("issue");
        fs::write(dir.path().join(format!("node-{node}.pem")), &cert.cert_pem).expect("pem");
        write_key(&dir.path().join(format!("node-{node}.key")), &cert.key_pem);
    }
    let shown = certs(&["show"], dir.path());
    println!("{shown}");
    for (file, status) in [
        ("ca.pem", "valid, 3249 days left"),
        ("node-1.pem", "EXPIRES in 14 days (warned from 30): renew"),
        ("node-2.pem", "EXPIRED: renew"),
        ("node-3.pem", "NOT YET VALID: check this host's clock"),
    ] {
        let line = row(&shown, file);
        assert!(line.ends_with(status), "{file}: {line}");
    }

    // A CA with 150 days left is within its warning period of a year.
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = ClusterCa::generate_at(now - DAY * 3500).expect("CA");
    fs::write(dir.path().join("ca.pem"), &ca.cert_pem).expect("ca.pem");
    let shown = certs(&["show"], dir.path());
    let line = row(&shown, "ca.pem");
    assert!(
        line.ends_with("EXPIRES in 149 days (warned from 365): renew"),
        "{line}"
    );
}

#[test]
fn a_stray_unparsable_file_is_a_warning_after_ensure_and_a_failure_of_show() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(&["ensure", "--nodes", "1"], dir.path());
    fs::write(dir.path().join("node-9.pem"), "garbage").expect("stray file");
    let out = Command::new(DUPLEX)
        .args(["certs", "ensure", "--nodes", "1,2", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run duplex certs ensure");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "ensure wrote node 2 and succeeds: {stderr}"
    );
    assert!(dir.path().join("node-2.pem").exists());
    assert!(
        stderr.contains("problem: ") && stderr.contains("node-9.pem"),
        "{stderr}"
    );
    NodeCredentials::load(dir.path(), 2).expect("node 2 loads");

    let out = Command::new(DUPLEX)
        .args(["certs", "show", "--dir"])
        .arg(dir.path())
        .output()
        .expect("run duplex certs show");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "show fails on a problem");
    assert!(
        stderr.contains("node-9.pem") && stderr.contains("1 problem(s)"),
        "{stderr}"
    );
}

/// A child process, killed and reaped however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn ensure_says_it_waits_for_the_lock_another_process_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    certs(&["ensure", "--nodes", "1"], dir.path());
    let lock = File::options()
        .read(true)
        .write(true)
        .open(dir.path().join("certs.lock"))
        .expect("open certs.lock");
    lock.lock().expect("hold the lock");
    let mut child = Reaped(
        Command::new(DUPLEX)
            .args(["certs", "ensure", "--nodes", "1,2", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn duplex certs ensure"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let next = || {
        lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .ok()
    };
    let waiting = std::iter::from_fn(next)
        .find(|line| line.contains("waiting for") && line.contains("certs.lock"));
    assert!(waiting.is_some(), "no waiting message before the deadline");
    assert!(
        !dir.path().join("node-2.pem").exists(),
        "nothing written while waiting"
    );
    drop(lock);
    // Its stderr ends when it exits.
    while next().is_some() {}
    let status = child.0.wait().expect("reap");
    assert!(status.success(), "{status}");
    assert!(dir.path().join("node-2.pem").exists());
}

/// Whether `strace` runs here and may trace a child.
fn strace_works() -> bool {
    Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `duplex certs <args> --dir <dir>` under strace, killed on entry to its `n`-th
/// `syscall`; returns whether it was killed (else it must have succeeded).
fn run_killed_at(args: &[&str], dir: &Path, syscall: &str, n: usize) -> bool {
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e"])
        .arg(format!("inject={syscall}:signal=KILL:when={n}"))
        .arg(DUPLEX)
        .arg("certs")
        .args(args)
        .arg("--dir")
        .arg(dir)
        .output()
        .expect("run strace");
    if out.status.signal() == Some(9) {
        return true;
    }
    assert!(
        out.status.success(),
        "duplex certs {args:?}, not killed at {syscall} {n}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    false
}

/// The calls a crash can fall between: writing and syncing files, giving them names, removing
/// them, and opening them.
const CRASH_SYSCALLS: [&str; 6] = ["openat", "write", "fsync", "linkat", "rename", "unlink"];
/// More calls of one kind than one run makes.
const CALLS_MAX: usize = 200;

/// Names in `dir` that start with a dot: temporary files left behind.
fn hidden_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with('.'))
        .collect()
}

/// After a crash and a rerun of `ensure`: one CA whose key matches it (issuing node 9 checks
/// that), every node's pair loads (its key, its name, its chain to ca.pem), and no temporary
/// files; `show` finds no problem.
fn assert_sound(dir: &Path, nodes: &[u16], what: &str) {
    for &node in nodes {
        NodeCredentials::load(dir, node).unwrap_or_else(|e| panic!("{what}: node {node}: {e}"));
    }
    certs(&["ensure", "--nodes", "9"], dir);
    NodeCredentials::load(dir, 9).unwrap_or_else(|e| panic!("{what}: node 9: {e}"));
    assert_eq!(hidden_files(dir), Vec::<String>::new(), "{what}");
    certs(&["show"], dir);
}

#[test]
fn a_crash_at_any_call_of_the_first_ensure_ends_after_a_rerun_in_one_ca() {
    if !strace_works() {
        println!("strace cannot trace here: crash points not exercised");
        return;
    }
    let mut crashes = 0;
    for syscall in CRASH_SYSCALLS {
        for n in 1..=CALLS_MAX {
            let dir = tempfile::tempdir().expect("tempdir");
            let certs_dir = dir.path().join("certs");
            if !run_killed_at(&["ensure", "--nodes", "1,2"], &certs_dir, syscall, n) {
                break;
            }
            assert!(n < CALLS_MAX, "{syscall}: still killed at call {n}");
            crashes += 1;
            let what = format!("killed at {syscall} {n}");
            let key_after_crash = fs::read(certs_dir.join("ca.key")).ok();
            certs(&["ensure", "--nodes", "1,2"], &certs_dir);
            if let Some(key) = key_after_crash {
                assert_eq!(
                    fs::read(certs_dir.join("ca.key")).expect("ca.key"),
                    key,
                    "{what}: the CA key the crash left is kept"
                );
            }
            assert_sound(&certs_dir, &[1, 2], &what);
        }
    }
    println!("{crashes} crash points");
}

#[test]
fn a_crash_at_any_call_of_a_renewal_ends_after_ensure_in_a_pair_that_loads() {
    if !strace_works() {
        println!("strace cannot trace here: crash points not exercised");
        return;
    }
    let mut crashes = 0;
    for syscall in CRASH_SYSCALLS {
        for n in 1..=CALLS_MAX {
            let dir = tempfile::tempdir().expect("tempdir");
            certs(&["ensure", "--nodes", "1,2"], dir.path());
            let ca = fs::read(dir.path().join("ca.pem")).expect("ca.pem");
            if !run_killed_at(&["renew", "--node", "1"], dir.path(), syscall, n) {
                break;
            }
            assert!(n < CALLS_MAX, "{syscall}: still killed at call {n}");
            crashes += 1;
            let what = format!("renewal killed at {syscall} {n}");
            certs(&["ensure", "--nodes", "1,2"], dir.path());
            assert_eq!(
                fs::read(dir.path().join("ca.pem")).expect("ca.pem"),
                ca,
                "{what}"
            );
            assert_sound(dir.path(), &[1, 2], &what);
        }
    }
    println!("{crashes} crash points");
}
