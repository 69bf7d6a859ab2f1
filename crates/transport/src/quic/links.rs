//! Links: dialling and accepting connections, the hellos on both lanes, the checks of the
//! peer's claim and incarnation, registering a link, and each link's readers and delay queue.

use super::*;

/// One lane's send stream, receive stream and decoder.
pub(super) type LaneStreams = (SendStream, RecvStream, FrameDecoder);

/// A connection whose hellos were exchanged on both lanes.
#[derive(Debug)]
pub(super) struct Lanes {
    conn: Connection,
    terms: LinkTerms,
    control: LaneStreams,
    bulk: LaneStreams,
}

impl Inner {
    pub(super) fn hello_frame(&self, path: Path) -> Bytes {
        let mut out = BytesMut::new();
        Frame::Hello(Hello {
            version: self.config.protocol_version,
            from: self.local(),
            path,
            incarnation: self.config.incarnation,
        })
        .encode(&mut out);
        out.freeze()
    }

    /// Reads a lane's first frame, which must be the peer's hello. The decoder is bounded to a
    /// hello and each read asks for no more than the hello's bytes still missing, so a peer
    /// that announces anything else is refused at its length prefix and nothing beyond the
    /// hello is buffered; the caller then gives the decoder the lane's bound.
    pub(super) async fn read_hello(
        recv: &mut RecvStream,
    ) -> Result<(Hello, FrameDecoder), LinkError> {
        let mut decoder = FrameDecoder::new(wire::HELLO_BODY_BYTES);
        loop {
            match decoder.next_frame()? {
                Some(Frame::Hello(h)) => return Ok((h, decoder)),
                Some(other) => {
                    return Err(LinkError::Handshake(format!(
                        "expected hello, found {other:?}"
                    )));
                }
                None => {}
            }
            let missing = wire::HELLO_FRAME_BYTES.saturating_sub(decoder.buffered_bytes());
            match recv.read_chunk(missing.max(1), true).await? {
                Some(chunk) => decoder.push(&chunk.bytes),
                None => return Err(LinkError::Finished),
            }
        }
    }

    /// The two lanes' hellos must agree on who is speaking, in which version and incarnation.
    pub(super) fn same_speaker(control: &Hello, bulk: &Hello) -> Result<(), LinkError> {
        let id = |h: &Hello| (h.from, h.version, h.incarnation);
        if id(control) != id(bulk) {
            return Err(LinkError::Handshake(format!(
                "bulk lane hello from {} (version {}, incarnation {}), control lane from {} ({}, {})",
                bulk.from,
                bulk.version,
                bulk.incarnation,
                control.from,
                control.version,
                control.incarnation
            )));
        }
        Ok(())
    }

    /// Whether `peer` is in this endpoint's cluster list (was given to `add_peer`).
    pub(super) fn in_cluster(&self, peer: EndpointId) -> bool {
        lock(&self.peers)
            .entries
            .get(&peer)
            .is_some_and(|e| e.addrs.is_some())
    }

    /// Whether a hello from `peer` may be answered: it is in the cluster list, or it is a
    /// client endpoint and this endpoint accepts clients (`accept_client` then bounds them).
    pub(super) fn admits(&self, peer: EndpointId) -> bool {
        self.in_cluster(peer) || (peer.is_client() && self.config.accept_clients)
    }

    /// Client endpoints accepted without being listed, known now.
    fn accepted_clients(peers: &Peers) -> usize {
        let clients = EndpointId::new(crate::addr::CLIENT_NODE, 0)
            ..=EndpointId::new(crate::addr::CLIENT_NODE, u16::MAX);
        peers
            .entries
            .range(clients)
            .filter(|(_, e)| e.accepted_client)
            .count()
    }

