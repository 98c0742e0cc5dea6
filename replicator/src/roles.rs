//! A volume's role and epoch at run time: one place that persists them, switches the
//! mount between read-write and read-only, and tells the replication sessions, always
//! in the order that keeps a crash safe.
//!
//! - Promotion waits for the standby's change of the volume under way
//!   ([`RoleCell::hold`]), then persists the new role and epoch (a node that crashes
//!   right after comes back active with the new epoch, never active with the old
//!   one), then allows local writes, then tells the sessions.
//! - Demotion refuses local writes first (at once, after the writes under way), then
//!   persists, then tells the sessions.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use twinfs_fs::{Role, Volume};

/// A role and the epoch it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RoleState {
    /// Active or standby.
    pub role: Role,
    /// The highest epoch this node has held or followed.
    pub epoch: u64,
}

/// Saves a volume's role and epoch durably; an error is the message for the operator.
pub type Store = Box<dyn Fn(RoleState) -> Result<(), String> + Send + Sync>;

/// A role change, for the hooks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleChange {
    /// The volume.
    pub volume: String,
    /// Before.
    pub previous: RoleState,
    /// After.
    pub next: RoleState,
    /// Why: `manual` (promote, demote, a handover, `twinfs role`), `fenced`, or
    /// `rollback` (a failed promote hook).
    pub reason: &'static str,
}

/// Runs after each role change (the hooks); returns `true` to hand back a promotion
/// whose hook failed.
pub type Hook = Box<dyn Fn(&RoleChange) -> bool + Send + Sync>;

/// Why an active node's local writes are held back. Each holder lifts only its own
/// hold; writes come back when none is left (so the end of the start-up hold cannot
/// undo a `demote` under way, nor a failed handover a `demote`, nor one standby's
/// failed handover another's under way: holds of one kind are counted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hold {
    /// An active that starts waits to meet its standbys.
    Startup,
    /// `twinfs demote` ships what is pending before the node becomes a standby.
    Demote,
    /// A planned handover ships what is pending before the standby takes over.
    Handover,
}

impl Hold {
    fn index(self) -> usize {
        self as usize
    }
}

/// One volume's role and epoch, shared by the daemon and the replication.
pub struct RoleCell {
    name: String,
    tx: watch::Sender<RoleState>,
    /// Bumped on any role change of any volume of the node (the dial loops follow it).
    node: watch::Sender<u64>,
    volume: Arc<Volume>,
    store: Store,
    /// The standby's record of its fitness to take over: it speaks of the active of
    /// the time, so a role change drops it.
    sync_record: std::path::PathBuf,
    hook: Option<Hook>,
    /// Role changes one at a time.
    changing: Mutex<()>,
    /// The [`Hold`]s on local writes, counted by kind. Its own lock, taken after `changing`
    /// if both: stopping writes must not wait for a role change's hook.
    holds: Mutex<[u32; 3]>,
    /// The replication's changes of the volume under way ([`RoleCell::hold`]).
    terms: Arc<Terms>,
    /// How long a promotion waits for them: [`CHANGE_WAIT`].
    change_wait: Duration,
}

/// The [`RoleHold`]s under way, and whether a role change waits for them to end.
#[derive(Default)]
struct Terms {
    state: Mutex<TermState>,
    changed: Condvar,
}

#[derive(Default)]
struct TermState {
    holds: usize,
    switching: bool,
    /// The number of the term now ([`Term`]).
    number: u64,
}

/// A role as this node took it: each change of role begins a new term, even one
/// handed back at once (a promotion whose hook failed). A replication session works
/// in the term it began in ([`RoleCell::term`]) and its changes of the volume, also
/// those carried on in the background after it ended, hold that term
/// ([`RoleCell::hold`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    /// The role of the term.
    pub role: Role,
    number: u64,
}

impl Terms {
    fn lock(&self) -> std::sync::MutexGuard<'_, TermState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a promotion waits for a standby's change of the volume under way.
pub const CHANGE_WAIT: Duration = Duration::from_secs(20);

/// How long a demotion (or a fencing) waits for the local writes under way before it
/// refuses local writes anyway; also how long `twinfs demote` waits for them.
pub const SWITCH_WAIT: Duration = Duration::from_secs(10);

/// A change of the volume that the node's role allows, under way (see
/// [`RoleCell::hold`]); the role cannot change until it is dropped.
pub struct RoleHold {
    terms: Arc<Terms>,
}

impl Drop for RoleHold {
    fn drop(&mut self) {
        let mut state = self.terms.lock();
        state.holds -= 1;
        if state.holds == 0 {
            self.terms.changed.notify_all();
        }
    }
}

/// A role change under way: no [`RoleHold`] is held, and none is given, until it is
/// dropped.
struct Switching<'a> {
    terms: &'a Terms,
}

