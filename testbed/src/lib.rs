//! Shared pieces of the testbed: the benchmark report format and process helpers.
//!
//! The testbed runs Duplex as real processes: crash children that get `kill -9`, peers in other
//! processes, and the benchmarks that compare Duplex with the machine's own limit in one run.

pub mod bank;
pub mod cluster;
pub mod local;

use serde::Serialize;

/// Whether a larger figure is better (throughput) or a smaller one (latency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One comparison of a benchmark: Duplex against the baseline measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub name: String,
    pub ours: f64,
    pub baseline: f64,
    pub unit: String,
    /// Greater than 1 means Duplex is better: ours/baseline for throughput, baseline/ours for latency.
    pub ratio: f64,
}

impl Comparison {
    pub fn new(name: &str, ours: f64, baseline: f64, unit: &str, better: Better) -> Self {
        let ratio = match better {
            Better::Higher if baseline > 0.0 => ours / baseline,
            Better::Lower if ours > 0.0 => baseline / ours,
            _ => 0.0,
        };
        Comparison {
            name: name.to_string(),
            ours,
            baseline,
            unit: unit.to_string(),
            ratio: (ratio * 1000.0).round() / 1000.0,
        }
    }
}

/// Prints the closing JSON lines, one per comparison, after everything else the benchmark printed.
pub fn print_comparisons(comparisons: &[Comparison]) {
    for c in comparisons {
        match serde_json::to_string(c) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("cannot encode comparison {}: {e}", c.name),
        }
    }
}

/// Median and 99th percentile of a set of samples (any one unit).
pub fn percentiles(samples: &mut [f64]) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}
