//! The cluster configuration file: the documented example parses, every rule's error names the
//! line of the value at fault, and generated valid configurations round-trip through TOML and
//! route every key to exactly one volume.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use duplex_lsg::LsgId;
use duplex_node::{ClusterConfig, ConfigError, Cpu, Durability, KeyBound, Lsg, Node, Volume};
use duplex_transport::EndpointId;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, RngSeed};
use serde::Serialize;

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples/cluster.toml")
}

#[test]
fn node_zero_is_reserved_for_clients() {
    let text = std::fs::read_to_string(example_path())
        .expect("example")
        .replacen("id = 1\ndata_dir", "id = 0\ndata_dir", 1);
    let err = ClusterConfig::parse(&text).expect_err("node 0 refused");
    assert!(err.to_string().contains("reserved for clients"), "{err}");
}

#[test]
fn the_documented_example_parses_and_routes_as_its_comments_say() {
    let config = ClusterConfig::load(&example_path()).expect("docs/examples/cluster.toml");
    assert_eq!(config.durability(), Durability::Normal);
    assert_eq!(config.storage().dir, Path::new("/var/lib/duplex/shared"));
    assert_eq!(config.timing(), duplex_node::Timing::default());
    assert_eq!(config.nodes().len(), 3);
    assert_eq!(config.peers().len(), 6);
    let node3 = config.cpus_of(3).expect("node 3");
    assert_eq!(node3.len(), 2);
    assert_eq!(node3[0].failsafe, None);
    assert_eq!(config.cpus_of(4), None);

    let route = |key: &[u8]| {
        config
            .route(key)
            .map(|r| (r.lsg.id.0, r.volume.name.as_str()))
    };
    assert_eq!(route(b""), Some((1, "accounts-a")));
    assert_eq!(route(b"accounts/4999"), Some((1, "accounts-a")));
    assert_eq!(route(b"accounts/5"), Some((1, "accounts-b")));
    assert_eq!(route(b"orders/17"), Some((2, "orders")));
    assert_eq!(route(b"orders0"), Some((3, "misc")));
    assert_eq!(route(b"zzz"), Some((3, "misc")));
    assert_eq!(route(&[255]), Some((3, "tail")));
    assert_eq!(route(&[255, 255, 0]), Some((3, "tail")));
    assert_eq!(config.volume("orders").map(|r| r.lsg.id), Some(LsgId(2)));
    assert!(config.volume("nope").is_none());

    let host = config
        .host_config(LsgId(1), EndpointId::new(2, 1))
        .expect("node 2 backs LSG 1 up");
    assert_eq!(host.lsg_dir, Path::new("/var/lib/duplex/shared/lsg-1"));
    assert_eq!(host.run_dir, Path::new("/var/lib/duplex/node-2"));
    assert!(!host.paranoid);
    let cpus: Vec<String> = host.cpus.iter().map(|c| c.to_string()).collect();
    assert_eq!(cpus, ["1.0", "1.1", "2.0", "2.1"]);
    assert_eq!(
        host.home_backup_of(EndpointId::new(1, 0)),
        Some(EndpointId::new(1, 1))
    );
    assert_eq!(
        host.backup_node_of(EndpointId::new(1, 0)),
        Some(EndpointId::new(2, 0))
    );
    // The second LSG's lists are rotated, so its halves land on other CPUs than the first's.
    let second: Vec<String> = config
        .lsg_cpus(LsgId(2))
        .iter()
        .map(|c| c.to_string())
        .collect();
    assert_eq!(second, ["2.1", "2.0", "3.1", "3.0"]);
    assert!(
        config
            .host_config(LsgId(1), EndpointId::new(3, 0))
            .is_none(),
        "node 3 neither homes nor backs up LSG 1"
    );
    assert!(
        config
            .host_config(LsgId(1), EndpointId::new(1, 7))
            .is_none()
    );

    let again = ClusterConfig::parse(&config.to_toml().expect("serializes")).expect("reparses");
    assert_eq!(again, config);
}