    /// Makes `peer` a known peer if it is a client endpoint that is not in the cluster list and
    /// this endpoint accepts clients, within `max_clients` (`TooManyClients` beyond it), and
    /// watches it on `path`. Called under the peers and detector locks when its link registers.
    fn accept_client(
        &self,
        peers: &mut Peers,
        detector: &mut FailureDetector,
        peer: EndpointId,
        path: Path,
    ) -> Result<(), LinkError> {
        if !peer.is_client() || !self.config.accept_clients {
            return Ok(());
        }
        match peers.entries.get(&peer) {
            Some(e) if e.addrs.is_some() => return Ok(()),
            Some(e) if e.accepted_client => {}
            _ => {
                admit_client(
                    self.local(),
                    peer,
                    Self::accepted_clients(peers),
                    self.config.max_clients,
                )?;
                peers.entries.entry(peer).or_default().accepted_client = true;
                info!(local = %self.local(), %peer, "client accepted without being listed");
            }
        }
        detector.add_peer(peer, &[path]);
        Ok(())
    }

    /// Whether one more unlisted client could be accepted now; checked before answering its
    /// hello, so a refusal comes before any lane is set up (`accept_client` checks again,
    /// atomically with registering).
    pub(super) fn refuse_client_beyond_limit(&self, peer: EndpointId) -> Result<(), LinkError> {
        if !peer.is_client() || !self.config.accept_clients {
            return Ok(());
        }
        let peers = lock(&self.peers);
        match peers.entries.get(&peer) {
            Some(e) if e.addrs.is_some() || e.accepted_client => Ok(()),
            _ => Ok(admit_client(
                self.local(),
                peer,
                Self::accepted_clients(&peers),
                self.config.max_clients,
            )?),
        }
    }

    /// Forgets a client accepted without being listed once it is down (or was never heard) and
    /// has no link left: its entry, the detector's watch and its stream numbers. Keeps the
    /// entries of unlisted clients within `max_clients` however many come and go.
    pub(super) fn forget_client_if_gone(&self, peer: EndpointId) {
        let mut peers = lock(&self.peers);
        // Lock order: peers, then detector; nothing takes them the other way.
        let mut detector = lock(&self.detector);
        let gone = peers
            .entries
            .get(&peer)
            .is_some_and(|e| e.accepted_client && e.links.is_empty())
            && !detector.status(peer).is_some_and(|s| s.up);
        if gone {
            peers.entries.remove(&peer);
            peers.streams.forget_peer(peer);
            detector.remove_peer(peer);
            debug!(local = %self.local(), %peer, "client forgotten: down and no link");
        }
    }

    /// Closes `conn` with the close code that says why, when the error is one we detected
    /// (bad frame, version, handshake, stale incarnation, a failed lane), and logs it; an
    /// error of the connection itself only ends the link.
    pub(super) fn close_for(
        &self,
        conn: &Connection,
        peer: Option<EndpointId>,
        path: Path,
        e: &LinkError,
    ) {
        let code = match e {
            LinkError::Frame(_) => close_code::BAD_FRAME,
            LinkError::Refused(HelloRefusal::Version(_)) => close_code::VERSION_REFUSED,
            LinkError::Refused(
                HelloRefusal::NotInCluster { .. } | HelloRefusal::TooManyClients { .. },
            )
            | LinkError::Handshake(_) => close_code::HANDSHAKE_FAILED,
            LinkError::Stale { .. } => close_code::STALE_INCARNATION,
            LinkError::Write(_) | LinkError::Read(_) | LinkError::Finished => {
                info!(local = %self.local(), ?peer, %path, "link ended: {e}");
                conn.close(
                    VarInt::from_u32(close_code::LANE_FAILED),
                    e.to_string().as_bytes(),
                );
                return;
            }
            LinkError::Connection(_) | LinkError::Connect(_) | LinkError::Replaced => {
                info!(local = %self.local(), ?peer, %path, "link ended: {e}");
                return;
            }
        };
        warn!(local = %self.local(), ?peer, %path, code, "closing connection: {e}");
        conn.close(VarInt::from_u32(code), e.to_string().as_bytes());
    }

