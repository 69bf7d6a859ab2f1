//! Forced paths of takeover and recovery, each a scripted run of the simulation
//! (`duplex_owner::sim::run_script`) with an oracle of its own on top of the bank's.

use std::time::Duration;

use duplex_owner::sim::{
    Fault, Restart, ScriptStep, SimOptions, SimReport, SimTakeover, Target, When, run_script,
};
use duplex_owner::takeover::{StartKind, TakeoverReport};
use duplex_transport::EndpointId;

/// Each scenario has a fixed seed; `DUPLEX_SCENARIO_SEED=<n>` runs them all with another.
fn options(seed: u64) -> SimOptions {
    let seed = std::env::var("DUPLEX_SCENARIO_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(seed);
    let mut options = SimOptions::new(seed);
    options.paranoid = false;
    options.loss_probability = 0.0;
    options.max_faults = 0;
    options.fault_time = Duration::ZERO;
    options.transfers_per_client = 8;
    options.time_limit = Duration::from_secs(20);
    options
}

fn run(name: &str, options: SimOptions, script: Vec<ScriptStep>) -> SimReport {
    println!("{name}: seed {}", options.seed);
    match run_script(options, script) {
        Ok(report) => report,
        Err(f) => panic!("{name}: {f}"),
    }
}

fn succeeded(t: &SimTakeover) -> &TakeoverReport {
    match &t.outcome {
        Ok(r) => r,
        Err(e) => panic!("takeover by {} failed: {e}", t.taker),
    }
}

/// The first primary runs on CPU 1.0; its same-node backup half is the other CPU of node 1.
const HOME_HALF: EndpointId = EndpointId::new(1, 1);

/// Scenario 1 (SPEC §3, CPU failure). The primary's CPU is killed while a commit it
/// acknowledged from memory (normal state) is beyond the trail's end. The same-node half takes
/// over warm, re-appends what only the backups held (which includes that commit), and nothing
/// acknowledged is lost.
///
/// Catches: a takeover that does not re-append a backup's tail (the acknowledged commit is
/// lost), and a same-node half that recovers cold or is not the one chosen.
#[test]
fn a_killed_primary_cpu_is_taken_over_warm_by_its_same_node_half_which_reappends_what_only_it_held()
{
    let report = run(
        "warm CPU takeover",
        options(11),
        vec![
            // Past the start (primary-only until the backups caught up): the trail's end is
            // written in normal state.
            ScriptStep::new(When::Committed(8), Fault::Note("steady".into())),
            ScriptStep::new(
                When::AckedBeyondTrail,
                Fault::Kill {
                    target: Target::Primary,
                    restart: Restart::Auto,
                },
            ),
        ],
    );
    let [t] = report.takeovers.as_slice() else {
        panic!("one takeover expected: {:#?}", report.takeovers);
    };
    let r = succeeded(t);
    assert_eq!(
        t.taker, HOME_HALF,
        "the same-node half takes over a CPU failure"
    );
    assert_eq!(r.start, StartKind::Warm, "{t:#?}");
    assert!(
        t.own.as_ref().and_then(|c| c.last) >= Some(t.trail_end),
        "the warm copy reaches the trail's end: {t:#?}"
    );
    assert!(r.reappended > 0, "nothing re-appended: {t:#?}");
    let tail_end = t.trail_end.0 + r.reappended;
    let needed: Vec<_> = t
        .acked_beyond_trail_end
        .iter()
        .filter(|lsn| lsn.0 <= tail_end)
        .collect();
    assert!(
        !needed.is_empty(),
        "no acknowledged commit was in the re-appended tail {}..={tail_end}: {t:#?}",
        t.trail_end.0 + 1
    );
    assert_eq!(report.transfers_lost_to_power_loss, 0);
    assert!(report.acknowledged.iter().any(|a| a.epoch == r.epoch));
}
