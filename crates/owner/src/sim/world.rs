//! The simulated world: creating the LSG, starting and killing CPUs, and the random faults.

use super::*;

impl World {
    pub(super) fn new(options: SimOptions) -> Result<Self, String> {
        let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
        let net = SimNetwork::new(
            rng.random(),
            SimConfig {
                loss_probability: options.loss_probability,
                ..SimConfig::default()
            },
        )
        .map_err(|e| e.to_string())?;
        let base_store = SimStore::new(rng.random());
        let lsg_config = LsgConfig {
            audit_segment_bytes: 64 << 10,
            volume_segment_bytes: 64 << 10,
            max_batch_bytes: 16 << 10,
            max_record_bytes: 8 << 10,
            max_key_bytes: 64,
            max_value_bytes: 1 << 10,
        };
        let mut cpus = BTreeMap::new();
        for id in CPUS {
            let transport = net.add_endpoint(id, &[Path::Main]);
            cpus.insert(
                id,
                Cpu {
                    transport,
                    store: base_store.another_process(),
                    role: Role::Down,
                    restart_at: None,
                    stopped: false,
                    resumed: false,
                },
            );
        }
        let mut clients = Vec::new();
        for i in 0..options.clients {
            let endpoint = EndpointId::new(3, i as u16);
            let transport = net.add_endpoint(endpoint, &[Path::Main]);
            clients.push(Client {
                id: ClientId(1000 + i as u64),
                transport,
                next_seq: 1,
                seen_below: 1,
                transfer: None,
                step: 0,
                tx: None,
                balances: (0, 0),
                pending: None,
                retry_at: None,
                done: 0,
                next_transfer: (i as u64 + 1) * 1_000_000,
                prepare_next: false,
            });
        }
        Ok(World {
            clock: VirtualClock::new(),
            faults_left: options.max_faults,
            options,
            rng,
            net,
            base_store,
            cpus,
            clients,
            primary: None,
            lsg_config,
            log: VecDeque::new(),
            report: SimReport {
                seed: options.seed,
                ..SimReport::default()
            },
            committed: Vec::new(),
            memory_losses: Vec::new(),
            partitioned_until: None,
            node_takeover_at: None,
            pending_node_kill: None,
            last_owner: None,
            takeover_retry_at: None,
            quiet_until: Duration::ZERO,
            memory_lost_everywhere: false,
            script: None,
        })
    }

    /// The one virtual time every component of the world reads: the network's, which the
    /// scheduler advances round by round.
    pub(super) fn now(&self) -> Duration {
        self.clock.now()
    }

    pub(super) fn note(&mut self, what: String) {
        if self.log.len() >= 400 {
            self.log.pop_front();
        }
        let line = format!("{:>10.3?} {what}", self.now());
        self.log.push_back(line);
    }

    pub(super) fn fail(&self, reason: String) -> SimFailure {
        let mut log = String::new();
        for line in &self.log {
            let _ = writeln!(log, "{line}");
        }
        SimFailure {
            seed: self.options.seed,
            at: self.now(),
            reason,
            log,
        }
    }

    pub(super) fn owner_config(
        &self,
        id: EndpointId,
        epoch: OwnerEpoch,
        incarnation: u64,
    ) -> OwnerConfig {
        OwnerConfig {
            primary: PrimaryConfig {
                tag: PairTag {
                    lsg: LSG,
                    epoch,
                    incarnation,
                },
                paranoid: self.options.paranoid,
                max_record_bytes: self.lsg_config.max_record_bytes,
                home: Some(EndpointId::new(id.node, 1 - id.cpu)),
                remote: Some(EndpointId::new(other_node(id), 0)),
                ack_timeout: Duration::from_millis(100),
                max_message_bytes: 32 << 10,
                max_unacked_records: 256,
                flush_bytes: 8 << 10,
                flush_interval: Duration::from_millis(5),
            },
            locks: LockConfig {
                lock_timeout: Duration::from_millis(200),
                ..LockConfig::default()
            },
            messages: MessageTableLimits::default(),
            checkpoint_interval: Duration::from_millis(150),
            max_active_transactions: 64,
            tx_idle_timeout: Duration::from_secs(1),
            max_scan_rows: 1_000,
        }
    }