    /// Refuses `incarnation` of a peer that lives with a newer one: a newer live link on any
    /// path (one whose connection is not closed yet) or the incarnation the detector has the
    /// peer up with (`up_with`).
    pub(super) fn check_not_stale(
        entry: Option<&PeerEntry>,
        up_with: Option<u64>,
        incarnation: u64,
    ) -> Result<(), LinkError> {
        let live = entry
            .into_iter()
            .flat_map(|e| e.links.values())
            .filter(|l| l.conn.close_reason().is_none())
            .map(|l| l.terms.incarnation)
            .chain(up_with)
            .max();
        match live {
            Some(live) if live > incarnation => Err(LinkError::Stale { incarnation, live }),
            _ => Ok(()),
        }
    }

    /// The incarnation the detector has `peer` up with, if it is up.
    pub(super) fn up_with(detector: &FailureDetector, peer: EndpointId) -> Option<u64> {
        detector
            .status(peer)
            .filter(|s| s.up)
            .and_then(|s| s.incarnation)
    }

    /// Whether a hello's incarnation is stale, checked before answering it (`register_link`
    /// checks again, atomically with registering).
    pub(super) fn refuse_stale(&self, hello: &Hello) -> Result<(), LinkError> {
        let peers = lock(&self.peers);
        let up_with = Self::up_with(&lock(&self.detector), hello.from);
        Self::check_not_stale(peers.entries.get(&hello.from), up_with, hello.incarnation)
    }

    /// Registers a link unless the peer lives with a newer incarnation (`check_not_stale`).
    /// Returns the links it replaces, or the refusal.
    pub(super) fn register_link(
        &self,
        peer: EndpointId,
        path: Path,
        link: Link,
    ) -> Result<Vec<Link>, LinkError> {
        let incarnation = link.terms.incarnation;
        let mut peers = lock(&self.peers);
        // Lock order: peers, then detector; nothing takes them the other way.
        let mut detector = lock(&self.detector);
        self.accept_client(&mut peers, &mut detector, peer, path)?;
        let entry = peers.entries.entry(peer).or_default();
        Self::check_not_stale(Some(entry), Self::up_with(&detector, peer), incarnation)?;
        link.current.store(true, Ordering::Release);
        let mut stale: Vec<Link> = entry.links.insert(path, link).into_iter().collect();
        // Links of an older incarnation on other paths belong to a process that is gone.
        let older: Vec<Path> = entry
            .links
            .iter()
            .filter(|(_, l)| l.terms.incarnation < incarnation)
            .map(|(p, _)| *p)
            .collect();
        stale.extend(older.iter().filter_map(|p| entry.links.remove(p)));
        for old in &stale {
            // Under the detector lock: none of its readers is telling the detector anything now.
            old.current.store(false, Ordering::Release);
        }
        drop(detector);
        Ok(stale)
    }

