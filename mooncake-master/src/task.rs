//! Copy and move tasks, and re-replication.
//!
//! A task copies one object's bytes to new segments (REPLICA_COPY) or moves one replica to
//! another segment (REPLICA_MOVE). The master never touches bytes, so a client does the work:
//!
//! 1. Create: the destination ranges are reserved at once (PROCESSING replicas held by the task;
//!    `NO_AVAILABLE_HANDLE` if there is no room) and the task is PENDING.
//! 2. FetchTasks by a client that holds a source replica: PENDING -> PROCESSING, and the client
//!    gets the source and destination descriptors.
//! 3. FinishTask(Success): the destinations become COMPLETE replicas of the object; a move then
//!    drops the source replica (kept reserved until an active read lease ends). FinishTask(Failed),
//!    a timeout or the executor's death sends the task back to PENDING, up to `task_max_retries`
//!    times, then FAILED (destinations freed).
//!
//! At most one unfinished task exists per object (`OBJECT_HAS_REPLICATION_TASK` otherwise). An
//! upsert that commits, or a removal, cancels it. Re-replication creates copy tasks by itself when
//! a lost segment leaves an object with fewer committed replicas than it asked for.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::placement::Placement;
use super::replica::{Replica, ReplicaDescriptor, ReplicaStatus};
use super::segment::release;
use super::types::{ClientId, LeaseDeadline, ReplicaId, SegmentId, TaskId, Timestamp};
use super::Master;
use mooncake_core::allocator::Allocator;
use mooncake_core::error::ErrorCode;

/// Kind of task, with upstream's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum TaskType {
    /// Copy an object to more segments (`REPLICA_COPY` = 0).
    ReplicaCopy = 0,
    /// Move one replica to another segment (`REPLICA_MOVE` = 1).
    ReplicaMove = 1,
}

/// Task lifecycle, with upstream's values.
///
/// ```text
/// PENDING --fetch--> PROCESSING --success--> SUCCESS
///    ^  |                 |
///    |  +--cancel--+      +--failure, retries left--> PENDING
///    |             v      +--failure, none left-----> FAILED
///    +---------- FAILED <-+--cancel
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum TaskStatus {
    /// Queued (`PENDING` = 0).
    Pending = 0,
    /// A client is executing it (`PROCESSING` = 1).
    Processing = 1,
    /// Gave up (`FAILED` = 2).
    Failed = 2,
    /// Done (`SUCCESS` = 3).
    Success = 3,
}

impl TaskStatus {
    /// Whether the task is finished.
    pub fn is_terminal(self) -> bool {
        matches!(self, TaskStatus::Failed | TaskStatus::Success)
    }

    /// Whether the lifecycle allows going from `self` to `to`.
    pub fn can_transition(self, to: TaskStatus) -> bool {
        use TaskStatus::*;
        matches!(
            (self, to),
            (Pending, Processing)
                | (Pending, Failed)
                | (Processing, Pending)
                | (Processing, Success)
                | (Processing, Failed)
        )
    }

    /// The status after moving to `to`, or `UNAVAILABLE_IN_CURRENT_STATUS`.
    pub fn transition(self, to: TaskStatus) -> Result<TaskStatus, ErrorCode> {
        if self.can_transition(to) {
            Ok(to)
        } else {
            Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS)
        }
    }
}

/// Who asked for a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskOrigin {
    /// A client's `create_copy_task` / `create_move_task`.
    User,
    /// The master, to restore `replica_num` after a segment was lost.
    Rereplication,
}

/// How the executing client says a task went.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskOutcome {
    /// Every destination holds the bytes.
    Success,
    /// The copy failed with this code.
    Failed(ErrorCode),
}

/// A task as `query_task` reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// Id.
    pub id: TaskId,
    /// Copy or move.
    pub kind: TaskType,
    /// User or re-replication.
    pub origin: TaskOrigin,
    /// Status.
    pub status: TaskStatus,
    /// The object.
    pub key: String,
    /// Source segment of a move.
    pub source: Option<String>,
    /// Target segments.
    pub targets: Vec<String>,
    /// Executing client while PROCESSING.
    pub assigned_client: Option<ClientId>,
    /// Failed attempts so far.
    pub attempts: u32,
    /// Creation time.
    pub created_at: Timestamp,
    /// Time of the last status change.
    pub updated_at: Timestamp,
    /// Last error.
    pub error: Option<ErrorCode>,
}

