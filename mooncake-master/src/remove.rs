//! Removal: by key, in batches, by regular expression, and everything.
//!
//! `Remove(key, force=false)` refuses a leased object (`OBJECT_HAS_LEASE`), an object with a
//! write in progress (`REPLICA_IS_NOT_READY`, as upstream) and one whose copy/move task is being
//! executed (`OBJECT_HAS_REPLICATION_TASK`); a queued task is cancelled. With `force` it removes
//! regardless; ranges still covered by a read lease are then kept reserved until the lease ends,
//! so the key disappears at once but a reader mid-transfer never sees its bytes overwritten.
//! `RemoveAll` and `RemoveByRegex` skip, without `force`, what `Remove` would refuse, and return
//! how many objects they removed. Regexes use search semantics (anchor with `^...$` for a whole
//! key match).

use super::segment::release;
use super::task::TaskStatus;
use super::types::{LeaseDeadline, Timestamp};
use super::Master;
use mooncake_core::error::ErrorCode;

/// Largest compiled regex accepted from a client, in bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Master {
    /// Why `key` may not be removed without force, if it may not.
    fn removal_blocker(&self, now: Timestamp, key: &str) -> Result<(), ErrorCode> {
        let obj = self.objects.get(key).ok_or(ErrorCode::OBJECT_NOT_FOUND)?;
        if obj.is_leased(now) {
            return Err(ErrorCode::OBJECT_HAS_LEASE);
        }
        if obj.pending.is_some() {
            return Err(ErrorCode::REPLICA_IS_NOT_READY);
        }
        if let Some(t) = obj.task {
            if self
                .tasks
                .get(&t)
                .is_some_and(|t| t.status == TaskStatus::Processing)
            {
                return Err(ErrorCode::OBJECT_HAS_REPLICATION_TASK);
            }
        }
        Ok(())
    }

    pub(crate) fn remove(
        &mut self,
        now: Timestamp,
        key: &str,
        force: bool,
    ) -> Result<(), ErrorCode> {
        if !self.objects.contains_key(key) {
            return Err(ErrorCode::OBJECT_NOT_FOUND);
        }
        if !force {
            self.removal_blocker(now, key)?;
        }
        self.remove_object(now, key);
        self.counters.removes += 1;
        Ok(())
    }

    /// Removes `key` unconditionally: committed replicas are freed (or retired while leased),
    /// a write in progress is freed, an unfinished task is cancelled.
    pub(crate) fn remove_object(&mut self, now: Timestamp, key: &str) {
        let Some(mut obj) = self.objects.remove(key) else {
            return;
        };
        if let Some(p) = &obj.pending {
            self.writes.remove(&(p.started_at, key.to_owned()));
        }
        for r in &mut obj.replicas {
            release(&mut self.segments, r, obj.lease, now);
        }
        if let Some(p) = &mut obj.pending {
            for r in &mut p.replicas {
                release(&mut self.segments, r, LeaseDeadline::default(), now);
            }
        }
        if let Some(t) = obj.task {
            self.end_task(now, t, TaskStatus::Failed, ErrorCode::OBJECT_NOT_FOUND);
        }
        self.under_replicated.remove(key);
    }

    /// Removes every key `matches` accepts and `force` allows; returns the count.
    fn remove_matching(
        &mut self,
        now: Timestamp,
        force: bool,
        matches: impl Fn(&str) -> bool,
    ) -> u64 {
        let keys: Vec<String> = self
            .objects
            .keys()
            .filter(|k| matches(k) && (force || self.removal_blocker(now, k).is_ok()))
            .cloned()
            .collect();
        for k in &keys {
            self.remove_object(now, k);
        }
        self.counters.removes += keys.len() as u64;
        keys.len() as u64
    }

    pub(crate) fn remove_all(&mut self, now: Timestamp, force: bool) -> u64 {
        self.remove_matching(now, force, |_| true)
    }

    pub(crate) fn remove_by_regex(
        &mut self,
        now: Timestamp,
        pattern: &str,
        force: bool,
    ) -> Result<u64, ErrorCode> {
        let re = regex::RegexBuilder::new(pattern)
            .size_limit(REGEX_SIZE_LIMIT)
            .build()
            .map_err(|_| ErrorCode::INVALID_PARAMS)?;
        Ok(self.remove_matching(now, force, |k| re.is_match(k)))
    }
}
