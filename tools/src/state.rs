//! What a volume remembers across restarts: its role and epoch, in
//! `<state_dir>/volumes/<name>.json`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{is_valid_name, Role};
use twinfs_replicator::durable::atomic_write;

/// The directory under the state directory that holds the volume states.
const VOLUMES_DIR: &str = "volumes";

/// The persisted state of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
// A field this version does not know would be lost by the next `store`.
#[serde(deny_unknown_fields)]
pub struct VolumeState {
    /// The role this node had last.
    pub role: Role,
    /// The epoch this node had last; 1 on first start.
    pub epoch: u64,
}

impl VolumeState {
    /// Loads the state of `volume_name`, or on the very first start records
    /// `initial_role` with epoch 1. A file that cannot be read or parsed is
    /// an error, never a reason to start over: the role it holds may be the
    /// only record that another node was promoted.
    pub fn load_or_init(
        state_dir: &Path,
        volume_name: &str,
        initial_role: Role,
    ) -> Result<VolumeState, StateError> {
        let path = state_path(state_dir, volume_name)?;
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let state = VolumeState {
                    role: initial_role,
                    epoch: 1,
                };
                state.store(state_dir, volume_name)?;
                Ok(state)
            }
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    /// Saves the state of `volume_name`, atomically and durably.
    pub fn store(&self, state_dir: &Path, volume_name: &str) -> Result<(), StateError> {
        let path = state_path(state_dir, volume_name)?;
        let dir = state_dir.join(VOLUMES_DIR);
        fs::create_dir_all(&dir).map_err(|source| StateError::Write {
            path: dir.clone(),
            source,
        })?;
        let mut json = serde_json::to_vec_pretty(self).map_err(|source| StateError::Encode {
            path: path.clone(),
            source,
        })?;
        json.push(b'\n');
        atomic_write(&path, &json, 0o644).map_err(|source| StateError::Write { path, source })
    }
}

fn state_path(state_dir: &Path, volume_name: &str) -> Result<PathBuf, StateError> {
    // The name becomes a file name: it must not climb out of the directory.
    if !is_valid_name(volume_name) {
        return Err(StateError::BadName(volume_name.to_owned()));
    }
    Ok(state_dir
        .join(VOLUMES_DIR)
        .join(format!("{volume_name}.json")))
}

/// Why a volume state cannot be loaded or stored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The volume name cannot be a file name.
    #[error("{0:?} is not a valid volume name")]
    BadName(String),
    /// The state file exists but cannot be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The state file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The state file is not valid.
    #[error(
        "{} is corrupt ({source}); fix or remove it by hand, knowing it held \
         this node's role",
        path.display()
    )]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What serde_json found.
        source: serde_json::Error,
    },
    /// The state cannot be serialized.
    #[error("cannot encode the state for {}: {source}", path.display())]
    Encode {
        /// The state file.
        path: PathBuf,
        /// serde_json's error.
        source: serde_json::Error,
    },
    /// The state file or its directory cannot be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_records_the_initial_role() {
        let state = tempfile::tempdir().expect("tempdir");
        let loaded = VolumeState::load_or_init(state.path(), "cmm", Role::Standby).expect("init");
        assert_eq!(
            loaded,
            VolumeState {
                role: Role::Standby,
                epoch: 1
            }
        );
        let text = fs::read_to_string(state.path().join("volumes/cmm.json")).expect("read");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json, serde_json::json!({ "role": "standby", "epoch": 1 }));
    }

    #[test]
    fn a_stored_state_wins_over_the_initial_role() {
        let state = tempfile::tempdir().expect("tempdir");
        let mut volume =
            VolumeState::load_or_init(state.path(), "cmm", Role::Standby).expect("init");
        volume.role = Role::Active;
        volume.epoch = 7;
        volume.store(state.path(), "cmm").expect("store");
        let reloaded = VolumeState::load_or_init(state.path(), "cmm", Role::Standby).expect("load");
        assert_eq!(reloaded, volume);
        let other = VolumeState::load_or_init(state.path(), "other", Role::Standby).expect("init");
        assert_eq!(other.role, Role::Standby, "volumes are independent");
    }

    #[test]
    fn a_corrupt_file_is_an_error_and_is_kept() {
        let state = tempfile::tempdir().expect("tempdir");
        let dir = state.path().join("volumes");
        fs::create_dir(&dir).expect("mkdir");
        let path = dir.join("cmm.json");
        for garbage in [
            &b"{\"role\": \"act"[..],
            b"{\"role\": \"boss\", \"epoch\": 1}",
            b"",
        ] {
            fs::write(&path, garbage).expect("write");
            let err = VolumeState::load_or_init(state.path(), "cmm", Role::Active).unwrap_err();
            assert!(matches!(err, StateError::Corrupt { .. }), "{err:?}");
            assert!(
                err.to_string().contains(&path.display().to_string()),
                "{err}"
            );
            assert_eq!(fs::read(&path).expect("read"), garbage, "never reset");
        }
    }

    #[test]
    fn names_that_would_leave_the_directory_are_refused() {
        let state = tempfile::tempdir().expect("tempdir");
        for name in ["..", "../x", "a/b", ""] {
            let err = VolumeState::load_or_init(state.path(), name, Role::Active).unwrap_err();
            assert!(matches!(err, StateError::BadName(_)), "{name}: {err:?}");
        }
    }
}