    /// Registers a ready link and runs it until a lane ends, a writer stops or it is replaced.
    pub(super) async fn run_link(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        lanes: Lanes,
    ) -> Result<(), LinkError> {
        let Lanes {
            conn,
            terms,
            control,
            bulk,
        } = lanes;
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let queue = Arc::new(SendQueue::new(&self.config.limits));
        let current = Arc::new(AtomicBool::new(false));
        let link = Link {
            conn: conn.clone(),
            queue: Arc::clone(&queue),
            generation,
            terms,
            current: Arc::clone(&current),
        };
        let stale = match self.register_link(peer, path, link) {
            Ok(stale) => stale,
            Err(e) => {
                self.forget_client_if_gone(peer);
                self.close_for(&conn, Some(peer), path, &e);
                return Err(e);
            }
        };
        for old in stale {
            old.queue.close();
            old.conn.close(
                VarInt::from_u32(close_code::REPLACED),
                b"replaced by a newer connection",
            );
        }
        info!(local = %self.local(), %peer, %path, version = terms.version, incarnation = terms.incarnation, "link established");
        let reader = LinkReader {
            peer,
            path,
            terms,
            conn: conn.clone(),
            current: Arc::clone(&current),
        };
        // The peer's hello was the first frame heard on this link.
        self.heard_on(&reader);
        self.detector_wake.notify_one();
        let span = |lane: &'static str| info_span!("writer", %peer, %path, lane);
        let mut control_writer = tokio::spawn(
            write_loop(control.0, Arc::clone(&queue), Lane::Control).instrument(span("control")),
        );
        let mut bulk_writer = tokio::spawn(
            write_loop(bulk.0, Arc::clone(&queue), Lane::Bulk).instrument(span("bulk")),
        );
        let this = Arc::clone(self);
        let bulk_link = reader.clone();
        let (mut bulk_recv, mut bulk_decoder) = (bulk.1, bulk.2);
        let mut bulk_reader = tokio::spawn(
            async move {
                this.read_loop(&bulk_link, &mut bulk_recv, &mut bulk_decoder)
                    .await
            }
            .instrument(info_span!("reader", %peer, %path, lane = "bulk")),
        );
        let (mut control_recv, mut control_decoder) = (control.1, control.2);
        // A writer ends when its stream fails, or with `Ok` once the queue is closed (the link
        // was replaced); either way the link is over.
        let ended = |r: Result<Result<(), LinkError>, tokio::task::JoinError>| {
            r.unwrap_or(Err(LinkError::Finished))
        };
        let result = tokio::select! {
            r = self.read_loop(&reader, &mut control_recv, &mut control_decoder) => r,
            r = &mut bulk_reader => ended(r),
            r = &mut control_writer => ended(r),
            r = &mut bulk_writer => ended(r),
        };
        bulk_reader.abort();
        control_writer.abort();
        bulk_writer.abort();
        queue.close();
        {
            let mut peers = lock(&self.peers);
            let _detector = lock(&self.detector);
            current.store(false, Ordering::Release);
            if let Some(entry) = peers.entries.get_mut(&peer)
                && entry
                    .links
                    .get(&path)
                    .is_some_and(|l| l.generation == generation)
            {
                entry.links.remove(&path);
            }
        }
        self.forget_client_if_gone(peer);
        if let Err(e) = &result {
            self.close_for(&conn, Some(peer), path, e);
        }
        result
    }

    /// Reads one lane: every chunk received is a sign of life (a large frame still arriving
    /// keeps its peer up), then its whole frames are handled in order, as long as the link is
    /// still the registered one.
    pub(super) async fn read_loop(
        self: &Arc<Self>,
        link: &LinkReader,
        recv: &mut RecvStream,
        decoder: &mut FrameDecoder,
    ) -> Result<(), LinkError> {
        let (peer, path) = (link.peer, link.path);
        // Created at the first delayed frame; from then on every frame of the lane goes
        // through it, so delayed and undelayed frames keep their order, and liveness is heard
        // when frames are released.
        let mut delayed: Option<(mpsc::UnboundedSender<Delayed>, Arc<Semaphore>)> = None;
        // A large frame arrives in thousands of packet-sized chunks: the detector hears the
        // lane at most once per `HEAR_EVERY`, which is far below any detection time.
        let mut last_heard: Option<Instant> = None;
        loop {
            while let Some(frame) = decoder.next_frame()? {
                if !link.current.load(Ordering::Acquire) {
                    return Err(LinkError::Replaced);
                }
                if self.faults.drops(peer, path) {
                    debug!(%peer, %path, "fault: frame dropped on receive");
                    continue;
                }
                let delay = self.faults.delay(peer);
                if delay.is_none() && delayed.is_none() {
                    if self.on_frame(link, frame).await? {
                        // It waited for the application: the frames after it are news again.
                        self.heard_on(link);
                    }
                    continue;
                }
                let release = tokio::time::Instant::now() + delay.unwrap_or_default();
                let (queue, budget) =
                    delayed.get_or_insert_with(|| self.spawn_delay_queue(link.clone()));
                let limit = self
                    .config
                    .limits
                    .delay_queue_bytes
                    .clamp(1, u32::MAX as usize);
                let size = u32::try_from(frame.encoded_len().min(limit)).unwrap_or(u32::MAX);
                let Ok(permit) = Arc::clone(budget).acquire_many_owned(size).await else {
                    return Err(LinkError::Finished);
                };
                if queue.send((release, frame, permit)).is_err() {
                    // The delay queue only stops once its link is over.
                    return Err(LinkError::Connection(link.conn.closed().await));
                }
            }
            match recv.read_chunk(READ_CHUNK_BYTES, true).await? {
                Some(chunk) => {
                    let delaying = delayed.is_some() || self.faults.delay(peer).is_some();
                    let due = last_heard.is_none_or(|t| t.elapsed() >= HEAR_EVERY);
                    if due && !delaying && !self.faults.is_cut(peer, path) {
                        self.heard_on(link);
                        last_heard = Some(Instant::now());
                    }
                    decoder.push(&chunk.bytes);
                }
                None => return Err(LinkError::Finished),
            }
        }
    }

