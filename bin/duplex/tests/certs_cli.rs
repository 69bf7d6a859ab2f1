//! `duplex certs`: what an operator sees of a cluster's certificates, through the real binary.

use std::fs;
use std::path::Path;
use std::process::Command;

const DUPLEX: &str = env!("CARGO_BIN_EXE_duplex");

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
