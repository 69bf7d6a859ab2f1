//! A client endpoint on the cluster transport and sessions on it.
//!
//! The endpoint learns who each LSG's primary is from the owners' [`Notice`]s (an owner tells
//! every peer that comes up, and a new owner every peer at once: the "ready" signal after a
//! takeover), from redirects ([`CpuReply::Redirect`]), and forgets it when the detector
//! reports it down; without a known primary, requests go to the LSG's CPUs in turn, whose
//! backups redirect at once.
//!
//! A [`Session`] is one client id in one LSG with numbered requests, any number in flight. A
//! request is sent again, unchanged (same sequence number), when its answer did not come: the
//! transport failed it, it was redirected, or a new primary was announced while it waited (so a
//! request to a dead or stopped primary is resent as soon as its successor is ready, without
//! waiting for a timeout). The owner's message table answers a resent commit or abort with its
//! first outcome, so a commit is never applied twice and its receipt is read back after a
//! takeover.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use duplex_lsg::{LsgId, OwnerEpoch};
use duplex_owner::{ClientReply, ClientRequest, Op, OpError};
use duplex_pair::{ClientId, RequestSeq, TxId};
use duplex_transport::{
    EndpointId, Event, PeerAddrs, PeerEvent, QuicConfig, QuicError, QuicTransport, Transport,
};
use thiserror::Error;
use tokio::sync::watch;
use tracing::{Instrument, debug, debug_span};

use crate::notice::Notice;
use crate::wire::{CpuReply, CpuRequest, CpuStatus};

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("binding the client endpoint: {0}")]
    Bind(#[from] QuicError),
    #[error("encoding request {seq}: {reason}")]
    Encode { seq: u64, reason: String },
    #[error("request {seq} got no answer within {after_ms} ms ({resends} resends)")]
    Timeout {
        seq: u64,
        after_ms: u64,
        resends: u32,
    },
    #[error("LSG {lsg} is not known to this client")]
    UnknownLsg { lsg: LsgId },
    #[error("CPU {cpu} refused the request: {reason}")]
    Refused { cpu: EndpointId, reason: String },
    #[error("CPU {cpu} did not answer: {reason}")]
    Unanswered { cpu: EndpointId, reason: String },
}

