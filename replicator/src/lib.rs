//! twinfs replication.
//!
//! - [`apply`]: writes what the active sends into a standby's volume: beneath the
//!   root only, atomically (temp entry, fsync, rename), durably.
//! - [`capture`]: the change sink of a volume: resolves policies, counts changes.
//! - [`delta`]: block deltas for large files: block lists and block records.
//! - [`manifest`]: what a volume holds (kind, mode, owner, mtime, xxh3 hash, xattrs):
//!   scanning with a hash cache, and the diff a full sync applies.
//! - [`node`]: the driver: sessions over QUIC, scans, reads, applies, invalidations.
//! - [`patch`]: in-place updates of large files on a standby, journaled.
//! - [`path`]: validated relative paths, the form every path from a peer takes.
//! - [`policy`]: which paths are replicated, how often and how urgently,
//!   from the glob rules of a volume.
//! - [`protocol`]: the messages of a volume's session, postcard-encoded.
//! - [`session`]: the replication session as a state machine without I/O or clock.
//! - [`transport`]: QUIC endpoints with mutual TLS pinned by certificate hash, and
//!   length-prefixed frames on streams.
//! - [`upstream`]: a standby's writes of `direction = "both"` paths, and the
//!   active's rule for taking them.

pub mod apply;
pub mod capture;
pub mod conflicts;
pub mod delta;
pub mod durable;
pub mod manifest;
pub mod node;
pub mod patch;
pub mod path;
pub mod policy;
pub mod protocol;
pub mod roles;
pub mod session;
pub mod transport;
pub mod upstream;
