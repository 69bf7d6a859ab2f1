//! `duplexd` refuses what it cannot run with a clear error and a non-zero exit, before it binds
//! anything: a malformed config (with its line and column), an unknown node or CPU, missing
//! certificates. (This test also makes `cargo test --workspace` build the binary the process
//! tests in `testbed/` start.)

use std::process::Command;

const DUPLEXD: &str = env!("CARGO_BIN_EXE_duplexd");

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(DUPLEXD)
        .args(args)
        .output()
        .expect("duplexd runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn example() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/examples/cluster.toml"
    ))
    .expect("docs/examples/cluster.toml")
}

#[test]
fn a_malformed_config_is_refused_with_its_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, example().replacen("backup = 2", "backup = 1", 1)).expect("write");
    let config = path.to_str().expect("utf-8 path");
    let (ok, stderr) = run(&["--config", config, "--node", "1", "--cpu", "0"]);
    assert!(!ok);
    assert!(
        stderr.contains("line ") && stderr.contains("column "),
        "{stderr}"
    );
    assert!(stderr.contains("backup node"), "{stderr}");
}

#[test]
fn an_unknown_node_or_cpu_and_missing_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cluster.toml");
    std::fs::write(&path, example()).expect("write");
    let config = path.to_str().expect("utf-8 path");
    let (ok, stderr) = run(&["--config", config, "--node", "9", "--cpu", "0"]);
    assert!(!ok);
    assert!(stderr.contains("node 9 is not in"), "{stderr}");
    let (ok, stderr) = run(&["--config", config, "--node", "1", "--cpu", "7"]);
    assert!(!ok);
    assert!(stderr.contains("node 1 has no CPU 7"), "{stderr}");
    let (ok, stderr) = run(&["--config", config, "--node", "1", "--cpu", "0"]);
    assert!(!ok);
    assert!(stderr.contains("certificates"), "{stderr}");
}
