//! A client of one LSG: an endpoint on the cluster transport and sessions on it.
//!
//! The endpoint learns who the primary is from the owners' [`Notice`]s (an owner tells every
//! peer that comes up, and a new owner every peer at once), and forgets it when the detector
//! reports it down or it answers `NotPrimary`; without a known primary, requests go to the
//! CPUs in turn, whose backups answer `NotPrimary` at once.
//!
//! A [`Session`] is one client id with numbered requests, one at a time. A request is sent
//! again, unchanged (same sequence number), when its answer did not come: the transport failed
//! it, its primary answered `NotPrimary`, or a new primary was announced while it waited (so a
//! request to a dead or stopped primary is resent as soon as its successor is ready, without
//! waiting for a timeout). The owner's message table answers a resent commit or abort with its
//! first outcome, so a commit is never applied twice and its receipt is read back after a
//! takeover.

use std::sync::atomic::{AtomicUsize, Ordering};
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

#[derive(Debug)]
struct Shared {
    transport: QuicTransport,
    lsg: LsgId,
    cpus: Vec<EndpointId>,
    hint: watch::Sender<Hint>,
    next: AtomicUsize,
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
    /// Binds the endpoint and lists the LSG's CPUs (the endpoint's id must be lower than
    /// theirs: it dials them).
    pub async fn bind(
        config: QuicConfig,
        lsg: LsgId,
        cpus: &[(EndpointId, PeerAddrs)],
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let local = config.local;
        let transport = QuicTransport::bind(config).await?;
        for (id, addrs) in cpus {
            transport.add_peer(*id, *addrs);
        }
        let shared = Arc::new(Shared {
            transport,
            lsg,
            cpus: cpus.iter().map(|(id, _)| *id).collect(),
            hint: watch::Sender::new(Hint {
                primary: None,
                epoch: OwnerEpoch(0),
            }),
            next: AtomicUsize::new(0),
            downs: Mutex::new(Vec::new()),
            options,
        });
        tokio::spawn(pump(Arc::clone(&shared)).instrument(debug_span!("client_events", %local)));
        Ok(ClientEndpoint { shared })
    }

    pub fn transport(&self) -> &QuicTransport {
        &self.shared.transport
    }

    /// A session for client `id`, numbering its requests from 1.
    pub fn session(&self, id: ClientId) -> Session {
        Session {
            endpoint: self.clone(),
            id,
            next_seq: 1,
        }
    }

    /// The primary last announced, if it is not known to be gone.
    pub fn primary(&self) -> Option<EndpointId> {
        self.shared.hint.borrow().primary
    }

    /// Waits until a primary is announced, at most `limit`.
    pub async fn wait_for_primary(&self, limit: Duration) -> Option<EndpointId> {
        let mut rx = self.shared.hint.subscribe();
        let found = tokio::time::timeout(limit, rx.wait_for(|h| h.primary.is_some())).await;
        match found {
            Ok(Ok(h)) => h.primary,
            _ => None,
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

impl Shared {
    fn target(&self, hint: &Hint) -> EndpointId {
        if let Some(p) = hint.primary {
            return p;
        }
        let up: Vec<EndpointId> = self
            .cpus
            .iter()
            .copied()
            .filter(|c| self.transport.peer_status(*c).is_some_and(|s| s.up))
            .collect();
        let from = if up.is_empty() { &self.cpus } else { &up };
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        from.get(i % from.len().max(1))
            .copied()
            .unwrap_or(EndpointId::new(0, 0))
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
}

async fn pump(shared: Arc<Shared>) {
    while let Some(event) = shared.transport.next_event().await {
        match event {
            Event::Message { from, payload, .. } => match Notice::decode(&payload) {
                Ok(Notice::Primary { lsg, epoch }) if lsg == shared.lsg => {
                    shared.hint.send_if_modified(|h| {
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
                Ok(_) => {}
                Err(e) => debug!(%from, error = %e, "malformed notice"),
            },
            Event::Peer(PeerEvent::Down { peer, .. }) => {
                if let Ok(mut downs) = shared.downs.lock() {
                    downs.push((Instant::now(), peer));
                }
                shared.forget(peer);
            }
            _ => {}
        }
    }
}

/// One client id's requests, one at a time (see the module docs).
#[derive(Debug)]
pub struct Session {
    endpoint: ClientEndpoint,
    id: ClientId,
    next_seq: u64,
}

impl Session {
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Sends one request (a new sequence number) until it is answered by the primary.
    pub async fn request(&mut self, tx: Option<TxId>, op: Op) -> Result<Answer, ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let span = debug_span!("session_request", client = self.id.0, seq);
        self.send_until_answered(seq, tx, op).instrument(span).await
    }

    async fn send_until_answered(
        &self,
        seq: u64,
        tx: Option<TxId>,
        op: Op,
    ) -> Result<Answer, ClientError> {
        let shared = Arc::clone(&self.endpoint.shared);
        let options = shared.options;
        let request = ClientRequest {
            client: self.id,
            seq: RequestSeq(seq),
            // Requests are one at a time: every earlier one was answered.
            seen_below: RequestSeq(seq),
            tx,
            op,
        };
        let payload = Bytes::from(request.encode().map_err(|e| ClientError::Encode {
            seq,
            reason: e.to_string(),
        })?);
        let started = Instant::now();
        let deadline = tokio::time::Instant::from_std(started + options.request_timeout);
        let mut resends = 0;
        loop {
            let mut hint = shared.hint.subscribe();
            let target = shared.target(&hint.borrow_and_update());
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
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(ClientError::Timeout {
                        seq,
                        after_ms: started.elapsed().as_millis() as u64,
                        resends,
                    });
                }
            };
            let retry_now = match outcome {
                Some(Ok(bytes)) => match ClientReply::decode(&bytes) {
                    Ok(ClientReply::Error(OpError::NotPrimary { reason })) => {
                        debug!(%target, %reason, seq, "not the primary");
                        shared.forget(target);
                        false
                    }
                    Ok(reply) => {
                        return Ok(Answer {
                            reply,
                            from: target,
                            resends,
                        });
                    }
                    Err(e) => {
                        debug!(%target, error = %e, seq, "malformed reply");
                        false
                    }
                },
                Some(Err(e)) => {
                    debug!(%target, error = %e, seq, "request failed");
                    shared.forget(target);
                    false
                }
                // A new primary was announced (or the old one declared down): resend at once.
                None => true,
            };
            resends += 1;
            if !retry_now {
                let mut hint = shared.hint.subscribe();
                hint.borrow_and_update();
                tokio::select! {
                    _ = hint.changed() => {}
                    _ = tokio::time::sleep(options.retry_backoff) => {}
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ClientError::Timeout {
                    seq,
                    after_ms: started.elapsed().as_millis() as u64,
                    resends,
                });
            }
        }
    }
}
