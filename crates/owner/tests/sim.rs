//! The deterministic simulation of one LSG (see `duplex_owner::sim`): many seeds, each a
//! whole history with faults, each checked by the bank oracle.
//!
//! `DUPLEX_SIM_SEEDS=100000 DUPLEX_SIM_FIRST_SEED=1 cargo test --release -p duplex-owner --test sim -- --nocapture`
//! runs more; a failure prints its seed, and `DUPLEX_SIM_FIRST_SEED=<seed> DUPLEX_SIM_SEEDS=1`
//! replays it.

use duplex_owner::sim::{SimOptions, run};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn a_quiet_run_commits_every_transfer() {
    let mut options = SimOptions::new(1);
    options.max_faults = 0;
    options.loss_probability = 0.0;
    match run(options) {
        Ok(report) => {
            println!("{report:?}");
            assert_eq!(
                report.transfers_committed,
                options.clients * options.transfers_per_client
            );
        }
        Err(f) => panic!("{f}"),
    }
}

#[test]
fn every_seed_keeps_every_acknowledged_transfer_exactly_once() {
    let first = env("DUPLEX_SIM_FIRST_SEED", 1);
    let seeds = env("DUPLEX_SIM_SEEDS", 500);
    let mut warm = 0;
    let mut cold = 0;
    let mut committed = 0;
    for seed in first..first + seeds {
        match run(SimOptions::new(seed)) {
            Ok(report) => {
                warm += report.takeovers_warm;
                cold += report.takeovers_cold;
                committed += report.transfers_committed;
            }
            Err(f) => panic!("{f}\nreplay: DUPLEX_SIM_FIRST_SEED={seed} DUPLEX_SIM_SEEDS=1"),
        }
    }
    println!(
        "{seeds} seeds from {first}: {committed} transfers, {warm} warm and {cold} cold takeovers"
    );
    assert!(
        warm > 0 && cold > 0,
        "the faults never forced both kinds of takeover"
    );
}

#[test]
#[ignore]
fn replay_one_seed_with_its_log() {
    let seed = env("DUPLEX_SIM_FIRST_SEED", 1);
    match run(SimOptions::new(seed)) {
        Ok(report) => println!("{report:?}"),
        Err(f) => panic!("{f}"),
    }
}
