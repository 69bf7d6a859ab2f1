//! Two-slot files: small metadata (the manifest, a volume's checkpoint) updated in place without
//! a rename. An update writes the slot not holding the current value and syncs; a reader takes
//! the valid slot with the higher sequence, so a torn update leaves the previous value readable.
//!
//! ```text
//! slot (4096 bytes, two of them at offsets 0 and 4096)
//!      0    8 magic (says which kind of file)
//!      8    4 format version
//!     12    4 body length
//!     16    8 slot sequence (rises by one per update)
//!     24    n body
//!   24+n    4 crc32c of bytes 0..24+n
//! ```

use crate::FORMAT_VERSION;
use crate::error::{Corruption, LsgError, Result};
use crate::store::{Store, StoreFile};

pub const SLOT_BYTES: usize = 4096;
const MAX_BODY_BYTES: usize = SLOT_BYTES - 28;

fn encode(magic: &[u8; 8], sequence: u64, body: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; SLOT_BYTES];
    b[0..8].copy_from_slice(magic);
    b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    b[16..24].copy_from_slice(&sequence.to_le_bytes());
    b[24..24 + body.len()].copy_from_slice(body);
    let crc = crc32c::crc32c(&b[..24 + body.len()]);
    b[24 + body.len()..28 + body.len()].copy_from_slice(&crc.to_le_bytes());
    b
}

enum SlotError {
    Foreign(Corruption),
    Corrupt(Corruption),
    Newer(u32),
}

fn decode(magic: &[u8; 8], b: &[u8]) -> std::result::Result<(u64, Vec<u8>), SlotError> {
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    if &b[0..8] != magic {
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[0..8]);
        return Err(SlotError::Foreign(Corruption::BadMagic {
            expected: *magic,
            found,
        }));
    }
    let body_len = u32_at(12) as usize;
    if body_len > MAX_BODY_BYTES {
        return Err(SlotError::Corrupt(Corruption::LengthOutOfBounds {
            length: body_len as u64,
            limit: MAX_BODY_BYTES as u64,
        }));
    }
    let expected = u32_at(24 + body_len);
    let found = crc32c::crc32c(&b[..24 + body_len]);
    if expected != found {
        return Err(SlotError::Corrupt(Corruption::ChecksumMismatch {
            expected,
            found,
        }));
    }
    let version = u32_at(8);
    if version > FORMAT_VERSION {
        return Err(SlotError::Newer(version));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[16..24]);
    Ok((u64::from_le_bytes(seq), b[24..24 + body_len].to_vec()))
}

/// Creates `name` holding `body` as sequence 0.
pub fn create<S: Store>(store: &S, name: &str, magic: &[u8; 8], body: &[u8]) -> Result<S::File> {
    let mut initial = encode(magic, 0, body);
    initial.resize(2 * SLOT_BYTES, 0);
    store.create(name, &initial, initial.len() as u64, true)
}

/// The current (sequence, body), read with `pread`: another process may be writing the file.
pub fn read<F: StoreFile>(file: &F, magic: &[u8; 8]) -> Result<(u64, Vec<u8>)> {
    let mut b = vec![0u8; 2 * SLOT_BYTES];
    if file.len_bytes() < b.len() as u64 {
        return Err(LsgError::Foreign {
            path: file.path().to_path_buf(),
            what: Corruption::Truncated {
                needed: b.len() as u64,
                available: file.len_bytes(),
            },
        });
    }
    file.read_at(0, &mut b)?;
    let mut best: Option<(u64, Vec<u8>)> = None;
    let mut first_error = None;
    for i in 0..2 {
        match decode(magic, &b[i * SLOT_BYTES..(i + 1) * SLOT_BYTES]) {
            Ok((seq, body)) => {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, body));
                }
            }
            Err(SlotError::Newer(found)) => {
                return Err(LsgError::NewerFormat {
                    path: file.path().to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                });
            }
            Err(e) => {
                first_error.get_or_insert((i, e));
            }
        }
    }
    let path = file.path().to_path_buf();
    match (best, first_error) {
        (Some(found), _) => Ok(found),
        (None, Some((0, SlotError::Foreign(what)))) => Err(LsgError::Foreign { path, what }),
        (None, Some((i, SlotError::Corrupt(what) | SlotError::Foreign(what)))) => {
            Err(LsgError::Corrupt {
                path,
                offset: (i * SLOT_BYTES) as u64,
                what,
            })
        }
        (None, _) => Err(LsgError::Corrupt {
            path,
            offset: 0,
            what: Corruption::Malformed("two-slot file: no valid slot"),
        }),
    }
}

/// Durably replaces the body whose sequence is `current`; returns the new sequence.
pub fn write<F: StoreFile>(file: &F, magic: &[u8; 8], current: u64, body: &[u8]) -> Result<u64> {
    let next = current + 1;
    let slot = next % 2;
    file.write_at(slot * SLOT_BYTES as u64, &encode(magic, next, body))?;
    file.sync()?;
    Ok(next)
}

/// After [`write`] failed on top of `current`: overwrites the slot it wrote with zeros, best
/// effort, so that readers sharing the page cache (a same-host next owner) keep reading the
/// previous value, the one that is on disk, not a slot that may never get there.
pub fn scrub_failed_write<F: StoreFile>(file: &F, current: u64) {
    let slot = (current + 1) % 2;
    if let Err(e) = file.write_at(slot * SLOT_BYTES as u64, &[0u8; SLOT_BYTES]) {
        tracing::warn!(path = %file.path().display(), error = %e,
            "could not scrub a two-slot file's failed update");
    }
}

/// Little-endian u64 fields of a body, for the small fixed bodies kept in slots.
pub fn u64s<const N: usize>(body: &[u8], path: &std::path::Path) -> Result<[u64; N]> {
    if body.len() != N * 8 {
        return Err(LsgError::Corrupt {
            path: path.to_path_buf(),
            offset: 24,
            what: Corruption::LengthOutOfBounds {
                length: body.len() as u64,
                limit: (N * 8) as u64,
            },
        });
    }
    let mut out = [0u64; N];
    for (i, v) in out.iter_mut().enumerate() {
        let mut a = [0u8; 8];
        a.copy_from_slice(&body[i * 8..i * 8 + 8]);
        *v = u64::from_le_bytes(a);
    }
    Ok(out)
}

pub fn body_of(values: &[u64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim_store::SimStore;

    #[test]
    fn a_torn_update_keeps_the_previous_value() {
        let store = SimStore::new(1);
        let file = create(&store, "F", b"TESTSLOT", &body_of(&[7])).expect("create");
        let seq = write(&file, b"TESTSLOT", 0, &body_of(&[8])).expect("write");
        assert_eq!(read(&file, b"TESTSLOT").expect("read"), (1, body_of(&[8])));
        // Slot 1 holds sequence 1; break it and the older value comes back.
        store
            .flip_bit("F", SLOT_BYTES as u64 + 30, 3)
            .expect("flip");
        let file = store.open("F").expect("open");
        assert_eq!(read(&file, b"TESTSLOT").expect("read"), (0, body_of(&[7])));
        assert_eq!(seq, 1);
    }

    #[test]
    fn a_foreign_file_is_named_as_such() {
        let store = SimStore::new(1);
        let file = create(&store, "F", b"OTHERKND", &[]).expect("create");
        assert!(matches!(
            read(&file, b"TESTSLOT"),
            Err(LsgError::Foreign { .. })
        ));
    }
}