    /// The injected-delay queue of one lane: frames stamped with their release time on arrival
    /// are handled in arrival order, each at its release time, so a delay adds latency once
    /// instead of accumulating per frame. Bounded by `Limits::delay_queue_bytes`: the reader
    /// waits for budget, which a frame returns once handled.
    pub(super) fn spawn_delay_queue(
        self: &Arc<Self>,
        link: LinkReader,
    ) -> (mpsc::UnboundedSender<Delayed>, Arc<Semaphore>) {
        let budget = Arc::new(Semaphore::new(
            self.config
                .limits
                .delay_queue_bytes
                .clamp(1, Semaphore::MAX_PERMITS),
        ));
        let (tx, mut rx) = mpsc::unbounded_channel::<Delayed>();
        let this = Arc::clone(self);
        let span = info_span!("delay", peer = %link.peer, path = %link.path);
        tokio::spawn(
            async move {
                while let Some((release, frame, permit)) = rx.recv().await {
                    tokio::time::sleep_until(release).await;
                    if !link.current.load(Ordering::Acquire) {
                        return;
                    }
                    this.heard_on(&link);
                    let handled = this.on_frame(&link, frame).await;
                    drop(permit);
                    if let Err(e) = handled {
                        this.close_for(&link.conn, Some(link.peer), link.path, &e);
                        return;
                    }
                }
            }
            .instrument(span),
        );
        (tx, budget)
    }

    /// Handles one frame the detector has already heard (liveness comes before anything that
    /// may wait on the application). Returns whether it waited for room in the event queue.
    pub(super) async fn on_frame(
        &self,
        link: &LinkReader,
        frame: Frame,
    ) -> Result<bool, LinkError> {
        let from = link.peer;
        let incarnation = link.terms.incarnation;
        let event = match received(from, incarnation, frame) {
            Received::KeepAlive => None,
            Received::Hello => {
                return Err(LinkError::Handshake(
                    "second hello on an established link".into(),
                ));
            }
            Received::Deliver(event) => Some(event),
            Received::Response { id, payload } => {
                match lock(&self.requests).on_response(from, incarnation, id, payload) {
                    ResponseOutcome::Deliver(event) => Some(event),
                    ResponseOutcome::Completed => None,
                    ResponseOutcome::WrongPeer { expected } => {
                        warn!(local = %self.local(), peer = %from, id, %expected,
                            "response from a peer the request did not go to: ignored");
                        None
                    }
                    ResponseOutcome::NotPending => {
                        debug!(peer = %from, id, "late response dropped");
                        None
                    }
                }
            }
        };
        match event {
            Some(event) => self.push_data_event(link, event).await,
            None => Ok(false),
        }
    }

