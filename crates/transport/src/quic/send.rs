//! The sending side: each link's bounded send queue (one budget per lane), the writer task that
//! batches a lane's frames into one write, and the endpoint's routing of messages, requests,
//! responses and stream frames onto a link.

use super::*;

/// Payloads up to this size are copied into the writer's batch buffer next to their header:
/// one copy is cheaper than one more chunk per frame; larger payloads go out without a copy.
pub(super) const COPY_PAYLOAD_MAX_BYTES: usize = 1024;

/// Frames one writer takes per batch.
pub(super) const BATCH_FRAMES_MAX: usize = 64;

/// A link's send queue: one deque and one byte budget per lane, so a full bulk lane never
/// refuses a control frame. Bytes count from `push` until the writer has handed them to quinn,
/// so a lane's queue and the batch being written together never exceed its budget (one frame
/// always fits an empty lane).
#[derive(Debug)]
pub(super) struct SendQueue {
    state: Mutex<SendQueueState>,
    control_ready: Notify,
    bulk_ready: Notify,
}

#[derive(Debug)]
pub(super) struct LaneQueue {
    frames: VecDeque<Frame>,
    queued_bytes: usize,
    max_bytes: usize,
}

impl LaneQueue {
    pub(super) fn new(max_bytes: usize) -> Self {
        LaneQueue {
            frames: VecDeque::new(),
            queued_bytes: 0,
            max_bytes,
        }
    }
}

#[derive(Debug)]
pub(super) struct SendQueueState {
    control: LaneQueue,
    bulk: LaneQueue,
    closed: bool,
}

impl SendQueueState {
    pub(super) fn lane(&mut self, lane: Lane) -> &mut LaneQueue {
        match lane {
            Lane::Control => &mut self.control,
            Lane::Bulk => &mut self.bulk,
        }
    }
}

/// Why a frame was not queued.
#[derive(Debug)]
pub(super) enum PushError {
    Full { limit_bytes: usize },
    Closed,
}

impl SendQueue {
    pub(super) fn new(limits: &Limits) -> Self {
        SendQueue {
            state: Mutex::new(SendQueueState {
                control: LaneQueue::new(limits.control_queue_bytes),
                bulk: LaneQueue::new(limits.bulk_queue_bytes),
                closed: false,
            }),
            control_ready: Notify::new(),
            bulk_ready: Notify::new(),
        }
    }

    pub(super) fn ready(&self, lane: Lane) -> &Notify {
        match lane {
            Lane::Control => &self.control_ready,
            Lane::Bulk => &self.bulk_ready,
        }
    }

    pub(super) fn push(&self, frame: Frame) -> Result<(), PushError> {
        let lane = frame.lane();
        let size = frame.encoded_len();
        {
            let mut s = lock(&self.state);
            if s.closed {
                return Err(PushError::Closed);
            }
            let q = s.lane(lane);
            if q.queued_bytes > 0 && q.queued_bytes + size > q.max_bytes {
                return Err(PushError::Full {
                    limit_bytes: q.max_bytes,
                });
            }
            q.queued_bytes += size;
            q.frames.push_back(frame);
        }
        self.ready(lane).notify_one();
        Ok(())
    }

    /// Moves up to `BATCH_FRAMES_MAX` frames of `lane` into `batch`, waiting for one; `false`
    /// once the link is closed.
    pub(super) async fn take_batch(&self, lane: Lane, batch: &mut Vec<Frame>) -> bool {
        loop {
            {
                let mut s = lock(&self.state);
                if s.closed {
                    return false;
                }
                let q = s.lane(lane);
                let n = q.frames.len().min(BATCH_FRAMES_MAX);
                if n > 0 {
                    batch.extend(q.frames.drain(..n));
                    return true;
                }
            }
            self.ready(lane).notified().await;
        }
    }

    /// The writer of `lane` handed `bytes` to quinn: they leave the lane's budget.
    pub(super) fn written(&self, lane: Lane, bytes: usize) {
        let mut s = lock(&self.state);
        let q = s.lane(lane);
        q.queued_bytes = q.queued_bytes.saturating_sub(bytes);
    }

    pub(super) fn close(&self) {
        {
            let mut s = lock(&self.state);
            s.closed = true;
            for lane in [Lane::Control, Lane::Bulk] {
                let q = s.lane(lane);
                q.frames.clear();
                q.queued_bytes = 0;
            }
        }
        self.control_ready.notify_one();
        self.bulk_ready.notify_one();
    }

    /// Bytes queued on both lanes.
    pub(super) fn queued_bytes(&self) -> usize {
        let s = lock(&self.state);
        s.control.queued_bytes + s.bulk.queued_bytes
    }
}

