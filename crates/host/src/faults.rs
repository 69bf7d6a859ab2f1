//! Fault injection from standard input, for drills and process tests: `partition N.C` and
//! `heal N.C` lines cut and mend this endpoint's paths to another (both directions at this end,
//! every path). `duplexd --faults-on-stdin` and the testbed's `lsg-cpu` obey them.

use duplex_transport::{EndpointId, Path, QuicTransport};
use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::warn;

/// Obeys fault lines on standard input until it closes (a task on the current runtime).
pub fn obey_fault_lines_on_stdin(transport: QuicTransport) {
    tokio::spawn(async move {
        let mut stdin = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = stdin.next_line().await {
            if let Err(e) = obey(&transport, &line) {
                warn!(%line, error = %e, "fault line refused");
            }
        }
    });
}

fn obey(transport: &QuicTransport, line: &str) -> Result<(), String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["partition", id] => {
            let id: EndpointId = id.parse()?;
            transport.faults().partition(id, &Path::ALL);
            Ok(())
        }
        ["heal", id] => {
            let id: EndpointId = id.parse()?;
            transport.faults().heal(id, &Path::ALL);
            Ok(())
        }
        [] => Ok(()),
        _ => Err(format!(
            "unknown command {line:?}: partition N.C or heal N.C"
        )),
    }
}

#[cfg(test)]
mod tests {
    use duplex_transport::EndpointId;

    #[test]
    fn endpoints_parse_as_they_print_and_bad_ones_say_why() {
        let id: EndpointId = "2.1".parse().expect("parses");
        assert_eq!(id, EndpointId::new(2, 1));
        assert_eq!(id.to_string().parse::<EndpointId>(), Ok(id));
        for bad in ["2", "2.", ".1", "a.b", "70000.0", "1.2.3"] {
            let e = bad.parse::<EndpointId>().expect_err(bad);
            assert!(e.contains("NODE.CPU"), "{e}");
        }
    }
}