    /// Creates the LSG with its accounts on CPU 1.0, which becomes the first owner.
    pub(super) fn create(&mut self) -> Result<(), String> {
        let id = CPUS[0];
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Err("no CPU 1.0".into());
        };
        let mut lsg = LogStorageGroup::create_in_with(
            cpu.store.clone(),
            LSG,
            self.lsg_config,
            LsgOptions::deterministic(),
        )
        .map_err(|e| e.to_string())?;
        let accounts = lsg.create_volume(ACCOUNTS).map_err(|e| e.to_string())?;
        lsg.create_volume(MARKERS).map_err(|e| e.to_string())?;
        // The opening balances go in as one committed transaction written directly.
        let mut records = Vec::new();
        let tx = TxId {
            epoch: lsg.owner_epoch(),
            number: 0,
        };
        for a in 0..self.options.accounts {
            let key = account_key(a);
            let value = START_BALANCE.to_le_bytes().to_vec();
            let body = duplex_pair::AuditBody::Update(duplex_pair::Update {
                tx,
                volume: ACCOUNTS.into(),
                key: key.clone(),
                before: None,
                after: Some(value.clone()),
            });
            let payload = body
                .encode(self.lsg_config.max_record_bytes)
                .map_err(|e| e.to_string())?;
            let lsn = lsg
                .audit()
                .append(
                    body.record_type(),
                    duplex_lsg::RecordFlags::OUT_OF_COMMUNICATION,
                    &payload,
                )
                .map_err(|e| e.to_string())?;
            accounts.put(&key, &value, lsn).map_err(|e| e.to_string())?;
            records.push((lsn, body.record_type(), payload));
        }
        let commit = duplex_pair::AuditBody::Commit(duplex_pair::TxEnd {
            tx,
            epoch: lsg.owner_epoch(),
            request: None,
        });
        let payload = commit
            .encode(self.lsg_config.max_record_bytes)
            .map_err(|e| e.to_string())?;
        let lsn = lsg
            .audit()
            .append(
                commit.record_type(),
                duplex_lsg::RecordFlags::OUT_OF_COMMUNICATION,
                &payload,
            )
            .map_err(|e| e.to_string())?;
        records.push((lsn, commit.record_type(), payload));
        lsg.audit().flush().map_err(|e| e.to_string())?;
        let retained = records
            .into_iter()
            .map(|(lsn, t, payload)| duplex_pair::StreamRecord {
                lsn,
                record_type: t as u8,
                // Written before any backup joined: not in communication.
                flags: duplex_lsg::RecordFlags::OUT_OF_COMMUNICATION.bits(),
                payload,
            })
            .collect();
        let incarnation = cpu.transport.incarnation();
        let epoch = lsg.owner_epoch();
        let config = self.owner_config(id, epoch, incarnation);
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return Err("no CPU 1.0".into());
        };
        let owner = LsgOwner::new(
            config,
            lsg,
            OwnerStart {
                state: CommitState::PrimaryOnly,
                retained,
                durable: lsn,
                table: duplex_pair::MessageTable::new(MessageTableLimits::default()),
                in_doubt: Vec::new(),
                last_checkpoint: Lsn(0),
                penultimate_checkpoint: Lsn(0),
            },
            now,
        );
        cpu.role = Role::Owner {
            owner: Box::new(owner),
            jobs: VecDeque::new(),
        };
        self.primary = Some(id);
        self.last_owner = Some(id);
        for other in CPUS.into_iter().skip(1) {
            self.start_backup(other);
        }
        Ok(())
    }

    pub(super) fn start_backup(&mut self, id: EndpointId) {
        let primary = self.primary;
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        let mut backup =
            AuditBackup::new(LSG, cpu.transport.incarnation(), Duration::from_millis(60));
        if let Some(p) = primary {
            backup.join(p);
        }
        cpu.role = Role::Backup {
            backup,
            gathering: None,
        };
        cpu.restart_at = None;
    }

    pub(super) fn kill(&mut self, id: EndpointId, why: &str) {
        let now = self.now();
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        if matches!(cpu.role, Role::Down) {
            return;
        }
        self.net.crash(id);
        cpu.store.kill_process();
        cpu.role = Role::Down;
        cpu.stopped = false;
        cpu.resumed = false;
        cpu.restart_at = Some(now + Duration::from_millis(self.rng.random_range(150..600)));
        if self.primary == Some(id) {
            self.primary = None;
        }
        self.note(format!("{id} killed ({why})"));
    }

    pub(super) fn restart(&mut self, id: EndpointId) {
        let Some(cpu) = self.cpus.get_mut(&id) else {
            return;
        };
        self.net.restart(id);
        cpu.store = self.base_store.another_process();
        self.start_backup(id);
        self.note(format!("{id} restarted as a backup"));
    }

    // ---- faults -------------------------------------------------------------------------

    pub(super) fn inject_faults(&mut self) {
        let now = self.now();
        if let Some(until) = self.partitioned_until
            && now >= until
        {
            self.partitioned_until = None;
            self.set_partition(false);
        }
        if now >= self.options.fault_time || self.faults_left == 0 {
            return;
        }
        // On average one fault every 400 ms of virtual time, at least a second apart: two
        // failures within the detection time of each other are a double failure.
        if now < self.quiet_until || !self.rng.random_ratio(1, 800) {
            return;
        }
        self.quiet_until = now + Duration::from_secs(1);
        self.faults_left -= 1;
        let fault = self.rng.random_range(0..100);
        let what = match fault {
            0..35 => {
                // Kill the primary's CPU.
                match self.primary {
                    Some(p) => {
                        self.kill(p, "fault: primary CPU killed");
                        format!("kill primary CPU {p}")
                    }
                    None => "kill primary (none)".into(),
                }
            }
            35..50 => {
                let id = CPUS[self.rng.random_range(0..CPUS.len())];
                self.kill(id, "fault: a CPU killed");
                format!("kill CPU {id}")
            }
            50..65 => {
                let node = self.primary.map_or(1, |p| p.node);
                for id in CPUS.into_iter().filter(|c| c.node == node) {
                    self.kill(id, "fault: home node killed");
                }
                format!("kill node {node}")
            }
            65..80 => {
                if self.partitioned_until.is_none() {
                    self.partitioned_until =
                        Some(now + Duration::from_millis(self.rng.random_range(100..800)));
                    self.set_partition(true);
                }
                "partition between the nodes".into()
            }
            80..90 => {
                // The backup node is cut off, then the home node dies: recovery must not use
                // the stale backup's memory.
                if self.partitioned_until.is_none() {
                    self.partitioned_until = Some(now + Duration::from_millis(600));
                    self.set_partition(true);
                }
                let node = self.primary.map_or(1, |p| p.node);
                let kill_at = now + Duration::from_millis(self.rng.random_range(350..500));
                for id in CPUS.into_iter().filter(|c| c.node == node) {
                    if let Some(cpu) = self.cpus.get_mut(&id) {
                        cpu.restart_at = None;
                    }
                }
                self.pending_node_kill = Some((kill_at, node));
                format!("partition, then kill node {node}")
            }
            _ => {
                self.power_loss();
                "power loss".into()
            }
        };
        self.note(format!("FAULT {what}"));
        self.report.faults.push(format!("{:?} {what}", now));
    }

    pub(super) fn set_partition(&mut self, cut: bool) {
        for a in CPUS.into_iter().filter(|c| c.node == 1) {
            for b in CPUS.into_iter().filter(|c| c.node == 2) {
                if cut {
                    self.net.partition(a, b, &[Path::Main]);
                } else {
                    self.net.heal(a, b, &[Path::Main]);
                }
            }
        }
        self.note(format!("partition {}", if cut { "on" } else { "healed" }));
    }

    pub(super) fn power_loss(&mut self) {
        // Whatever the owner acknowledged from memory and had not flushed may go.
        // Replies already on the wire still arrive, so this is judged by receipt, at the end.
        let owner = self.cpus.values().find_map(|c| match &c.role {
            Role::Owner { owner, .. } => Some((owner.epoch(), owner.lsg().audit().durable_lsn())),
            _ => None,
        });
        if let Some((epoch, durable)) = owner {
            self.memory_losses.push((epoch, durable));
        }
        self.note(format!(
            "power loss with the owner's trail durable through {owner:?}"
        ));
        for id in CPUS {
            self.kill(id, "power loss");
        }
        self.base_store.power_loss();
        self.memory_lost_everywhere = true;
    }
}
