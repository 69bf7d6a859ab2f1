//! Fault injection for tests and drills: drop, delay or randomly lose what goes to and from a
//! peer, per path.

use super::*;

/// Faults injected by tests and drills: everything to and from a peer can be dropped (per
/// path), delayed, or dropped at random. Applied to every frame, keep-alives included.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    active: Arc<AtomicBool>,
    state: Arc<Mutex<FaultState>>,
}

#[derive(Debug, Default)]
pub(super) struct FaultState {
    cut: BTreeMap<(EndpointId, Path), ()>,
    delay_ms: BTreeMap<EndpointId, u64>,
    drop_probability: BTreeMap<EndpointId, f64>,
    rng: Option<ChaCha8Rng>,
}

impl FaultInjector {
    pub(super) fn lock(&self) -> MutexGuard<'_, FaultState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn refresh(&self, s: &FaultState) {
        let any = !s.cut.is_empty() || !s.delay_ms.is_empty() || !s.drop_probability.is_empty();
        self.active.store(any, Ordering::Release);
    }

    /// Drops every frame to and from `peer` on `paths`.
    pub fn partition(&self, peer: EndpointId, paths: &[Path]) {
        let mut s = self.lock();
        for &p in paths {
            s.cut.insert((peer, p), ());
        }
        self.refresh(&s);
        info!(%peer, ?paths, "fault: partition");
    }

    pub fn heal(&self, peer: EndpointId, paths: &[Path]) {
        let mut s = self.lock();
        for &p in paths {
            s.cut.remove(&(peer, p));
        }
        self.refresh(&s);
        info!(%peer, ?paths, "fault: heal");
    }

    /// Delays every frame heard from `peer` by `delay_ms` (0 removes the delay; capped at an
    /// hour). Each frame is stamped on arrival and released at arrival + delay, in order, so
    /// the delay is added latency, not a per-frame pause.
    pub fn set_delay_ms(&self, peer: EndpointId, delay_ms: u64) {
        let delay_ms = delay_ms.min(FAULT_DELAY_MAX_MS);
        let mut s = self.lock();
        if delay_ms == 0 {
            s.delay_ms.remove(&peer);
        } else {
            s.delay_ms.insert(peer, delay_ms);
        }
        self.refresh(&s);
        info!(%peer, delay_ms, "fault: delay");
    }

    /// Drops this fraction of frames to and from `peer` (0 removes the fault).
    pub fn set_drop_probability(&self, peer: EndpointId, probability: f64, seed: u64) {
        let mut s = self.lock();
        if probability <= 0.0 {
            s.drop_probability.remove(&peer);
        } else {
            s.drop_probability.insert(peer, probability.min(1.0));
            s.rng = Some(ChaCha8Rng::seed_from_u64(seed));
        }
        self.refresh(&s);
        info!(%peer, probability, "fault: random drop");
    }

    pub fn clear(&self) {
        let mut s = self.lock();
        *s = FaultState::default();
        self.refresh(&s);
    }

    /// Whether this frame is lost; the fast path is one atomic load.
    pub(super) fn drops(&self, peer: EndpointId, path: Path) -> bool {
        if !self.active.load(Ordering::Acquire) {
            return false;
        }
        let mut s = self.lock();
        if s.cut.contains_key(&(peer, path)) {
            return true;
        }
        match (s.drop_probability.get(&peer).copied(), s.rng.as_mut()) {
            (Some(p), Some(rng)) => rng.random_bool(p),
            _ => false,
        }
    }

    /// Whether every frame on this path is cut (no randomness consumed).
    pub(super) fn is_cut(&self, peer: EndpointId, path: Path) -> bool {
        self.active.load(Ordering::Acquire) && self.lock().cut.contains_key(&(peer, path))
    }

    pub(super) fn delay(&self, peer: EndpointId) -> Option<Duration> {
        if !self.active.load(Ordering::Acquire) {
            return None;
        }
        self.lock()
            .delay_ms
            .get(&peer)
            .map(|ms| Duration::from_millis(*ms))
    }
}
