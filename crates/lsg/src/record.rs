//! The record frame shared by the audit trail and the data volumes: the one module that owns its
//! byte layout (see `docs/storage-format.md`).
//!
//! ```text
//! offset size field
//!      0    4 crc32c of bytes 4..24 and of the payload
//!      4    4 payload length, little-endian
//!      8    8 LSN, little-endian
//!     16    1 record type
//!     17    1 flags
//!     18    6 reserved, zero
//!     24    n payload, then zero padding to a multiple of 8 bytes
//! ```

use crate::Lsn;
use crate::error::Corruption;

pub const RECORD_HEADER_BYTES: usize = 24;
pub const RECORD_ALIGN_BYTES: usize = 8;

/// What a record is. Audit-trail types are written by the pairs of later layers; the volume types
/// frame the records of a data volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// Before and after images of one change to a data volume.
    Update = 1,
    Commit = 2,
    Abort = 3,
    Prepare = 4,
    Checkpoint = 5,
    /// Undoes one update of an aborted transaction: written at a new LSN, redone like an
    /// update, never undone itself.
    Compensation = 6,
    /// A change of the pair's commit state or of which backups count for acknowledgements.
    StateChange = 7,
    /// A data volume's record: key and value.
    VolumePut = 16,
    /// A data volume's deletion marker for a key.
    VolumeDelete = 17,
    /// Closes a data volume segment: its records are complete, the next ones are in the next
    /// segment. Lets recovery tell a segment that ended from one that lost its end.
    SegmentEnd = 18,
}

impl TryFrom<u8> for RecordType {
    type Error = Corruption;
    fn try_from(v: u8) -> Result<Self, Corruption> {
        Ok(match v {
            1 => RecordType::Update,
            2 => RecordType::Commit,
            3 => RecordType::Abort,
            4 => RecordType::Prepare,
            5 => RecordType::Checkpoint,
            6 => RecordType::Compensation,
            7 => RecordType::StateChange,
            16 => RecordType::VolumePut,
            17 => RecordType::VolumeDelete,
            18 => RecordType::SegmentEnd,
            other => return Err(Corruption::UnknownRecordType(other)),
        })
    }
}

/// Flags carried by every record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecordFlags(u8);

impl RecordFlags {
    pub const NONE: RecordFlags = RecordFlags(0);
    /// The communications flag: written while the backup node was out of communication
    /// (primary-only or backup-only state), so the backup's cache cannot be trusted (seed 000).
    pub const OUT_OF_COMMUNICATION: RecordFlags = RecordFlags(1);
    const KNOWN: u8 = 1;

    pub fn bits(self) -> u8 {
        self.0
    }
    pub fn contains(self, other: RecordFlags) -> bool {
        self.0 & other.0 == other.0
    }
    fn from_bits(bits: u8) -> Option<Self> {
        (bits & !Self::KNOWN == 0).then_some(RecordFlags(bits))
    }
}

/// Total bytes a record with `payload_len` bytes of payload takes, padding included.
pub fn encoded_len(payload_len: usize) -> usize {
    (RECORD_HEADER_BYTES + payload_len).next_multiple_of(RECORD_ALIGN_BYTES)
}

/// Appends one encoded record to `buf`.
pub fn encode_into(
    buf: &mut Vec<u8>,
    lsn: Lsn,
    record_type: RecordType,
    flags: RecordFlags,
    payload: &[u8],
) {
    let start = buf.len();
    buf.extend_from_slice(&[0u8; 4]);
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&lsn.0.to_le_bytes());
    buf.push(record_type as u8);
    buf.push(flags.bits());
    buf.extend_from_slice(&[0u8; 6]);
    buf.extend_from_slice(payload);
    let crc = crc32c::crc32c(&buf[start + 4..]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
    buf.resize(start + encoded_len(payload.len()), 0);
}

/// A record read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordView<'a> {
    pub lsn: Lsn,
    pub record_type: RecordType,
    pub flags: RecordFlags,
    pub payload: &'a [u8],
}

impl RecordView<'_> {
    /// Bytes this record takes in its file.
    pub fn encoded_len(&self) -> usize {
        encoded_len(self.payload.len())
    }
}

/// What the bytes at a record position hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    Record(RecordView<'a>),
    /// An all-zero header: the end of what was ever written here.
    Zero,
    /// Not a whole, valid record.
    Invalid(Corruption),
}