/// What a client fetched for execution: copy `size` bytes from `source` to each destination.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskAssignment {
    /// Task to report on with FinishTask.
    pub task_id: TaskId,
    /// Copy or move.
    pub kind: TaskType,
    /// The object.
    pub key: String,
    /// Bytes to copy.
    pub size: u64,
    /// A COMPLETE replica on one of the client's segments.
    pub source: ReplicaDescriptor,
    /// PROCESSING destination replicas.
    pub destinations: Vec<ReplicaDescriptor>,
}

/// The master's record of a task.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Task {
    pub(crate) id: TaskId,
    pub(crate) seq: u64,
    pub(crate) kind: TaskType,
    pub(crate) origin: TaskOrigin,
    pub(crate) key: String,
    pub(crate) source: Option<String>,
    pub(crate) targets: Vec<String>,
    /// Reserved destination replicas (PROCESSING); empty once the task is finished.
    pub(crate) dests: Vec<Replica>,
    pub(crate) status: TaskStatus,
    /// Executing client and the segment it copies from, while PROCESSING.
    pub(crate) assigned: Option<(ClientId, SegmentId)>,
    pub(crate) attempts: u32,
    pub(crate) created_at: Timestamp,
    pub(crate) updated_at: Timestamp,
    pub(crate) error: Option<ErrorCode>,
}

impl Task {
    fn set(&mut self, to: TaskStatus, now: Timestamp) {
        match self.status.transition(to) {
            Ok(s) => self.status = s,
            Err(_) => debug_assert!(false, "illegal task transition {:?} -> {to:?}", self.status),
        }
        self.updated_at = now;
    }

    fn info(&self) -> TaskInfo {
        TaskInfo {
            id: self.id,
            kind: self.kind,
            origin: self.origin,
            status: self.status,
            key: self.key.clone(),
            source: self.source.clone(),
            targets: self.targets.clone(),
            assigned_client: self.assigned.map(|(c, _)| c),
            attempts: self.attempts,
            created_at: self.created_at,
            updated_at: self.updated_at,
            error: self.error,
        }
    }
}

impl Master {
    fn active_task_count(&self) -> usize {
        self.tasks
            .values()
            .filter(|t| !t.status.is_terminal())
            .count()
    }

    /// Checks that a task may be created on `key`; returns the object's size.
    fn task_precheck(&self, key: &str) -> Result<u64, ErrorCode> {
        let obj = self.objects.get(key).ok_or(ErrorCode::OBJECT_NOT_FOUND)?;
        if obj.replicas.is_empty() {
            return Err(ErrorCode::REPLICA_IS_NOT_READY);
        }
        if obj.pending.is_some() {
            return Err(ErrorCode::OBJECT_REPLICA_BUSY);
        }
        if obj.task.is_some() {
            return Err(ErrorCode::OBJECT_HAS_REPLICATION_TASK);
        }
        if self.active_task_count() >= self.config.max_active_tasks {
            return Err(ErrorCode::TASK_PENDING_LIMIT_EXCEEDED);
        }
        Ok(obj.size)
    }

