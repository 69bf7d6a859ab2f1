//! The host's own messages, apart from the pair stream and client requests: an owner tells every
//! peer that comes up (CPUs and clients) that it is the LSG's primary, with its epoch. Backups
//! join it; clients send to it and resend what they have not seen answered (SPEC §3: clients are
//! told when the new primary is ready). Sent as one-way transport messages; a lost one is
//! harmless (clients also find the primary by asking, backups by its `Fence`).

use duplex_lsg::{LsgId, OwnerEpoch};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The sender owns `lsg` at `epoch`.
    Primary { lsg: LsgId, epoch: OwnerEpoch },
}

impl Notice {
    pub fn encode(&self) -> Result<Vec<u8>, postcard::Error> {
        postcard::to_stdvec(self)
    }

    /// A whole notice or an error: trailing bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let (notice, rest): (Notice, _) =
            postcard::take_from_bytes(bytes).map_err(|e| format!("malformed notice: {e}"))?;
        if !rest.is_empty() {
            return Err(format!(
                "malformed notice: {} bytes after the message",
                rest.len()
            ));
        }
        Ok(notice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notice_round_trips_and_trailing_bytes_are_refused() {
        let n = Notice::Primary {
            lsg: LsgId(7),
            epoch: OwnerEpoch(3),
        };
        let bytes = n.encode().expect("encode");
        assert_eq!(Notice::decode(&bytes), Ok(n));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Notice::decode(&longer).is_err());
        assert!(Notice::decode(&[0xff, 0xff]).is_err());
    }
}
