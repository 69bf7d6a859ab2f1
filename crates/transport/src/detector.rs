//! Failure detection as a plain state machine: frames heard and clock ticks go in, keep-alives
//! to send and up/down events come out, and `now` is always passed in. The QUIC driver and the
//! simulated network both run this same code, so a detection bug shows up in simulation.
//!
//! Model (seed 001): every peer has a main path and maybe a failsafe path. Any frame heard on a
//! path proves that path alive; a path is down after `detection_time_ms` of silence. The peer is
//! down only when all its paths are down. A path that goes down or up while the peer stays up
//! is a link event, not a peer event: a cut main link is a link failure, not a node failure.
//! Peers start down and come up at the first frame heard.
//!
//! Sign of life: any bytes received from a path count, not only whole frames, so a peer that
//! sends one large frame slower than the detection time stays up (the drivers call `on_heard`
//! for every chunk read).
//!
//! Incarnations: every frame is heard with the sender's boot id (from its hello). A higher boot
//! id than the one a peer is up with means the peer restarted, however quickly: its old
//! incarnation is reported `Down` and the new one `Up`. A lower one is a stale frame of the old
//! process and is ignored while the peer is up; a peer that is down accepts any incarnation, so
//! a restarted process whose clock went backwards still comes up after one detection time.
//!
//! Local stalls: the driver ticks at least every keep-alive interval. A tick that comes much
//! later than that means this process did not run (a long sync, a paused VM); the silence that
//! piled up meanwhile says nothing about the peers, so every path's silence clock is moved
//! forward by the stall and the stall is reported to the driver (`DetectorAction::LocalStall`)
//! instead of declaring every peer down. Forgiveness is capped per silence episode (from the
//! last frame heard on a path): the first stall is forgiven in full, later ones only while the
//! episode's total stays within one detection time. So a runtime that is late at every tick
//! (ticks every `g`) still reports a dead peer within about `detection + max(g, detection) + g`
//! instead of never.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use crate::addr::{EndpointId, Path};

/// Timing of failure detection. Defaults suit loopback: down after 300 ms of silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// How often a keep-alive goes out on every path of every peer.
    pub keepalive_interval_ms: u64,
    /// Silence after which a path is declared down.
    pub detection_time_ms: u64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        DetectorConfig {
            keepalive_interval_ms: 50,
            detection_time_ms: 300,
        }
    }
}

impl DetectorConfig {
    /// A detection time with keep-alives six times as frequent, so that a few lost
    /// keep-alives never cause a false down.
    pub fn with_detection_time_ms(detection_time_ms: u64) -> Self {
        DetectorConfig {
            keepalive_interval_ms: (detection_time_ms / 6).max(1),
            detection_time_ms: detection_time_ms.max(1),
        }
    }
}

/// What the detector tells the rest of the system about a peer. `incarnation` is the peer
/// process's boot id the event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PeerEvent {
    /// The first path of a down peer was heard, or a new incarnation of an up peer.
    Up { peer: EndpointId, incarnation: u64 },
    /// Every path of the peer has been silent for the detection time, or the peer restarted
    /// (then `incarnation` is the old one and an `Up` with the new one follows).
    Down { peer: EndpointId, incarnation: u64 },
    /// One path went silent while another still hears the peer: a link failure.
    LinkDown {
        peer: EndpointId,
        path: Path,
        incarnation: u64,
    },
    /// A path came back while the peer was up.
    LinkUp {
        peer: EndpointId,
        path: Path,
        incarnation: u64,
    },
}

impl PeerEvent {
    /// The peer the event is about.
    pub fn peer(&self) -> EndpointId {
        match *self {
            PeerEvent::Up { peer, .. }
            | PeerEvent::Down { peer, .. }
            | PeerEvent::LinkDown { peer, .. }
            | PeerEvent::LinkUp { peer, .. } => peer,
        }
    }

    /// The incarnation of the peer the event is about.
    pub fn incarnation(&self) -> u64 {
        match *self {
            PeerEvent::Up { incarnation, .. }
            | PeerEvent::Down { incarnation, .. }
            | PeerEvent::LinkDown { incarnation, .. }
            | PeerEvent::LinkUp { incarnation, .. } => incarnation,
        }
    }
}

