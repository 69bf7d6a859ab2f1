//! Running a script's faults when their moment comes.

use super::*;

impl World {
    /// The owner's CPU and its owner, if one runs.
    pub(super) fn current_owner(&self) -> Option<(EndpointId, &Owner)> {
        let id = self.primary?;
        match &self.cpus.get(&id)?.role {
            Role::Owner { owner, .. } => Some((id, owner)),
            _ => None,
        }
    }

    pub(super) fn successful_takeovers(&self) -> usize {
        self.report
            .takeovers
            .iter()
            .filter(|t| t.outcome.is_ok())
            .count()
    }

    pub(super) fn holds(&self, when: &When) -> bool {
        let Some(script) = &self.script else {
            return false;
        };
        let now = self.now();
        match when {
            When::At(at) => now >= *at,
            When::After(d) => now >= script.last_step_at + *d,
            When::Committed(n) => self.committed.len() >= *n,
            When::CommittedIn { state, count } => {
                self.committed
                    .iter()
                    .skip(script.committed_at_last_step)
                    .filter(|c| c.state == *state)
                    .count()
                    >= *count
            }
            When::AckedBeyondTrail => self.current_owner().is_some_and(|(_, owner)| {
                let durable = owner.lsg().audit().durable_lsn();
                self.committed
                    .iter()
                    .any(|c| c.epoch == owner.epoch() && c.lsn > durable)
            }),
            When::HomeNotCounting => self.current_owner().is_some_and(|(_, owner)| {
                owner.state() == CommitState::Normal && !owner.primary().home_counts()
            }),
            When::LoserInTrail => self.current_owner().is_some_and(|(_, owner)| {
                let written = owner.lsg().audit().durable_lsn();
                written.0 + 1 == owner.primary().next_lsn().0 && self.holds(&When::WriteInFlight)
            }),
            When::WriteInFlight => self
                .clients
                .iter()
                .any(|c| c.transfer.is_some() && matches!(c.step, 4 | 5)),
            When::All(all) => all.iter().all(|w| self.holds(w)),
            When::OwnerReady => {
                self.primary.is_some()
                    && self.successful_takeovers() > script.takeovers_at_last_step
            }
            When::Prepared => script.prepared.is_some(),
            When::ReplyLost => self.report.lost_reply.is_some(),
        }
    }

    /// Runs every scripted step whose time has come.
    pub(super) fn step_script(&mut self) -> Result<(), SimFailure> {
        loop {
            let Some(step) = self.script.as_ref().and_then(|s| s.steps.front().cloned()) else {
                return Ok(());
            };
            if !self.holds(&step.when) {
                return Ok(());
            }
            let now = self.now();
            let takeovers = self.successful_takeovers();
            let committed = self.committed.len();
            if let Some(script) = self.script.as_mut() {
                script.steps.pop_front();
                script.last_step_at = now;
                script.takeovers_at_last_step = takeovers;
                script.committed_at_last_step = committed;
            }
            self.note(format!("SCRIPT {:?}: {:?}", step.when, step.fault));
            self.report.faults.push(format!("{now:?} {:?}", step.fault));
            self.apply_fault(step.fault)?;
        }
    }

    pub(super) fn targets(&self, target: Target) -> Result<Vec<EndpointId>, SimFailure> {
        let home = self.primary.map_or(self.last_home_node(), |p| p.node);
        Ok(match target {
            Target::Primary => match self.primary {
                Some(p) => vec![p],
                None => return Err(self.fail("script: no primary to kill".into())),
            },
            Target::HomeBackup => {
                let Some(p) = self.primary else {
                    return Err(self.fail("script: no primary, so no home backup".into()));
                };
                vec![EndpointId::new(p.node, 1 - p.cpu)]
            }
            Target::HomeNode => CPUS.into_iter().filter(|c| c.node == home).collect(),
            Target::BackupNode => CPUS.into_iter().filter(|c| c.node != home).collect(),
            Target::AllCpus => CPUS.to_vec(),
            Target::Cpu(id) => vec![id],
        })
    }

