//! Keeps the crate's architecture invariants true (docs/ARCHITECTURE.md, "Volume pairs"): the
//! core depends on neither the transport nor an async runtime, and its code reads no clock,
//! starts no thread and iterates no hash map, so one seed replays one run.

use std::fs;
use std::path::Path;

#[test]
fn the_core_stays_deterministic_and_off_the_network() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .expect("a [dependencies] section");
    for banned in ["duplex-transport", "tokio", "quinn"] {
        assert!(
            !deps.contains(banned),
            "crates/volume-pair depends on {banned}"
        );
    }

    let mut checked = 0;
    for entry in fs::read_dir(root.join("src")).expect("read src") {
        let path = entry.expect("entry").path();
        let text = fs::read_to_string(&path).expect("read source");
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for banned in [
                "HashMap",
                "HashSet",
                "Instant",
                "SystemTime",
                "std::thread",
                "tokio",
                ".unwrap()",
            ] {
                assert!(
                    !code.contains(banned),
                    "{}:{}: {banned} in a deterministic core: {line}",
                    path.display(),
                    n + 1
                );
            }
        }
        checked += 1;
    }
    assert!(checked >= 4, "only {checked} source files found");
}
