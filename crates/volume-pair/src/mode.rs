//! Lock modes of multiple-granularity locking (Gray et al., 1976), on two levels: the volume and
//! its keys. A point read takes IS on the volume and S on the key; a point write IX and X; a scan
//! S on the whole volume. So a scan conflicts with every writer of the volume (no phantoms)
//! and with no reader, and point operations on different keys never conflict.
//!
//! A transaction holds one mode per resource; asking for more converts it to the join of the two
//! (a writer that then scans holds SIX).

/// A lock mode. Declared from weakest to strongest; the order is not the lattice (IX and S are
/// incomparable), use [`LockMode::join`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockMode {
    /// IS: the holder reads some keys of the volume.
    IntentShared,
    /// IX: the holder writes some keys of the volume.
    IntentExclusive,
    /// S: the holder reads the key (or, on the volume, every key).
    Shared,
    /// SIX: the holder reads every key of the volume and writes some.
    SharedIntentExclusive,
    /// X: the holder writes the key.
    Exclusive,
}

use LockMode::{
    Exclusive as X, IntentExclusive as IX, IntentShared as IS, Shared as S,
    SharedIntentExclusive as SIX,
};

impl LockMode {
    pub const ALL: [LockMode; 5] = [IS, IX, S, SIX, X];

    /// The mode's place in [`LockMode::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// Whether two different transactions may hold `self` and `other` on one resource at once.
    pub fn compatible(self, other: LockMode) -> bool {
        matches!(
            (self, other),
            (IS, IS | IX | S | SIX) | (IX, IS | IX) | (S, IS | S) | (SIX, IS)
        )
    }

    /// The weakest mode that grants both: what a holder of `self` holds after asking for `other`.
    pub fn join(self, other: LockMode) -> LockMode {
        match (self, other) {
            (a, b) if a == b => a,
            (X, _) | (_, X) => X,
            (SIX, _) | (_, SIX) => SIX,
            (IS, m) | (m, IS) => m,
            // What is left is {IX, S}.
            _ => SIX,
        }
    }

    /// Whether holding `self` already grants `other`.
    pub fn covers(self, other: LockMode) -> bool {
        self.join(other) == self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_compatibility_matrix_is_the_textbook_one_and_symmetric() {
        // Rows and columns in the order IS, IX, S, SIX, X.
        let expected = [
            [true, true, true, true, false],
            [true, true, false, false, false],
            [true, false, true, false, false],
            [true, false, false, false, false],
            [false, false, false, false, false],
        ];
        for (i, a) in LockMode::ALL.into_iter().enumerate() {
            for (j, b) in LockMode::ALL.into_iter().enumerate() {
                assert_eq!(a.compatible(b), expected[i][j], "{a:?} with {b:?}");
                assert_eq!(a.compatible(b), b.compatible(a), "{a:?} with {b:?}");
            }
        }
    }

    #[test]
    fn join_is_the_least_upper_bound_and_never_weakens_a_lock() {
        for a in LockMode::ALL {
            for b in LockMode::ALL {
                let j = a.join(b);
                assert_eq!(j, b.join(a));
                assert!(j.covers(a) && j.covers(b), "{a:?} join {b:?} = {j:?}");
                // Least: any mode covering both covers the join.
                for c in LockMode::ALL {
                    if c.covers(a) && c.covers(b) {
                        assert!(c.covers(j), "{c:?} covers {a:?}, {b:?} but not {j:?}");
                    }
                }
                // A stronger mode conflicts with at least what the weaker one did.
                for c in LockMode::ALL {
                    if !a.compatible(c) {
                        assert!(!j.compatible(c), "{j:?} is weaker than {a:?} against {c:?}");
                    }
                }
                for c in LockMode::ALL {
                    assert_eq!(a.join(b.join(c)), a.join(b).join(c));
                }
            }
        }
        assert_eq!(IX.join(S), SIX);
    }
}
