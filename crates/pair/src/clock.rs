//! The time boundary. Cores never read a clock: every event carries `now`, a `Duration` since a
//! driver-chosen origin. Drivers read it from a [`Clock`]: [`MonotonicClock`] in a process,
//! [`VirtualClock`] in a simulation, where only the scheduler moves time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A source of monotonic time since an origin.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Duration;
}

/// Real time since the clock was made.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    pub fn new() -> Self {
        MonotonicClock {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

/// Time that moves only when its owner advances it. Clones share one time.
#[derive(Debug, Clone, Default)]
pub struct VirtualClock {
    micros: Arc<AtomicU64>,
}

impl VirtualClock {
    pub fn new() -> Self {
        Self::default()
    }

    /// Moves time forward to `to`; time never goes back, so an earlier `to` is ignored.
    pub fn advance_to(&self, to: Duration) {
        let to = u64::try_from(to.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_max(to, Ordering::SeqCst);
    }
}

impl Clock for VirtualClock {
    fn now(&self) -> Duration {
        Duration::from_micros(self.micros.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtual_time_moves_only_forward_and_only_when_advanced() {
        let clock = VirtualClock::new();
        let other = clock.clone();
        assert_eq!(clock.now(), Duration::ZERO);
        clock.advance_to(Duration::from_millis(5));
        assert_eq!(other.now(), Duration::from_millis(5));
        clock.advance_to(Duration::from_millis(3));
        assert_eq!(other.now(), Duration::from_millis(5));
    }

    #[test]
    fn monotonic_time_does_not_go_back() {
        let clock = MonotonicClock::new();
        let a = clock.now();
        let b = clock.now();
        assert!(b >= a);
    }
}
