//! The CPUs: each one's owner or backup driven over the simulated network and store, storage
//! work done a little later as a storage thread would, takeovers and the node services'
//! takeover order.

use super::*;

impl World {
    /// Runs one CPU: its transport events, its storage work that is due, its ticks.
    pub(super) fn step_cpu(&mut self, id: EndpointId) -> Result<(), SimFailure> {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Ok(());
        };
        if cpu.stopped {
            // SIGSTOP: nothing runs; frames for it wait in its transport's queue.
            return Ok(());
        }
        let resumed = cpu.resumed;
        let mut events = Vec::new();
        while let Some(e) = cpu.transport.try_next_event() {
            events.push(e);
        }
        let mut notes = Vec::new();
        match &mut cpu.role {
            Role::Down => {}
            Role::Owner { owner, jobs } => {
                for e in events {
                    match e {
                        Event::Request {
                            from,
                            id: rid,
                            payload,
                            ..
                        } => match ClientRequest::decode(&payload) {
                            Ok(req) => owner.on_request(now, (from, rid), req),
                            Err(e) => {
                                let reply = ClientReply::Error(e).encode().unwrap_or_default();
                                let _ = cpu.transport.respond(from, rid, Bytes::from(reply));
                            }
                        },
                        Event::Stream { from, payload, .. } => {
                            if let Ok(m) = PairMessage::decode(&payload) {
                                owner.on_pair_message(now, from, m);
                            }
                        }
                        Event::Peer(PeerEvent::Down { peer, incarnation }) => {
                            owner.on_peer_down(now, peer, incarnation);
                        }
                        _ => {}
                    }
                }
                while jobs.front().is_some_and(|(at, _)| *at <= now) {
                    let Some((_, job)) = jobs.pop_front() else {
                        break;
                    };
                    let lsg = std::sync::Arc::clone(owner.lsg());
                    match job {
                        StorageJob::FlushTrail(through) => {
                            match lsg.audit().wait_durable(through) {
                                Ok(()) => owner.on_trail_durable(now, lsg.audit().durable_lsn()),
                                Err(e) => owner.on_storage_failed(e.to_string()),
                            }
                        }
                        StorageJob::FlushVolumes(lsn) => {
                            let mut failed = None;
                            for name in lsg.volume_names() {
                                if let Err(e) = lsg.volume(&name).and_then(|v| v.flush(lsn)) {
                                    failed = Some(e.to_string());
                                    break;
                                }
                            }
                            match failed {
                                None => owner.on_volumes_flushed(now, lsn),
                                Some(e) => owner.on_storage_failed(e),
                            }
                        }
                        StorageJob::Truncate(below) => {
                            if let Err(e) = lsg.audit().truncate_below(below) {
                                owner.on_storage_failed(e.to_string());
                            }
                        }
                    }
                }
                owner.tick(now);
                let mut stopped = None;
                while let Some(action) = owner.poll_action() {
                    match action {
                        OwnerAction::Reply { to, reply } => {
                            if resumed {
                                self.report
                                    .replies_after_resume
                                    .push((now, id, reply.clone()));
                            }
                            if let ClientReply::Outcome(Reply::Committed(receipt)) = &reply
                                && let Some(script) = self.script.as_mut()
                                && script.lose_next_commit_reply
                                && to.0.node == 3
                                && let Some(client) = self.clients.get(usize::from(to.0.cpu))
                                && let Some((Some(rid), request)) = &client.pending
                                && *rid == to.1
                                && let Some(tx) = request.tx
                            {
                                // Lost on the wire: the client hears nothing and resends.
                                script.lose_next_commit_reply = false;
                                self.report.lost_reply = Some(LostReply {
                                    at: now,
                                    by: id,
                                    client: client.id,
                                    seq: request.seq,
                                    tx,
                                    receipt: *receipt,
                                });
                                notes.push(format!(
                                    "the commit reply of {tx} to client {} is lost",
                                    client.id.0
                                ));
                                continue;
                            }
                            let bytes = reply.encode().unwrap_or_default();
                            let _ = cpu.transport.respond(to.0, to.1, Bytes::from(bytes));
                        }
                        OwnerAction::Send { to, message } => {
                            if let Ok(bytes) = message.encode() {
                                let _ =
                                    cpu.transport
                                        .stream_send(to, PAIR_STREAM, Bytes::from(bytes));
                            }
                        }
                        OwnerAction::FlushTrail { through } => {
                            let delay = Duration::from_micros(500 + (through.0 % 7) * 300);
                            jobs.push_back((now + delay, StorageJob::FlushTrail(through)));
                        }
                        OwnerAction::FlushVolumes { checkpoint_lsn } => {
                            jobs.push_back((
                                now + Duration::from_millis(2),
                                StorageJob::FlushVolumes(checkpoint_lsn),
                            ));
                        }
                        OwnerAction::TruncateTrail { below } => {
                            jobs.push_back((
                                now + Duration::from_millis(1),
                                StorageJob::Truncate(below),
                            ));
                        }
                        OwnerAction::StateChanged { state, home_counts } => {
                            notes.push(format!("{id} state {state:?} home_counts {home_counts}"));
                        }
                        OwnerAction::Stopped { reason } => stopped = Some(reason),
                    }
                }
                // Jobs are kept in time order: flushes scheduled out of order are rare and
                // harmless (a flush covers everything before it), but keep them sorted.
                jobs.make_contiguous().sort_by_key(|(at, _)| *at);
                if let Err(e) = owner.validate() {
                    return Err(self.fail(format!("owner {id}: {e}")));
                }
                if let Some(reason) = stopped {
                    for n in notes {
                        self.note(n);
                    }
                    if resumed {
                        self.report
                            .resumed_owner_stopped
                            .push((now, id, reason.clone()));
                    }
                    self.kill(id, &format!("owner stopped: {reason}"));
                    return Ok(());
                }
            }
            Role::Backup { backup, gathering } => {
                for e in events {
                    match e {
                        Event::Stream { from, payload, .. } => {
                            let Ok(m) = PairMessage::decode(&payload) else {
                                continue;
                            };
                            if let (
                                Some(g),
                                PairMessage::FenceAck {
                                    tag,
                                    records,
                                    complete,
                                },
                            ) = (gathering.as_mut(), &m)
                            {
                                g.copies.on_part(from, tag.epoch, records, *complete);
                                continue;
                            }
                            backup.on_message(now, from, m);
                        }
                        Event::Request { from, id: rid, .. } => {
                            let reply = ClientReply::Error(OpError::NotPrimary {
                                reason: "a backup".into(),
                            });
                            let _ = cpu.transport.respond(
                                from,
                                rid,
                                Bytes::from(reply.encode().unwrap_or_default()),
                            );
                        }
                        _ => {}
                    }
                }
                backup.tick(now);
                while let Some(BackupAction::Send { to, message }) = backup.poll_action() {
                    if let Ok(bytes) = message.encode() {
                        let _ = cpu
                            .transport
                            .stream_send(to, PAIR_STREAM, Bytes::from(bytes));
                    }
                }
                if let Err(e) = backup.validate() {
                    return Err(self.fail(format!("backup {id}: {e}")));
                }
            }
        }
        for n in notes {
            self.note(n);
        }
        self.finish_gathering(id)
    }

    /// Starts a takeover on `id`: open the LSG for writing (fencing the old owner), then ask
    /// the other backups for their copies.
    pub(super) fn start_takeover(&mut self, id: EndpointId) {
        let now = self.now();
        let lsg_config = self.lsg_config;
        let others: BTreeSet<EndpointId> = CPUS
            .into_iter()
            .filter(|c| *c != id)
            .filter(|c| {
                self.cpus
                    .get(c)
                    .is_some_and(|cpu| matches!(cpu.role, Role::Backup { .. }))
            })
            .collect();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        let Role::Backup { backup, gathering } = &mut cpu.role else {
            return;
        };
        if gathering.is_some() {
            return;
        }
        let lsg = match LogStorageGroup::open_in_with(
            cpu.store.clone(),
            lsg_config,
            OpenMode::Write,
            LsgOptions::deterministic(),
        ) {
            Ok(lsg) => lsg,
            Err(e) => {
                let msg = format!("{id} cannot take over: {e}");
                self.note(msg);
                return;
            }
        };
        let epoch = lsg.owner_epoch();
        backup.take_over(epoch);
        let from = Lsn(lsg.audit().next_lsn().0.saturating_sub(1).max(1));
        let tag = PairTag {
            lsg: LSG,
            epoch,
            incarnation: cpu.transport.incarnation(),
        };
        let fence = match (PairMessage::Fence { tag, from }).encode() {
            Ok(bytes) => Bytes::from(bytes),
            Err(_) => return,
        };
        *gathering = Some(Box::new(Gathering {
            lsg,
            copies: Copies::new(others),
            fence,
            resend_at: now,
            deadline: now + Duration::from_millis(40),
        }));
        if self.takeover_retry_at.is_none() {
            self.note(format!(
                "{id} takes over at epoch {epoch}: fenced, gathering copies"
            ));
        }
    }

    pub(super) fn finish_gathering(&mut self, id: EndpointId) -> Result<(), SimFailure> {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Ok(());
        };
        let Role::Backup { backup, gathering } = &mut cpu.role else {
            return Ok(());
        };
        if let Some(g) = gathering.as_mut()
            && now >= g.resend_at
        {
            g.resend_at = now + Duration::from_millis(5);
            for other in g.copies.waiting_for() {
                let _ = cpu
                    .transport
                    .stream_send(*other, PAIR_STREAM, g.fence.clone());
            }
        }
        let done = gathering
            .as_ref()
            .is_some_and(|g| g.copies.all_in() || now >= g.deadline);
        if !done {
            return Ok(());
        }
        let Some(g) = gathering.take() else {
            return Ok(());
        };
        let mut g = *g;
        // A copy still arriving when the time ran out is incomplete: it cannot vouch.
        let gathered = std::mem::take(&mut g.copies).into_complete();
        let own = Chain::of_backup(backup);
        let own = (!own.records.is_empty()).then_some(own);
        let config = {
            let epoch = g.lsg.owner_epoch();
            let inc = cpu.transport.incarnation();
            (epoch, inc)
        };
        let owner_config = self.owner_config(id, config.0, config.1);
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Ok(());
        };
        let backup_node = self
            .last_owner
            .map(|o| EndpointId::new(other_node(o), 0))
            .filter(|b| *b != id);
        let taker = Taker {
            incarnation: config.1,
            backup_node,
            memory_lost_everywhere: self.memory_lost_everywhere,
        };
        let mut attempt = SimTakeover {
            at: now,
            taker: id,
            epoch: g.lsg.owner_epoch(),
            trail_end: Lsn(g.lsg.audit().next_lsn().0 - 1),
            own: own.as_ref().map(|c| CopySummary::of(id, c)),
            gathered: gathered
                .iter()
                .map(|(from, c)| CopySummary::of(*from, c))
                .collect(),
            crash_armed: self.script.as_mut().and_then(|s| s.crash_next_taker.take()),
            outcome: Err(String::new()),
            acked_beyond_trail_end: Vec::new(),
        };
        if let Some(n) = attempt.crash_armed {
            cpu.store.crash_after_writes(n);
        }
        let result = take_over::<SimStore, ReplyTo>(g.lsg, taker, own, gathered, owner_config, now);
        match &result {
            Ok((_, report)) => attempt.outcome = Ok(report.clone()),
            Err(TakeoverError::CopyMissing { .. }) => {}
            Err(e) => attempt.outcome = Err(e.to_string()),
        }
        if !matches!(result, Err(TakeoverError::CopyMissing { .. })) {
            self.report.takeovers.push(attempt);
        }
        match result {
            Ok((owner, report)) => {
                match report.start {
                    StartKind::Warm => self.report.takeovers_warm += 1,
                    StartKind::Cold => self.report.takeovers_cold += 1,
                }
                cpu.role = Role::Owner {
                    owner: Box::new(owner),
                    jobs: VecDeque::new(),
                };
                self.primary = Some(id);
                self.last_owner = Some(id);
                self.node_takeover_at = None;
                self.takeover_retry_at = None;
                self.memory_lost_everywhere = false;
                self.note(format!("{id} is the owner: {report:?}"));
                // The other backups follow the new primary.
                for other in CPUS {
                    if other == id {
                        continue;
                    }
                    if let Some(c) = self.cpus.get_mut(&other)
                        && let Role::Backup { backup, gathering } = &mut c.role
                    {
                        *gathering = None;
                        backup.join(id);
                    }
                }
            }
            Err(TakeoverError::CopyMissing { .. }) => {
                // Let the LSG go and try again later (or let the backup node's pairs do it).
                if self.takeover_retry_at.is_none() {
                    self.note(format!(
                        "{id} gives up the takeover for now: no complete copy at hand (retrying quietly)"
                    ));
                }
                self.takeover_retry_at = Some(now + Duration::from_millis(50));
            }
            Err(e) => {
                let msg = format!("takeover by {id} failed: {e}");
                self.kill(id, &msg);
            }
        }
        Ok(())
    }

    /// Node services: who takes over when the owner is gone, and restarts.
    pub(super) fn node_services(&mut self) {
        let now = self.now();
        if let Some((at, node)) = self.pending_node_kill
            && now >= at
        {
            self.pending_node_kill = None;
            for id in CPUS.into_iter().filter(|c| c.node == node) {
                self.kill(id, "fault: home node killed after the partition began");
            }
        }
        for id in CPUS {
            let restart = self.cpus.get(&id).is_some_and(|c| {
                matches!(c.role, Role::Down) && c.restart_at.is_some_and(|t| now >= t)
            });
            if restart {
                self.restart(id);
            }
        }
        if self.primary.is_some() {
            return;
        }
        let gathering = self.cpus.values().any(|c| {
            matches!(
                &c.role,
                Role::Backup {
                    gathering: Some(_),
                    ..
                }
            )
        });
        if gathering || self.takeover_retry_at.is_some_and(|t| now < t) {
            return;
        }
        // The home node is the one the last owner ran on; its live backup half goes first.
        let live_backups: Vec<EndpointId> = CPUS
            .into_iter()
            .filter(|c| {
                self.cpus
                    .get(c)
                    .is_some_and(|cpu| matches!(cpu.role, Role::Backup { .. }))
            })
            .collect();
        if live_backups.is_empty() {
            return;
        }
        let holds = |id: &EndpointId| {
            self.cpus.get(id).map_or(Lsn(0), |c| match &c.role {
                Role::Backup { backup, .. } => backup.held(),
                _ => Lsn(0),
            })
        };
        let last_home = self.last_home_node();
        let home_alive: Vec<EndpointId> = live_backups
            .iter()
            .copied()
            .filter(|c| c.node == last_home)
            .collect();
        let candidate = if let Some(&c) = home_alive.first() {
            Some(c)
        } else {
            // The whole home node is dead: the backup node takes over after the detector's
            // silence (300 ms).
            match self.node_takeover_at {
                None => {
                    self.node_takeover_at = Some(now + Duration::from_millis(300));
                    None
                }
                Some(at) if now >= at => live_backups
                    .iter()
                    .copied()
                    .max_by_key(|c| (holds(c), std::cmp::Reverse(*c))),
                Some(_) => None,
            }
        };
        if let Some(c) = candidate {
            self.start_takeover(c);
        }
    }

    pub(super) fn last_home_node(&self) -> u16 {
        self.last_owner.map_or(1, |o| o.node)
    }
}
