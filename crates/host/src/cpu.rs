//! The event loop of one CPU: one transport endpoint, one thread, every LSG role the CPU runs.
//!
//! [`Cpu`] reads what arrives (transport events, storage completions, lock acquisitions,
//! finished takeovers, node deaths, ticks), decodes it and hands it to the [`Host`] of the LSG
//! it names: pair messages by their tag, notices by their LSG, client requests by the LSG in
//! their envelope ([`CpuRequest`]). Peer and node events go to every role. After the events
//! that are ready (up to 64) it drains every role's actions, so the records of several
//! requests go to a backup in one message.
//!
//! A CPU whose owner stops (fenced, or its storage failed) ends: the NonStop CPU halts on an
//! error it cannot mend, its LSGs are taken over by their backups, and a restarted CPU rejoins
//! as a backup.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use duplex_lsg::LsgId;
use duplex_owner::ClientRequest;
use duplex_pair::PairMessage;
use duplex_transport::{EndpointId, Event, PeerEvent, QuicTransport, RequestId, Transport};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{debug, info, warn};

use crate::HostError;
use crate::config::HostConfig;
use crate::create::Row;
use crate::driver::{Exit, Host, Inbox, Internal, Report};
use crate::node::{self, Liveness};
use crate::notice::Notice;
use crate::wire::{CpuReply, CpuRequest, CpuStatus};

/// Events handled before the actions they caused are run, at most.
const MAX_EVENTS_PER_TURN: usize = 64;
/// Room for a request's envelope around its key and value.
const REQUEST_OVERHEAD_BYTES: usize = 4096;
/// How often the status gauges (`duplex_lsg_*`) are brought up to date.
const GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// One CPU's event loop and its LSG roles. See the module docs.
pub struct Cpu {
    local: EndpointId,
    transport: QuicTransport,
    run_dir: PathBuf,
    hosts: BTreeMap<LsgId, Host>,
    internal_tx: UnboundedSender<(LsgId, Internal)>,
    internal_rx: UnboundedReceiver<(LsgId, Internal)>,
    node_dead_tx: UnboundedSender<u16>,
    node_dead_rx: UnboundedReceiver<u16>,
    watched: Vec<u16>,
    _liveness: Liveness,
}