    pub(super) fn apply_fault(&mut self, fault: Fault) -> Result<(), SimFailure> {
        let now = self.now();
        match fault {
            Fault::Note(_) => {}
            Fault::Kill { target, restart } => {
                let ids = self.targets(target)?;
                if target == Target::AllCpus {
                    // Every process's memory goes; the page cache stays. Commits acknowledged
                    // from memory and not yet written are gone, as their receipts allowed.
                    if let Some((_, owner)) = self.current_owner() {
                        let lost = (owner.epoch(), owner.lsg().audit().durable_lsn());
                        self.memory_losses.push(lost);
                    }
                }
                for id in ids {
                    self.kill(id, "script");
                    if restart == Restart::Held
                        && let Some(cpu) = self.cpus.get_mut(&id)
                    {
                        cpu.restart_at = None;
                        if let Some(script) = self.script.as_mut() {
                            script.held.insert(id);
                        }
                    }
                }
                if target == Target::AllCpus {
                    self.memory_lost_everywhere = true;
                }
            }
            Fault::Restart => {
                let held = self
                    .script
                    .as_mut()
                    .map(|s| std::mem::take(&mut s.held))
                    .unwrap_or_default();
                for id in held {
                    let down = self
                        .cpus
                        .get(&id)
                        .is_some_and(|c| matches!(c.role, Role::Down));
                    if down {
                        self.restart(id);
                    }
                }
            }
            Fault::Partition => self.set_partition(true),
            Fault::Heal => self.set_partition(false),
            Fault::PowerLoss => self.power_loss(),
            Fault::StopPrimary => {
                let Some(p) = self.primary else {
                    return Err(self.fail("script: no primary to stop".into()));
                };
                if let Some(cpu) = self.cpus.get_mut(&p) {
                    cpu.stopped = true;
                }
                if let Some(script) = self.script.as_mut() {
                    script.stopped = Some(p);
                }
                self.note(format!("{p} stopped (SIGSTOP)"));
            }
            Fault::StealLock => {
                let Some(id) = self.script.as_ref().and_then(|s| s.stopped) else {
                    return Err(self.fail("script: no stopped CPU to steal the lock from".into()));
                };
                // The node service found the owner unresponsive. It must end the owner's hold
                // on the LSG before a backup can open it: on one host by killing the process
                // (SIGKILL ends even a stopped process, and the kernel frees its lock), across
                // hosts by letting its lease lapse. The sim models the lock's loss by killing
                // the stopped process's store handle only: its lock is free and every file
                // operation it tries fails, while its memory, its open LSG, its owner state
                // and its transport live on, as a process that wakes up would have them.
                if let Some(cpu) = self.cpus.get_mut(&id) {
                    cpu.store.kill_process();
                }
                if self.primary == Some(id) {
                    self.primary = None;
                }
                self.note(format!(
                    "node service: {id} does not answer; its lock is taken from it"
                ));
            }
            Fault::Resume => {
                let Some(id) = self.script.as_mut().and_then(|s| s.stopped.take()) else {
                    return Err(self.fail("script: no stopped CPU to resume".into()));
                };
                if let Some(cpu) = self.cpus.get_mut(&id) {
                    cpu.stopped = false;
                    cpu.resumed = true;
                }
                self.note(format!("{id} resumed (SIGCONT)"));
            }
            Fault::CrashNextTaker { after_writes } => {
                if let Some(script) = self.script.as_mut() {
                    script.crash_next_taker = Some(after_writes);
                }
            }
            Fault::LoseNextCommitReply => {
                if let Some(script) = self.script.as_mut() {
                    script.lose_next_commit_reply = true;
                }
            }
            Fault::PrepareNext { client } => match self.clients.get_mut(client) {
                Some(c) => c.prepare_next = true,
                None => return Err(self.fail(format!("script: no client {client}"))),
            },
            Fault::Probe { key } => {
                let account = match key {
                    ProbeKey::InDoubt => match &self.report.prepared {
                        Some(prepared) => prepared.accounts.0,
                        None => {
                            return Err(self.fail(
                                "script: a probe of the in-doubt key needs a prepared transfer"
                                    .into(),
                            ));
                        }
                    },
                    ProbeKey::Free => self.options.accounts + 1,
                };
                let index = self.script.as_ref().map_or(0, |s| s.probes.len());
                let endpoint = EndpointId::new(4, index as u16);
                let transport = self.net.add_endpoint(endpoint, &[Path::Main]);
                let probe = ProbeClient {
                    volume: ACCOUNTS.into(),
                    account,
                    id: ClientId(9000 + index as u64),
                    transport,
                    next_seq: 1,
                    tx: None,
                    stage: 0,
                    pending: None,
                    report: ProbeReport {
                        key,
                        read_sent_at: None,
                        answered_at: None,
                        reply: None,
                    },
                };
                if let Some(script) = self.script.as_mut() {
                    script.probes.push(probe);
                }
            }
            Fault::Resolve(outcome) => self.resolve(now, outcome)?,
        }
        Ok(())
    }

