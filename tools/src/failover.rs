//! Automatic failover and the active's health watch.
//!
//! - A standby of a volume with `failover = "auto"` watches how long its active has
//!   been silent. After `peer_timeout` it asks every configured peer (witnesses too)
//!   how they see the volume, then (if the rule picks this node) those that answered
//!   for their vote, and promotes itself only when it is
//!   fit, nobody it reaches is active at its epoch or later or still hears the
//!   active, no other fit, silent standby it reaches outranks it (higher epoch, then
//!   lower node name), and (with more than two nodes) a majority of the nodes voted
//!   for it. A node votes for one candidate per volume at a time ([`Ballot`]), so
//!   two candidates that cannot see each other never both get a majority.
//! - An active checks that it can still serve: its backing directory takes a create
//!   and an unlink, and the volume's `health_command` exits 0. After
//!   `health_failures` failures in a row it demotes itself (reason `health`) so a
//!   standby can take over.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use twinfs_fs::Role;
use twinfs_replicator::node::{self, Board, Peer, SyncRecord};
use twinfs_replicator::protocol::VolumeView;
use twinfs_replicator::roles::RoleCell;

/// How often the watch looks at the board.
const TICK: Duration = Duration::from_millis(200);

/// How long a probe of one peer may take (peers are probed at once).
const PROBE_WAIT: Duration = Duration::from_millis(800);

/// What one volume needs for a view of it (shared by the probe answers and the
/// watch).
#[derive(Clone)]
pub struct Viewed {
    /// The volume's name.
    pub name: String,
    /// Its role cell.
    pub roles: Arc<RoleCell>,
    /// Where its standby keeps its fitness.
    pub sync_file: PathBuf,
    /// Its `peer_timeout`: an active silent for longer is not heard.
    pub peer_timeout: Duration,
}

/// Whether a connected active of `volume` was heard from within `within`.
pub fn hears_active(board: &Board, volume: &str, within: Duration) -> bool {
    board
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .any(|p| {
            p.volume == volume
                && p.connected
                && p.peer_role == Some(Role::Active)
                && p.heard.is_some_and(|t| t.elapsed() < within)
        })
}

/// When an active of `volume` was last heard from, if ever.
fn last_heard(board: &Board, volume: &str) -> Option<Instant> {
    board
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|p| p.volume == volume && p.peer_role == Some(Role::Active))
        .filter_map(|p| p.heard)
        .max()
}

/// Why a standby holding `epoch` is not fit to take over, from its sync record;
/// `None` when it is.
pub fn unfit(record: Option<&SyncRecord>, epoch: u64) -> Option<String> {
    let Some(record) = record else {
        return Some("this node never completed a full sync with an active".into());
    };
    if record.demoted.as_deref() == Some("health") {
        return Some(format!(
            "this node gave up the active role (epoch {}) after failing its health checks",
            record.epoch
        ));
    }
    if record.demoted.is_some() && record.epoch < epoch {
        return Some(format!(
            "this node was the active until epoch {}, and has not completed a full sync with the active of epoch {epoch}",
            record.epoch
        ));
    }
    if record.synced {
        return None;
    }
    let mut why = String::from("not in sync with the last active");
    if record.refused > 0 {
        why.push_str(&format!(
            "; {} streamed change(s) refused here and not yet repaired by a full sync",
            record.refused
        ));
        if let Some(last) = &record.last_refused {
            why.push_str(&format!(" (last: {last})"));
        }
    } else if record.priority1_pending.is_empty() && record.priority1_more == 0 {
        why.push_str(" (its last full sync did not complete, or refused changes)");
        return Some(why);
    }
    if record.priority1_pending.is_empty() && record.priority1_more == 0 {
        return Some(why);
    }
    why.push_str(&format!(
        "; priority-1 paths not known to be in sync: {}",
        record.priority1_pending.join(", ")
    ));
    if record.priority1_more > 0 {
        why.push_str(&format!(" and {} more", record.priority1_more));
    }
    Some(why)
}

/// Why this node is not a candidate of an automatic failover of `v` now, if it is
/// not: unfit by its sync record, or the active until `twinfs demote` without a full
/// sync since (fit for `twinfs promote`, as it has every change it made, but an
/// automatic failover would hand it back the role it was asked to give up).
fn not_candidate(v: &Viewed) -> Option<String> {
    match SyncRecord::load(&v.sync_file) {
        Ok(record) => not_candidate_by(record.as_ref(), v.roles.get().epoch),
        Err(e) => Some(format!("cannot read the sync record: {e}")),
    }
}

