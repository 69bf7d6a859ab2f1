//! Reading durable records back in LSN order, through a read-ahead window (recovery and
//! backups read whole trails).

use super::*;

/// Iterates durable audit records from an LSN on, copying each out.
#[derive(Debug)]
pub struct AuditReader<S: Store> {
    shared: Arc<Shared<S>>,
    pos: Position,
    expected: Option<Lsn>,
    skip_below: Lsn,
    done: bool,
    window: ReadWindow,
}

/// Durable bytes read ahead with one `pread` (recovery reads the whole retained trail; two
/// system calls per record made it slow). Durable bytes never change, and the window never
/// holds bytes past the durable end it was filled under.
#[derive(Debug)]
pub(super) struct ReadWindow {
    segment: u64,
    start: u64,
    bytes: Vec<u8>,
    /// How much one refill reads at least (0: exactly what is asked).
    fill_bytes: usize,
}

impl ReadWindow {
    /// A window for a reader going through many records.
    pub(super) fn ahead() -> Self {
        ReadWindow {
            segment: u64::MAX,
            start: 0,
            bytes: Vec::new(),
            fill_bytes: 1 << 20,
        }
    }

    /// No read-ahead: for one record.
    pub(super) fn exact() -> Self {
        ReadWindow {
            fill_bytes: 0,
            ..ReadWindow::ahead()
        }
    }

    /// `len` bytes at `at` of `segment`, read through the window (refilled as needed).
    pub(super) fn get<F: StoreFile>(
        &mut self,
        file: &F,
        segment: u64,
        at: u64,
        len: usize,
        end: u64,
    ) -> Result<&[u8]> {
        let covered = self.segment == segment
            && at >= self.start
            && at + len as u64 <= self.start + self.bytes.len() as u64;
        if !covered {
            let fill = (len.max(self.fill_bytes) as u64).min(end.saturating_sub(at)) as usize;
            self.bytes = store::read_checked(file, at, fill.max(len))?;
            self.segment = segment;
            self.start = at;
        }
        let from = (at - self.start) as usize;
        Ok(&self.bytes[from..from + len])
    }
}

impl<S: Store> AuditReader<S> {
    pub(super) fn new(shared: Arc<Shared<S>>, pos: Position, from: Lsn) -> Self {
        AuditReader {
            shared,
            pos,
            expected: None,
            skip_below: from,
            done: false,
            window: ReadWindow::ahead(),
        }
    }

    pub(super) fn next_record(&mut self) -> Result<Option<AuditRecord>> {
        let max_payload = self.shared.config.max_record_bytes;
        // Where the previous segment's records ended, if this one was entered from it: a record
        // that does not follow on is reported there, where the records stopped.
        let mut ended_at: Option<(std::path::PathBuf, u64)> = None;
        let segments = lock(&self.shared.state).files.len() + 1;
        for _ in 0..=segments {
            let Some(Readable { file, end, is_tail }) = self.shared.readable(self.pos)? else {
                return Ok(None);
            };
            let at = self.pos.offset;
            let slot = read_record_windowed(
                &mut self.window,
                &*file,
                self.pos.segment,
                at,
                end,
                max_payload,
            )?;
            let rec = match slot {
                Slot::Record(rec) => rec,
                Slot::Zero if !is_tail => {
                    ended_at = Some((file.path().to_path_buf(), at));
                    self.pos = Position {
                        segment: self.pos.segment + 1,
                        offset: SEGMENT_HEADER_BYTES,
                    };
                    continue;
                }
                Slot::Zero => return Err(zeros_inside(&*file, at)),
                Slot::Invalid(what) => {
                    return Err(LsgError::Corrupt {
                        path: file.path().to_path_buf(),
                        offset: at,
                        what,
                    });
                }
            };
            if let Some(expected) = self.expected
                && rec.lsn != expected
            {
                let (path, offset) = ended_at.unwrap_or((file.path().to_path_buf(), at));
                return Err(LsgError::Corrupt {
                    path,
                    offset,
                    what: Corruption::LsnOutOfSequence {
                        expected,
                        found: rec.lsn,
                    },
                });
            }
            self.expected = Some(Lsn(rec.lsn.0.saturating_add(1)));
            self.pos.offset += record::encoded_len(rec.payload.len()) as u64;
            return Ok(Some(rec));
        }
        Ok(None)
    }
}

impl<S: Store> Iterator for AuditReader<S> {
    type Item = Result<AuditRecord>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            match self.next_record() {
                Ok(Some(rec)) if rec.lsn < self.skip_below => continue,
                Ok(Some(rec)) => return Some(Ok(rec)),
                Ok(None) => return None,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }
}

/// What one record position of a file holds, copied out.
pub(super) enum Slot {
    Record(AuditRecord),
    Zero,
    Invalid(Corruption),
}

/// Reads the record at `at`, whose file's readable bytes end at `end`: the header first, then
/// exactly the record, so nothing past it is touched.
pub(super) fn read_record<F: StoreFile>(
    file: &F,
    at: u64,
    end: u64,
    max_payload: usize,
) -> Result<Slot> {
    read_record_windowed(
        &mut ReadWindow::exact(),
        file,
        u64::MAX,
        at,
        end,
        max_payload,
    )
}

/// [`read_record`] through a reader's window.
pub(super) fn read_record_windowed<F: StoreFile>(
    window: &mut ReadWindow,
    file: &F,
    segment: u64,
    at: u64,
    end: u64,
    max_payload: usize,
) -> Result<Slot> {
    let available = end.saturating_sub(at) as usize;
    let header_len = available.min(record::RECORD_HEADER_BYTES);
    let header = window.get(file, segment, at, header_len, end)?;
    if header.iter().all(|&b| b == 0) {
        return Ok(Slot::Zero);
    }
    let payload_len = if header.len() < record::RECORD_HEADER_BYTES {
        usize::MAX
    } else {
        u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize
    };
    let take = record::encoded_len(payload_len.min(max_payload)).min(available);
    let bytes = window.get(file, segment, at, take, end)?;
    Ok(match record::decode(bytes, max_payload) {
        Decoded::Record(v) => Slot::Record(AuditRecord {
            lsn: v.lsn,
            record_type: v.record_type,
            flags: v.flags,
            payload: v.payload.to_vec(),
        }),
        Decoded::Zero => Slot::Zero,
        Decoded::Invalid(c) => Slot::Invalid(c),
    })
}

pub(super) fn zeros_inside<F: StoreFile>(file: &F, offset: u64) -> LsgError {
    LsgError::Corrupt {
        path: file.path().to_path_buf(),
        offset,
        what: Corruption::Malformed("zeros inside the durable audit trail"),
    }
}