impl std::fmt::Debug for Cpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cpu")
            .field("local", &self.local)
            .field("lsgs", &self.hosts.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Cpu {
    /// A CPU on `transport` whose node keeps its pid files and liveness file in `run_dir`. Takes
    /// the node's liveness lock at once (see `node`).
    pub fn new(transport: QuicTransport, run_dir: &Path) -> Result<Self, HostError> {
        let liveness = node::hold_liveness(run_dir).map_err(|source| HostError::Io {
            what: format!("holding the liveness file in {}", run_dir.display()),
            source,
        })?;
        let (internal_tx, internal_rx) = unbounded_channel();
        let (node_dead_tx, node_dead_rx) = unbounded_channel();
        Ok(Cpu {
            local: transport.local_id(),
            transport,
            run_dir: run_dir.to_path_buf(),
            hosts: BTreeMap::new(),
            internal_tx,
            internal_rx,
            node_dead_tx,
            node_dead_rx,
            watched: Vec::new(),
            _liveness: liveness,
        })
    }

    pub fn transport(&self) -> &QuicTransport {
        &self.transport
    }

    fn inbox(&self, lsg: LsgId) -> Inbox {
        Inbox {
            lsg,
            tx: self.internal_tx.clone(),
        }
    }

    /// Watches node `node`'s liveness file (in its run directory `run_dir`): this CPU may take
    /// over LSGs whose home it is.
    pub fn watch_node(&mut self, node: u16, run_dir: PathBuf) -> Result<(), HostError> {
        if node == self.local.node || self.watched.contains(&node) {
            return Ok(());
        }
        let tx = self.node_dead_tx.clone();
        node::watch_node(node, run_dir.clone(), move |n| {
            let _ = tx.send(n);
        })
        .map_err(|source| HostError::Io {
            what: format!("watching the liveness file in {}", run_dir.display()),
            source,
        })?;
        self.watched.push(node);
        Ok(())
    }

    fn insert(&mut self, host: Host) -> Result<(), HostError> {
        let lsg = host.lsg_id();
        if self.hosts.contains_key(&lsg) {
            return Err(HostError::Create(format!(
                "CPU {} already runs a role of LSG {lsg}",
                self.local
            )));
        }
        self.hosts.insert(lsg, host);
        Ok(())
    }

    /// Runs a backup of `config`'s LSG (see [`Host`]); with `cold_start`, it may recover the
    /// LSG when nobody announces a primary.
    pub fn add_backup(
        &mut self,
        config: HostConfig,
        cold_start: bool,
        report: Box<dyn FnMut(Report)>,
    ) -> Result<(), HostError> {
        let inbox = self.inbox(config.lsg_id);
        let host = Host::backup(config, self.transport.clone(), inbox, cold_start, report);
        self.insert(host)
    }

    /// Runs fresh pairs that take the LSG over at once and recover it from its trail.
    pub fn add_recover(
        &mut self,
        config: HostConfig,
        report: Box<dyn FnMut(Report)>,
    ) -> Result<(), HostError> {
        let inbox = self.inbox(config.lsg_id);
        let host = Host::recover(config, self.transport.clone(), inbox, report);
        self.insert(host)
    }

    /// Creates the LSG with `volumes` and `rows` and owns it.
    pub async fn add_created(
        &mut self,
        config: HostConfig,
        volumes: Vec<String>,
        rows: Vec<Row>,
        report: Box<dyn FnMut(Report)>,
    ) -> Result<(), HostError> {
        let inbox = self.inbox(config.lsg_id);
        let host =
            Host::create_and_own(config, self.transport.clone(), inbox, volumes, rows, report)
                .await?;
        self.insert(host)
    }

    /// The state of every role, for `duplex status`.
    pub fn status(&self) -> CpuStatus {
        CpuStatus {
            cpu: self.local,
            incarnation: self.transport.incarnation(),
            at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            lsgs: self.hosts.values().map(Host::status).collect(),
        }
    }

    fn tick_every(&self) -> Duration {
        self.hosts
            .values()
            .map(Host::tick_every)
            .min()
            .unwrap_or(Duration::from_millis(10))
    }

    /// Runs the CPU until an owner stops or the transport closes.
    pub async fn run(self) -> Result<Exit, HostError> {
        self.run_until(std::future::pending()).await
    }

    /// Runs the CPU until an owner stops, the transport closes, or `stop` completes (the
    /// operator's stop: every owner's trail is made durable first, and the CPU ends with
    /// [`Exit::Closed`]).
    pub async fn run_until(
        mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Exit, HostError> {
        tokio::pin!(stop);
        node::write_pid_file(&self.run_dir, self.local).map_err(|source| HostError::Io {
            what: format!("writing the pid file in {}", self.run_dir.display()),
            source,
        })?;
        for host in self.hosts.values_mut() {
            host.report_ready();
        }
        let transport = self.transport.clone();
        let tick = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(tick);
        let mut gauges = tokio::time::interval(GAUGE_INTERVAL);
        gauges.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some((lsg, internal)) = self.internal_rx.recv() => self.on_internal(lsg, internal),
                Some(node) = self.node_dead_rx.recv() => self.on_node_dead(node),
                () = &mut stop => {
                    info!(cpu = %self.local, "stopping: every owner's trail is made durable");
                    for host in self.hosts.values_mut() {
                        host.flush_for_stop();
                    }
                    return Ok(Exit::Closed);
                }
                event = transport.next_event() => match event {
                    Some(event) => self.on_event(event),
                    None => return Ok(Exit::Closed),
                },
                () = &mut tick => {
                    for host in self.hosts.values_mut() {
                        host.on_tick();
                    }
                    tick.as_mut().reset(tokio::time::Instant::now() + self.tick_every());
                }
                _ = gauges.tick() => self.record_gauges(),
            }
            // Take what else is ready before acting: the records of several requests then go
            // to the backups in one message, and one acknowledgement answers several.
            for _ in 0..MAX_EVENTS_PER_TURN {
                if let Ok((lsg, internal)) = self.internal_rx.try_recv() {
                    self.on_internal(lsg, internal);
                } else if let Some(event) = transport.try_next_event() {
                    self.on_event(event);
                } else {
                    break;
                }
            }
            let mut exit = None;
            for host in self.hosts.values_mut() {
                host.drain();
                if let Some(e) = host.take_exit() {
                    exit.get_or_insert(e);
                }
            }
            if let Some(exit) = exit {
                return Ok(exit);
            }
        }
    }

    /// Sets the per-LSG gauges from the roles' status (metrics in docs/operations.md).
    fn record_gauges(&self) {
        for status in self.hosts.values().map(Host::status) {
            let lsg = status.lsg.to_string();
            let owner = if status.role == "owner" { 1.0 } else { 0.0 };
            metrics::gauge!("duplex_lsg_owner", "lsg" => lsg.clone()).set(owner);
            metrics::gauge!("duplex_lsg_epoch", "lsg" => lsg.clone()).set(status.epoch.0 as f64);
            if owner == 0.0 {
                continue;
            }
            for state in ["Normal", "PrimaryOnly", "BackupOnly"] {
                let on = status.state.as_deref() == Some(state);
                metrics::gauge!("duplex_lsg_state", "lsg" => lsg.clone(), "state" => state)
                    .set(if on { 1.0 } else { 0.0 });
            }
            metrics::gauge!("duplex_lsg_next_lsn", "lsg" => lsg.clone()).set(status.lsn as f64);
            metrics::gauge!("duplex_lsg_durable_lsn", "lsg" => lsg.clone())
                .set(status.durable_lsn as f64);
            metrics::gauge!("duplex_lsg_last_checkpoint_lsn", "lsg" => lsg.clone())
                .set(status.last_checkpoint_lsn as f64);
            metrics::gauge!("duplex_lsg_active_transactions", "lsg" => lsg.clone())
                .set(status.active_transactions as f64);
            if let Some(lag) = status.lag_records {
                metrics::gauge!("duplex_lsg_lag_records", "lsg" => lsg).set(lag as f64);
            }
        }
    }

    fn on_internal(&mut self, lsg: LsgId, internal: Internal) {
        if let Some(host) = self.hosts.get_mut(&lsg) {
            host.on_internal(internal);
        }
    }

    fn on_node_dead(&mut self, node: u16) {
        info!(
            node,
            "every CPU of the node died (its liveness file was released)"
        );
        for host in self.hosts.values_mut() {
            host.on_node_dead(node);
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Request {
                from, id, payload, ..
            } => self.on_request(from, id, &payload),
            // Pair messages and notices are the CPUs' own: a client may not join the pair
            // protocol (it would fence backups or pose as a primary).
            Event::Stream { from, .. } | Event::Message { from, .. } if from.is_client() => {
                metrics::counter!("duplex_malformed_requests_total").increment(1);
                warn!(%from, "a client sent a pair message or notice: dropped");
            }
            Event::Stream { from, payload, .. } => match PairMessage::decode(&payload) {
                Ok(message) => {
                    if let Some(host) = self.hosts.get_mut(&message.tag().lsg) {
                        host.on_pair_message(from, message);
                    }
                }
                Err(e) => warn!(%from, error = %e, "malformed pair message dropped"),
            },
            Event::Message { from, payload, .. } => match Notice::decode(&payload) {
                Ok(notice) => {
                    let Notice::Primary { lsg, .. } = notice;
                    if let Some(host) = self.hosts.get_mut(&lsg) {
                        host.on_notice(from, notice);
                    }
                }
                Err(e) => warn!(%from, error = %e, "malformed notice dropped"),
            },
            Event::Peer(PeerEvent::Up { peer, incarnation }) => {
                for host in self.hosts.values_mut() {
                    host.on_peer_up(peer, incarnation);
                }
            }
            Event::Peer(PeerEvent::Down { peer, incarnation }) => {
                for host in self.hosts.values_mut() {
                    host.on_peer_down_event(peer, incarnation);
                }
            }
            Event::Peer(_) => {}
            Event::LocalStall { stalled_ms } => {
                warn!(stalled_ms, "this CPU did not run for a while");
            }
            Event::Response { .. } | Event::RequestFailed { .. } => {}
        }
    }

    /// The largest request any of this CPU's LSGs can take: a key and a value at their limits
    /// and the envelope around them.
    fn max_request_bytes(&self) -> usize {
        self.hosts
            .values()
            .map(|h| {
                let limits = h.lsg_config();
                limits.max_key_bytes + limits.max_value_bytes + REQUEST_OVERHEAD_BYTES
            })
            .max()
            .unwrap_or(REQUEST_OVERHEAD_BYTES)
    }

    fn on_request(&mut self, from: EndpointId, id: RequestId, payload: &[u8]) {
        // Refused before decoding: a client sending huge requests must not hold this thread
        // (and with it the heartbeats that keep the CPU alive in its peers' eyes).
        let max = self.max_request_bytes();
        if payload.len() > max {
            metrics::counter!("duplex_malformed_requests_total").increment(1);
            let reason = format!(
                "a request of {} bytes exceeds the limit of {max} bytes (largest key and value)",
                payload.len()
            );
            self.respond(from, id, &CpuReply::Malformed { reason });
            return;
        }
        let request = match CpuRequest::decode(payload) {
            Ok(r) => r,
            Err(reason) => {
                metrics::counter!("duplex_malformed_requests_total").increment(1);
                debug!(%from, %reason, "malformed request");
                self.respond(from, id, &CpuReply::Malformed { reason });
                return;
            }
        };
        match request {
            CpuRequest::Lsg { lsg, request } => self.on_client_request(from, id, lsg, request),
            CpuRequest::Status => {
                let status = self.status();
                self.respond(from, id, &CpuReply::Status(status));
            }
        }
    }

    fn on_client_request(
        &mut self,
        from: EndpointId,
        id: RequestId,
        lsg: LsgId,
        request: ClientRequest,
    ) {
        match self.hosts.get_mut(&lsg) {
            Some(host) => {
                metrics::counter!("duplex_client_requests_total", "lsg" => lsg.to_string())
                    .increment(1);
                host.on_client_request(from, id, request);
            }
            None => {
                metrics::counter!("duplex_client_requests_total", "lsg" => "unknown").increment(1);
                let reason = format!("CPU {} runs no role of LSG {lsg}", self.local);
                let reply = CpuReply::Redirect {
                    lsg,
                    primary: None,
                    reason,
                };
                self.respond(from, id, &reply);
            }
        }
    }

    fn respond(&self, to: EndpointId, id: RequestId, reply: &CpuReply) {
        let bytes = match reply.encode() {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                warn!(%to, error = %e, "cannot encode a reply");
                return;
            }
        };
        if let Err(e) = self.transport.respond(to, id, bytes) {
            debug!(%to, error = %e, "reply not sent");
        }
    }
}