/// What the driver must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetectorAction {
    SendKeepAlive {
        peer: EndpointId,
        path: Path,
    },
    Report(PeerEvent),
    /// This process did not tick for `stalled`: its silence was not counted against any peer.
    LocalStall {
        stalled: Duration,
    },
}

/// Bound on queued actions; a driver that stops polling cannot grow memory without limit.
pub const ACTION_QUEUE_MAX: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct PathState {
    last_heard: Option<Duration>,
    last_keepalive_sent: Option<Duration>,
    up: bool,
    /// Silence forgiven for local stalls since `last_heard` was last set by a frame; `None`
    /// before the first stall of this silence episode.
    forgiven: Option<Duration>,
}

#[derive(Debug, Clone)]
struct PeerState {
    paths: BTreeMap<Path, PathState>,
    up: bool,
    /// The incarnation last heard; `None` before the first frame.
    incarnation: Option<u64>,
}

/// The observed state of one peer, for status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub up: bool,
    /// The incarnation last heard, `None` before the first frame.
    pub incarnation: Option<u64>,
    pub paths_up: Vec<Path>,
}

/// Failure detection of every watched peer (see the module docs).
#[derive(Debug)]
pub struct FailureDetector {
    config: DetectorConfig,
    peers: BTreeMap<EndpointId, PeerState>,
    actions: VecDeque<DetectorAction>,
    /// When `on_tick` last ran, to tell a local stall from silent peers.
    last_tick: Option<Duration>,
}

impl FailureDetector {
    pub fn new(config: DetectorConfig) -> Self {
        FailureDetector {
            config,
            peers: BTreeMap::new(),
            actions: VecDeque::new(),
            last_tick: None,
        }
    }

    /// A gap between ticks beyond which the process is taken to have stalled: two keep-alive
    /// intervals (the driver ticks at least once per interval), at most half the detection time.
    fn stall_after(&self) -> Duration {
        let interval = self.config.keepalive_interval_ms.saturating_mul(2);
        Duration::from_millis(interval.min(self.config.detection_time_ms / 2).max(1))
    }

    pub fn config(&self) -> DetectorConfig {
        self.config
    }

    /// Starts watching a peer on the given paths. Watching a known peer again adds paths.
    pub fn add_peer(&mut self, peer: EndpointId, paths: &[Path]) {
        let state = self.peers.entry(peer).or_insert_with(|| PeerState {
            paths: BTreeMap::new(),
            up: false,
            incarnation: None,
        });
        for &path in paths {
            state.paths.entry(path).or_insert(PathState {
                last_heard: None,
                last_keepalive_sent: None,
                up: false,
                forgiven: None,
            });
        }
    }

    pub fn remove_peer(&mut self, peer: EndpointId) {
        self.peers.remove(&peer);
    }

