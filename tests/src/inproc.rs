//! A volume mounted in this test process, with a recording change sink.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use twinfs_fs::{Change, ChangeSink, MountOptions, Mounted, Role, UpstreamFilter, Volume};

/// A change sink that keeps every record for the test to inspect.
#[derive(Default)]
pub struct Recorder {
    changes: Mutex<Vec<Change>>,
}

impl ChangeSink for Recorder {
    fn record(&self, change: Change) {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(change);
    }
}

impl Recorder {
    /// Takes the records so far.
    pub fn take(&self) -> Vec<Change> {
        std::mem::take(&mut *self.changes.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A scratch directory mounted in place through twinfs; unmounted on drop, even when
/// the test fails.
pub struct MountedDir {
    /// Holds the scratch directory alive.
    _scratch: tempfile::TempDir,
    /// The mounted directory.
    pub path: PathBuf,
    /// Records of every change.
    pub recorder: Arc<Recorder>,
    mounted: Option<Mounted>,
}

impl MountedDir {
    /// Mounts a fresh empty directory, filled first by `fill` (before the mount).
    pub fn new(passthrough: bool, fill: impl FnOnce(&Path)) -> MountedDir {
        let recorder = Arc::new(Recorder::default());
        Self::with_sink(passthrough, recorder.clone(), recorder, fill)
    }

    /// Like [`MountedDir::new`] in a scratch directory made in `parent` (a small
    /// filesystem of the test's own, say) instead of the system's temp directory.
    pub fn new_in(parent: &Path, passthrough: bool, fill: impl FnOnce(&Path)) -> MountedDir {
        let recorder = Arc::new(Recorder::default());
        Self::mount_in(
            Some(parent),
            passthrough,
            recorder.clone(),
            recorder,
            None,
            fill,
        )
    }

    /// Like [`MountedDir::new`], with the volume reporting to `sink` (the recorder then
    /// stays empty unless `sink` forwards to it).
    pub fn with_sink(
        passthrough: bool,
        sink: Arc<dyn ChangeSink>,
        recorder: Arc<Recorder>,
        fill: impl FnOnce(&Path),
    ) -> MountedDir {
        Self::mount(passthrough, sink, recorder, None, fill)
    }

    /// Like [`MountedDir::new`] without passthrough (as a replicated volume is
    /// mounted), with the standby's upstream paths given by `upstream`.
    pub fn with_upstream(upstream: UpstreamFilter, fill: impl FnOnce(&Path)) -> MountedDir {
        let recorder = Arc::new(Recorder::default());
        Self::mount(false, recorder.clone(), recorder, Some(upstream), fill)
    }

    fn mount(
        passthrough: bool,
        sink: Arc<dyn ChangeSink>,
        recorder: Arc<Recorder>,
        upstream: Option<UpstreamFilter>,
        fill: impl FnOnce(&Path),
    ) -> MountedDir {
        Self::mount_in(None, passthrough, sink, recorder, upstream, fill)
    }

    fn mount_in(
        parent: Option<&Path>,
        passthrough: bool,
        sink: Arc<dyn ChangeSink>,
        recorder: Arc<Recorder>,
        upstream: Option<UpstreamFilter>,
        fill: impl FnOnce(&Path),
    ) -> MountedDir {
        crate::require_fuse();
        let mut builder = tempfile::Builder::new();
        builder.prefix("twinfs-test-");
        let scratch = match parent {
            Some(parent) => builder.tempdir_in(parent),
            None => builder.tempdir(),
        }
        .expect("scratch dir");
        let path = scratch.path().join("vol");
        std::fs::create_dir(&path).expect("mkdir vol");
        fill(&path);
        let mut volume = Volume::new(&path, Role::Active, sink).expect("open volume");
        if let Some(upstream) = upstream {
            volume = volume.with_upstream(upstream);
        }
        let options = MountOptions {
            name: "test".into(),
            passthrough,
            threads: 2,
            // The daemon's own watchdog: a test process that dies leaves no dead mount.
            watchdog: Some(twinfs_fs::watchdog::WatchdogCommand {
                program: crate::daemon::twinfs_bin(),
                name: "twinfs".into(),
                args: vec!["watch-mount".into()],
            }),
        };
        let mounted = Mounted::mount(Arc::new(volume), &options).expect("mount");
        MountedDir {
            _scratch: scratch,
            path,
            recorder,
            mounted: Some(mounted),
        }
    }

    /// The mounted volume.
    pub fn mounted(&self) -> &Mounted {
        self.mounted.as_ref().expect("mounted")
    }

    /// The volume core.
    pub fn volume(&self) -> &Volume {
        self.mounted().volume()
    }

    /// Unmounts now (the directory stays).
    pub fn unmount(&mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount(Duration::from_secs(10)).expect("unmount");
        }
    }
}

impl Drop for MountedDir {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            if m.unmount(Duration::from_secs(10)).is_err() {
                crate::force_unmount(&self.path);
            }
        }
        if crate::is_mounted(&self.path) {
            crate::force_unmount(&self.path);
        }
    }
}