/// [`not_candidate`] of a node holding `epoch` with sync record `record`.
fn not_candidate_by(record: Option<&SyncRecord>, epoch: u64) -> Option<String> {
    unfit(record, epoch).or_else(|| {
        record
            .is_some_and(|r| r.demoted.as_deref() == Some("manual"))
            .then(|| {
                "this node gave up the active role with `twinfs demote` (`twinfs promote` takes it back)"
                    .to_owned()
            })
    })
}

/// How this node sees `v` now.
pub fn view(v: &Viewed, board: &Board) -> VolumeView {
    let state = v.roles.get();
    let standby = state.role == Role::Standby;
    VolumeView {
        volume: v.name.clone(),
        role: state.role,
        epoch: state.epoch,
        fit: standby && not_candidate(v).is_none(),
        hears_active: standby && hears_active(board, &v.name, v.peer_timeout),
    }
}

/// How long a vote binds the node that gave it: no other candidate gets its vote
/// for that volume meanwhile (the one it voted for has promoted and is heard by then,
/// or has failed).
const VOTE_LEASE: Duration = Duration::from_secs(10);

/// The votes this node gave, per volume: to whom and when.
#[derive(Default)]
pub struct Ballot {
    given: Mutex<std::collections::HashMap<String, (String, Instant)>>,
}

impl Ballot {
    /// Whether this node votes for `candidate` to become the active of `volume`, as
    /// it sees the volume (`mine`; `None` on a node without it, such as a witness):
    /// not while it is active for it or still hears its active, and not for a second
    /// candidate within [`VOTE_LEASE`] of a vote for another.
    pub fn grant(&self, volume: &str, candidate: &str, mine: Option<&VolumeView>) -> bool {
        if mine.is_some_and(|m| m.role == Role::Active || m.hears_active) {
            return false;
        }
        let mut given = self.given.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((to, at)) = given.get(volume) {
            if to != candidate && at.elapsed() < VOTE_LEASE {
                return false;
            }
        }
        given.insert(volume.to_owned(), (candidate.to_owned(), Instant::now()));
        true
    }
}

/// The answer this node gives to a peer's probe (and its vote, when asked).
pub fn prober(node: String, volumes: Vec<Viewed>, board: Board) -> node::Prober {
    let ballot = Ballot::default();
    Arc::new(move |asker, vote| {
        let views: Vec<VolumeView> = volumes.iter().map(|v| view(v, &board)).collect();
        let granted = vote.is_some_and(|volume| {
            let mine = views.iter().find(|w| w.volume == volume);
            let granted = ballot.grant(volume, asker, mine);
            tracing::info!(
                volume,
                candidate = asker,
                granted,
                "vote asked for an automatic failover"
            );
            granted
        });
        node::ProbeReply {
            node: node.clone(),
            volumes: views,
            granted,
        }
    })
}

/// What the watch decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Take over with this epoch.
    Promote(u64),
    /// Not now, and why.
    Wait(String),
}

/// The rule, on what the probes brought back: `mine` is this node's view, `own` its
/// name, `total` the number of nodes configured (this one included), and `answers`
/// one per peer that answered (with its vote for this node).
pub fn decide(
    mine: &VolumeView,
    own: &str,
    total: usize,
    answers: &[node::ProbeReply],
) -> Decision {
    match rank(mine, own, total, answers) {
        Decision::Promote(epoch) => votes(total, answers.iter().filter(|a| a.granted).count())
            .map_or(Decision::Promote(epoch), Decision::Wait),
        wait => wait,
    }
}

/// Why `granted` votes of peers (and this node's own) are not enough among `total`
/// nodes, if they are not.
fn votes(total: usize, granted: usize) -> Option<String> {
    let votes = 1 + granted;
    (total > 2 && votes * 2 <= total).then(|| {
        format!("no majority of votes: {votes} of {total} (another candidate may have them)")
    })
}