/// Writes whatever is queued on one lane in one batch: one wake-up per batch, not per frame.
/// Headers and small payloads are encoded back to back into one buffer (one allocation per
/// batch). The control lane goes before the bulk lane in quinn's scheduling. Ends with `Ok`
/// once the queue is closed, with the error once the stream fails (which ends the link).
pub(super) async fn write_loop(
    mut send: SendStream,
    queue: Arc<SendQueue>,
    lane: Lane,
) -> Result<(), LinkError> {
    let priority = match lane {
        Lane::Control => 1,
        Lane::Bulk => 0,
    };
    send.set_priority(priority)
        .map_err(|e| LinkError::Write(e.into()))?;
    let mut batch = Vec::with_capacity(BATCH_FRAMES_MAX);
    let mut chunks: Vec<Bytes> = Vec::with_capacity(BATCH_FRAMES_MAX * 2);
    while queue.take_batch(lane, &mut batch).await {
        let mut bytes = 0;
        let size: usize = batch
            .iter()
            .map(|f| match f.payload().len() {
                n if n <= COPY_PAYLOAD_MAX_BYTES => f.encoded_len(),
                _ => FRAME_HEADER_MAX_BYTES + wire::LENGTH_PREFIX_BYTES,
            })
            .sum();
        let mut buf = BytesMut::with_capacity(size);
        for frame in batch.drain(..) {
            bytes += frame.encoded_len();
            if frame.payload().len() <= COPY_PAYLOAD_MAX_BYTES {
                frame.encode(&mut buf);
                continue;
            }
            frame.encode_header(&mut buf);
            chunks.push(buf.split().freeze());
            chunks.push(frame.into_payload());
        }
        if !buf.is_empty() {
            chunks.push(buf.freeze());
        }
        let written = send.write_all_chunks(&mut chunks).await;
        queue.written(lane, bytes);
        written?;
        chunks.clear();
    }
    Ok(())
}

impl Inner {
    /// Queues a frame for the link's writer, which encodes it (no allocation per frame here).
    pub(super) fn enqueue(
        &self,
        to: EndpointId,
        link: &Link,
        path: Path,
        frame: Frame,
    ) -> Result<(), TransportError> {
        if self.faults.drops(to, path) {
            debug!(peer = %to, %path, "fault: frame dropped on send");
            return Ok(());
        }
        link.queue.push(frame).map_err(|e| match e {
            PushError::Full { limit_bytes } => TransportError::QueueFull {
                peer: to,
                limit_bytes,
            },
            PushError::Closed => TransportError::Unreachable { peer: to },
        })
    }

    /// Refuses early what can never be sent: a closed endpoint or an oversized payload.
    pub(super) fn check_sendable(&self, to: EndpointId, size: usize) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed {
                local: self.local(),
            });
        }
        self.config.limits.check_payload(to, size)
    }

    pub(super) fn unknown_peer(&self, peer: EndpointId) -> TransportError {
        TransportError::UnknownPeer {
            local: self.local(),
            peer,
        }
    }

    /// The path and link data to `to` takes (`core::choose_path`).
    pub(super) fn route<'a>(
        &self,
        to: EndpointId,
        entry: &'a PeerEntry,
    ) -> Result<(Path, &'a Link), TransportError> {
        choose_path(&entry.paths_up, |p| entry.links.contains_key(&p))
            .and_then(|p| entry.links.get(&p).map(|l| (p, l)))
            .ok_or(TransportError::Unreachable { peer: to })
    }

    pub(super) fn send_frame(&self, to: EndpointId, frame: Frame) -> Result<(), TransportError> {
        self.check_sendable(to, frame.payload().len())?;
        // Queued under the peers lock: one lock per send, no clone of the link.
        let peers = lock(&self.peers);
        let entry = peers
            .entries
            .get(&to)
            .ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self.route(to, entry)?;
        self.enqueue(to, link, path, frame)
    }

    /// Queues an answer on the link to the requester's incarnation; drops it if the link speaks
    /// for another incarnation (the requester restarted: the answer could only meet a new
    /// request that reused the id).
    pub(super) fn respond(
        &self,
        to: EndpointId,
        id: RequestId,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        self.check_sendable(to, payload.len())?;
        let peers = lock(&self.peers);
        let entry = peers
            .entries
            .get(&to)
            .ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self.route(to, entry)?;
        if link.terms.incarnation != id.requester_incarnation {
            debug!(local = %self.local(), peer = %to, id = id.id,
                asked_by = id.requester_incarnation, now = link.terms.incarnation,
                "response dropped: the requester restarted");
            return Ok(());
        }
        self.enqueue(to, link, path, Frame::Response { id: id.id, payload })
    }

    /// Numbers and queues a stream frame in one critical section (the peers lock), so numbers
    /// follow queue order and a refused frame consumes no number.
    pub(super) fn stream_send(
        &self,
        to: EndpointId,
        stream: StreamId,
        payload: Bytes,
    ) -> Result<u64, TransportError> {
        self.check_sendable(to, payload.len())?;
        let mut peers = lock(&self.peers);
        let Peers { entries, streams } = &mut *peers;
        let entry = entries.get(&to).ok_or_else(|| self.unknown_peer(to))?;
        let (path, link) = self.route(to, entry)?;
        streams.send(to, stream, |seq| {
            self.enqueue(
                to,
                link,
                path,
                Frame::Stream {
                    stream,
                    seq,
                    payload,
                },
            )
        })
    }

    /// Sends request `id`, whose waiter is registered; forgets the waiter if it cannot be sent.
    pub(super) fn send_request(
        &self,
        to: EndpointId,
        id: u64,
        timeout_ms: u32,
        payload: Bytes,
    ) -> Result<(), TransportError> {
        let sent = self.send_frame(
            to,
            Frame::Request {
                id,
                timeout_ms,
                payload,
            },
        );
        if sent.is_err() {
            lock(&self.requests).forget(id);
        }
        sent
    }
}
