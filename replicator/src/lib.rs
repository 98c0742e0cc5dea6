//! twinfs replication.
//!
//! - [`capture`]: the change sink of a volume: resolves policies, counts changes.
//! - [`path`]: validated relative paths, the form every path from a peer takes.
//! - [`policy`]: which paths are replicated, how often and how urgently,
//!   from the glob rules of a volume.

pub mod capture;
pub mod path;
pub mod policy;
