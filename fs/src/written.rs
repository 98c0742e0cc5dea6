//! Which byte ranges of large files were written through the mount, so that the
//! replicator can bring a file's block list up to date by reading only those ranges
//! (a 1 MiB change in a 512 MiB file then costs 1 MiB of reading and hashing, not
//! 512 MiB).
//!
//! The replicator *watches* a file by taking its record ([`Written::take`]): that
//! returns what was written since the last take and starts a new, empty record.
//! Between two takes, every change of the file's bytes through the mount is added to
//! the record after it happened (a write, a truncation, an `fallocate`, an `O_TRUNC`
//! open), so the bytes the replicator read after a take, plus the ranges of the next
//! take, describe the file as it is at that next take.
//!
//! A record is *spoiled* when twinfs cannot see the writes, on a volume served by
//! FUSE passthrough (only volumes without peers are), and every record is dropped
//! when the volume becomes a standby (the replicator itself writes a standby's
//! files). Writes that bypass the mount altogether (a process that opened the
//! backing file before the mount) are not seen either; neither are they recorded as
//! changes.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Mutex;

use crate::inode::Key;

/// Files from this size are watched (smaller ones are cheap to read whole).
pub const TRACK_MIN: u64 = 16 << 20;

/// Most files watched at once: past that, every record is dropped (a record not
/// found only costs a full read of its file).
const MAX_WATCHED: usize = 4096;

/// Most separate ranges in one record: past that, it is spoiled.
const MAX_RANGES: usize = 1024;

/// What was written to a file since its record was taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// These ranges, sorted, none overlapping or touching; a range may end at
    /// `u64::MAX` (everything from its start, as after a truncation).
    Ranges(Vec<Range<u64>>),
    /// Unknown: the file must be read whole.
    Spoiled,
}

impl Record {
    fn add(&mut self, range: Range<u64>) {
        let Record::Ranges(ranges) = self else {
            return;
        };
        if range.is_empty() {
            return;
        }
        // The first range that ends at or after the new one's start can merge with it.
        let at = ranges.partition_point(|r| r.end < range.start);
        let mut merged = range;
        let mut end = at;
        while end < ranges.len() && ranges[end].start <= merged.end {
            merged.start = merged.start.min(ranges[end].start);
            merged.end = merged.end.max(ranges[end].end);
            end += 1;
        }
        ranges.splice(at..end, std::iter::once(merged));
        if ranges.len() > MAX_RANGES {
            *self = Record::Spoiled;
        }
    }
}

/// The records of the watched files, by backing file.
#[derive(Default)]
pub struct Written {
    records: Mutex<HashMap<Key, Record>>,
}

impl Written {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Record>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `range` to the record of `key`, if it is watched. Call after the write.
    pub fn record(&self, key: Key, range: Range<u64>) {
        if let Some(record) = self.records().get_mut(&key) {
            record.add(range);
        }
    }

    /// Drops the record of `key`.
    pub fn forget(&self, key: Key) {
        self.records().remove(&key);
    }

    /// Drops every record.
    pub fn forget_all(&self) {
        self.records().clear();
    }

    /// What was written to `key` since the last take, `None` if it was not watched;
    /// starts a new record (spoiled at once if `spoiled`).
    pub fn take(&self, key: Key, spoiled: bool) -> Option<Record> {
        let mut records = self.records();
        if records.len() >= MAX_WATCHED && !records.contains_key(&key) {
            records.clear();
        }
        let fresh = if spoiled {
            Record::Spoiled
        } else {
            Record::Ranges(Vec::new())
        };
        records.insert(key, fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_and_stay_sorted() {
        let mut r = Record::Ranges(Vec::new());
        r.add(10..20);
        r.add(30..40);
        r.add(0..5);
        r.add(5..5);
        assert_eq!(r, Record::Ranges(vec![0..5, 10..20, 30..40]));
        r.add(18..31);
        assert_eq!(r, Record::Ranges(vec![0..5, 10..40]));
        r.add(5..10);
        let whole: Range<u64> = 0..40;
        assert_eq!(r, Record::Ranges(vec![whole]));
        r.add(100..u64::MAX);
        r.add(50..60);
        assert_eq!(r, Record::Ranges(vec![0..40, 50..60, 100..u64::MAX]));
        r.add(200..300);
        assert_eq!(r, Record::Ranges(vec![0..40, 50..60, 100..u64::MAX]));
    }

    #[test]
    fn too_many_ranges_spoil_the_record() {
        let mut r = Record::Ranges(Vec::new());
        for i in 0..=MAX_RANGES as u64 {
            r.add(i * 10..i * 10 + 1);
        }
        assert_eq!(r, Record::Spoiled);
        r.add(0..1);
        assert_eq!(r, Record::Spoiled);
    }

    #[test]
    fn only_watched_files_are_recorded_and_a_take_starts_afresh() {
        let w = Written::default();
        let key = (1, 2);
        w.record(key, 0..10);
        assert_eq!(
            w.take(key, false),
            None,
            "not watched before its first take"
        );
        w.record(key, 0..10);
        w.record(key, 20..30);
        assert_eq!(
            w.take(key, false),
            Some(Record::Ranges(vec![0..10, 20..30]))
        );
        assert_eq!(w.take(key, true), Some(Record::Ranges(vec![])));
        w.record(key, 0..1);
        assert_eq!(w.take(key, false), Some(Record::Spoiled), "started spoiled");
        w.forget_all();
        assert_eq!(w.take(key, false), None);
    }
}
