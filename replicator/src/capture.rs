//! Capture: the change sink a volume reports to. It resolves each change's policy,
//! counts changes per policy and hands the resulting records on (to the log now; to
//! the outbox that ships them from #3 on).

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use twinfs_fs::turn::Wait;
use twinfs_fs::{Change, ChangeSink};

use crate::policy::{Policy, PolicySet, SyncMode};

/// A change with the policy resolved for its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The change as the volume reported it.
    pub change: Change,
    /// The policy of `change.path` (for a rename, of the new path).
    pub policy: Policy,
}

/// Where records go after capture.
pub trait RecordSink: Send + Sync + 'static {
    /// Takes one record; must not block but for a `sync` path's wait.
    fn push(&self, record: Record);

    /// Takes one record, and returns a `sync` path's wait for the standbys instead of
    /// waiting (see [`ChangeSink::record_later`]).
    fn push_later(&self, record: Record) -> Option<Wait> {
        self.push(record);
        None
    }
}

/// Counts of captured changes per sync mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counters {
    /// Changes to `always` paths.
    pub always: u64,
    /// Changes to `once` paths.
    pub once: u64,
    /// Changes to `interval` paths.
    pub interval: u64,
    /// Changes to `never` paths.
    pub never: u64,
}

impl Counters {
    /// All changes.
    pub fn total(&self) -> u64 {
        self.always + self.once + self.interval + self.never
    }
}

/// The change sink of one volume.
pub struct Capture {
    volume: String,
    policies: PolicySet,
    counts: [AtomicU64; 4],
    next: Option<Box<dyn RecordSink>>,
}

fn slot(sync: SyncMode) -> usize {
    match sync {
        SyncMode::Always => 0,
        SyncMode::Once => 1,
        SyncMode::Interval(_) => 2,
        SyncMode::Never => 3,
    }
}

impl Capture {
    /// A capture for the volume `volume` with its rules; records go to `next` if given.
    pub fn new(volume: &str, policies: PolicySet, next: Option<Box<dyn RecordSink>>) -> Self {
        Capture {
            volume: volume.to_owned(),
            policies,
            counts: Default::default(),
            next,
        }
    }

    /// The policy of a path.
    pub fn policy(&self, path: &Path) -> Policy {
        self.policies.resolve(path)
    }

    /// Changes captured so far, per sync mode.
    pub fn counters(&self) -> Counters {
        let get = |i: usize| self.counts[i].load(Ordering::Relaxed);
        Counters {
            always: get(0),
            once: get(1),
            interval: get(2),
            never: get(3),
        }
    }
}

impl ChangeSink for Capture {
    fn record(&self, change: Change) {
        if let Some(wait) = self.record_later(change) {
            wait();
        }
    }

    fn record_later(&self, change: Change) -> Option<Wait> {
        let policy = self.policies.resolve(&change.path);
        self.counts[slot(policy.sync)].fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            volume = %self.volume,
            path = %change.path.display(),
            kind = change.kind.name(),
            sync = policy.sync.name(),
            priority = policy.priority.get(),
            "change captured"
        );
        self.next
            .as_ref()
            .and_then(|next| next.push_later(Record { change, policy }))
    }
}
