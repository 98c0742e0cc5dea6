//! Standby: local writes of upstream paths (`direction = "both"`) and the
//! replicator's applies of the active's changes take turns, never interleaved.
//!
//! A local write (the change and its record: a write, a namespace operation, the
//! record a close, fsync or release makes) holds a [`WriteTurn`]; the replicator holds
//! an [`ApplyTurn`] while it ships the records made so far and then applies one op of
//! the active. So a write is either recorded before the op (and shipped upstream based
//! on the version it replaced, before that version goes) or made after it (and a
//! close then finds its file replaced, and hands what it wrote to the rescue). Without
//! turns, a close recorded between the two would be read after the op, and the
//! active's version shipped in its place (or its own version shipped as if based on
//! the active's).
//!
//! A writer that waits for the standbys (a `sync` path) does so after its turn: the
//! replicator may need the turn to get there. [`after_turn`] defers such waits.

use std::cell::RefCell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Something to do once the calling thread holds no write turn any more.
pub type Wait = Box<dyn FnOnce() + Send>;

/// The turns of one volume.
#[derive(Default)]
pub struct Turns {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    writers: usize,
    applying: bool,
    /// Applies waiting for the writers under way: new writes wait behind them (but
    /// for one nested in a write of the same thread, which the apply waits for).
    waiting: usize,
}

thread_local! {
    /// The write turns this thread holds, and what waits for them to end.
    static HELD: RefCell<(usize, Vec<Wait>)> = const { RefCell::new((0, Vec::new())) };
}

impl Turns {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A local write's turn: waits while the replicator applies an op.
    pub(crate) fn write(&self) -> WriteTurn<'_> {
        let nested = HELD.with(|held| held.borrow().0 > 0);
        let mut state = self.lock();
        while state.applying || (state.waiting > 0 && !nested) {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.writers += 1;
        drop(state);
        HELD.with(|held| held.borrow_mut().0 += 1);
        WriteTurn { turns: self }
    }

    /// The replicator's turn: waits for the local writes under way (each is short: a
    /// system call and its record), and holds new ones back until dropped.
    pub fn apply(self: &Arc<Self>) -> ApplyTurn {
        let mut state = self.lock();
        state.waiting += 1;
        while state.applying || state.writers > 0 {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.waiting -= 1;
        state.applying = true;
        ApplyTurn {
            turns: self.clone(),
        }
    }

    /// [`Turns::apply`] if no local write is under way now.
    pub fn try_apply(self: &Arc<Self>) -> Option<ApplyTurn> {
        let mut state = self.lock();
        if state.applying || state.writers > 0 {
            return None;
        }
        state.applying = true;
        Some(ApplyTurn {
            turns: self.clone(),
        })
    }
}

/// Runs `wait` now, or, if this thread holds a write turn, once it holds none.
pub(crate) fn after_turn(wait: Wait) {
    let now = HELD.with(|held| {
        let mut held = held.borrow_mut();
        if held.0 == 0 {
            Some(wait)
        } else {
            held.1.push(wait);
            None
        }
    });
    if let Some(wait) = now {
        wait();
    }
}

/// A local write's turn (see [`Turns::write`]).
pub struct WriteTurn<'a> {
    turns: &'a Turns,
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        let mut state = self.turns.lock();
        state.writers -= 1;
        if state.writers == 0 {
            self.turns.changed.notify_all();
        }
        drop(state);
        let waits = HELD.with(|held| {
            let mut held = held.borrow_mut();
            held.0 -= 1;
            if held.0 == 0 {
                std::mem::take(&mut held.1)
            } else {
                Vec::new()
            }
        });
        for wait in waits {
            wait();
        }
    }
}

/// The replicator's turn (see [`Turns::apply`]); local writes of upstream paths go on
/// once it is dropped.
pub struct ApplyTurn {
    turns: Arc<Turns>,
}

impl Drop for ApplyTurn {
    fn drop(&mut self) {
        self.turns.lock().applying = false;
        self.turns.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn an_apply_waits_for_the_writes_under_way_and_holds_new_ones_back() {
        let turns = Arc::new(Turns::default());
        let writing = turns.write();
        assert!(turns.try_apply().is_none(), "a write is under way");
        let applied = Arc::new(AtomicBool::new(false));
        let released = Arc::new(AtomicBool::new(false));
        let (t, a, r) = (turns.clone(), applied.clone(), released.clone());
        let applier = std::thread::spawn(move || {
            let turn = t.apply();
            a.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            r.store(true, Ordering::SeqCst);
            drop(turn);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !applied.load(Ordering::SeqCst),
            "the apply went ahead of a write"
        );
        drop(writing);
        while !applied.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        // The apply holds the turn: a new write waits for it to end.
        drop(turns.write());
        assert!(
            released.load(Ordering::SeqCst),
            "a write went ahead of an apply"
        );
        applier.join().expect("applier");
        assert!(turns.try_apply().is_some());
    }

    #[test]
    fn a_wait_made_during_a_write_turn_runs_after_it() {
        let turns = Turns::default();
        let ran = Arc::new(AtomicBool::new(false));
        let outer = turns.write();
        let inner = turns.write();
        let r = ran.clone();
        after_turn(Box::new(move || r.store(true, Ordering::SeqCst)));
        drop(inner);
        assert!(!ran.load(Ordering::SeqCst), "ran inside the outer turn");
        drop(outer);
        assert!(ran.load(Ordering::SeqCst));
        // Outside any turn it runs at once.
        let r = ran.clone();
        after_turn(Box::new(move || r.store(false, Ordering::SeqCst)));
        assert!(!ran.load(Ordering::SeqCst));
    }
}
