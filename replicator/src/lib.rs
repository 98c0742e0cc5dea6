//! twinfs replication.
//!
//! - [`capture`]: the change sink of a volume: resolves policies, counts changes.
//! - [`policy`]: which paths are replicated, how often and how urgently,
//!   from the glob rules of a volume.

pub mod capture;
pub mod policy;