impl Drop for Switching<'_> {
    fn drop(&mut self) {
        self.terms.lock().switching = false;
    }
}

impl RoleCell {
    /// The cell of volume `name`, now in `state`; `node` is shared by all volumes.
    pub fn new(
        name: &str,
        state: RoleState,
        volume: Arc<Volume>,
        store: Store,
        sync_record: std::path::PathBuf,
        node: watch::Sender<u64>,
        hook: Option<Hook>,
    ) -> RoleCell {
        RoleCell {
            name: name.to_owned(),
            tx: watch::Sender::new(state),
            node,
            volume,
            store,
            sync_record,
            hook,
            changing: Mutex::new(()),
            holds: Mutex::new([0; 3]),
            terms: Arc::default(),
            change_wait: CHANGE_WAIT,
        }
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role and epoch now.
    pub fn get(&self) -> RoleState {
        *self.tx.borrow()
    }

    /// Follows changes.
    pub fn subscribe(&self) -> watch::Receiver<RoleState> {
        self.tx.subscribe()
    }

    /// The mounted volume.
    pub fn volume(&self) -> &Arc<Volume> {
        &self.volume
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The term now: the role, and which change of role began it.
    pub fn term(&self) -> Term {
        let state = self.terms.lock();
        Term {
            role: self.get().role,
            number: state.number,
        }
    }

    /// For a change of the volume that only the role of `term` makes (a standby
    /// putting in place what its active sent): held until dropped; `None` if the term
    /// is over (the role changed since, even if it was handed back), or a role change
    /// is under way. A role change waits for the holds under way and gives none
    /// meanwhile, so nothing an old active sent lands once this node has taken local
    /// writes (a large file received in the background, a batch of files being put in
    /// place, both carried on after their session ended). Never waits itself, so a
    /// hold taken with a lock held, or within another hold, cannot deadlock with a
    /// role change.
    pub fn hold(&self, term: Term) -> Option<RoleHold> {
        let mut state = self.terms.lock();
        if state.switching || state.number != term.number || self.get().role != term.role {
            return None;
        }
        state.holds += 1;
        Some(RoleHold {
            terms: self.terms.clone(),
        })
    }

    /// Waits until no [`RoleHold`] is held, and gives none until the role has changed
    /// (the guard is dropped). Gives up after [`CHANGE_WAIT`]: a change that takes
    /// longer is stuck (a disk that does not answer), and the role change is refused
    /// rather than left hanging.
    fn switch(&self) -> Result<Switching<'_>, String> {
        let mut state = self.terms.lock();
        state.switching = true;
        let deadline = std::time::Instant::now() + self.change_wait;
        let mut waits = 0;
        while state.holds > 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                state.switching = false;
                return Err(format!(
                    "a change of the volume that the replication began as a standby has not \
                     finished within {}s (is the disk answering?)",
                    self.change_wait.as_secs()
                ));
            }
            if waits == 1 {
                tracing::info!(volume = %self.name, "the role change waits for a change of the volume under way");
            }
            waits += 1;
            state = self
                .terms
                .changed
                .wait_timeout(state, (deadline - now).min(Duration::from_secs(1)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(Switching { terms: &self.terms })
    }

    fn publish(&self, state: RoleState) {
        let changed = self.get().role != state.role;
        // Fit again only after a full sync with the active of the new order: the
        // record goes before the role changes, so none is read with the new role, and
        // after, in case a session of the old term saved one meanwhile (it drops what
        // it saves once it sees its term is over, so one of the two removals follows
        // its save).
        if changed {
            self.drop_sync_record();
        }
        {
            // A new term whenever the role changes (a term is read under this lock).
            let mut terms = self.terms.lock();
            if changed {
                terms.number += 1;
            }
            self.tx.send_replace(state);
        }
        if changed {
            self.drop_sync_record();
        }
        self.node.send_modify(|g| *g += 1);
    }

    fn drop_sync_record(&self) {
        if let Err(e) = std::fs::remove_file(&self.sync_record) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(volume = %self.name, error = %e, "cannot drop the sync record");
            }
        }
    }