    pub(super) async fn accept_loop(self: Arc<Self>, path: Path, endpoint: quinn::Endpoint) {
        loop {
            let incoming = tokio::select! {
                i = endpoint.accept() => i,
                _ = self.shutdown.notified() => return,
            };
            let Some(incoming) = incoming else { return };
            let remote = incoming.remote_address();
            let Ok(permit) = Arc::clone(&self.handshakes).try_acquire_owned() else {
                warn!(local = %self.local(), %path, %remote,
                    limit = self.config.max_incoming_handshakes,
                    "refused incoming connection: too many handshakes in progress");
                incoming.refuse();
                continue;
            };
            let this = Arc::clone(&self);
            tokio::spawn(
                async move {
                    let accepted = this.accept_handshake(path, incoming).await;
                    drop(permit);
                    match accepted {
                        // How the link ended was logged when it ended (`close_for`).
                        Ok((peer, lanes)) => {
                            let _ = this.run_link(peer, path, lanes).await;
                        }
                        Err(e) => {
                            warn!(local = %this.local(), %path, %remote, "refused incoming connection: {e}");
                        }
                    }
                }
                .instrument(info_span!("accept", %path, %remote)),
            );
        }
    }

    /// The hello's claimed endpoint must belong to the identity of the client certificate that
    /// authenticated the connection (`verify_claimed_node`): a node may claim any of its own
    /// CPUs, no other node and no client endpoint; a client certificate only client endpoints.
    pub(super) fn check_claim(conn: &Connection, claimed: EndpointId) -> Result<(), LinkError> {
        let refuse = |why: String| {
            LinkError::Handshake(format!("hello claims endpoint {claimed}, refused: {why}"))
        };
        let identity = conn
            .peer_identity()
            .ok_or_else(|| refuse("no client certificate".into()))?;
        let chain = identity
            .downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
            .map_err(|_| refuse("peer identity is not a certificate chain".into()))?;
        let leaf = chain
            .first()
            .ok_or_else(|| refuse("empty client certificate chain".into()))?;
        verify_claimed_node(leaf, claimed.node).map_err(refuse)
    }