/// The rule but for the votes: whether this node is the one to take over, as far as
/// it can tell from the peers that answered.
fn rank(mine: &VolumeView, own: &str, total: usize, answers: &[node::ProbeReply]) -> Decision {
    let reachable = 1 + answers.len();
    if total > 2 && reachable * 2 <= total {
        return Decision::Wait(format!(
            "no majority: {reachable} of {total} nodes reachable"
        ));
    }
    let mut highest = mine.epoch;
    for node::ProbeReply {
        node,
        volumes: views,
        ..
    } in answers
    {
        let Some(view) = views.iter().find(|w| w.volume == mine.volume) else {
            continue;
        };
        highest = highest.max(view.epoch);
        match view.role {
            Role::Active if view.epoch >= mine.epoch => {
                return Decision::Wait(format!("{node} is active at epoch {}", view.epoch));
            }
            // An active of an older epoch is stale: the new one fences it.
            Role::Active => {}
            Role::Standby if view.hears_active => {
                return Decision::Wait(format!("{node} still hears the active"));
            }
            Role::Standby
                if view.fit
                    && (view.epoch > mine.epoch
                        || (view.epoch == mine.epoch && node.as_str() < own)) =>
            {
                return Decision::Wait(format!(
                    "{node} takes over (fit, epoch {}, and first by the rule)",
                    view.epoch
                ));
            }
            Role::Standby => {}
        }
    }
    Decision::Promote(highest + 1)
}

/// Probes `peers` at once (asking their vote for `vote`, if given); those that
/// answered, with their answers.
async fn probe_all(
    endpoint: &quinn::Endpoint,
    peers: &[Peer],
    vote: Option<&str>,
) -> Vec<(Peer, node::ProbeReply)> {
    let mut asked = tokio::task::JoinSet::new();
    for peer in peers.iter().cloned() {
        let endpoint = endpoint.clone();
        let vote = vote.map(str::to_owned);
        asked.spawn(async move {
            let answer = node::probe(&endpoint, &peer, vote.as_deref(), PROBE_WAIT).await;
            answer.map(|a| (peer, a))
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = asked.join_next().await {
        if let Ok(Some(a)) = answer {
            answers.push(a);
        }
    }
    answers
}

/// Watches the active of `v` while this node is its standby, and promotes this node
/// by [`decide`] once the active has been silent for `peer_timeout`. `promote` takes
/// over with the epoch given; `note` is what status shows.
pub async fn watch<F, Fut>(
    v: Viewed,
    own: String,
    board: Board,
    endpoint: quinn::Endpoint,
    peers: Vec<Peer>,
    note: Arc<Mutex<String>>,
    promote: F,
) where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let say = |text: String| {
        let mut n = note.lock().unwrap_or_else(|e| e.into_inner());
        if *n != text {
            tracing::info!(volume = %v.name, "automatic failover: {text}");
            *n = text;
        }
    };
    // Silence counts from the last message of an active, or from when this node
    // became (or started as) a standby.
    let mut since = Instant::now();
    let mut roles = v.roles.subscribe();
    loop {
        tokio::time::sleep(TICK).await;
        if roles.has_changed().unwrap_or(false) {
            roles.borrow_and_update();
            since = Instant::now();
        }
        if v.roles.get().role != Role::Standby {
            say("this node is active".into());
            continue;
        }
        if let Some(t) = last_heard(&board, &v.name) {
            since = since.max(t);
        }
        if since.elapsed() < v.peer_timeout {
            say(if hears_active(&board, &v.name, v.peer_timeout) {
                "the active answers".into()
            } else {
                "no active heard from yet; waiting for peer_timeout".into()
            });
            continue;
        }
        if let Some(why) = not_candidate(&v) {
            say(format!("the active is silent; not taking over: {why}"));
            continue;
        }
        // First how everyone sees it; only the node the rule picks asks for votes (a
        // node that defers to another must not hold votes the other needs).
        let (reached, answers): (Vec<Peer>, Vec<node::ProbeReply>) =
            probe_all(&endpoint, &peers, None).await.into_iter().unzip();
        // The active may have spoken (or this node changed role) while it asked.
        if v.roles.get().role != Role::Standby || hears_active(&board, &v.name, v.peer_timeout) {
            continue;
        }
        let mine = view(&v, &board);
        let total = peers.len() + 1;
        let decision = match rank(&mine, &own, total, &answers) {
            Decision::Promote(epoch) if total > 2 => {
                // Only those that answered can vote; the others would only cost time.
                let ballots = probe_all(&endpoint, &reached, Some(&v.name)).await;
                votes(total, ballots.iter().filter(|(_, a)| a.granted).count())
                    .map_or(Decision::Promote(epoch), Decision::Wait)
            }
            other => other,
        };
        match decision {
            Decision::Wait(why) => {
                let split = why.starts_with("no majority of votes");
                say(format!("the active is silent; waiting: {why}"));
                if split {
                    // Two candidates split the votes: try again at different times.
                    tokio::time::sleep(jitter(v.peer_timeout)).await;
                }
            }
            Decision::Promote(epoch) => {
                tracing::warn!(volume = %v.name, epoch, silent = ?since.elapsed(),
                    reachable = answers.len() + 1, "automatic failover: the active is silent; taking over");
                match promote(epoch).await {
                    Ok(line) => say(format!("took over: {line}")),
                    Err(e) => say(format!("the takeover failed: {e}")),
                }
                since = Instant::now();
            }
        }
    }
}

/// A random pause up to `most`.
fn jitter(most: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(std::process::id() as u64);
    most.mul_f64((h.finish() % 1000) as f64 / 1000.0)
}

/// Checks once that the active's backing file system takes a new file and a write
/// under `root` (the backing directory). The file is unnamed (`O_TMPFILE`), so the
/// volume's root keeps its modification time and a crash leaves nothing behind; a
/// file system without `O_TMPFILE` gets the create and unlink of a reserved name
/// instead (never visible through the mount, never replicated).
fn probe(root: &std::os::fd::OwnedFd) -> Result<(), String> {
    use std::os::fd::AsFd;
    let failed = |e: std::io::Error| format!("backing directory: {e}");
    let here = std::ffi::OsStr::new(".");
    match twinfs_fs::sys::openat(root.as_fd(), here, libc::O_TMPFILE | libc::O_WRONLY, 0o600) {
        Ok(fd) => twinfs_fs::sys::pwrite(fd.as_fd(), b"x", 0)
            .map(|_| ())
            .map_err(failed),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EISDIR)) => {
            let name = std::ffi::OsStr::new(".twinfs-health");
            let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
            twinfs_fs::sys::openat(root.as_fd(), name, flags, 0o600)
                .and_then(|_| twinfs_fs::sys::unlinkat(root.as_fd(), name, 0))
                .map_err(failed)
        }
        Err(e) => Err(failed(e)),
    }
}