    /// Becomes active with an epoch above any this node has seen: `epoch`, or one more
    /// than the epoch it holds now if that has reached `epoch` (the caller chose it
    /// before a wait, during which this node followed a newer active). Persisted, then
    /// writable, then the sessions follow, then the hook runs (a failed one may hand
    /// the role back). Blocks for as long as the hook; call from a blocking context.
    pub fn promote(&self, epoch: u64, reason: &'static str) -> Result<RoleState, String> {
        let _one = self.lock();
        let epoch = epoch.max(self.get().epoch.saturating_add(1));
        self.promote_locked(epoch, reason)
    }

    /// Becomes active keeping the epoch it holds (`twinfs role`, low level: no new
    /// epoch), as [`RoleCell::promote`] does otherwise.
    pub fn activate(&self, reason: &'static str) -> Result<RoleState, String> {
        let _one = self.lock();
        self.promote_locked(self.get().epoch, reason)
    }

    fn promote_locked(&self, epoch: u64, reason: &'static str) -> Result<RoleState, String> {
        let previous = self.get();
        let next = RoleState {
            role: Role::Active,
            epoch,
        };
        // (Only a standby's changes hold a role: a demotion need not wait.)
        let switching = self.switch()?;
        (self.store)(next).map_err(|e| format!("cannot persist the promotion: {e}"))?;
        {
            // A promotion takes writes, whatever held them back in an earlier term.
            let mut holds = self.holds();
            *holds = [0; 3];
            self.switch_within(Role::Active);
        }
        self.publish(next);
        drop(switching);
        tracing::warn!(volume = %self.name, epoch, reason, "now active");
        if self.run_hook(previous, next, reason) && previous.role != Role::Active {
            tracing::warn!(volume = %self.name, "the promote hook failed: handing the role back");
            return self.demote_locked(epoch, "rollback");
        }
        Ok(next)
    }

    /// Runs the hook for a change of role (not for an unchanged one); whether to roll
    /// back.
    fn run_hook(&self, previous: RoleState, next: RoleState, reason: &'static str) -> bool {
        match &self.hook {
            Some(hook) if previous.role != next.role => hook(&RoleChange {
                volume: self.name.clone(),
                previous,
                next,
                reason,
            }),
            _ => false,
        }
    }

    /// Refuses local writes from now on, for `hold`, without telling the sessions yet
    /// (they go on shipping what was written before). Blocks until the writes under
    /// way are done. Does not wait for a role change under way (a hook may take long).
    pub fn stop_writes(&self, hold: Hold) {
        // The hold and the switch's place among the switches in one step; but not
        // holding `holds` while it waits: a write stuck on a disk that does not answer
        // must not hold up `resume_writes` or a promotion too, whose later switches
        // decide the role (see `Volume::begin_switch`).
        let switch = {
            let mut holds = self.holds();
            holds[hold.index()] = holds[hold.index()].saturating_add(1);
            self.volume.begin_switch()
        };
        self.volume.finish_switch(Role::Standby, switch);
    }

    /// Lifts `hold`; lets local writes in again if no other hold is left and the node
    /// is still active.
    pub fn resume_writes(&self, hold: Hold) {
        let _one = self.lock();
        let mut holds = self.holds();
        holds[hold.index()] = holds[hold.index()].saturating_sub(1);
        if *holds == [0; 3] && self.get().role == Role::Active {
            self.switch_within(Role::Active);
        }
    }

