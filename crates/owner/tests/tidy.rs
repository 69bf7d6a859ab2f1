//! Keeps the pair layer deterministic (docs/ARCHITECTURE.md, "Pairs and the LSG owner"): the
//! cores of `duplex-pair`, `duplex-audit-pair`, `duplex-volume-pair` and `duplex-owner` depend
//! on no async runtime, read no clock, start no thread, draw no unseeded randomness and iterate
//! no hash map, so one seed replays one simulated run. The one clock reader is the `Clock`
//! boundary itself (`crates/pair/src/clock.rs`).

use std::fs;
use std::path::{Path, PathBuf};

const CORES: [&str; 4] = ["pair", "audit-pair", "volume-pair", "owner"];
const ALLOWED_CLOCK: &str = "crates/pair/src/clock.rs";

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_pair_cores_stay_deterministic() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    for core in CORES {
        let root = workspace.join("crates").join(core);
        let manifest = fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|rest| rest.split("\n[").next())
            .expect("a [dependencies] section");
        for banned in ["tokio", "quinn", "crossbeam"] {
            assert!(!deps.contains(banned), "crates/{core} depends on {banned}");
        }
        let mut files = Vec::new();
        sources(&root.join("src"), &mut files);
        for path in files {
            let text = fs::read_to_string(&path).expect("read source");
            let relative = path
                .strip_prefix(&workspace)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            for (n, line) in text.lines().enumerate() {
                let code = line.trim_start();
                if code.starts_with("//") {
                    continue;
                }
                let mut banned = vec![
                    "HashMap",
                    "HashSet",
                    "std::thread",
                    "tokio",
                    "thread_rng",
                    "rand::rng()",
                    "from_entropy",
                    "from_os_rng",
                    "OsRng",
                ];
                if !relative.ends_with(ALLOWED_CLOCK) {
                    banned.extend(["Instant", "SystemTime"]);
                }
                for b in banned {
                    assert!(
                        !code.contains(b),
                        "{relative}:{}: `{b}` in a deterministic core: {line}",
                        n + 1
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked >= 15, "only {checked} source files found");
}
