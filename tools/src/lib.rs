//! twinfs tools library: what the `twinfs` program and daemon are built from.
//!
//! - [`config`]: the configuration file, parsed and validated into typed
//!   structs.
//! - [`identity`]: the node's TLS certificate and key, and its node id.
//! - [`state`]: what each volume remembers across restarts (role, epoch).
//! - [`control`]: the control socket protocol between the command and the daemon.
//! - [`daemon`]: `twinfs mount`: mounts, control socket, clean shutdown.
//! - [`error`]: an error and its causes as the command prints them.
//! - [`failover`]: automatic failover of a standby, and the active's health watch.
//! - [`shell`]: hooks and health commands, run with a time limit.
//! - [`notify`]: readiness for systemd (`Type=notify`).

pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod failover;
pub mod identity;
pub mod notify;
pub mod shell;
pub mod state;
