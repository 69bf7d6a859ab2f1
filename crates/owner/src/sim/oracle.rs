//! The checks at the end of a run: the bank (totals, balances against markers, acknowledged
//! transfers present) and the trail (it recovers without an error).

use super::*;

impl World {
    /// The bank after the run: totals, balances against markers, acknowledged transfers.
    pub(super) fn check_bank(&mut self) -> Result<(), SimFailure> {
        let Some((_, owner)) = self.current_owner() else {
            return Err(self.fail("no owner at the end".into()));
        };
        if owner.active_transactions() != 0 {
            return Err(self.fail(format!(
                "{} transactions still active at the end",
                owner.active_transactions()
            )));
        }
        let lsg = std::sync::Arc::clone(owner.lsg());
        self.check_trail(&lsg)
            .map_err(|e| self.fail(format!("the final trail does not recover: {e}")))?;
        let read_all = |name: &str| -> Result<Rows, String> {
            let v = lsg.volume(name).map_err(|e| e.to_string())?;
            duplex_volume_pair::VolumeAccess::scan(
                v.as_ref(),
                std::ops::Bound::Unbounded,
                std::ops::Bound::Unbounded,
                usize::MAX,
            )
            .map_err(|e| e.to_string())
        };
        let accounts = read_all(ACCOUNTS).map_err(|e| self.fail(e))?;
        let markers = read_all(MARKERS).map_err(|e| self.fail(e))?;
        let mut expected = vec![START_BALANCE; self.options.accounts];
        let mut present = BTreeSet::new();
        for (key, value) in &markers {
            let (Ok(id), Ok(from), Ok(to), Ok(amount)) = (
                <[u8; 8]>::try_from(key.as_slice()),
                value
                    .get(0..8)
                    .map_or(Err(()), |b| <[u8; 8]>::try_from(b).map_err(|_| ())),
                value
                    .get(8..16)
                    .map_or(Err(()), |b| <[u8; 8]>::try_from(b).map_err(|_| ())),
                value
                    .get(16..24)
                    .map_or(Err(()), |b| <[u8; 8]>::try_from(b).map_err(|_| ())),
            ) else {
                return Err(self.fail(format!("malformed marker {key:?}")));
            };
            present.insert(u64::from_be_bytes(id));
            let (from, to, amount) = (
                u64::from_le_bytes(from) as usize,
                u64::from_le_bytes(to) as usize,
                i64::from_le_bytes(amount),
            );
            if from >= expected.len() || to >= expected.len() {
                return Err(self.fail(format!("marker names unknown accounts {from} {to}")));
            }
            expected[from] -= amount;
            expected[to] += amount;
        }
        let mut found = vec![None; self.options.accounts];
        for (key, value) in &accounts {
            let Some(a) = std::str::from_utf8(key)
                .ok()
                .and_then(|k| k.strip_prefix("acct"))
                .and_then(|n| n.parse::<usize>().ok())
            else {
                return Err(self.fail(format!("unknown account key {key:?}")));
            };
            let Ok(b) = <[u8; 8]>::try_from(value.as_slice()) else {
                return Err(self.fail(format!("malformed balance of account {a}")));
            };
            if a < found.len() {
                found[a] = Some(i64::from_le_bytes(b));
            }
        }
        let total: i64 = found.iter().flatten().sum();
        let start_total = START_BALANCE * self.options.accounts as i64;
        if total != start_total {
            return Err(self.fail(format!(
                "total {total}, expected {start_total}: money was made or lost"
            )));
        }
        for (a, (f, e)) in found.iter().zip(&expected).enumerate() {
            if *f != Some(*e) {
                return Err(self.fail(format!(
                    "account {a} holds {f:?} but the committed transfers (markers) make it {e}: a transfer applied partly or twice"
                )));
            }
        }
        let mut lost = 0;
        for c in &self.committed {
            if !present.contains(&c.transfer) {
                let excused = c.state == CommitState::Normal
                    && self
                        .memory_losses
                        .iter()
                        .any(|(epoch, durable)| c.epoch == *epoch && c.lsn > *durable);
                if excused {
                    lost += 1;
                } else {
                    return Err(self.fail(format!(
                        "transfer {} was acknowledged ({:?} at {}) but is not in the volumes",
                        c.transfer, c.state, c.lsn
                    )));
                }
            }
        }
        self.report.transfers_lost_to_power_loss = lost;
        Ok(())
    }

    /// Reads the owner's retained durable trail as a cold recovery would: it must plan
    /// without error (dense LSNs, no transaction ended twice, no update undone twice, every
    /// checkpoint agreeing with the records before it).
    pub(super) fn check_trail(&self, lsg: &LogStorageGroup<SimStore>) -> Result<(), String> {
        let records = read_trail(lsg).map_err(|e| e.to_string())?;
        let records = trail_records(&records).map_err(|e| e.to_string())?;
        plan_recovery(
            records,
            &volume_checkpoints(lsg),
            MessageTableLimits::default(),
        )
        .map(drop)
        .map_err(|e| e.to_string())
    }

    /// What the report says about the whole run, once it ended.
    pub(super) fn finish_report(&mut self) {
        self.report.acknowledged = self
            .committed
            .iter()
            .map(|c| Acknowledged {
                transfer: c.transfer,
                commit_lsn: c.lsn,
                epoch: c.epoch,
                state: c.state,
            })
            .collect();
        for t in &mut self.report.takeovers {
            t.acked_beyond_trail_end = self
                .committed
                .iter()
                .filter(|c| c.epoch < t.epoch && c.lsn > t.trail_end)
                .map(|c| c.lsn)
                .collect();
        }
        if let Some(script) = &self.script {
            self.report.probes = script.probes.iter().map(|p| p.report.clone()).collect();
        }
    }
}
