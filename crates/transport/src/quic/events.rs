//! The receiving side's hand-off to the application and the failure detector: the event queue
//! (control events first, data events bounded), what the readers hear, and the detector's timer
//! task.

use super::*;

impl Inner {
    /// Queues a peer event or a request failure; never waits.
    pub(super) fn push_control(&self, event: Event) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let coalesced = lock(&self.events).push_control(event);
        if let Some(old) = coalesced {
            warn!(local = %self.local(), ?old, "application not draining events: peer event coalesced");
        }
        self.event_ready.notify_one();
    }

    /// The next queued event; a read request failure frees its request slot, a data event
    /// makes room for a waiting reader.
    pub(super) fn pop_event(&self) -> Option<Event> {
        let event = lock(&self.events).pop()?;
        match &event {
            Event::RequestFailed { .. } => lock(&self.requests).failure_read(),
            Event::Peer(_) | Event::LocalStall { .. } => {}
            // One event's room for one waiting reader: waking them all for every event would
            // restart their waits at every pop.
            _ if self.readers_waiting.load(Ordering::Acquire) > 0 => {
                self.event_room.notify_one();
            }
            _ => {}
        }
        Some(event)
    }

    /// Hands a data event to the application, waiting while its queue is full (the reader then
    /// stops reading and QUIC flow control slows the sender). While waiting, packets still
    /// arriving on the connection prove the peer alive, so the detector keeps hearing it (every
    /// keep-alive interval, on one timer that room for other readers does not restart). A link
    /// that is replaced or whose connection closes meanwhile drops the event and ends: a dead
    /// incarnation's frames are never delivered after its successor took over (a dropped
    /// response fails its request instead). Returns whether it had to wait.
    pub(super) async fn push_data_event(
        &self,
        link: &LinkReader,
        event: Event,
    ) -> Result<bool, LinkError> {
        let mut event = match lock(&self.events).push_data(event) {
            Ok(()) => {
                self.event_ready.notify_one();
                return Ok(false);
            }
            Err(QueueFull(event)) => event,
        };
        let (peer, path) = (link.peer, link.path);
        debug!(local = %self.local(), %peer, %path, "event queue full: reader waits for the application");
        let interval = Duration::from_millis(self.config.detector.keepalive_interval_ms.max(1));
        let mut sign_of_life =
            tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        sign_of_life.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = link.conn.stats().udp_rx.datagrams;
        let _waiting = WaitingReader::new(&self.readers_waiting);
        loop {
            let room = self.event_room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.closed.load(Ordering::Acquire) {
                debug!(local = %self.local(), "event dropped: endpoint closed");
                return Ok(true);
            }
            if !link.current.load(Ordering::Acquire) {
                self.event_lost(event, "its link was replaced while it waited");
                return Err(LinkError::Replaced);
            }
            match lock(&self.events).push_data(event) {
                Ok(()) => {
                    self.event_ready.notify_one();
                    return Ok(true);
                }
                Err(QueueFull(back)) => event = back,
            }
            tokio::select! {
                _ = room => {}
                _ = sign_of_life.tick() => {
                    let now_seen = link.conn.stats().udp_rx.datagrams;
                    if now_seen != seen && !self.faults.is_cut(peer, path) {
                        self.heard_on(link);
                    }
                    seen = now_seen;
                }
                reason = link.conn.closed() => {
                    self.event_lost(event, "its connection closed while it waited");
                    return Err(LinkError::Connection(reason));
                }
            }
        }
    }

    /// A data event a dead link's reader held is dropped; a response fails its request.
    pub(super) fn event_lost(&self, event: Event, reason: &'static str) {
        debug!(local = %self.local(), ?event, "event dropped: {reason}");
        if let Event::Response { from, id, .. } = event {
            let failed = lock(&self.requests).response_lost(from, id, reason);
            self.push_control(failed);
        }
    }

    /// Tells the detector bytes arrived on a link, if the link is still the registered one (a
    /// replaced link never speaks for its incarnation again), and carries out what that changed.
    pub(super) fn heard_on(&self, link: &LinkReader) {
        let changed = {
            let mut d = lock(&self.detector);
            if !link.current.load(Ordering::Acquire) {
                return;
            }
            d.on_heard(link.peer, link.path, link.terms.incarnation, self.now());
            d.has_actions()
        };
        if changed {
            self.run_detector_actions();
        }
    }

    /// Carries out what the detector asked for: keep-alives out, events to the control queue,
    /// the paths a reported peer is heard on to its entry. Never waits.
    pub(super) fn run_detector_actions(&self) {
        let _order = lock(&self.report_order);
        loop {
            let action = lock(&self.detector).poll_action();
            let Some(action) = action else { break };
            match action {
                DetectorAction::SendKeepAlive { peer, path } => {
                    let peers = lock(&self.peers);
                    let link = peers.entries.get(&peer).and_then(|e| e.links.get(&path));
                    if let Some(link) = link
                        && let Err(e) = self.enqueue(peer, link, path, Frame::KeepAlive)
                    {
                        debug!(%peer, %path, "keep-alive not queued: {e}");
                    }
                }
                DetectorAction::Report(event) => {
                    info!(local = %self.local(), ?event, "peer event");
                    let peer = event.peer();
                    {
                        // Lock order: peers, then detector; nothing takes them the other way.
                        let mut peers = lock(&self.peers);
                        let paths_up = lock(&self.detector)
                            .status(peer)
                            .map(|s| s.paths_up)
                            .unwrap_or_default();
                        // An entry is never made here: a forgotten client stays forgotten.
                        if let Some(entry) = peers.entries.get_mut(&peer) {
                            entry.paths_up = paths_up;
                        }
                    }
                    self.push_control(Event::Peer(event));
                    if let PeerEvent::Down { .. } = event {
                        self.forget_client_if_gone(peer);
                    }
                }
                DetectorAction::LocalStall { stalled } => {
                    let stalled_ms = u64::try_from(stalled.as_millis()).unwrap_or(u64::MAX);
                    let now_ms = u64::try_from(self.now().as_millis()).unwrap_or(u64::MAX);
                    let last = self.last_stall_warn_ms.load(Ordering::Acquire);
                    if last == u64::MAX || now_ms.saturating_sub(last) >= STALL_WARN_EVERY_MS {
                        self.last_stall_warn_ms.store(now_ms, Ordering::Release);
                        warn!(local = %self.local(), stalled_ms,
                            "this process did not run for a while: silence not counted against peers");
                    } else {
                        debug!(local = %self.local(), stalled_ms, "local stall");
                    }
                    self.push_control(Event::LocalStall { stalled_ms });
                }
            }
        }
    }

    pub(super) async fn detector_loop(self: Arc<Self>) {
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let now = self.now();
            lock(&self.detector).on_tick(now);
            self.run_detector_actions();
            let expired = lock(&self.requests).expire(now);
            for e in expired {
                self.push_control(e);
            }
            let next = lock(&self.detector).next_deadline();
            let next_request = lock(&self.requests).next_deadline();
            let wake_at = [next, next_request].into_iter().flatten().min();
            let sleep = wake_at.map_or(
                Duration::from_millis(self.config.detector.keepalive_interval_ms),
                |t| t.saturating_sub(self.now()),
            );
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.detector_wake.notified() => {}
                _ = self.shutdown.notified() => return,
            }
        }
    }
}