    /// Switches the mount to `role`, waiting at most [`SWITCH_WAIT`] for the local
    /// writes under way (a disk that does not answer must not hold the role, nor the
    /// locks of the role changes, for good).
    fn switch_within(&self, role: Role) {
        if !self.volume.set_role_within(role, SWITCH_WAIT) {
            tracing::error!(volume = %self.name, ?role, wait = ?SWITCH_WAIT,
                "writes under way do not finish (a disk that does not answer?); switched without waiting for them");
        }
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, [u32; 3]> {
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Becomes a standby that follows epoch `epoch` or later (waiting at most
    /// [`SWITCH_WAIT`] for the local writes under way): read-only at once,
    /// persisted, then the sessions follow, then the hook runs. Blocks for as long as
    /// the hook.
    pub fn demote(&self, epoch: u64, reason: &'static str) -> Result<RoleState, String> {
        let _one = self.lock();
        self.demote_locked(epoch, reason)
    }

    fn demote_locked(&self, epoch: u64, reason: &'static str) -> Result<RoleState, String> {
        let previous = self.get();
        // A write stuck on a disk that no longer answers does not keep this node
        // active (and its peers from taking over).
        self.switch_within(Role::Standby);
        let next = RoleState {
            role: Role::Standby,
            epoch: epoch.max(previous.epoch),
        };
        (self.store)(next)?;
        self.publish(next);
        tracing::warn!(volume = %self.name, epoch = next.epoch, reason, "now standby");
        self.run_hook(previous, next, reason);
        Ok(next)
    }

    /// A standby follows an active of `epoch`: remembered if newer (a later promotion
    /// must go above it). Persisted before the session applies anything from it.
    pub fn follow(&self, epoch: u64) -> Result<(), String> {
        let _one = self.lock();
        let now = self.get();
        if now.role != Role::Standby || epoch <= now.epoch {
            return Ok(());
        }
        let next = RoleState { epoch, ..now };
        (self.store)(next)?;
        // Not published: the session that follows this epoch goes on.
        self.tx.send_replace(next);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(dir: &std::path::Path, role: Role) -> RoleCell {
        let volume = Volume::new(dir, role, Arc::new(twinfs_fs::Discard)).expect("volume");
        RoleCell::new(
            "v",
            RoleState { role, epoch: 1 },
            Arc::new(volume),
            Box::new(|_| Ok(())),
            dir.join("no-sync-record"),
            watch::Sender::new(0),
            None,
        )
    }

    #[test]
    fn writes_come_back_only_when_every_hold_is_lifted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roles = cell(dir.path(), Role::Active);
        let writable = || roles.volume().role() == Role::Active;
        roles.stop_writes(Hold::Startup);
        // A demote starts while the start-up hold is on; the start-up hold ends.
        roles.stop_writes(Hold::Demote);
        roles.resume_writes(Hold::Startup);
        assert!(
            !writable(),
            "the end of the start-up hold undid a demote under way"
        );
        // A handover that times out does not undo it either.
        roles.stop_writes(Hold::Handover);
        roles.resume_writes(Hold::Handover);
        assert!(!writable());
        roles.resume_writes(Hold::Demote);
        assert!(writable());
        // Two standbys ask for a handover at once; one gives up.
        roles.stop_writes(Hold::Handover);
        roles.stop_writes(Hold::Handover);
        roles.resume_writes(Hold::Handover);
        assert!(!writable(), "one handover's end undid the other's hold");
        roles.resume_writes(Hold::Handover);
        assert!(writable());
    }

    #[test]
    fn a_promotion_takes_writes_whatever_held_them_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roles = cell(dir.path(), Role::Active);
        roles.stop_writes(Hold::Demote);
        roles.demote(1, "manual").expect("demote");
        assert_eq!(roles.volume().role(), Role::Standby);
        // Lifting a hold never makes a standby writable.
        roles.resume_writes(Hold::Demote);
        assert_eq!(roles.volume().role(), Role::Standby);
        roles.promote(2, "manual").expect("promote");
        assert_eq!(roles.volume().role(), Role::Active);
        // Nothing of the earlier term is left to hold writes back.
        roles.stop_writes(Hold::Handover);
        roles.resume_writes(Hold::Handover);
        assert_eq!(roles.volume().role(), Role::Active);
    }

    /// A cell of a standby at `epoch` over a scratch directory, and what it stored.
    fn standby(epoch: u64) -> (tempfile::TempDir, RoleCell, Arc<Mutex<Vec<RoleState>>>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume =
            Volume::new(dir.path(), Role::Standby, Arc::new(twinfs_fs::Discard)).expect("volume");
        let stored = Arc::new(Mutex::new(Vec::new()));
        let into = stored.clone();
        let store: Store = Box::new(move |state| {
            into.lock().expect("stored").push(state);
            Ok(())
        });
        let cell = RoleCell::new(
            "vol",
            RoleState {
                role: Role::Standby,
                epoch,
            },
            Arc::new(volume),
            store,
            dir.path().join("vol.sync.json"),
            watch::Sender::new(0),
            None,
        );
        (dir, cell, stored)
    }

    #[test]
    fn a_promotion_waits_for_the_standbys_change_under_way_and_gives_no_new_hold() {
        let (_dir, cell, stored) = standby(1);
        let term = cell.term();
        assert_eq!(term.role, Role::Standby);
        let hold = cell.hold(term).expect("a standby's change");
        std::thread::scope(|scope| {
            let promoting = scope.spawn(|| cell.promote(2, "manual"));
            // The promotion has begun once it refuses new holds; it is not through.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while cell.hold(term).is_some() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the promotion never began"
                );
                std::thread::yield_now();
            }
            std::thread::sleep(Duration::from_millis(200));
            assert!(!promoting.is_finished(), "the promotion did not wait");
            assert_eq!(cell.get().role, Role::Standby);
            assert_eq!(cell.volume().role(), Role::Standby, "local writes let in");
            assert!(stored.lock().expect("stored").is_empty());
            drop(hold);
            let now = promoting.join().expect("thread").expect("promote");
            assert_eq!(now.role, Role::Active);
        });
        assert_eq!(cell.volume().role(), Role::Active);
        assert!(
            cell.hold(term).is_none(),
            "a standby's change after the promotion"
        );
        let active = cell.term();
        assert_eq!(active.role, Role::Active);
        drop(cell.hold(active).expect("the active's"));
    }