/// Decodes the record at the start of `bytes`, which runs to the end of the file's record area.
/// `max_payload_bytes` bounds the length field so garbage cannot claim a huge record.
pub fn decode(bytes: &[u8], max_payload_bytes: usize) -> Decoded<'_> {
    if bytes.len() < RECORD_HEADER_BYTES {
        if bytes.iter().all(|&b| b == 0) {
            return Decoded::Zero;
        }
        return Decoded::Invalid(Corruption::Truncated {
            needed: RECORD_HEADER_BYTES as u64,
            available: bytes.len() as u64,
        });
    }
    let header = &bytes[..RECORD_HEADER_BYTES];
    if header.iter().all(|&b| b == 0) {
        return Decoded::Zero;
    }
    let expected = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let payload_len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
    if payload_len > max_payload_bytes {
        return Decoded::Invalid(Corruption::LengthOutOfBounds {
            length: payload_len as u64,
            limit: max_payload_bytes as u64,
        });
    }
    let total = encoded_len(payload_len);
    if total > bytes.len() {
        return Decoded::Invalid(Corruption::Truncated {
            needed: total as u64,
            available: bytes.len() as u64,
        });
    }
    let payload = &bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload_len];
    let found = crc32c::crc32c_append(crc32c::crc32c(&header[4..]), payload);
    if found != expected {
        return Decoded::Invalid(Corruption::ChecksumMismatch { expected, found });
    }
    if header[18..24].iter().any(|&b| b != 0) {
        return Decoded::Invalid(Corruption::ReservedNonZero);
    }
    let mut lsn = [0u8; 8];
    lsn.copy_from_slice(&header[8..16]);
    let record_type = match RecordType::try_from(header[16]) {
        Ok(t) => t,
        Err(c) => return Decoded::Invalid(c),
    };
    let Some(flags) = RecordFlags::from_bits(header[17]) else {
        return Decoded::Invalid(Corruption::Malformed("record flags"));
    };
    Decoded::Record(RecordView {
        lsn: Lsn(u64::from_le_bytes(lsn)),
        record_type,
        flags,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_type() -> impl Strategy<Value = RecordType> {
        prop::sample::select(vec![
            RecordType::Update,
            RecordType::Commit,
            RecordType::Abort,
            RecordType::Prepare,
            RecordType::Checkpoint,
            RecordType::VolumePut,
            RecordType::VolumeDelete,
            RecordType::SegmentEnd,
        ])
    }

    proptest! {
        #[test]
        fn encode_then_decode_round_trips(
            records in prop::collection::vec(
                (any::<u64>(), any_type(), any::<bool>(), prop::collection::vec(any::<u8>(), 0..300)),
                1..20,
            )
        ) {
            let mut buf = Vec::new();
            for (lsn, t, out, payload) in &records {
                let flags = if *out { RecordFlags::OUT_OF_COMMUNICATION } else { RecordFlags::NONE };
                encode_into(&mut buf, Lsn(*lsn), *t, flags, payload);
            }
            prop_assert_eq!(buf.len() % RECORD_ALIGN_BYTES, 0);
            let mut at = 0;
            for (lsn, t, out, payload) in &records {
                match decode(&buf[at..], 1 << 20) {
                    Decoded::Record(v) => {
                        prop_assert_eq!(v.lsn, Lsn(*lsn));
                        prop_assert_eq!(v.record_type, *t);
                        prop_assert_eq!(v.flags.contains(RecordFlags::OUT_OF_COMMUNICATION), *out);
                        prop_assert_eq!(v.payload, payload.as_slice());
                        at += v.encoded_len();
                    }
                    other => prop_assert!(false, "expected a record, got {:?}", other),
                }
            }
            prop_assert_eq!(at, buf.len());
        }

        #[test]
        fn any_single_bit_flip_is_detected(
            payload in prop::collection::vec(any::<u8>(), 0..200),
            bit in any::<usize>(),
        ) {
            let mut buf = Vec::new();
            encode_into(&mut buf, Lsn(7), RecordType::Update, RecordFlags::NONE, &payload);
            let len = RECORD_HEADER_BYTES + payload.len();
            let bit = bit % (len * 8);
            buf[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(!matches!(decode(&buf, 1 << 20), Decoded::Record(_)));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes, 64);
        }
    }

    #[test]
    fn zeros_are_the_end_not_corruption() {
        assert_eq!(decode(&[0u8; 64], 1024), Decoded::Zero);
        assert_eq!(decode(&[0u8; 10], 1024), Decoded::Zero);
    }
}
