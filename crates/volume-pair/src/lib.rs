//! Volume pairs (placeholder until the first module lands).