/// Runs `health_command`, if any, for at most `wait`.
fn run_command(command: Option<&str>, wait: Duration) -> Result<(), String> {
    let Some(command) = command else {
        return Ok(());
    };
    let outcome =
        crate::shell::run(command, &[], wait, false).map_err(|e| format!("cannot run sh: {e}"))?;
    match outcome.status {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(format!("health_command: {status}")),
        None => Err(format!("health_command: still running after {wait:?}")),
    }
}

/// Runs `job` on a blocking thread and waits at most `wait` for it. A job that hangs
/// (a backing disk that stopped answering) is kept in `hung` rather than started again
/// beside itself: while it has not returned, every call fails at once.
async fn within<F>(
    hung: &mut Option<tokio::task::JoinHandle<Result<(), String>>>,
    wait: Duration,
    job: F,
) -> Result<(), String>
where
    F: FnOnce() -> Result<(), String> + Send + 'static,
{
    if hung.as_ref().is_some_and(|h| !h.is_finished()) {
        return Err("backing directory: the check before has not returned".to_owned());
    }
    let mut handle = tokio::task::spawn_blocking(job);
    match tokio::time::timeout(wait, &mut handle).await {
        Ok(joined) => {
            *hung = None;
            joined.unwrap_or_else(|e| Err(e.to_string()))
        }
        Err(_) => {
            *hung = Some(handle);
            Err(format!("backing directory: no answer in {wait:?}"))
        }
    }
}

/// What status shows of an active's health.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthStatus {
    /// Failures in a row so far.
    pub failures: u32,
    /// The last failure, if the last check failed.
    pub last_error: Option<String>,
    /// When the node last demoted itself for its health (seconds since the epoch).
    pub demoted_at: Option<u64>,
}