    #[test]
    fn a_change_begun_before_a_promotion_handed_back_is_refused_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let volume =
            Volume::new(dir.path(), Role::Standby, Arc::new(twinfs_fs::Discard)).expect("volume");
        // The promote hook fails, and the role is handed back.
        let cell = RoleCell::new(
            "vol",
            RoleState {
                role: Role::Standby,
                epoch: 1,
            },
            Arc::new(volume),
            Box::new(|_| Ok(())),
            dir.path().join("vol.sync.json"),
            watch::Sender::new(0),
            Some(Box::new(|change: &RoleChange| {
                change.next.role == Role::Active
            })),
        );
        let before = cell.term();
        let now = cell.promote(2, "manual").expect("promote");
        assert_eq!(now.role, Role::Standby, "the role was not handed back");
        assert_eq!(now.epoch, 2);
        assert_ne!(
            cell.term(),
            before,
            "a promotion handed back is a term of its own"
        );
        assert!(
            cell.hold(before).is_none(),
            "a change begun before the promotion may land on what was written during it"
        );
        // A session of the new term changes the volume as before.
        drop(cell.hold(cell.term()).expect("a change of the new term"));
        // Following a newer active begins no term: the session goes on.
        let term = cell.term();
        cell.follow(5).expect("follow");
        assert_eq!(cell.term(), term);
    }

    #[test]
    fn a_promotion_that_a_stuck_change_holds_up_is_refused_and_leaves_the_standby_as_it_was() {
        let (_dir, mut cell, stored) = standby(1);
        cell.change_wait = Duration::from_millis(300);
        let term = cell.term();
        let stuck = cell.hold(term).expect("a standby's change");
        let refused = cell.promote(2, "manual").expect_err("refused");
        assert!(refused.contains("has not finished"), "{refused}");
        assert_eq!(
            cell.get(),
            RoleState {
                role: Role::Standby,
                epoch: 1
            }
        );
        assert_eq!(cell.volume().role(), Role::Standby);
        assert!(stored.lock().expect("stored").is_empty());
        // The standby goes on applying, in the same term; once the change is through, a
        // promotion goes.
        assert_eq!(cell.term(), term);
        drop(cell.hold(term).expect("changes go on after the refusal"));
        drop(stuck);
        assert_eq!(
            cell.promote(2, "manual").expect("promote").role,
            Role::Active
        );
    }

    #[test]
    fn a_promotion_goes_above_an_epoch_followed_while_the_caller_waited() {
        let (_dir, cell, stored) = standby(3);
        // The caller chose 4, then waited; meanwhile the node followed an active of 7.
        let chosen = cell.get().epoch + 1;
        cell.follow(7).expect("follow");
        let now = cell.promote(chosen, "manual").expect("promote");
        assert_eq!(
            now,
            RoleState {
                role: Role::Active,
                epoch: 8
            }
        );
        assert_eq!(cell.get(), now);
        assert_eq!(stored.lock().expect("stored").last(), Some(&now));
    }

    #[test]
    fn a_promotion_keeps_an_epoch_given_above_the_one_held() {
        let (_dir, cell, _stored) = standby(3);
        assert_eq!(cell.promote(10, "manual").expect("promote").epoch, 10);
    }

    #[test]
    fn activate_keeps_the_epoch() {
        let (_dir, cell, _stored) = standby(5);
        let now = cell.activate("manual").expect("activate");
        assert_eq!(
            now,
            RoleState {
                role: Role::Active,
                epoch: 5
            }
        );
    }
}
