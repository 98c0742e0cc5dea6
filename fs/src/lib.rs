//! twinfs FUSE layer: serves a directory in place through FUSE and reports every
//! change made through the mount.
//!
//! - [`volume`]: the core. Every operation relative to the directory fd opened before
//!   the mount; roles (active/standby); change capture. No fuser types.
//! - [`fuse`]: the thin fuser adapter (one call into the core, one reply), passthrough.
//! - [`mount`]: mounting in place, cache invalidation, bounded unmount.
//! - [`change`]: change records and the [`ChangeSink`] trait the replicator implements.
//! - [`inode`]: the inode table (FUSE inode numbers, names, directory fds).
//! - [`watchdog`]: a dead daemon's mount is detached, not left answering ENOTCONN.
//! - [`turn`]: a standby's local writes of upstream paths and its applies take turns.
//! - [`sys`]: safe wrappers over the `*at` system calls.
//! - [`error`]: the error type, carried to the kernel as an errno.

pub mod change;
pub mod error;
pub mod fuse;
pub mod inode;
pub mod mount;
pub mod sys;
pub mod turn;
pub mod volume;
pub mod watchdog;
pub mod written;

pub use change::{AttrChange, Change, ChangeKind, ChangeSink, Discard, FileId};
pub use error::{Error, Result};
pub use mount::{Invalidator, MountOptions, Mounted};
pub use turn::{ApplyTurn, Turns};
pub use volume::{PatchGuard, Role, UpstreamFilter, Volume, Writing};
