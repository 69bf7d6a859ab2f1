//! Connecting to a cluster, sessions, status.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use duplex_host::{ClientEndpoint, ClientOptions, CpuStatus, Session};
use duplex_lsg::LsgId;
use duplex_node::ClusterConfig;
use duplex_pair::ClientId;
use duplex_transport::certs::{ClientName, Credentials};
use duplex_transport::{EndpointId, QuicConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tracing::info;

use crate::error::ClientError;
use crate::txn::Transaction;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The cluster's certificate directory, holding this client's certificate.
    pub certs: PathBuf,
    /// The client certificate's name (`client-NAME.pem` in `certs`).
    pub client_name: String,
    pub timeouts: ClientOptions,
}

#[derive(Debug)]
struct Inner {
    config: ClusterConfig,
    endpoint: ClientEndpoint,
    /// Client ids are `id_base + n`: a random base, so two client processes do not share ids.
    id_base: u64,
    next_id: AtomicU64,
}

/// A connection to a cluster. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

impl Cluster {
    /// Binds a client endpoint and dials every CPU of `config`.
    pub async fn connect(
        config: ClusterConfig,
        options: ConnectOptions,
    ) -> Result<Self, ClientError> {
        let seed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ (u64::from(std::process::id()) << 32);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Client endpoints are `0.k`; a random k keeps two client processes apart (one that
        // drew the same k would replace the other's links until it reconnects).
        let local = EndpointId::new(0, rng.random::<u16>());
        let name = ClientName::new(&options.client_name)
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let credentials = Credentials::load_client(&options.certs, &name)
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let quic = QuicConfig::new(
            local,
            "127.0.0.1:0"
                .parse()
                .map_err(|e| ClientError::Config(format!("{e}")))?,
            credentials,
        );
        let cpus = config.peers();
        let endpoint =
            ClientEndpoint::bind_cluster(quic, config.lsg_routes(), &cpus, options.timeouts)
                .await?;
        info!(%local, "client endpoint bound");
        Ok(Cluster {
            inner: Arc::new(Inner {
                config,
                endpoint,
                id_base: rng.random::<u64>() >> 16 << 16,
                next_id: AtomicU64::new(1),
            }),
        })
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.inner.config
    }

    pub fn endpoint(&self) -> &ClientEndpoint {
        &self.inner.endpoint
    }

    /// A new session: a client id of its own.
    pub fn session(&self) -> ClientSession {
        let n = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        ClientSession {
            cluster: self.clone(),
            id: ClientId(self.inner.id_base.wrapping_add(n)),
            sessions: Mutex::new(BTreeMap::new()),
        }
    }

    /// The primary of `lsg` last announced.
    pub fn primary_of(&self, lsg: LsgId) -> Option<EndpointId> {
        self.inner.endpoint.primary_of(lsg)
    }

    /// Waits until every LSG has announced a primary, at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), ClientError> {
        let deadline = tokio::time::Instant::now() + limit;
        for lsg in self.inner.config.lsgs() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if self
                .inner
                .endpoint
                .wait_for_primary_of(lsg.id, left)
                .await
                .is_none()
            {
                return Err(ClientError::Transport(
                    duplex_host::ClientError::Unanswered {
                        cpu: EndpointId::new(lsg.home, 0),
                        reason: format!("LSG {} announced no primary within {limit:?}", lsg.id),
                    },
                ));
            }
        }
        Ok(())
    }

    /// Every CPU's status, asked at once; a CPU that does not answer within `limit` is listed
    /// with its error.
    pub async fn status(
        &self,
        limit: Duration,
    ) -> Vec<(EndpointId, Result<CpuStatus, ClientError>)> {
        let asks = self.inner.config.peers().into_iter().map(|(cpu, _)| {
            let endpoint = self.inner.endpoint.clone();
            async move {
                (
                    cpu,
                    endpoint.status(cpu, limit).await.map_err(ClientError::from),
                )
            }
        });
        let mut out = Vec::new();
        let handles: Vec<_> = asks.map(tokio::spawn).collect();
        for h in handles {
            if let Ok(r) = h.await {
                out.push(r);
            }
        }
        out
    }

    pub fn close(&self) {
        self.inner.endpoint.close();
    }
}

/// One client id (SPEC §4): its requests in every LSG, numbered per LSG.
#[derive(Debug)]
pub struct ClientSession {
    cluster: Cluster,
    id: ClientId,
    sessions: Mutex<BTreeMap<LsgId, Arc<Session>>>,
}

impl ClientSession {
    pub fn id(&self) -> ClientId {
        self.id
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// A transaction; it begins at its first operation, in the LSG of that key.
    pub fn transaction(&self) -> Transaction<'_> {
        Transaction::new(self)
    }

    pub(crate) fn in_lsg(&self, lsg: LsgId) -> Arc<Session> {
        let mut sessions = match self.sessions.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        Arc::clone(
            sessions
                .entry(lsg)
                .or_insert_with(|| Arc::new(self.cluster.inner.endpoint.session_in(lsg, self.id))),
        )
    }
}
