//! What a CPU's client-facing service takes and answers on the cluster transport's requests.
//!
//! One CPU serves roles of several LSGs, so a client request names its LSG; the CPU hands it to
//! that LSG's owner if it runs here, and otherwise answers [`CpuReply::Redirect`] with the
//! primary it knows (SPEC §4: the client library finds the current primary). `Status` asks the
//! CPU for the state of every role it runs (`duplex status`).
//!
//! Postcard, like the pair stream; a message with bytes left over is refused.

use duplex_lsg::{LsgId, OwnerEpoch};
use duplex_owner::{ClientReply, ClientRequest};
use duplex_transport::EndpointId;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CpuRequest {
    /// A client request for LSG `lsg`.
    Lsg { lsg: LsgId, request: ClientRequest },
    /// The state of this CPU's roles.
    Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CpuReply {
    /// The owner's answer.
    Lsg(ClientReply),
    /// This CPU does not own `lsg`: send to `primary` (when known) and wait for its notice.
    Redirect {
        lsg: LsgId,
        primary: Option<EndpointId>,
        reason: String,
    },
    /// The request could not be read.
    Malformed {
        reason: String,
    },
    Status(CpuStatus),
}

/// One CPU's roles, for `duplex status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpuStatus {
    pub cpu: EndpointId,
    pub incarnation: u64,
    /// Wall-clock milliseconds since the Unix epoch when the status was taken.
    pub at_unix_ms: u64,
    pub lsgs: Vec<LsgStatus>,
}

/// One LSG's role on one CPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LsgStatus {
    pub lsg: LsgId,
    /// `owner`, `backup`, `recover`, `taking_over` or `stopped`.
    pub role: String,
    /// The primary this CPU follows (or is).
    pub primary: Option<EndpointId>,
    pub epoch: OwnerEpoch,
    /// The owner's commit state (`Normal`, `PrimaryOnly`, `BackupOnly`); owners only.
    pub state: Option<String>,
    /// Whether the same-node backup half counts for acknowledgements; owners only.
    pub home_counts: bool,
    /// The next LSN the owner appends at (owners), or the last LSN a backup holds.
    pub lsn: u64,
    /// The trail is durable below this LSN (owners).
    pub durable_lsn: u64,
    /// Records the backup node's pairs have not acknowledged yet (owners): the replication lag.
    pub lag_records: Option<u64>,
    /// The LSN of the last fuzzy checkpoint (owners).
    pub last_checkpoint_lsn: u64,
    pub active_transactions: usize,
    pub in_doubt: usize,
    /// Every takeover this CPU ran for the LSG, oldest first (at most the last 16).
    pub takeovers: Vec<Timeline>,
}

/// One takeover, as this CPU saw it: wall-clock milliseconds since the Unix epoch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// The failure was known: the lock released by the kernel, the node's liveness file
    /// released, or the detector's `Down`, whichever came first.
    pub detected_unix_ms: u64,
    /// The LSG's lock was held and the owner epoch raised: the old primary is fenced.
    pub fenced_unix_ms: u64,
    /// Recovery (copies checked, redo, undo) finished.
    pub recovered_unix_ms: Option<u64>,
    /// The new owner runs and told every peer it is the primary.
    pub ready_unix_ms: Option<u64>,
    pub epoch: OwnerEpoch,
    /// The previous primary, when known.
    pub from: Option<EndpointId>,
    /// `warm` or `cold`, once recovered.
    pub start: Option<String>,
}

fn decode_whole<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T, String> {
    let (value, rest): (T, _) =
        postcard::take_from_bytes(bytes).map_err(|e| format!("malformed {what}: {e}"))?;
    if !rest.is_empty() {
        return Err(format!(
            "malformed {what}: {} bytes after the message",
            rest.len()
        ));
    }
    Ok(value)
}

impl CpuRequest {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        decode_whole(bytes, "CPU request")
    }
}

impl CpuReply {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        decode_whole(bytes, "CPU reply")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duplex_owner::Op;
    use duplex_pair::{ClientId, RequestSeq};

    #[test]
    fn requests_and_replies_round_trip_and_trailing_bytes_are_refused() {
        let request = CpuRequest::Lsg {
            lsg: LsgId(3),
            request: ClientRequest {
                client: ClientId(9),
                seq: RequestSeq(4),
                seen_below: RequestSeq(4),
                tx: None,
                op: Op::Begin,
            },
        };
        let bytes = request.encode().expect("encode");
        assert_eq!(CpuRequest::decode(&bytes), Ok(request));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(CpuRequest::decode(&longer).is_err());
        assert!(CpuRequest::decode(&[0xff, 0xff, 0xff]).is_err());
        let reply = CpuReply::Redirect {
            lsg: LsgId(3),
            primary: Some(EndpointId::new(2, 1)),
            reason: "backup".into(),
        };
        let bytes = reply.encode().expect("encode");
        assert_eq!(CpuReply::decode(&bytes), Ok(reply));
    }
}