/// Checks the active's health every `interval` while it is active and takes writes;
/// after `failures` failures in a row calls `demote` (which hands the role over).
#[allow(clippy::too_many_arguments)]
pub async fn health<F, Fut>(
    name: String,
    roles: Arc<RoleCell>,
    root: Arc<std::os::fd::OwnedFd>,
    command: Option<String>,
    interval: Duration,
    failures: u32,
    status: Arc<Mutex<HealthStatus>>,
    demote: F,
) where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<String, String>>,
{
    let mut failed = 0u32;
    let mut hung = None;
    loop {
        tokio::time::sleep(interval).await;
        if roles.get().role != Role::Active || roles.volume().role() != Role::Active {
            failed = 0;
            continue;
        }
        let root = root.clone();
        let mut result = within(&mut hung, interval, move || probe(&root)).await;
        if result.is_ok() {
            let command = command.clone();
            result = tokio::task::spawn_blocking(move || run_command(command.as_deref(), interval))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
        }
        let mut s = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match result {
            Ok(()) => {
                failed = 0;
                s.failures = 0;
                s.last_error = None;
            }
            Err(e) => {
                failed += 1;
                tracing::warn!(volume = %name, failures = failed, of = failures, error = %e, "health check failed");
                s.failures = failed;
                s.last_error = Some(e);
            }
        }
        *status.lock().unwrap_or_else(|e| e.into_inner()) = s.clone();
        if failed >= failures {
            tracing::error!(volume = %name, failures = failed, "cannot serve: giving up the active role");
            s.demoted_at = Some(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            );
            // In status before the role changes: whoever sees the node a standby
            // also sees why.
            *status.lock().unwrap_or_else(|e| e.into_inner()) = s;
            match demote().await {
                Ok(line) => tracing::warn!(volume = %name, "{line}"),
                Err(e) => tracing::error!(volume = %name, error = %e, "cannot demote"),
            }
            failed = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_demotion_leaves_the_node_fit_unless_its_health_failed() {
        let demoted = |reason: &str| SyncRecord {
            synced: reason != "health",
            epoch: 4,
            demoted: Some(reason.to_owned()),
            ..SyncRecord::default()
        };
        assert_eq!(unfit(Some(&demoted("manual")), 4), None);
        // Fit for `twinfs promote`, not a candidate of an automatic failover.
        let passed_over = not_candidate_by(Some(&demoted("manual")), 4);
        assert!(
            passed_over
                .as_deref()
                .is_some_and(|w| w.contains("twinfs demote")),
            "{passed_over:?}"
        );
        // Another node became the active since: not before a full sync with it.
        let stale = unfit(Some(&demoted("manual")), 5);
        assert!(
            stale.as_deref().is_some_and(|w| w.contains("epoch 5")),
            "{stale:?}"
        );
        let sick = unfit(Some(&demoted("health")), 4);
        assert!(
            sick.as_deref()
                .is_some_and(|w| w.contains("health") && w.contains("epoch 4")),
            "{sick:?}"
        );
        // A record from before the field existed reads as a full sync's.
        let old: SyncRecord = serde_json::from_str(
            r#"{"synced":true,"at":1,"epoch":2,"priority1_pending":[],"priority1_more":0}"#,
        )
        .expect("parse");
        assert_eq!(old.demoted, None);
        assert_eq!(unfit(Some(&old), 2), None);
        assert_eq!(not_candidate_by(Some(&old), 2), None);
    }

    #[tokio::test]
    async fn a_check_that_hangs_fails_and_is_not_started_again_while_it_hangs() {
        let mut hung = None;
        assert_eq!(
            within(&mut hung, Duration::from_secs(5), || Ok(())).await,
            Ok(())
        );
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let started = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counted = started.clone();
        let stuck = move || {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let _ = wait.recv();
            Ok(())
        };
        let first = within(&mut hung, Duration::from_millis(50), stuck).await;
        assert!(first.is_err_and(|e| e.contains("no answer")));
        let again = within(&mut hung, Duration::from_millis(50), || Ok(())).await;
        assert!(again.is_err_and(|e| e.contains("has not returned")));
        assert_eq!(started.load(std::sync::atomic::Ordering::SeqCst), 1);
        // The disk answers again: so do the checks.
        drop(release);
        let back = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if within(&mut hung, Duration::from_secs(5), || Ok(()))
                    .await
                    .is_ok()
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        assert!(back.is_ok(), "checks never recovered");
    }

    #[test]
    fn the_probe_leaves_the_root_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = twinfs_fs::sys::open_dir_path(dir.path()).expect("open");
        let before = std::fs::metadata(dir.path()).expect("stat");
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(probe(&root), Ok(()));
        let after = std::fs::metadata(dir.path()).expect("stat");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (before.mtime(), before.mtime_nsec()),
            (after.mtime(), after.mtime_nsec())
        );
        assert_eq!(std::fs::read_dir(dir.path()).expect("read_dir").count(), 0);
    }

    #[test]
    fn unfit_says_which_refused_changes_wait_for_repair() {
        let record = SyncRecord {
            synced: false,
            refused: 19,
            last_refused: Some("py/f3: renaming failed".into()),
            priority1_pending: vec!["cmm.conf".into()],
            ..SyncRecord::default()
        };
        let why = unfit(Some(&record), 0).expect("unfit");
        assert_eq!(
            why,
            "not in sync with the last active; 19 streamed change(s) refused here and not \
             yet repaired by a full sync (last: py/f3: renaming failed); priority-1 paths \
             not known to be in sync: cmm.conf"
        );
        let fit = SyncRecord {
            synced: true,
            ..SyncRecord::default()
        };
        assert_eq!(unfit(Some(&fit), 0), None);
        // A record written before `refused` existed still reads.
        let old: SyncRecord = serde_json::from_str(
            r#"{"synced":true,"at":1,"epoch":2,"priority1_pending":[],"priority1_more":0}"#,
        )
        .expect("old record");
        assert_eq!(old.refused, 0);
    }

    fn v(role: Role, epoch: u64, fit: bool, hears: bool) -> VolumeView {
        VolumeView {
            volume: "cmm".into(),
            role,
            epoch,
            fit,
            hears_active: hears,
        }
    }

    /// A peer's answer: its name, its view of the volume (none for a witness), and its
    /// vote.
    fn a(node: &str, view: Option<VolumeView>, granted: bool) -> node::ProbeReply {
        node::ProbeReply {
            node: node.into(),
            volumes: view.into_iter().collect(),
            granted,
        }
    }

    #[test]
    fn the_first_fit_standby_by_name_takes_over() {
        let mine = v(Role::Standby, 1, true, false);
        let other = vec![a("b", Some(v(Role::Standby, 1, true, false)), true)];
        assert_eq!(decide(&mine, "a", 3, &other), Decision::Promote(2));
        assert!(
            matches!(decide(&mine, "c", 3, &other), Decision::Wait(w) if w.contains("b takes over"))
        );
        // An unfit standby does not count; one of a later epoch goes first.
        let unfit = vec![a("b", Some(v(Role::Standby, 1, false, false)), true)];
        assert_eq!(decide(&mine, "c", 3, &unfit), Decision::Promote(2));
        let later = vec![a("z", Some(v(Role::Standby, 2, true, false)), true)];
        assert!(matches!(decide(&mine, "a", 3, &later), Decision::Wait(_)));
    }

    #[test]
    fn no_majority_no_takeover() {
        let mine = v(Role::Standby, 1, true, false);
        assert!(
            matches!(decide(&mine, "a", 3, &[]), Decision::Wait(w) if w.contains("no majority"))
        );
        // Two nodes: no majority needed.
        assert_eq!(decide(&mine, "a", 2, &[]), Decision::Promote(2));
        // A witness (no views) makes the majority, with its vote.
        assert_eq!(
            decide(&mine, "a", 3, &[a("w", None, true)]),
            Decision::Promote(2)
        );
        assert!(matches!(
            decide(&mine, "a", 5, &[a("w", None, true)]),
            Decision::Wait(_)
        ));
        // Reached but its vote went to another candidate.
        assert!(matches!(
            decide(&mine, "a", 3, &[a("w", None, false)]),
            Decision::Wait(w) if w.contains("votes")
        ));
    }

    #[test]
    fn an_active_or_a_standby_that_hears_it_holds_the_takeover() {
        let mine = v(Role::Standby, 3, true, false);
        let active = vec![a("b", Some(v(Role::Active, 3, false, false)), false)];
        assert!(
            matches!(decide(&mine, "a", 2, &active), Decision::Wait(w) if w.contains("active"))
        );
        let stale = vec![a("b", Some(v(Role::Active, 2, false, false)), false)];
        assert_eq!(decide(&mine, "a", 2, &stale), Decision::Promote(4));
        let hears = vec![a("z", Some(v(Role::Standby, 3, true, true)), false)];
        assert!(matches!(decide(&mine, "a", 3, &hears), Decision::Wait(w) if w.contains("hears")));
    }

    #[test]
    fn a_node_votes_for_one_candidate_at_a_time() {
        let ballot = Ballot::default();
        assert!(ballot.grant("cmm", "s1", None));
        assert!(ballot.grant("cmm", "s1", None), "asked again");
        assert!(!ballot.grant("cmm", "s2", None), "a second candidate");
        assert!(ballot.grant("other", "s2", None), "per volume");
        let fresh = Ballot::default();
        let active = v(Role::Active, 1, false, false);
        assert!(
            !fresh.grant("cmm", "s1", Some(&active)),
            "an active votes for nobody"
        );
        let hears = v(Role::Standby, 1, true, true);
        assert!(
            !fresh.grant("cmm", "s1", Some(&hears)),
            "nor one that hears it"
        );
        let silent = v(Role::Standby, 1, true, false);
        assert!(fresh.grant("cmm", "s1", Some(&silent)));
    }

    /// Five nodes, the active dead; two standbys that cannot see each other both reach
    /// the two witnesses: whatever order the witnesses are asked in, at most one of
    /// them gets a majority.
    #[test]
    fn candidates_that_cannot_see_each_other_never_both_win() {
        let mine = v(Role::Standby, 1, true, false);
        for order in [[0, 0, 1, 1], [0, 1, 1, 0], [1, 0, 0, 1], [1, 1, 0, 0]] {
            let witnesses = [Ballot::default(), Ballot::default()];
            let mut answers: [Vec<node::ProbeReply>; 2] = [Vec::new(), Vec::new()];
            // Each step: candidate `c` asks witness `w` (each asks each witness once).
            let steps = [(order[0], 0), (order[1], 1), (order[2], 0), (order[3], 1)];
            let mut asked = [[false; 2]; 2];
            for (c, w) in steps {
                let (c, w) = if asked[c][w] { (c, 1 - w) } else { (c, w) };
                asked[c][w] = true;
                let name = ["s1", "s2"][c];
                let granted = witnesses[w].grant("cmm", name, None);
                answers[c].push(a(["w1", "w2"][w], None, granted));
            }
            let wins = [("s1", &answers[0]), ("s2", &answers[1])]
                .iter()
                .filter(|(name, ans)| matches!(decide(&mine, name, 5, ans), Decision::Promote(_)))
                .count();
            assert!(wins <= 1, "order {order:?}: {wins} winners");
        }
    }

    #[test]
    fn a_backing_directory_that_takes_no_writes_fails_the_check() {
        let dir = tempfile::tempdir().expect("scratch");
        let fd = twinfs_fs::sys::open_dir_path(dir.path()).expect("open");
        assert_eq!(probe(&fd), Ok(()));
        assert_eq!(run_command(None, Duration::from_secs(5)), Ok(()));
        assert_eq!(run_command(Some("true"), Duration::from_secs(5)), Ok(()));
        let failed = run_command(Some("exit 3"), Duration::from_secs(5));
        assert!(failed.is_err_and(|e| e.contains("exit status: 3")));
        let slow = run_command(Some("sleep 5"), Duration::from_millis(100));
        assert!(slow.is_err_and(|e| e.contains("still running")));
        // A filesystem gone read-only (as ext4 does on I/O errors): needs root.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let ro = dir.path().join("ro");
        std::fs::create_dir(&ro).expect("mkdir");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "ro,size=1m", "twinfs-test"])
            .arg(&ro)
            .status()
            .is_ok_and(|s| s.success());
        assert!(mounted, "mount a read-only tmpfs");
        let fd = twinfs_fs::sys::open_dir_path(&ro).expect("open");
        let result = probe(&fd);
        drop(fd);
        let _ = std::process::Command::new("umount").arg(&ro).status();
        assert!(
            result
                .as_ref()
                .is_err_and(|e| e.contains("backing directory")),
            "{result:?}"
        );
    }
}