/// How patient a client is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientOptions {
    /// One attempt waits at most this long for its answer.
    pub attempt_timeout: Duration,
    /// A request is given up after this long.
    pub request_timeout: Duration,
    /// Pause between attempts when no new primary is announced meanwhile.
    pub retry_backoff: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            attempt_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(20),
            retry_backoff: Duration::from_millis(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Hint {
    primary: Option<EndpointId>,
    epoch: OwnerEpoch,
}

/// What the endpoint knows of one LSG.
#[derive(Debug)]
struct LsgRoute {
    cpus: Vec<EndpointId>,
    hint: watch::Sender<Hint>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Shared {
    transport: QuicTransport,
    lsgs: BTreeMap<LsgId, LsgRoute>,
    downs: Mutex<Vec<(Instant, EndpointId)>>,
    options: ClientOptions,
}

/// A client's endpoint on the cluster transport. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ClientEndpoint {
    shared: Arc<Shared>,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub reply: ClientReply,
    /// The CPU that answered.
    pub from: EndpointId,
    /// How many times the request was sent again.
    pub resends: u32,
}

impl ClientEndpoint {
    /// Binds the endpoint for one LSG served by `cpus` (the endpoint's id must be lower than
    /// theirs: it dials them).
    pub async fn bind(
        config: QuicConfig,
        lsg: LsgId,
        cpus: &[(EndpointId, PeerAddrs)],
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let lsgs = vec![(lsg, cpus.iter().map(|(id, _)| *id).collect())];
        Self::bind_cluster(config, lsgs, cpus, options).await
    }

    /// Binds the endpoint for a cluster: every CPU with its addresses, and each LSG with the
    /// CPUs that may be its primary, in the order to try them.
    pub async fn bind_cluster(
        config: QuicConfig,
        lsgs: Vec<(LsgId, Vec<EndpointId>)>,
        cpus: &[(EndpointId, PeerAddrs)],
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let local = config.local;
        let transport = QuicTransport::bind(config).await?;
        for (id, addrs) in cpus {
            transport.add_peer(*id, *addrs);
        }
        let lsgs = lsgs
            .into_iter()
            .map(|(lsg, cpus)| {
                let route = LsgRoute {
                    cpus,
                    hint: watch::Sender::new(Hint {
                        primary: None,
                        epoch: OwnerEpoch(0),
                    }),
                    next: AtomicUsize::new(0),
                };
                (lsg, route)
            })
            .collect();
        let shared = Arc::new(Shared {
            transport,
            lsgs,
            downs: Mutex::new(Vec::new()),
            options,
        });
        tokio::spawn(pump(Arc::clone(&shared)).instrument(debug_span!("client_events", %local)));
        Ok(ClientEndpoint { shared })
    }

    pub fn transport(&self) -> &QuicTransport {
        &self.shared.transport
    }

    /// A session for client `id` in the endpoint's first LSG, numbering its requests from 1.
    pub fn session(&self, id: ClientId) -> Session {
        let lsg = self.shared.lsgs.keys().next().copied().unwrap_or(LsgId(0));
        self.session_in(lsg, id)
    }

    /// A session for client `id` in LSG `lsg`, numbering its requests from 1.
    pub fn session_in(&self, lsg: LsgId, id: ClientId) -> Session {
        Session {
            endpoint: self.clone(),
            lsg,
            id,
            next_seq: AtomicU64::new(1),
            outstanding: Mutex::new(BTreeSet::new()),
        }
    }

    /// The primary of the first LSG last announced, if it is not known to be gone.
    pub fn primary(&self) -> Option<EndpointId> {
        self.shared
            .lsgs
            .values()
            .next()
            .and_then(|r| r.hint.borrow().primary)
    }

    /// The primary of `lsg` last announced, if it is not known to be gone.
    pub fn primary_of(&self, lsg: LsgId) -> Option<EndpointId> {
        self.shared
            .lsgs
            .get(&lsg)
            .and_then(|r| r.hint.borrow().primary)
    }

    /// Waits until the first LSG's primary is announced, at most `limit`.
    pub async fn wait_for_primary(&self, limit: Duration) -> Option<EndpointId> {
        let lsg = self.shared.lsgs.keys().next().copied()?;
        self.wait_for_primary_of(lsg, limit).await
    }

    /// Waits until `lsg`'s primary is announced, at most `limit`.
    pub async fn wait_for_primary_of(&self, lsg: LsgId, limit: Duration) -> Option<EndpointId> {
        let mut rx = self.shared.lsgs.get(&lsg)?.hint.subscribe();
        let found = tokio::time::timeout(limit, rx.wait_for(|h| h.primary.is_some())).await;
        match found {
            Ok(Ok(h)) => h.primary,
            _ => None,
        }
    }

    /// Asks CPU `cpu` for the state of its roles.
    pub async fn status(&self, cpu: EndpointId, limit: Duration) -> Result<CpuStatus, ClientError> {
        let payload = CpuRequest::Status
            .encode()
            .map_err(|e| ClientError::Encode {
                seq: 0,
                reason: e.to_string(),
            })?;
        let bytes = self
            .shared
            .transport
            .call(cpu, Bytes::from(payload), limit)
            .await
            .map_err(|e| ClientError::Unanswered {
                cpu,
                reason: e.to_string(),
            })?;
        match CpuReply::decode(&bytes) {
            Ok(CpuReply::Status(status)) => Ok(status),
            Ok(other) => Err(ClientError::Refused {
                cpu,
                reason: format!("answered a status request with {other:?}"),
            }),
            Err(reason) => Err(ClientError::Refused { cpu, reason }),
        }
    }

    /// Every `Down` the detector reported, with when it was read.
    pub fn downs(&self) -> Vec<(Instant, EndpointId)> {
        self.shared
            .downs
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    pub fn close(&self) {
        self.shared.transport.close();
    }
}

impl LsgRoute {
    fn target(&self, transport: &QuicTransport, hint: &Hint) -> Option<EndpointId> {
        if let Some(p) = hint.primary {
            return Some(p);
        }
        let up: Vec<EndpointId> = self
            .cpus
            .iter()
            .copied()
            .filter(|c| transport.peer_status(*c).is_some_and(|s| s.up))
            .collect();
        let from = if up.is_empty() { &self.cpus } else { &up };
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        from.get(i % from.len().max(1)).copied()
    }

    /// `cpu` is not (or no longer) the primary.
    fn forget(&self, cpu: EndpointId) {
        self.hint.send_if_modified(|h| {
            if h.primary == Some(cpu) {
                h.primary = None;
                true
            } else {
                false
            }
        });
    }

    /// A CPU said the primary is `cpu` (a redirect: no epoch of its own).
    fn redirect(&self, cpu: EndpointId) {
        self.hint.send_if_modified(|h| {
            if h.primary.is_none() {
                h.primary = Some(cpu);
                true
            } else {
                false
            }
        });
    }
}

async fn pump(shared: Arc<Shared>) {
    while let Some(event) = shared.transport.next_event().await {
        match event {
            Event::Message { from, payload, .. } => match Notice::decode(&payload) {
                Ok(Notice::Primary { lsg, epoch }) => {
                    let Some(route) = shared.lsgs.get(&lsg) else {
                        continue;
                    };
                    route.hint.send_if_modified(|h| {
                        if epoch >= h.epoch && (h.primary != Some(from) || epoch != h.epoch) {
                            *h = Hint {
                                primary: Some(from),
                                epoch,
                            };
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => debug!(%from, error = %e, "malformed notice"),
            },
            Event::Peer(PeerEvent::Down { peer, .. }) => {
                if let Ok(mut downs) = shared.downs.lock() {
                    downs.push((Instant::now(), peer));
                }
                for route in shared.lsgs.values() {
                    route.forget(peer);
                }
            }
            _ => {}
        }
    }
}

/// Removes a request from the session's outstanding set when it ends, however it ends.
struct Outstanding<'a> {
    session: &'a Session,
    seq: u64,
}

impl Drop for Outstanding<'_> {
    fn drop(&mut self) {
        let mut out = match self.session.outstanding.lock() {
            Ok(out) => out,
            Err(poisoned) => poisoned.into_inner(),
        };
        out.remove(&self.seq);
    }
}

/// One client id's requests in one LSG, any number in flight (see the module docs).
#[derive(Debug)]
pub struct Session {
    endpoint: ClientEndpoint,
    lsg: LsgId,
    id: ClientId,
    next_seq: AtomicU64,
    /// Requests sent and not answered yet: the lowest is the `seen_below` of the next.
    outstanding: Mutex<BTreeSet<u64>>,
}

impl Session {
    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn lsg(&self) -> LsgId {
        self.lsg
    }

    /// Sends one request (a new sequence number) until it is answered by the primary.
    pub async fn request(&self, tx: Option<TxId>, op: Op) -> Result<Answer, ClientError> {
        // The number and the low mark are taken together: a request numbered later never
        // tells the owner that an earlier one, not yet sent, was answered.
        let (seq, seen_below) = {
            let mut out = match self.outstanding.lock() {
                Ok(out) => out,
                Err(poisoned) => poisoned.into_inner(),
            };
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            out.insert(seq);
            (seq, out.first().copied().unwrap_or(seq))
        };
        // Unanswered until this guard drops: also when the caller stops waiting.
        let _outstanding = Outstanding { session: self, seq };
        let span = debug_span!("session_request", lsg = %self.lsg, client = self.id.0, seq);
        self.send_until_answered(seq, seen_below, tx, op)
            .instrument(span)
            .await
    }

    async fn send_until_answered(
        &self,
        seq: u64,
        seen_below: u64,
        tx: Option<TxId>,
        op: Op,
    ) -> Result<Answer, ClientError> {
        let shared = Arc::clone(&self.endpoint.shared);
        let route = shared
            .lsgs
            .get(&self.lsg)
            .ok_or(ClientError::UnknownLsg { lsg: self.lsg })?;
        let options = shared.options;
        let request = CpuRequest::Lsg {
            lsg: self.lsg,
            request: ClientRequest {
                client: self.id,
                seq: RequestSeq(seq),
                seen_below: RequestSeq(seen_below),
                tx,
                op,
            },
        };
        let payload = Bytes::from(request.encode().map_err(|e| ClientError::Encode {
            seq,
            reason: e.to_string(),
        })?);
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + options.request_timeout);
        let timeout = |resends| ClientError::Timeout {
            seq,
            after_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            resends,
        };
        let mut resends = 0;
        loop {
            let mut hint = route.hint.subscribe();
            let target = route.target(&shared.transport, &hint.borrow_and_update());
            let Some(target) = target else {
                return Err(ClientError::UnknownLsg { lsg: self.lsg });
            };
            let call = shared
                .transport
                .call(target, payload.clone(), options.attempt_timeout);
            let outcome = tokio::select! {
                r = call => Some(r),
                changed = hint.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(options.retry_backoff).await;
                    }
                    None
                }
                _ = tokio::time::sleep_until(deadline) => return Err(timeout(resends)),
            };
            let retry_now = match outcome {
                Some(Ok(bytes)) => match CpuReply::decode(&bytes) {
                    Ok(CpuReply::Lsg(ClientReply::Error(OpError::NotPrimary { reason }))) => {
                        debug!(%target, %reason, seq, "the owner stopped");
                        route.forget(target);
                        false
                    }
                    Ok(CpuReply::Lsg(reply)) => {
                        return Ok(Answer {
                            reply,
                            from: target,
                            resends,
                        });
                    }
                    Ok(CpuReply::Redirect {
                        primary, reason, ..
                    }) => {
                        debug!(%target, ?primary, %reason, seq, "redirected");
                        route.forget(target);
                        match primary {
                            Some(p) if p != target => {
                                route.redirect(p);
                                true
                            }
                            _ => false,
                        }
                    }
                    Ok(CpuReply::Malformed { reason }) => {
                        return Err(ClientError::Refused {
                            cpu: target,
                            reason,
                        });
                    }
                    Ok(CpuReply::Status(_)) => {
                        return Err(ClientError::Refused {
                            cpu: target,
                            reason: "answered a request with a status".into(),
                        });
                    }
                    Err(e) => {
                        debug!(%target, error = %e, seq, "malformed reply");
                        false
                    }
                },
                Some(Err(e)) => {
                    debug!(%target, error = %e, seq, "request failed");
                    route.forget(target);
                    false
                }
                // A new primary was announced (or the old one declared down): resend at once.
                None => true,
            };
            resends += 1;
            if !retry_now {
                let mut hint = route.hint.subscribe();
                hint.borrow_and_update();
                tokio::select! {
                    _ = hint.changed() => {}
                    _ = tokio::time::sleep(options.retry_backoff) => {}
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timeout(resends));
            }
        }
    }
}
