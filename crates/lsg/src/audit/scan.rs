//! The recovery scan at open: where a segment's valid records end, how far bytes were written
//! past them (a torn flush or corruption), and zeroing a torn tail.

use super::*;

/// Scans one segment from its first record to the end of its valid records, and finds how far
/// bytes were written past that end (the whole rest of the segment is searched: data far beyond
/// the end proves corruption, data just beyond it is a torn flush to zero out).
pub(super) fn scan_tail<F: StoreFile>(file: &F, max_payload: usize) -> Result<TailScan> {
    let max_record = record::encoded_len(max_payload);
    let mut reader = store::ScanReader::new(file, max_record);
    let mut at = SEGMENT_HEADER_BYTES;
    let mut last: Option<Lsn> = None;
    let mut bad = None;
    while at < file.len_bytes() {
        match record::decode(reader.record_at(at, max_payload)?, max_payload) {
            Decoded::Record(v) => {
                if let Some(prev) = last
                    && prev.0.checked_add(1) != Some(v.lsn.0)
                {
                    bad = Some(Corruption::LsnOutOfSequence {
                        expected: Lsn(prev.0.saturating_add(1)),
                        found: v.lsn,
                    });
                    break;
                }
                last = Some(v.lsn);
                at += v.encoded_len() as u64;
            }
            Decoded::Zero => break,
            Decoded::Invalid(what) => {
                bad = Some(what);
                break;
            }
        }
    }
    Ok(TailScan {
        last_lsn: last,
        end_offset: at,
        bad,
        written_end: reader.written_end(at)?,
    })
}

/// Overwrites `from..to` with zeros and syncs.
pub(super) fn zero_range<F: StoreFile>(file: &F, from: u64, to: u64) -> Result<()> {
    let zeros = vec![0u8; 1 << 20];
    let mut at = from;
    while at < to {
        let n = (to - at).min(zeros.len() as u64) as usize;
        file.write_at(at, &zeros[..n])?;
        at += n as u64;
    }
    file.sync()
}
