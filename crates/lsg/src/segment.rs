//! Segment files: the fixed-size, preallocated files that hold records, for the audit trail and
//! for data volumes alike. Each begins with a header block that says whose segment it is, so a
//! misplaced or foreign file is caught before its records are trusted.
//!
//! ```text
//! header (first 4096 bytes of the file; records start at offset 4096)
//!      0    8 magic "DPLXSEG1"
//!      8    4 format version
//!     12    4 segment kind: 1 audit trail, 2 data volume
//!     16    8 LSG id
//!     24    8 segment number (also the file name, 16 hex digits)
//!     32    8 file size in bytes
//!     40    4 crc32c of bytes 0..40
//! ```

use crate::error::{Corruption, LsgError, Result};
use crate::store::{Store, StoreFile};
use crate::{FORMAT_VERSION, LsgId};

pub const SEGMENT_HEADER_BYTES: u64 = 4096;
const MAGIC: [u8; 8] = *b"DPLXSEG1";
const USED_BYTES: usize = 44;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum SegmentKind {
    AuditTrail = 1,
    DataVolume = 2,
}

/// `dir/0000000000000001.seg`
pub fn segment_name(dir: &str, number: u64) -> String {
    format!("{dir}/{number:016x}.seg")
}

/// The segment number in a file name made by [`segment_name`], or `None` for any other name.
pub fn parse_segment_name(file_name: &str) -> Option<u64> {
    let hex = file_name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn encode_header(kind: SegmentKind, lsg_id: LsgId, number: u64, size_bytes: u64) -> Vec<u8> {
    let mut b = vec![0u8; SEGMENT_HEADER_BYTES as usize];
    b[0..8].copy_from_slice(&MAGIC);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    b[16..24].copy_from_slice(&lsg_id.0.to_le_bytes());
    b[24..32].copy_from_slice(&number.to_le_bytes());
    b[32..40].copy_from_slice(&size_bytes.to_le_bytes());
    let crc = crc32c::crc32c(&b[0..40]);
    b[40..44].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Creates segment `number` in `dir`, zero-filled to `size_bytes` when `preallocate`.
pub fn create<S: Store>(
    store: &S,
    dir: &str,
    kind: SegmentKind,
    lsg_id: LsgId,
    number: u64,
    size_bytes: u64,
    preallocate: bool,
) -> Result<S::File> {
    let header = encode_header(kind, lsg_id, number, size_bytes);
    store.create(&segment_name(dir, number), &header, size_bytes, preallocate)
}

/// Opens segment `number` in `dir` and checks that its header is the one it must be.
pub fn open<S: Store>(
    store: &S,
    dir: &str,
    kind: SegmentKind,
    lsg_id: LsgId,
    number: u64,
) -> Result<S::File> {
    let file = store.open(&segment_name(dir, number))?;
    let path = || file.path().to_path_buf();
    if file.len_bytes() < SEGMENT_HEADER_BYTES {
        return Err(LsgError::Foreign {
            path: path(),
            what: Corruption::Truncated {
                needed: SEGMENT_HEADER_BYTES,
                available: file.len_bytes(),
            },
        });
    }
    let mut b = [0u8; USED_BYTES];
    file.read_at(0, &mut b)?;
    if b[0..8] != MAGIC {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[0..8]);
        return Err(LsgError::Foreign {
            path: path(),
            what: Corruption::BadMagic {
                expected: MAGIC,
                found,
            },
        });
    }
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let u64_at = |i: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(a)
    };
    let expected = u32_at(40);
    let found = crc32c::crc32c(&b[0..40]);
    if expected != found {
        return Err(LsgError::Corrupt {
            path: path(),
            offset: 0,
            what: Corruption::ChecksumMismatch { expected, found },
        });
    }
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(LsgError::NewerFormat {
            path: path(),
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let checks = [
        ("segment kind", kind as u64, u32_at(12) as u64),
        ("LSG id", lsg_id.0, u64_at(16)),
        ("segment number", number, u64_at(24)),
        ("segment size", file.len_bytes(), u64_at(32)),
    ];
    for (what, expected, found) in checks {
        if expected != found {
            return Err(LsgError::Corrupt {
                path: path(),
                offset: 0,
                what: Corruption::WrongOwner {
                    what,
                    expected,
                    found,
                },
            });
        }
    }
    Ok(file)
}

/// Numbers of the segments in `dir`, ascending. Other files there are ignored.
pub fn list<S: Store>(store: &S, dir: &str) -> Result<Vec<u64>> {
    let mut numbers: Vec<u64> = store
        .list(dir)?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Length of `bytes` up to and including its last non-zero byte (0 if all are zero): where
/// writing stopped in a zero-filled segment. Scans backwards a block at a time with word-wise
/// ORs, which compile to vector instructions; a byte-wise scan of a 64 MiB segment took tens of
/// milliseconds of every takeover.
pub fn written_len(bytes: &[u8]) -> usize {
    const BLOCK_BYTES: usize = 4096;
    let mut end = bytes.len();
    while end > 0 {
        let start = end.saturating_sub(BLOCK_BYTES);
        let block = &bytes[start..end];
        let (words, rest) = block.as_chunks::<8>();
        let any = words
            .iter()
            .fold(0u64, |acc, w| acc | u64::from_ne_bytes(*w))
            != 0
            || rest.iter().any(|&b| b != 0);
        if any {
            return start + block.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        }
        end = start;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::written_len;

    #[test]
    fn written_len_finds_the_last_non_zero_byte() {
        let mut b = vec![0u8; 10_000];
        assert_eq!(written_len(&b), 0);
        b[0] = 1;
        assert_eq!(written_len(&b), 1);
        b[4095] = 1;
        assert_eq!(written_len(&b), 4096);
        b[9_999] = 7;
        assert_eq!(written_len(&b), 10_000);
        assert_eq!(written_len(&b[..9_999]), 4096);
        assert_eq!(written_len(&[]), 0);
    }
}