    /// The acceptor's side of a handshake: TLS, then on each lane the dialer's hello and ours.
    pub(super) async fn accept_handshake(
        self: &Arc<Self>,
        path: Path,
        incoming: quinn::Incoming,
    ) -> Result<(EndpointId, Lanes), LinkError> {
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let handshake = async {
            let conn = incoming.await?;
            let checked = async {
                let (send, mut recv) = conn.accept_bi().await?;
                let (hello, mut decoder) = Self::read_hello(&mut recv).await?;
                decoder.set_max_frame_bytes(CONTROL_FRAME_MAX_BYTES);
                let terms = accept_hello(
                    self.local(),
                    self.config.protocol_version,
                    &hello,
                    self.admits(hello.from),
                )?;
                Self::check_claim(&conn, hello.from)?;
                self.refuse_client_beyond_limit(hello.from)?;
                self.refuse_stale(&hello)?;
                let mut control = (send, recv, decoder);
                control.0.write_all(&self.hello_frame(path)).await?;
                let (mut send, mut recv) = conn.accept_bi().await?;
                let (bulk_hello, mut decoder) = Self::read_hello(&mut recv).await?;
                Self::same_speaker(&hello, &bulk_hello)?;
                decoder.set_max_frame_bytes(self.config.limits.frame_bytes());
                send.write_all(&self.hello_frame(path)).await?;
                // Both hellos are in: the link may now use its full receive window.
                conn.set_receive_window(VarInt::from_u32(CONNECTION_WINDOW_BYTES));
                if hello.path != path {
                    debug!(peer = %hello.from, said = %hello.path, %path, "hello names another path; using the socket's");
                }
                Ok((
                    hello.from,
                    terms,
                    control,
                    (send, recv, decoder),
                ))
            }
            .await;
            match checked {
                Ok((peer, terms, control, bulk)) => Ok((
                    peer,
                    Lanes {
                        conn,
                        terms,
                        control,
                        bulk,
                    },
                )),
                Err(e) => {
                    self.close_for(&conn, None, path, &e);
                    Err(e)
                }
            }
        };
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
            })?
    }

    /// The dialer's side of a handshake: TLS, then on each lane our hello and the acceptor's.
    pub(super) async fn connect_once(
        self: &Arc<Self>,
        peer: EndpointId,
        path: Path,
        addr: SocketAddr,
    ) -> Result<(), LinkError> {
        let endpoint = self
            .endpoints
            .get(&path)
            .or_else(|| self.endpoints.get(&Path::Main));
        let Some(endpoint) = endpoint else {
            return Err(LinkError::Handshake("no local endpoint".into()));
        };
        let timeout = Duration::from_millis(self.config.handshake_timeout_ms);
        let handshake = async {
            let conn = endpoint
                .connect_with(
                    self.client_config.clone(),
                    addr,
                    &node_server_name(peer.node),
                )?
                .await?;
            let lanes = async {
                let mut terms = None;
                let mut hellos: Vec<Hello> = Vec::with_capacity(2);
                let mut lanes = Vec::with_capacity(2);
                for (lane, max_frame) in [
                    (Lane::Control, CONTROL_FRAME_MAX_BYTES),
                    (Lane::Bulk, self.config.limits.frame_bytes()),
                ] {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(&self.hello_frame(path)).await?;
                    let (hello, mut decoder) = Self::read_hello(&mut recv).await?;
                    decoder.set_max_frame_bytes(max_frame);
                    if hello.from != peer {
                        return Err(LinkError::Handshake(format!(
                            "dialled {peer} at {addr}, found {} on the {lane:?} lane",
                            hello.from
                        )));
                    }
                    // Refused on the lane that shows it, before another lane is opened.
                    terms = Some(accept_hello(
                        self.local(),
                        self.config.protocol_version,
                        &hello,
                        true,
                    )?);
                    if let Some(first) = hellos.first() {
                        Self::same_speaker(first, &hello)?;
                    }
                    hellos.push(hello);
                    lanes.push((send, recv, decoder));
                }
                let bulk = lanes.pop();
                let control = lanes.pop();
                let (Some(terms), Some(control), Some(bulk)) = (terms, control, bulk) else {
                    return Err(LinkError::Handshake("lanes not opened".into()));
                };
                // Both hellos are in: the link may now use its full receive window.
                conn.set_receive_window(VarInt::from_u32(CONNECTION_WINDOW_BYTES));
                Ok((terms, control, bulk))
            }
            .await;
            match lanes {
                Ok((terms, control, bulk)) => Ok(Lanes {
                    conn,
                    terms,
                    control,
                    bulk,
                }),
                Err(e) => {
                    self.close_for(&conn, Some(peer), path, &e);
                    Err(e)
                }
            }
        };
        let lanes = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| {
                LinkError::Handshake(format!("no hello within {} ms", timeout.as_millis()))
            })??;
        self.run_link(peer, path, lanes).await
    }

    /// Keeps one connection to `peer` on `path` alive: dial its current address, run, redial
    /// with capped backoff.
    pub(super) async fn dial_loop(self: Arc<Self>, peer: EndpointId, path: Path) {
        let min = self.config.reconnect_backoff_min_ms.max(1);
        let max = self.config.reconnect_backoff_max_ms.max(min);
        let mut backoff_ms = min;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let addr = lock(&self.peers)
                .entries
                .get(&peer)
                .and_then(|e| e.addrs)
                .and_then(|a| a.get(path));
            let started = Instant::now();
            // Refusals we detect (version, handshake, bad frame) were logged at warn when the
            // connection was closed; the rest (peer not there yet) is routine while redialling.
            if let Some(addr) = addr
                && let Err(e) = self.connect_once(peer, path, addr).await
            {
                debug!(local = %self.local(), %peer, %path, %addr, "dial failed: {e}");
            }
            // A session that lasted a while was a success: start the backoff again from the bottom.
            if started.elapsed() > Duration::from_millis(max) {
                backoff_ms = min;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
                _ = self.shutdown.notified() => return,
            }
            backoff_ms = (backoff_ms * 2).min(max);
        }
    }
}