    /// The coordinator's decision on the prepared transfer, applied by the current owner.
    pub(super) fn resolve(&mut self, now: Duration, outcome: Outcome) -> Result<(), SimFailure> {
        let Some((index, tx, transfer)) = self.script.as_mut().and_then(|s| s.prepared.take())
        else {
            return Err(self.fail("script: nothing prepared to resolve".into()));
        };
        let owner = self
            .primary
            .and_then(|p| match &mut self.cpus.get_mut(&p)?.role {
                Role::Owner { owner, .. } => Some(owner),
                _ => None,
            });
        let Some(owner) = owner else {
            return Err(self.fail("script: no owner to resolve the prepared transfer".into()));
        };
        let in_doubt: Vec<TxId> = owner.in_doubt().map(|d| d.tx).collect();
        let resolved = owner.resolve_in_doubt(now, tx, outcome);
        let commit_lsn = Lsn(owner.primary().next_lsn().0 - 1);
        let (epoch, state) = (owner.epoch(), owner.state());
        if let Some(p) = self.report.prepared.as_mut() {
            p.in_doubt_at_resolve = in_doubt;
            p.resolved = Some((now, outcome));
        }
        if let Err(e) = resolved {
            return Err(self.fail(format!("resolving {tx} ({outcome:?}) failed: {e}")));
        }
        self.note(format!("coordinator: {tx} {outcome:?}"));
        let client = &mut self.clients[index];
        match outcome {
            Outcome::Commit => {
                client.done += 1;
                client.transfer = None;
                client.pending = None;
                self.committed.push(Committed {
                    transfer: transfer.id,
                    lsn: commit_lsn,
                    epoch,
                    state,
                });
                self.report.transfers_committed += 1;
            }
            Outcome::Abort => Self::restart_transfer(client, now, Duration::from_millis(1)),
        }
        Ok(())
    }

    /// Runs the probe transactions: begin, read the key, abort.
    pub(super) fn step_probes(&mut self) {
        let now = self.now();
        let primary = self.primary;
        let Some(script) = self.script.as_mut() else {
            return;
        };
        for probe in &mut script.probes {
            let mut replies = Vec::new();
            while let Some(e) = probe.transport.try_next_event() {
                match e {
                    Event::Response { id, payload, .. }
                        if probe.pending.as_ref().is_some_and(|(p, _)| *p == Some(id)) =>
                    {
                        replies
                            .push(ClientReply::decode(&payload).unwrap_or_else(ClientReply::Error));
                    }
                    Event::RequestFailed { id, .. } => {
                        if let Some((p, _)) = probe.pending.as_mut()
                            && *p == Some(id)
                        {
                            *p = None;
                        }
                    }
                    _ => {}
                }
            }
            for reply in replies {
                probe.pending = None;
                match (probe.stage, &reply) {
                    (_, ClientReply::Error(OpError::NotPrimary { .. })) => {}
                    (0, ClientReply::Began(tx)) => {
                        probe.tx = Some(*tx);
                        probe.stage = 1;
                    }
                    (1, _) => {
                        probe.report.answered_at = Some(now);
                        probe.report.reply = Some(reply.clone());
                        probe.stage = if matches!(reply, ClientReply::Value(_)) {
                            2
                        } else {
                            3
                        };
                    }
                    _ => probe.stage = 3,
                }
            }
            if probe.pending.is_none() && probe.stage < 3 {
                let op = match probe.stage {
                    0 => Op::Begin,
                    1 => Op::Get {
                        volume: probe.volume.clone(),
                        key: account_key(probe.account),
                    },
                    _ => Op::Abort,
                };
                let seq = probe.next_seq;
                probe.next_seq += 1;
                probe.pending = Some((
                    None,
                    ClientRequest {
                        client: probe.id,
                        seq: RequestSeq(seq),
                        seen_below: RequestSeq(seq),
                        tx: probe.tx,
                        op,
                    },
                ));
            }
            if let (Some((None, request)), Some(p)) = (&probe.pending, primary) {
                let request = request.clone();
                let sent = request.encode().ok().and_then(|bytes| {
                    probe
                        .transport
                        .request(p, Bytes::from(bytes), Duration::from_secs(2))
                        .ok()
                });
                if let Some(id) = sent {
                    if probe.stage == 1 && probe.report.read_sent_at.is_none() {
                        probe.report.read_sent_at = Some(now);
                    }
                    probe.pending = Some((Some(id), request));
                }
            }
        }
    }

    pub(super) fn script_done(&self) -> bool {
        self.script.as_ref().is_none_or(|s| {
            s.steps.is_empty()
                && s.stopped.is_none()
                && s.prepared.is_none()
                && s.probes.iter().all(|p| p.stage == 3)
        })
    }

    /// Commit records of `tx` in the durable trail of `owner`, from its first retained record.
    pub(super) fn commit_records(owner: &Owner, tx: TxId) -> usize {
        let audit = owner.lsg().audit();
        let Ok(reader) = audit.reader(audit.first_lsn()) else {
            return 0;
        };
        reader
            .filter_map(Result::ok)
            .filter(|r| r.record_type == RecordType::Commit)
            .filter(|r| {
                matches!(AuditBody::decode(r.lsn, r.record_type, &r.payload),
                    Ok(AuditBody::Commit(end)) if end.tx == tx)
            })
            .count()
    }
}