    /// Reserves `size` bytes on each named target (all or nothing).
    fn reserve_targets(
        &mut self,
        key: &str,
        targets: &[String],
        size: u64,
    ) -> Result<Vec<Replica>, ErrorCode> {
        let held: BTreeSet<SegmentId> = self.objects[key].segments().collect();
        let mut ids = Vec::with_capacity(targets.len());
        for name in targets {
            let id = *self
                .segment_names
                .get(name)
                .ok_or(ErrorCode::SEGMENT_NOT_FOUND)?;
            if held.contains(&id) {
                return Err(ErrorCode::REPLICA_ALREADY_EXISTS);
            }
            if ids.contains(&id) {
                return Err(ErrorCode::INVALID_PARAMS);
            }
            ids.push(id);
        }
        let mut dests: Vec<Replica> = Vec::with_capacity(ids.len());
        for id in ids {
            let seg = self.segments.get_mut(&id).expect("resolved above");
            match seg.allocator.allocate(size) {
                Some(alloc) => {
                    let rid = ReplicaId(self.next_replica_id);
                    self.next_replica_id += 1;
                    dests.push(Replica::processing(rid, id, alloc));
                }
                None => {
                    for r in &mut dests {
                        release(
                            &mut self.segments,
                            r,
                            LeaseDeadline::default(),
                            Timestamp::ZERO,
                        );
                    }
                    self.eviction_requested = true;
                    return Err(ErrorCode::NO_AVAILABLE_HANDLE);
                }
            }
        }
        Ok(dests)
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_task(
        &mut self,
        now: Timestamp,
        key: &str,
        kind: TaskType,
        origin: TaskOrigin,
        source: Option<String>,
        targets: Vec<String>,
        dests: Vec<Replica>,
    ) -> TaskId {
        let mut id = TaskId(self.rng.uuid());
        while self.tasks.contains_key(&id) {
            id = TaskId(self.rng.uuid());
        }
        let seq = self.next_task_seq;
        self.next_task_seq += 1;
        self.tasks.insert(
            id,
            Task {
                id,
                seq,
                kind,
                origin,
                key: key.to_owned(),
                source,
                targets,
                dests,
                status: TaskStatus::Pending,
                assigned: None,
                attempts: 0,
                created_at: now,
                updated_at: now,
                error: None,
            },
        );
        self.objects.get_mut(key).expect("prechecked").task = Some(id);
        self.counters.tasks_created += 1;
        id
    }

    pub(crate) fn create_copy_task(
        &mut self,
        now: Timestamp,
        key: &str,
        targets: Vec<String>,
    ) -> Result<TaskId, ErrorCode> {
        let size = self.task_precheck(key)?;
        if targets.is_empty() {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        let dests = self.reserve_targets(key, &targets, size)?;
        Ok(self.insert_task(
            now,
            key,
            TaskType::ReplicaCopy,
            TaskOrigin::User,
            None,
            targets,
            dests,
        ))
    }

    pub(crate) fn create_move_task(
        &mut self,
        now: Timestamp,
        key: &str,
        source: String,
        target: String,
    ) -> Result<TaskId, ErrorCode> {
        let size = self.task_precheck(key)?;
        if source == target {
            return Err(ErrorCode::INVALID_PARAMS);
        }
        let src = *self
            .segment_names
            .get(&source)
            .ok_or(ErrorCode::SEGMENT_NOT_FOUND)?;
        if !self.objects[key].segments().any(|s| s == src) {
            return Err(ErrorCode::REPLICA_NOT_FOUND);
        }
        let targets = vec![target];
        let dests = self.reserve_targets(key, &targets, size)?;
        Ok(self.insert_task(
            now,
            key,
            TaskType::ReplicaMove,
            TaskOrigin::User,
            Some(source),
            targets,
            dests,
        ))
    }

    /// Tries to restore `key`'s replica count with a copy task. Returns whether the key needs no
    /// more attention (restored, gone, or nothing to do).
    fn rereplicate(&mut self, now: Timestamp, key: &str) -> bool {
        let Some(obj) = self.objects.get(key) else {
            return true;
        };
        let missing = (obj.replica_num as usize).saturating_sub(obj.replicas.len());
        if missing == 0 || obj.replicas.is_empty() {
            return true;
        }
        if !self.config.enable_rereplication
            || obj.pending.is_some()
            || obj.task.is_some()
            || self.active_task_count() >= self.config.max_active_tasks
        {
            return false;
        }
        let size = obj.size;
        let exclude: BTreeSet<SegmentId> = obj.segments().collect();
        let avoid_hosts = exclude
            .iter()
            .map(|s| self.segments[s].host.clone())
            .collect();
        let placed = self.place(Placement {
            size,
            count: missing,
            requester: None,
            config: None,
            exclude: &exclude,
            avoid_hosts,
        });
        if placed.is_empty() {
            return false;
        }
        let mut targets = Vec::with_capacity(placed.len());
        let mut dests = Vec::with_capacity(placed.len());
        for (seg, alloc) in placed {
            targets.push(self.segments[&seg].name.clone());
            let rid = ReplicaId(self.next_replica_id);
            self.next_replica_id += 1;
            dests.push(Replica::processing(rid, seg, alloc));
        }
        let id = self.insert_task(
            now,
            key,
            TaskType::ReplicaCopy,
            TaskOrigin::Rereplication,
            None,
            targets,
            dests,
        );
        self.counters.rereplications_scheduled += 1;
        tracing::debug!(key, task = %id, missing, "re-replication scheduled");
        false
    }

    /// Tries re-replication for every key that may need it.
    pub(crate) fn retry_rereplication(&mut self, now: Timestamp) {
        let keys: Vec<String> = self.under_replicated.iter().cloned().collect();
        for key in keys {
            if self.rereplicate(now, &key) {
                self.under_replicated.remove(&key);
            }
        }
    }

    pub(crate) fn fetch_tasks(
        &mut self,
        now: Timestamp,
        client: ClientId,
        max: u32,
    ) -> Vec<TaskAssignment> {
        let mut pending: Vec<(u64, TaskId)> = self
            .tasks
            .values()
            .filter(|t| t.status == TaskStatus::Pending)
            .map(|t| (t.seq, t.id))
            .collect();
        pending.sort_unstable();
        let mut out = Vec::new();
        for (_, id) in pending {
            if out.len() >= max as usize {
                break;
            }
            let task = &self.tasks[&id];
            let Some(obj) = self.objects.get(&task.key) else {
                continue;
            };
            let wanted = task
                .source
                .as_ref()
                .and_then(|name| self.segment_names.get(name).copied());
            let source = obj.replicas.iter().find(|r| {
                self.segments[&r.segment].client == client && wanted.is_none_or(|w| w == r.segment)
            });
            let Some(source) = source else {
                continue;
            };
            let seg = &self.segments[&source.segment];
            let assignment = TaskAssignment {
                task_id: id,
                kind: task.kind,
                key: task.key.clone(),
                size: obj.size,
                source: seg.descriptor(source, obj.size),
                destinations: self.descriptors(&task.dests, obj.size),
            };
            let source_seg = source.segment;
            let task = self.tasks.get_mut(&id).expect("listed");
            task.set(TaskStatus::Processing, now);
            task.assigned = Some((client, source_seg));
            out.push(assignment);
        }
        out
    }

    pub(crate) fn finish_task(
        &mut self,
        now: Timestamp,
        client: ClientId,
        id: TaskId,
        outcome: TaskOutcome,
    ) -> Result<(), ErrorCode> {
        let task = self.tasks.get(&id).ok_or(ErrorCode::TASK_NOT_FOUND)?;
        if task.status != TaskStatus::Processing {
            return Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
        }
        if task.assigned.map(|(c, _)| c) != Some(client) {
            return Err(ErrorCode::ILLEGAL_CLIENT);
        }
        match outcome {
            TaskOutcome::Success => {
                self.commit_task(now, id);
                Ok(())
            }
            TaskOutcome::Failed(code) => {
                self.fail_attempt(now, id, code);
                Ok(())
            }
        }
    }

    fn commit_task(&mut self, now: Timestamp, id: TaskId) {
        let task = self.tasks.get_mut(&id).expect("checked by caller");
        let mut dests = std::mem::take(&mut task.dests);
        let key = task.key.clone();
        let source = (task.kind == TaskType::ReplicaMove)
            .then(|| task.assigned.map(|(_, s)| s))
            .flatten();
        task.set(TaskStatus::Success, now);
        task.assigned = None;
        self.counters.tasks_succeeded += 1;
        let obj = self
            .objects
            .get_mut(&key)
            .expect("an unfinished task's object exists");
        obj.task = None;
        for r in &mut dests {
            r.set(ReplicaStatus::Complete);
        }
        obj.replicas.append(&mut dests);
        if let Some(src) = source {
            if let Some(pos) = obj.replicas.iter().position(|r| r.segment == src) {
                let mut r = obj.replicas.remove(pos);
                release(&mut self.segments, &mut r, obj.lease, now);
            }
        }
        if obj.replicas.len() >= obj.replica_num as usize {
            self.under_replicated.remove(&key);
        }
    }

    /// Counts a failed attempt: back to PENDING, or FAILED when retries are used up.
    fn fail_attempt(&mut self, now: Timestamp, id: TaskId, code: ErrorCode) {
        let max = self.config.task_max_retries;
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        task.attempts += 1;
        task.error = Some(code);
        if task.attempts > max {
            self.end_task(now, id, TaskStatus::Failed, code);
        } else {
            task.set(TaskStatus::Pending, now);
            task.assigned = None;
            self.counters.task_retries += 1;
        }
    }

    /// Ends an unfinished task as FAILED (freeing its destinations) and detaches it from its
    /// object. `status` must be FAILED; success goes through `commit_task`.
    pub(crate) fn end_task(
        &mut self,
        now: Timestamp,
        id: TaskId,
        status: TaskStatus,
        code: ErrorCode,
    ) {
        debug_assert_eq!(status, TaskStatus::Failed);
        let Some(task) = self.tasks.get_mut(&id) else {
            return;
        };
        if task.status.is_terminal() {
            return;
        }
        for r in &mut task.dests {
            r.set(ReplicaStatus::Failed);
            release(&mut self.segments, r, LeaseDeadline::default(), now);
        }
        task.dests.clear();
        task.set(status, now);
        task.assigned = None;
        task.error = Some(code);
        self.counters.tasks_failed += 1;
        if let Some(obj) = self.objects.get_mut(&task.key) {
            if obj.task == Some(id) {
                obj.task = None;
            }
        }
    }

    pub(crate) fn task_timeout(&mut self, now: Timestamp, id: TaskId) -> Result<(), ErrorCode> {
        let task = self.tasks.get(&id).ok_or(ErrorCode::TASK_NOT_FOUND)?;
        if task.status != TaskStatus::Processing
            || now.since(task.updated_at) < self.config.task_timeout_ms
        {
            return Err(ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS);
        }
        self.fail_attempt(now, id, ErrorCode::RPC_TIMEOUT);
        Ok(())
    }

    /// A segment is gone: drop task destinations on it, and fail attempts that read from it.
    pub(crate) fn tasks_on_segment_lost(&mut self, now: Timestamp, id: SegmentId, name: &str) {
        let ids: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| !t.status.is_terminal())
            .map(|t| t.id)
            .collect();
        for tid in ids {
            let task = self.tasks.get_mut(&tid).expect("listed");
            task.dests.retain(|r| r.segment != id);
            if task.kind == TaskType::ReplicaMove && task.source.as_deref() == Some(name) {
                self.end_task(now, tid, TaskStatus::Failed, ErrorCode::REPLICA_IS_GONE);
            } else if task.dests.is_empty() {
                self.end_task(now, tid, TaskStatus::Failed, ErrorCode::SEGMENT_NOT_FOUND);
            } else if task.assigned.is_some_and(|(_, s)| s == id) {
                self.fail_attempt(now, tid, ErrorCode::REPLICA_IS_GONE);
            }
        }
    }

    /// A client is gone: the tasks it was executing count as failed attempts.
    pub(crate) fn tasks_on_client_lost(&mut self, now: Timestamp, client: ClientId) {
        let ids: Vec<TaskId> = self
            .tasks
            .values()
            .filter(|t| {
                t.status == TaskStatus::Processing && t.assigned.is_some_and(|(c, _)| c == client)
            })
            .map(|t| t.id)
            .collect();
        for id in ids {
            self.fail_attempt(now, id, ErrorCode::RPC_FAIL);
        }
    }

    /// Forgets finished tasks older than the retention period; returns how many.
    pub(crate) fn purge_tasks(&mut self, now: Timestamp) -> u64 {
        let keep = self.config.task_retention_ms;
        let before = self.tasks.len();
        self.tasks
            .retain(|_, t| !(t.status.is_terminal() && now.since(t.updated_at) >= keep));
        (before - self.tasks.len()) as u64
    }

    /// A task's public view.
    pub(crate) fn task_info(&self, id: TaskId) -> Result<TaskInfo, ErrorCode> {
        self.tasks
            .get(&id)
            .map(Task::info)
            .ok_or(ErrorCode::TASK_NOT_FOUND)
    }
}