#[test]
fn relative_paths_are_taken_from_the_files_directory() {
    let dir = std::env::temp_dir().join(format!("duplex-node-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("cluster.toml");
    std::fs::write(&path, BASE.replace("\"/s\"", "\"shared\"")).expect("write");
    let config = ClusterConfig::load(&path).expect("valid");
    std::fs::remove_dir_all(&dir).expect("clean up");
    assert_eq!(config.storage().dir, dir.join("shared"));
    assert_eq!(config.nodes()[0].data_dir, Path::new("/n1"));
}

/// A small valid configuration; the error tests change one line or append lines, so the line
/// an error must name is known.
const BASE: &str = r#"[storage]
mode = "shared"
dir = "/s"

[[nodes]]
id = 1
data_dir = "/n1"
cpus = [{ id = 0, main = "127.0.0.1:7100" }, { id = 1, main = "127.0.0.1:7101" }]

[[nodes]]
id = 2
data_dir = "/n2"
cpus = [{ id = 0, main = "127.0.0.1:7200" }]

[[lsgs]]
id = 1
home = 1
backup = 2
volumes = [{ name = "a", end = "m" }, { name = "b", start = "m" }]
"#;

/// `BASE` with line `n` (from 1) replaced.
fn with_line(n: usize, text: &str) -> String {
    let mut lines: Vec<&str> = BASE.lines().collect();
    lines[n - 1] = text;
    lines.join("\n") + "\n"
}

/// `BASE` followed by `text`, whose first line is line 20.
fn with_extra(text: &str) -> String {
    assert_eq!(BASE.lines().count(), 19);
    format!("{BASE}{text}")
}

fn error_of(text: &str) -> ConfigError {
    ClusterConfig::parse(text).expect_err("the configuration must be refused")
}

/// The error names `line` and its problem contains `words`.
fn assert_refused(text: &str, line: usize, words: &str) -> ConfigError {
    let e = error_of(text);
    assert_eq!(e.line, line, "{e}");
    assert!(e.problem.contains(words), "{e:?} should mention {words:?}");
    assert!(e.to_string().starts_with(&format!("line {line}, column ")));
    e
}

#[test]
fn the_base_configuration_is_valid() {
    ClusterConfig::parse(BASE).expect("BASE is valid");
}

#[test]
fn malformed_toml_names_its_line_and_column() {
    let e = assert_refused(&with_line(7, "data_dir = \"/n1"), 7, "string");
    assert!(e.column > 1, "{e}");
}

#[test]
fn an_unknown_field_is_refused_where_it_is() {
    assert_refused(&with_line(7, "data_dri = \"/n1\""), 7, "data_dri");
}

#[test]
fn a_malformed_address_is_refused() {
    let e = assert_refused(
        &with_line(13, "cpus = [{ id = 0, main = \"localhost\" }]"),
        13,
        "address",
    );
    assert_eq!(e.column, 26, "the column of the address value: {e}");
}

#[test]
fn an_unknown_durability_mode_is_refused() {
    assert_refused(&format!("durability = \"fast\"\n{BASE}"), 1, "paranoid");
}

#[test]
fn a_duplicate_node_id_names_both_lines() {
    assert_refused(
        &with_line(11, "id = 1"),
        11,
        "node id 1, already used at line 6",
    );
}

#[test]
fn a_duplicate_cpu_id_is_refused() {
    assert_refused(
        &with_line(
            8,
            "cpus = [{ id = 0, main = \"127.0.0.1:7100\" }, { id = 0, main = \"127.0.0.1:7101\" }]",
        ),
        8,
        "CPU id 0 of node 1",
    );
}

#[test]
fn a_duplicate_lsg_id_is_refused() {
    let extra = "\n[[lsgs]]\nid = 1\nhome = 2\nbackup = 1\nvolumes = [{ name = \"c\", start = \"\\u0000\" }]\n";
    assert_refused(&with_extra(extra), 22, "LSG id 1, already used at line 16");
}

#[test]
fn an_lsg_backed_up_on_its_home_node_is_refused() {
    let e = assert_refused(&with_line(18, "backup = 1"), 18, "must differ");
    assert_eq!(
        e.to_string(),
        "line 18, column 10: LSG 1's backup node is its home node 1: they must differ"
    );
}

#[test]
fn an_lsg_naming_an_unknown_node_is_refused() {
    assert_refused(&with_line(17, "home = 9"), 17, "home node 9 is not a node");
    assert_refused(
        &with_line(18, "backup = 9"),
        18,
        "backup node 9 is not a node",
    );
}

#[test]
fn overlapping_ranges_of_one_lsg_are_refused() {
    let e = assert_refused(
        &with_line(
            19,
            "volumes = [{ name = \"a\", end = \"n\" }, { name = \"b\", start = \"m\" }]",
        ),
        19,
        "overlaps volume \"a\" of the same LSG",
    );
    assert_eq!(e.column, 61, "points at b's start: {e}");
}

#[test]
fn overlapping_ranges_of_two_lsgs_are_refused() {
    let extra = "\n[[lsgs]]\nid = 2\nhome = 2\nbackup = 1\nvolumes = [{ name = \"c\", start = \"x\", end = \"y\" }]\n";
    assert_refused(
        &with_extra(extra),
        25,
        "overlaps volume \"b\" of LSG 1 (line 19)",
    );
}

#[test]
fn an_empty_range_is_refused() {
    assert_refused(
        &with_line(
            19,
            "volumes = [{ name = \"a\", end = \"m\" }, { name = \"b\", start = \"m\", end = \"m\" }]",
        ),
        19,
        "empty key range",
    );
}

#[test]
fn a_volume_name_the_storage_layer_refuses_is_refused() {
    assert_refused(
        &with_line(19, "volumes = [{ name = \"a/b\" }]"),
        19,
        "may hold only ASCII letters",
    );
    assert_refused(
        &with_line(
            19,
            &format!("volumes = [{{ name = \"{}\" }}]", "v".repeat(65)),
        ),
        19,
        "1 to 64 characters",
    );
}

#[test]
fn a_volume_name_used_twice_is_refused() {
    let extra = "\n[[lsgs]]\nid = 2\nhome = 2\nbackup = 1\nvolumes = [{ name = \"a\", start = \"\\u0000\" }]\n";
    assert_refused(
        &with_extra(extra),
        25,
        "volume name \"a\", already used at line 19",
    );
}

#[test]
fn a_duplicate_address_is_refused() {
    let e = assert_refused(
        &with_line(
            13,
            "cpus = [{ id = 0, main = \"127.0.0.1:7200\", failsafe = \"127.0.0.1:7101\" }]",
        ),
        13,
        "address 127.0.0.1:7101, already used at line 8",
    );
    assert_eq!(e.column, 55, "points at the failsafe address: {e}");
}

#[test]
fn a_node_without_cpus_is_refused() {
    assert_refused(
        &with_line(13, "cpus = []"),
        13,
        "node 2's CPU list has none",
    );
}

#[test]
fn an_lsg_without_volumes_is_refused() {
    assert_refused(
        &with_line(19, "volumes = []"),
        19,
        "LSG 1's volume list has none",
    );
}

#[test]
fn limits_out_of_range_are_refused() {
    assert_refused(
        &with_extra("\n[timing]\ndetection_time_ms = 5\n"),
        22,
        "detection_time_ms = 5 is out of range 20..=60000",
    );
    assert_refused(
        &with_extra("\n[timing]\nlock_timeout_ms = 0\n"),
        22,
        "lock_timeout_ms = 0 is out of range",
    );
    assert_refused(
        &with_extra("\n[timing]\ncheckpoint_interval_ms = 3600001\n"),
        22,
        "checkpoint_interval_ms",
    );
    assert_refused(&with_line(11, "id = 70000"), 11, "70000");
    assert_refused(
        &with_line(13, "cpus = [{ id = 0, main = \"127.0.0.1:0\" }]"),
        13,
        "port 0",
    );
    assert_refused(
        &with_line(
            19,
            &format!(
                "volumes = [{{ name = \"a\", end = \"{}\" }}]",
                "k".repeat(1025)
            ),
        ),
        19,
        "longer than 1024",
    );
}

/// The file's schema as a test writes it: the public element types with the top level around
/// them, so a generated configuration is written by serde, not by hand.
#[derive(Debug, Serialize)]
struct Doc {
    durability: Durability,
    storage: duplex_node::Storage,
    timing: duplex_node::Timing,
    nodes: Vec<Node>,
    lsgs: Vec<Lsg>,
}

/// A valid configuration: nodes with 1 to 3 CPUs, and `boundaries` cutting the key space into
/// ranges that tile it, dealt to LSGs (each gets at least one) by `choices`.
fn doc(
    cpus_per_node: Vec<u16>,
    boundaries: Vec<Vec<u8>>,
    lsg_count: usize,
    choices: Vec<u32>,
    paranoid: bool,
    timing: (u64, u64, u64),
) -> Doc {
    let mut choice = choices.into_iter().cycle();
    let mut pick = |n: usize| choice.next().unwrap_or(0) as usize % n;
    let nodes: Vec<Node> = cpus_per_node
        .iter()
        .enumerate()
        .map(|(i, &cpus)| {
            let id = 10 + i as u16;
            Node {
                id,
                data_dir: PathBuf::from(format!("/data/node-{id}")),
                cpus: (0..cpus)
                    .map(|c| {
                        let port = 10_000 + id * 10 + c;
                        Cpu {
                            id: c,
                            main: SocketAddr::from(([127, 0, 0, 1], port)),
                            failsafe: (c % 2 == 0)
                                .then(|| SocketAddr::from(([127, 0, 0, 2], port))),
                            metrics: None,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    let mut lsgs: Vec<Lsg> = (0..lsg_count)
        .map(|i| {
            let home = pick(nodes.len());
            let backup = (home + 1 + pick(nodes.len() - 1)) % nodes.len();
            Lsg {
                id: LsgId(100 + i as u64),
                home: nodes[home].id,
                backup: nodes[backup].id,
                volumes: Vec::new(),
            }
        })
        .collect();
    let starts = std::iter::once(Vec::new()).chain(boundaries.iter().cloned());
    let ends = boundaries
        .iter()
        .cloned()
        .map(Some)
        .chain(std::iter::once(None));
    for (i, (start, end)) in starts.zip(ends).enumerate() {
        let owner = if i < lsg_count { i } else { pick(lsg_count) };
        lsgs[owner].volumes.push(Volume {
            name: format!("v{i}"),
            start: KeyBound(start),
            end: end.map(KeyBound),
        });
    }
    Doc {
        durability: if paranoid {
            Durability::Paranoid
        } else {
            Durability::Normal
        },
        storage: duplex_node::Storage {
            mode: duplex_node::StorageMode::Shared,
            dir: PathBuf::from("/data/shared"),
        },
        timing: duplex_node::Timing {
            detection_time_ms: timing.0,
            checkpoint_interval_ms: timing.1,
            lock_timeout_ms: timing.2,
        },
        nodes,
        lsgs,
    }
}

fn arb_doc() -> impl Strategy<Value = Doc> {
    (
        prop::collection::vec(1u16..=3, 2..=5),
        prop::collection::btree_set(prop::collection::vec(any::<u8>(), 1..=6), 3..=16),
        1usize..=4,
        prop::collection::vec(any::<u32>(), 1..=32),
        any::<bool>(),
        (
            duplex_node::Timing::DETECTION_TIME_MS,
            duplex_node::Timing::CHECKPOINT_INTERVAL_MS,
            duplex_node::Timing::LOCK_TIMEOUT_MS,
        ),
    )
        .prop_map(|(cpus, bounds, lsgs, choices, paranoid, timing)| {
            doc(
                cpus,
                bounds.into_iter().collect(),
                lsgs,
                choices,
                paranoid,
                timing,
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        rng_seed: RngSeed::Fixed(0x00d0_91e5),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn valid_configs_round_trip_and_every_key_routes_to_exactly_one_volume(
        doc in arb_doc(),
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..=7), 32),
    ) {
        let text = toml::to_string(&doc).expect("serializes");
        let config = ClusterConfig::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(config.durability(), doc.durability);
        prop_assert_eq!(config.storage(), &doc.storage);
        prop_assert_eq!(config.timing(), doc.timing);
        prop_assert_eq!(config.nodes(), doc.nodes.as_slice());
        prop_assert_eq!(config.lsgs(), doc.lsgs.as_slice());
        let again = ClusterConfig::parse(&config.to_toml().expect("serializes")).expect("reparses");
        prop_assert_eq!(&again, &config);

        // Random keys, every bound, and the keys right after and right before a bound.
        let bounds = doc.lsgs.iter().flat_map(|l| &l.volumes).map(|v| v.start.0.clone());
        let mut probes: Vec<Vec<u8>> = keys;
        for b in bounds {
            let mut after = b.clone();
            after.push(0);
            let mut before = b.clone();
            if let Some(last) = before.last_mut() {
                if *last > 0 { *last -= 1; } else { before.pop(); }
            }
            probes.extend([b, after, before]);
        }
        for key in probes {
            let holders: Vec<(LsgId, &str)> = doc
                .lsgs
                .iter()
                .flat_map(|l| l.volumes.iter().filter(|v| v.holds(&key)).map(move |v| (l.id, v.name.as_str())))
                .collect();
            prop_assert_eq!(holders.len(), 1, "key {:?} is held by {:?}", key, holders);
            let route = config.route(&key).expect("the ranges tile the key space");
            prop_assert_eq!((route.lsg.id, route.volume.name.as_str()), holders[0]);
        }
    }
}