    pub fn peers(&self) -> impl Iterator<Item = EndpointId> + '_ {
        self.peers.keys().copied()
    }

    pub fn status(&self, peer: EndpointId) -> Option<PeerStatus> {
        self.peers.get(&peer).map(|p| PeerStatus {
            up: p.up,
            incarnation: p.incarnation,
            paths_up: p
                .paths
                .iter()
                .filter(|(_, s)| s.up)
                .map(|(path, _)| *path)
                .collect(),
        })
    }

    /// Whether `path` to `peer` is up; `None` for a peer not watched. Cheap: no allocation,
    /// because the transports ask on every frame.
    pub fn path_up(&self, peer: EndpointId, path: Path) -> Option<bool> {
        self.peers
            .get(&peer)
            .map(|p| p.paths.get(&path).is_some_and(|s| s.up))
    }

    /// Queues an action within `ACTION_QUEUE_MAX`. On overflow the newest report of every peer
    /// survives: first an old keep-alive goes (they are periodic and idempotent), then the oldest
    /// report of the same peer (coalescing to its latest state); a new keep-alive is dropped
    /// rather than a report. With only one report per peer queued the queue may exceed the bound
    /// by at most the number of peers, which is itself bounded by the configuration.
    fn push(&mut self, action: DetectorAction) {
        if self.actions.len() >= ACTION_QUEUE_MAX {
            let victim = self
                .actions
                .iter()
                .position(|a| matches!(a, DetectorAction::SendKeepAlive { .. }))
                .or_else(|| match action {
                    DetectorAction::Report(new) => self.actions.iter().position(
                        |a| matches!(a, DetectorAction::Report(old) if old.peer() == new.peer()),
                    ),
                    DetectorAction::SendKeepAlive { .. } | DetectorAction::LocalStall { .. } => {
                        None
                    }
                });
            match (victim, action) {
                (Some(pos), _) => {
                    self.actions.remove(pos);
                }
                (
                    None,
                    DetectorAction::SendKeepAlive { .. } | DetectorAction::LocalStall { .. },
                ) => {
                    return;
                }
                (None, DetectorAction::Report(_)) => {}
            }
        }
        self.actions.push_back(action);
    }

    /// Bytes from incarnation `incarnation` of `peer` arrived on `path` (a whole frame or part
    /// of one). Unknown peers are watched from now on.
    pub fn on_heard(&mut self, peer: EndpointId, path: Path, incarnation: u64, now: Duration) {
        self.add_peer(peer, &[path]);
        let Some(state) = self.peers.get_mut(&peer) else {
            return;
        };
        let mut restarted = None;
        match state.incarnation {
            Some(current) if state.up && incarnation < current => return,
            Some(current) if state.up && incarnation > current => {
                state.up = false;
                for ps in state.paths.values_mut() {
                    ps.up = false;
                }
                restarted = Some(current);
            }
            _ => {}
        }
        state.incarnation = Some(incarnation);
        let Some(ps) = state.paths.get_mut(&path) else {
            return;
        };
        ps.last_heard = Some(now);
        ps.forgiven = None;
        if ps.up {
            return;
        }
        ps.up = true;
        let event = if state.up {
            PeerEvent::LinkUp {
                peer,
                path,
                incarnation,
            }
        } else {
            state.up = true;
            PeerEvent::Up { peer, incarnation }
        };
        if let Some(old) = restarted {
            self.push(DetectorAction::Report(PeerEvent::Down {
                peer,
                incarnation: old,
            }));
        }
        self.push(DetectorAction::Report(event));
    }

    /// Advances time: queues the keep-alives that are due and the paths and peers that fell silent.
    /// A tick much later than the previous one is a local stall: the silence it covers is not
    /// counted (every path's silence clock moves forward by the stall), within the cap per
    /// silence episode of the module docs.
    pub fn on_tick(&mut self, now: Duration) {
        let interval = Duration::from_millis(self.config.keepalive_interval_ms);
        let detection = Duration::from_millis(self.config.detection_time_ms);
        let mut out = Vec::new();
        let gap = self
            .last_tick
            .map_or(Duration::ZERO, |t| now.saturating_sub(t));
        self.last_tick = Some(now);
        if gap > self.stall_after() {
            let stalled = gap.saturating_sub(interval);
            for ps in self.peers.values_mut().flat_map(|s| s.paths.values_mut()) {
                let Some(t) = ps.last_heard else { continue };
                let allowed = match ps.forgiven {
                    None => stalled,
                    Some(f) => detection.saturating_sub(f).min(stalled),
                };
                let shifted = (t + allowed).min(now).max(t);
                ps.last_heard = Some(shifted);
                ps.forgiven = Some(ps.forgiven.unwrap_or_default() + (shifted - t));
            }
            out.push(DetectorAction::LocalStall { stalled });
        }
        for (&peer, state) in self.peers.iter_mut() {
            let incarnation = state.incarnation.unwrap_or_default();
            let mut went_down = Vec::new();
            for (&path, ps) in state.paths.iter_mut() {
                let due = ps.last_keepalive_sent.is_none_or(|t| now >= t + interval);
                if due {
                    ps.last_keepalive_sent = Some(now);
                    out.push(DetectorAction::SendKeepAlive { peer, path });
                }
                if ps.up && ps.last_heard.is_some_and(|t| now >= t + detection) {
                    ps.up = false;
                    went_down.push(path);
                }
            }
            if went_down.is_empty() {
                continue;
            }
            if state.up && state.paths.values().all(|p| !p.up) {
                state.up = false;
                out.push(DetectorAction::Report(PeerEvent::Down {
                    peer,
                    incarnation,
                }));
            } else if state.up {
                for path in went_down {
                    out.push(DetectorAction::Report(PeerEvent::LinkDown {
                        peer,
                        path,
                        incarnation,
                    }));
                }
            }
        }
        for a in out {
            self.push(a);
        }
    }

    /// Whether actions are waiting for `poll_action`.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// The next action the driver must carry out.
    pub fn poll_action(&mut self) -> Option<DetectorAction> {
        self.actions.pop_front()
    }

    /// When `on_tick` next has work to do: the next keep-alive or silence deadline.
    pub fn next_deadline(&self) -> Option<Duration> {
        let interval = Duration::from_millis(self.config.keepalive_interval_ms);
        let detection = Duration::from_millis(self.config.detection_time_ms);
        let mut next: Option<Duration> = None;
        for state in self.peers.values() {
            for ps in state.paths.values() {
                let keepalive = ps
                    .last_keepalive_sent
                    .map_or(Duration::ZERO, |t| t + interval);
                next = Some(next.map_or(keepalive, |n| n.min(keepalive)));
                if ps.up
                    && let Some(t) = ps.last_heard
                {
                    let silence = t + detection;
                    next = Some(next.map_or(silence, |n| n.min(silence)));
                }
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: EndpointId = EndpointId::new(1, 0);
    const INC: u64 = 7;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn events(d: &mut FailureDetector) -> Vec<PeerEvent> {
        let mut out = Vec::new();
        while let Some(a) = d.poll_action() {
            if let DetectorAction::Report(e) = a {
                out.push(e);
            }
        }
        out
    }

    fn detector() -> FailureDetector {
        let mut d = FailureDetector::new(DetectorConfig {
            keepalive_interval_ms: 50,
            detection_time_ms: 300,
        });
        d.add_peer(A, &Path::ALL);
        d
    }

    #[test]
    fn silent_peer_goes_down_after_detection_time_and_not_before() {
        let mut d = detector();
        d.on_heard(A, Path::Main, INC, ms(0));
        d.on_heard(A, Path::Failsafe, INC, ms(0));
        assert_eq!(
            events(&mut d),
            vec![
                PeerEvent::Up {
                    peer: A,
                    incarnation: INC
                },
                PeerEvent::LinkUp {
                    peer: A,
                    path: Path::Failsafe,
                    incarnation: INC,
                }
            ]
        );
        d.on_tick(ms(299));
        assert_eq!(events(&mut d), vec![]);
        d.on_tick(ms(300));
        assert_eq!(
            events(&mut d),
            vec![PeerEvent::Down {
                peer: A,
                incarnation: INC
            }]
        );
        assert_eq!(
            d.status(A),
            Some(PeerStatus {
                up: false,
                incarnation: Some(INC),
                paths_up: vec![]
            })
        );
    }

    #[test]
    fn main_cut_with_failsafe_alive_is_a_link_failure() {
        let mut d = detector();
        d.on_heard(A, Path::Main, INC, ms(0));
        d.on_heard(A, Path::Failsafe, INC, ms(0));
        events(&mut d);
        for t in (50..=1000).step_by(50) {
            d.on_heard(A, Path::Failsafe, INC, ms(t));
            d.on_tick(ms(t));
        }
        assert_eq!(
            events(&mut d),
            vec![PeerEvent::LinkDown {
                peer: A,
                path: Path::Main,
                incarnation: INC,
            }]
        );
        d.on_heard(A, Path::Main, INC, ms(1010));
        assert_eq!(
            events(&mut d),
            vec![PeerEvent::LinkUp {
                peer: A,
                path: Path::Main,
                incarnation: INC,
            }]
        );
        assert_eq!(
            d.status(A),
            Some(PeerStatus {
                up: true,
                incarnation: Some(INC),
                paths_up: vec![Path::Main, Path::Failsafe]
            })
        );
    }

    #[test]
    fn peer_comes_back_up_after_down() {
        let mut d = detector();
        d.on_heard(A, Path::Main, INC, ms(0));
        d.on_tick(ms(400));
        d.on_heard(A, Path::Main, INC, ms(500));
        assert_eq!(
            events(&mut d),
            vec![
                PeerEvent::Up {
                    peer: A,
                    incarnation: INC
                },
                PeerEvent::Down {
                    peer: A,
                    incarnation: INC
                },
                PeerEvent::Up {
                    peer: A,
                    incarnation: INC
                }
            ]
        );
    }

    #[test]
    fn keepalives_go_out_on_every_path_at_the_interval() {
        let mut d = detector();
        let mut sent = Vec::new();
        for t in (0..=200).step_by(10) {
            d.on_tick(ms(t));
            while let Some(a) = d.poll_action() {
                if let DetectorAction::SendKeepAlive { path, .. } = a {
                    sent.push((t, path));
                }
            }
        }
        let main: Vec<u64> = sent
            .iter()
            .filter(|(_, p)| *p == Path::Main)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(main, vec![0, 50, 100, 150, 200]);
        assert_eq!(sent.len(), 10);
    }

    #[test]
    fn next_deadline_covers_keepalive_and_silence() {
        let mut d = detector();
        assert_eq!(d.next_deadline(), Some(ms(0)));
        d.on_tick(ms(0));
        d.on_heard(A, Path::Main, INC, ms(10));
        assert_eq!(d.next_deadline(), Some(ms(50)));
        let mut t = ms(0);
        for _ in 0..100 {
            let Some(next) = d.next_deadline() else { break };
            t = next;
            d.on_tick(t);
            if events(&mut d).contains(&PeerEvent::Down {
                peer: A,
                incarnation: INC,
            }) {
                break;
            }
        }
        assert_eq!(t, ms(310));
    }

    #[test]
    fn action_queue_is_bounded() {
        let mut d = FailureDetector::new(DetectorConfig::default());
        for n in 0..(ACTION_QUEUE_MAX as u16) {
            d.add_peer(EndpointId::new(n, 0), &Path::ALL);
        }
        d.on_tick(ms(0));
        let mut count = 0;
        while d.poll_action().is_some() {
            count += 1;
        }
        assert_eq!(count, ACTION_QUEUE_MAX);
    }

    #[test]
    fn overflow_never_drops_the_latest_report_of_a_peer() {
        let mut d = FailureDetector::new(DetectorConfig::default());
        let peers = ACTION_QUEUE_MAX as u16 + 1;
        for n in 0..peers {
            d.on_heard(EndpointId::new(n, 0), Path::Main, INC, ms(0));
        }
        // Full of reports now: keep-alives due at this tick are the ones dropped.
        d.on_tick(ms(1));
        // Down then Up again for peer 0 while full: coalesced to its latest state.
        let p0 = EndpointId::new(0, 0);
        for t in (50..=400).step_by(50) {
            d.on_tick(ms(t));
        }
        d.on_heard(p0, Path::Main, INC, ms(401));
        let mut latest = BTreeMap::new();
        let mut count = 0;
        while let Some(a) = d.poll_action() {
            count += 1;
            if let DetectorAction::Report(e) = a {
                latest.insert(e.peer(), e);
            }
        }
        assert_eq!(latest.len(), usize::from(peers), "every peer kept a report");
        assert_eq!(
            latest.get(&p0),
            Some(&PeerEvent::Up {
                peer: p0,
                incarnation: INC
            })
        );
        let p1 = EndpointId::new(1, 0);
        assert_eq!(
            latest.get(&p1),
            Some(&PeerEvent::Down {
                peer: p1,
                incarnation: INC
            })
        );
        assert!(count <= ACTION_QUEUE_MAX + usize::from(peers), "{count}");
    }

    /// Ticks every keep-alive interval from `from` to `to` (inclusive), hearing A on main if
    /// `heard`.
    fn run(d: &mut FailureDetector, from: u64, to: u64, heard: bool) -> Vec<PeerEvent> {
        let mut out = Vec::new();
        for t in (from..=to).step_by(50) {
            if heard {
                d.on_heard(A, Path::Main, INC, ms(t));
            }
            d.on_tick(ms(t));
            out.extend(events(d));
        }
        out
    }

    #[test]
    fn a_late_tick_is_a_local_stall_not_silent_peers() {
        let mut d = FailureDetector::new(DetectorConfig::default());
        d.add_peer(A, &[Path::Main]);
        assert_eq!(
            run(&mut d, 0, 1000, true),
            vec![PeerEvent::Up {
                peer: A,
                incarnation: INC
            }]
        );
        // This process stalls for two seconds (a long sync): no tick, nothing read.
        d.on_tick(ms(3000));
        let mut stalls = Vec::new();
        while let Some(a) = d.poll_action() {
            match a {
                DetectorAction::LocalStall { stalled } => stalls.push(stalled),
                DetectorAction::Report(e) => panic!("reported {e:?} after a local stall"),
                DetectorAction::SendKeepAlive { .. } => {}
            }
        }
        assert_eq!(
            stalls,
            vec![ms(1950)],
            "the stall is reported with its length"
        );
        // The peer is heard again soon after the stall: it never went down.
        assert_eq!(run(&mut d, 3050, 4000, true), vec![]);
        // A peer that really is silent after the stall is still detected.
        let after = run(&mut d, 4050, 4400, false);
        assert_eq!(
            after,
            vec![PeerEvent::Down {
                peer: A,
                incarnation: INC
            }]
        );
    }

    #[test]
    fn a_peer_that_died_during_a_stall_is_down_one_detection_time_later() {
        let mut d = FailureDetector::new(DetectorConfig::default());
        d.add_peer(A, &[Path::Main]);
        run(&mut d, 0, 1000, true);
        d.on_tick(ms(3000));
        events(&mut d);
        let down = run(&mut d, 3050, 3300, false);
        assert_eq!(
            down,
            vec![PeerEvent::Down {
                peer: A,
                incarnation: INC
            }]
        );
    }

    #[test]
    fn a_quick_restart_is_a_new_incarnation() {
        let mut d = detector();
        d.on_heard(A, Path::Main, 1, ms(0));
        d.on_heard(A, Path::Failsafe, 1, ms(0));
        events(&mut d);
        // The process restarts within the detection time: its new hello carries boot id 2.
        d.on_heard(A, Path::Main, 2, ms(100));
        assert_eq!(
            events(&mut d),
            vec![
                PeerEvent::Down {
                    peer: A,
                    incarnation: 1
                },
                PeerEvent::Up {
                    peer: A,
                    incarnation: 2
                }
            ]
        );
        assert_eq!(
            d.status(A),
            Some(PeerStatus {
                up: true,
                incarnation: Some(2),
                paths_up: vec![Path::Main]
            }),
            "the old incarnation's other path is not taken for the new one"
        );
        // A late frame of the old process changes nothing.
        d.on_heard(A, Path::Failsafe, 1, ms(110));
        assert_eq!(events(&mut d), vec![]);
        d.on_heard(A, Path::Failsafe, 2, ms(120));
        assert_eq!(
            events(&mut d),
            vec![PeerEvent::LinkUp {
                peer: A,
                path: Path::Failsafe,
                incarnation: 2
            }]
        );
    }

    #[test]
    fn a_down_peer_comes_back_with_any_incarnation() {
        let mut d = detector();
        d.on_heard(A, Path::Main, 5, ms(0));
        d.on_tick(ms(400));
        d.on_heard(A, Path::Main, 3, ms(500));
        assert_eq!(
            events(&mut d),
            vec![
                PeerEvent::Up {
                    peer: A,
                    incarnation: 5
                },
                PeerEvent::Down {
                    peer: A,
                    incarnation: 5
                },
                PeerEvent::Up {
                    peer: A,
                    incarnation: 3
                }
            ]
        );
    }
}
