//! The history checker: per key, every read must be explained by a write that could still be the
//! key's value when the read ran, and the final reads (after the chaos stopped) must find each
//! key's last acknowledged write.
//!
//! What the store promises, and so what is checked:
//! - An **upsert** acknowledged `Ok` replaced the value somewhere inside its call.
//! - A **put** acknowledged `Ok` either stored its value or found the key taken (a committed
//!   value, or an unfinished write of another caller younger than the takeover time) and left it
//!   as it was: upstream's put-if-absent. It counts as a definite write only when nothing else
//!   could have occupied the key (see [`definite_put`]).
//! - A **remove** acknowledged `Ok` removed the key; refused with `OBJECT_HAS_LEASE` it did
//!   nothing. A remove answered `OBJECT_NOT_FOUND` may have been applied by an earlier attempt
//!   of the same call (removes are not idempotent across retries), so its outcome is unknown;
//!   such answers on a key known to hold a value are counted as wrong outcomes.
//! - A write refused at its start (`OBJECT_ALREADY_EXISTS`, `OBJECT_REPLICA_BUSY`,
//!   `NO_AVAILABLE_HANDLE`, `INVALID_PARAMS`) did nothing; any other error leaves the outcome
//!   unknown: applied or not. An error a master answered (or one the client saw after its last
//!   answer from a master, such as a failed transfer) means any effect happened before the
//!   answer: a leader answers only after committing in its own term, after which no entry of an
//!   older term can still commit. Without an answer (`RPC_FAIL`, `RPC_TIMEOUT`,
//!   `UNAVAILABLE_IN_CURRENT_STATUS`) the request may still sit in a log that a new leader
//!   commits, so it may take effect up to [`Checker::grace`] after the caller heard of it.
//! - A **read** returns a value whose write started before the read ended and that no definite
//!   write or remove replaced in between (that started after the value's write could have taken
//!   effect and ended before the read started); `OBJECT_NOT_FOUND` is a read of "absent", which
//!   the initial state and every remove produce. Other read errors say nothing.
//!
//! Values are unique (they name their writer and its sequence number), so a read names the one
//! write it comes from.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// Identifies one write: (client, sequence number of the operation).
pub(crate) type Vid = (u32, u64);

/// What an operation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Put,
    Upsert,
    Remove,
    Get,
}

/// What the caller was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Res {
    /// Success (a write or remove).
    Ok,
    /// Refused before doing anything (error code): not applied.
    Refused(i32),
    /// Failed with this code: applied or not.
    Unknown(i32),
    /// A read returned the value of this write.
    Got(Vid),
    /// `OBJECT_NOT_FOUND` (a read: the key was absent; a remove: outcome unknown).
    NotFound,
    /// A read returned bytes no write of this run produced for this key.
    Corrupt,
    /// A read failed with this code (says nothing about the key).
    ReadErr(i32),
}

/// One operation of the history; times in seconds since the run started.
#[derive(Clone, Debug)]
pub(crate) struct Op {
    pub(crate) client: u32,
    pub(crate) seq: u64,
    pub(crate) key: u32,
    pub(crate) kind: Kind,
    pub(crate) start: f64,
    pub(crate) end: f64,
    pub(crate) res: Res,
    /// A read made after the chaos stopped (its failures are lost writes).
    pub(crate) last: bool,
}

impl Op {
    /// The value a write stores.
    pub(crate) fn vid(&self) -> Vid {
        (self.client, self.seq)
    }
    fn mutates(&self) -> bool {
        matches!(self.kind, Kind::Put | Kind::Upsert | Kind::Remove)
    }
}

/// How sure it is that a mutation took effect.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Applied {
    Yes,
    Maybe,
    No,
}

/// One violation, described for a person.
#[derive(Clone, Debug)]
pub(crate) struct Violation {
    pub(crate) what: &'static str,
    pub(crate) detail: String,
}

/// Totals of a check.
#[derive(Debug, Default)]
pub(crate) struct Report {
    /// Reads that returned a value already replaced, or absent while a value was current.
    pub(crate) stale_reads: Vec<Violation>,
    /// Final reads not finding the last acknowledged write.
    pub(crate) lost_writes: Vec<Violation>,
    /// Reads returning bytes never written (or of a write reported refused).
    pub(crate) bad_values: Vec<Violation>,
    /// Removes answered `OBJECT_NOT_FOUND` on a key known to hold a value.
    pub(crate) remove_not_found_on_present: Vec<Violation>,
    /// Removes answered `OBJECT_NOT_FOUND`, all of them.
    pub(crate) remove_not_found: usize,
    /// Writes that failed with a definite-looking error (not a timeout) yet were read later.
    pub(crate) failed_but_applied: Vec<Violation>,
    /// Operations whose outcome was unknown, per error code.
    pub(crate) unknown_by_code: BTreeMap<i32, usize>,
    /// Reads that failed, per error code (`CHECKSUM_MISMATCH` here is a late or corrupt write
    /// caught by the reader, not a wrong read).
    pub(crate) read_errors_by_code: BTreeMap<i32, usize>,
    /// Operations per kind and result class (for the summary).
    pub(crate) counts: BTreeMap<String, usize>,
    /// Puts counted as definite writes.
    pub(crate) definite_puts: usize,
    /// Reads checked.
    pub(crate) reads_checked: usize,
}

impl Report {
    /// Safety violations: a run with any fails.
    pub(crate) fn violations(&self) -> usize {
        self.stale_reads.len() + self.lost_writes.len() + self.bad_values.len()
    }
}

/// See the module docs.
pub(crate) struct Checker {
    /// How long after its caller heard of a failure an unknown-outcome write may still take
    /// effect (seconds).
    pub(crate) grace: f64,
    /// How long an unfinished write blocks a put of the same key (the master's takeover time,
    /// seconds).
    pub(crate) takeover: f64,
}

const RPC_FAIL: i32 = -900;
const RPC_TIMEOUT: i32 = -901;
const UNAVAILABLE: i32 = -1010;

impl Checker {
    fn applied(&self, op: &Op) -> Applied {
        match (op.kind, op.res) {
            (Kind::Upsert | Kind::Remove, Res::Ok) => Applied::Yes,
            (_, Res::Refused(_)) => Applied::No,
            (Kind::Get, _) => Applied::No,
            _ => Applied::Maybe,
        }
    }

    /// Until when the mutation may take effect: the end of the call, unless the caller was
    /// left without an answer from a master (an RPC failure or timeout, or a master unable to
    /// serve), when the request may still sit in a log that a new leader commits.
    fn effect_end(&self, op: &Op) -> f64 {
        match op.res {
            Res::Unknown(RPC_FAIL | RPC_TIMEOUT | UNAVAILABLE) => op.end + self.grace,
            _ => op.end,
        }
    }

    /// Checks the whole history.
    pub(crate) fn check(&self, history: &[Op]) -> Report {
        let mut report = Report::default();
        let mut by_key: BTreeMap<u32, Vec<&Op>> = BTreeMap::new();
        for op in history {
            by_key.entry(op.key).or_default().push(op);
            let class = match op.res {
                Res::Ok => "ok",
                Res::Refused(_) => "refused",
                Res::Unknown(_) => "unknown",
                Res::Got(_) => "value",
                Res::NotFound => "not_found",
                Res::Corrupt => "corrupt",
                Res::ReadErr(_) => "error",
            };
            *report
                .counts
                .entry(format!("{:?} {class}", op.kind).to_lowercase())
                .or_default() += 1;
            match (op.kind, op.res) {
                (Kind::Remove, Res::NotFound) => report.remove_not_found += 1,
                (_, Res::Unknown(c)) => *report.unknown_by_code.entry(c).or_default() += 1,
                (_, Res::ReadErr(c)) => *report.read_errors_by_code.entry(c).or_default() += 1,
                _ => {}
            }
        }
        for (key, ops) in by_key {
            self.check_key(key, &ops, &mut report);
        }
        report
    }

    /// A put acknowledged `Ok` that certainly stored its value: after a point where the key was
    /// certainly absent (the start or a remove acknowledged before the put began), nothing else
    /// could have written the key, or left an unfinished write blocking it, before the put ended.
    fn definite_put(&self, put: &Op, muts: &[&Op]) -> bool {
        if put.kind != Kind::Put || put.res != Res::Ok {
            return false;
        }
        let anchors = std::iter::once(None).chain(
            muts.iter()
                .filter(|a| a.kind == Kind::Remove && a.res == Res::Ok && a.end < put.start)
                .map(|a| Some(*a)),
        );
        for anchor in anchors {
            let from = anchor.map_or(f64::NEG_INFINITY, |a| a.start);
            let clear = muts.iter().all(|o| {
                if std::ptr::eq(*o, put) || anchor.is_some_and(|a| std::ptr::eq(*o, a)) {
                    return true;
                }
                if self.applied(o) == Applied::No || o.start > put.end {
                    return true;
                }
                let mut until = self.effect_end(o);
                if o.kind != Kind::Remove && o.res != Res::Ok {
                    // A failed write may leave its reservation blocking puts until taken over.
                    until = until.max(o.end + self.takeover + self.grace);
                    if until >= put.start {
                        return false;
                    }
                }
                until < from
            });
            if clear {
                return true;
            }
        }
        false
    }

    /// Is `cand` (a mutation, or `None` for the initial absence) replaced, for a read starting at
    /// `rs`, by a definite mutation that began after `cand` could last take effect and ended
    /// before the read began? Returns the replacing mutation.
    fn superseded<'a>(
        &self,
        muts: &[&'a Op],
        definite: &[bool],
        cand: Option<&Op>,
        rs: f64,
    ) -> Option<&'a Op> {
        let after = cand.map_or(f64::NEG_INFINITY, |c| self.effect_end(c));
        muts.iter().zip(definite).find_map(|(s, d)| {
            let other = cand.is_none_or(|c| !std::ptr::eq(*s, c));
            (*d && other && s.start > after && s.end < rs).then_some(*s)
        })
    }

    fn check_key(&self, key: u32, ops: &[&Op], report: &mut Report) {
        let muts: Vec<&Op> = ops.iter().copied().filter(|o| o.mutates()).collect();
        let definite: Vec<bool> = muts
            .iter()
            .map(|o| self.applied(o) == Applied::Yes || self.definite_put(o, &muts))
            .collect();
        report.definite_puts += muts
            .iter()
            .zip(&definite)
            .filter(|(o, d)| o.kind == Kind::Put && **d)
            .count();
        let by_vid: BTreeMap<Vid, &Op> = muts
            .iter()
            .filter(|o| o.kind != Kind::Remove)
            .map(|o| (o.vid(), *o))
            .collect();

        let superseded = |cand: Option<&Op>, rs: f64| self.superseded(&muts, &definite, cand, rs);

        for r in ops.iter().filter(|o| o.kind == Kind::Get) {
            let (rs, re) = (r.start, r.end);
            match r.res {
                Res::Corrupt => report.bad_values.push(Violation {
                    what: "read returned bytes no write produced",
                    detail: format!("key {key}: {}", describe(r)),
                }),
                Res::Got(vid) => {
                    report.reads_checked += 1;
                    let Some(w) = by_vid.get(&vid).copied().filter(|w| w.key == key) else {
                        report.bad_values.push(Violation {
                            what: "read returned a value never written to this key",
                            detail: format!("key {key}: {} got {vid:?}", describe(r)),
                        });
                        continue;
                    };
                    if w.start >= re {
                        report.bad_values.push(Violation {
                            what: "read returned a value whose write had not started",
                            detail: format!("key {key}: {} / {}", describe(r), describe(w)),
                        });
                        continue;
                    }
                    match w.res {
                        Res::Refused(_) => {
                            report.bad_values.push(Violation {
                                what: "read returned the value of a write reported refused",
                                detail: format!("key {key}: {} / {}", describe(r), describe(w)),
                            });
                            continue;
                        }
                        Res::Unknown(c) if c != RPC_FAIL && c != RPC_TIMEOUT => {
                            report.failed_but_applied.push(Violation {
                                what: "write reported failed was applied",
                                detail: format!("key {key}: {} / {}", describe(w), describe(r)),
                            })
                        }
                        _ => {}
                    }
                    if let Some(s) = superseded(Some(w), rs) {
                        let v = Violation {
                            what: if r.last {
                                "final read found an overwritten value"
                            } else {
                                "read returned an overwritten value"
                            },
                            detail: format!(
                                "key {key}: {} returned {} replaced by {}",
                                describe(r),
                                describe(w),
                                describe(s)
                            ),
                        };
                        if r.last {
                            report.lost_writes.push(v)
                        } else {
                            report.stale_reads.push(v)
                        }
                    }
                }
                Res::NotFound => {
                    report.reads_checked += 1;
                    let initial = superseded(None, rs);
                    if initial.is_none() {
                        continue;
                    }
                    let explained = muts.iter().any(|p| {
                        p.kind == Kind::Remove
                            && self.applied(p) != Applied::No
                            && p.start < re
                            && superseded(Some(p), rs).is_none()
                    });
                    if !explained {
                        let last = muts
                            .iter()
                            .zip(&definite)
                            .filter(|(s, d)| **d && s.end < rs)
                            .max_by(|a, b| a.0.end.total_cmp(&b.0.end))
                            .map(|(s, _)| *s)
                            .or(initial);
                        let v = Violation {
                            what: if r.last {
                                "final read found nothing where a write was acknowledged"
                            } else {
                                "read found nothing where a value was current"
                            },
                            detail: format!(
                                "key {key}: {} after {}",
                                describe(r),
                                last.map_or("?".into(), describe)
                            ),
                        };
                        if r.last {
                            report.lost_writes.push(v)
                        } else {
                            report.stale_reads.push(v)
                        }
                    }
                }
                _ => {}
            }
        }

        // Removes answered "not found" on a key that certainly held a value: a definite write
        // ended before the remove began, and no other mutation could have intervened.
        for r in muts
            .iter()
            .filter(|o| o.kind == Kind::Remove && o.res == Res::NotFound)
        {
            let present = muts.iter().zip(&definite).any(|(w, d)| {
                *d && w.kind != Kind::Remove
                    && w.end < r.start
                    && muts.iter().all(|o| {
                        std::ptr::eq(*o, *w)
                            || std::ptr::eq(*o, *r)
                            || self.applied(o) == Applied::No
                            || o.start > r.end
                            || self.effect_end(o) < w.start
                    })
            });
            if present {
                report.remove_not_found_on_present.push(Violation {
                    what: "remove answered OBJECT_NOT_FOUND on a key holding a value",
                    detail: format!("key {key}: {}", describe(r)),
                });
            }
        }
    }
}

/// Parses one line of a history file (as [`history_line`] writes it).
pub(crate) fn parse_line(line: &str) -> Option<Op> {
    let f: Vec<&str> = line.split('\t').collect();
    let [client, seq, key, kind, start, end, res, last] = f[..] else {
        return None;
    };
    let code = |s: &str, prefix: &str| -> Option<i32> {
        s.strip_prefix(prefix)?.strip_suffix(')')?.parse().ok()
    };
    let res = match res {
        "Ok" => Res::Ok,
        "NotFound" => Res::NotFound,
        "Corrupt" => Res::Corrupt,
        r if r.starts_with("Got((") => {
            let inner = r.strip_prefix("Got((")?.strip_suffix("))")?;
            let (c, q) = inner.split_once(", ")?;
            Res::Got((c.parse().ok()?, q.parse().ok()?))
        }
        r => code(r, "Refused(")
            .map(Res::Refused)
            .or_else(|| code(r, "Unknown(").map(Res::Unknown))
            .or_else(|| code(r, "ReadErr(").map(Res::ReadErr))?,
    };
    Some(Op {
        client: client.parse().ok()?,
        seq: seq.parse().ok()?,
        key: key.parse().ok()?,
        kind: match kind {
            "Put" => Kind::Put,
            "Upsert" => Kind::Upsert,
            "Remove" => Kind::Remove,
            "Get" => Kind::Get,
            _ => return None,
        },
        start: start.parse().ok()?,
        end: end.parse().ok()?,
        res,
        last: last.parse().ok()?,
    })
}

/// One line of a history file: the operation's fields, tab-separated.
pub(crate) fn history_line(op: &Op) -> String {
    format!(
        "{}\t{}\t{}\t{:?}\t{:.6}\t{:.6}\t{:?}\t{}\n",
        op.client, op.seq, op.key, op.kind, op.start, op.end, op.res, op.last
    )
}

/// One operation in a line: `client.seq kind [start, end] result`.
pub(crate) fn describe(op: &Op) -> String {
    let mut s = format!(
        "c{}.{} {:?} [{:.3}, {:.3}] ",
        op.client, op.seq, op.kind, op.start, op.end
    );
    let _ = match op.res {
        Res::Got((c, q)) => write!(s, "-> c{c}.{q}"),
        other => write!(s, "-> {other:?}"),
    };
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(client: u32, seq: u64, kind: Kind, start: f64, end: f64, res: Res) -> Op {
        Op {
            client,
            seq,
            key: 7,
            kind,
            start,
            end,
            res,
            last: false,
        }
    }

    fn checker() -> Checker {
        Checker {
            grace: 5.0,
            takeover: 30.0,
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let h = vec![
            op(1, 1, Kind::Upsert, 0.0, 1.0, Res::Ok),
            op(2, 1, Kind::Get, 1.5, 2.0, Res::Got((1, 1))),
            op(2, 2, Kind::Upsert, 2.5, 3.0, Res::Ok),
            // Concurrent with the upsert: either value is fine.
            op(3, 1, Kind::Get, 2.6, 2.9, Res::Got((1, 1))),
            op(1, 2, Kind::Get, 2.7, 3.5, Res::Got((2, 2))),
            op(1, 3, Kind::Remove, 4.0, 4.5, Res::Ok),
            op(2, 3, Kind::Get, 5.0, 5.5, Res::NotFound),
        ];
        let r = checker().check(&h);
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!(r.reads_checked, 4);
    }

    #[test]
    fn a_stale_value_is_caught() {
        let h = vec![
            op(1, 1, Kind::Upsert, 0.0, 1.0, Res::Ok),
            op(2, 1, Kind::Upsert, 2.0, 3.0, Res::Ok),
            op(3, 1, Kind::Get, 4.0, 4.5, Res::Got((1, 1))),
        ];
        let r = checker().check(&h);
        assert_eq!(r.stale_reads.len(), 1, "{r:?}");
    }

    #[test]
    fn a_removed_value_read_back_is_caught_and_absence_of_a_current_value_too() {
        let h = vec![
            op(1, 1, Kind::Upsert, 0.0, 1.0, Res::Ok),
            op(2, 1, Kind::Remove, 2.0, 3.0, Res::Ok),
            op(3, 1, Kind::Get, 4.0, 4.5, Res::Got((1, 1))),
            op(1, 2, Kind::Upsert, 5.0, 6.0, Res::Ok),
            op(3, 2, Kind::Get, 7.0, 7.5, Res::NotFound),
        ];
        let r = checker().check(&h);
        assert_eq!(r.stale_reads.len(), 2, "{r:?}");
    }

    #[test]
    fn an_unknown_outcome_may_or_may_not_have_applied() {
        // A timed-out upsert, then reads seeing either state; a timed-out remove likewise.
        let h = vec![
            op(1, 1, Kind::Upsert, 0.0, 1.0, Res::Ok),
            op(2, 1, Kind::Upsert, 2.0, 3.0, Res::Unknown(RPC_TIMEOUT)),
            op(3, 1, Kind::Get, 3.5, 3.6, Res::Got((1, 1))),
            op(3, 2, Kind::Get, 3.7, 3.8, Res::Got((2, 1))),
            op(1, 2, Kind::Remove, 4.0, 5.0, Res::NotFound),
            op(3, 3, Kind::Get, 5.5, 5.6, Res::NotFound),
        ];
        let r = checker().check(&h);
        assert_eq!(r.violations(), 0, "{r:?}");
        assert_eq!(r.remove_not_found, 1);
        assert_eq!(r.unknown_by_code.get(&RPC_TIMEOUT), Some(&1));
    }

    #[test]
    fn an_unknown_write_cannot_come_back_after_the_grace() {
        let h = vec![
            op(2, 1, Kind::Upsert, 0.0, 1.0, Res::Unknown(RPC_TIMEOUT)),
            op(1, 1, Kind::Upsert, 10.0, 11.0, Res::Ok),
            op(3, 1, Kind::Get, 12.0, 12.5, Res::Got((2, 1))),
        ];
        let r = checker().check(&h);
        assert_eq!(r.stale_reads.len(), 1, "{r:?}");
    }

    #[test]
    fn an_answered_failure_takes_effect_before_its_answer_or_never() {
        // A remove answered "not found" (perhaps applied by an earlier attempt) and a write
        // whose transfer failed cannot take effect after their answers.
        let h = vec![
            op(1, 1, Kind::Remove, 0.0, 1.0, Res::NotFound),
            op(1, 2, Kind::Upsert, 1.5, 2.0, Res::Unknown(-800)),
            op(2, 1, Kind::Upsert, 3.0, 4.0, Res::Ok),
            op(3, 1, Kind::Get, 5.0, 5.5, Res::NotFound),
            op(3, 2, Kind::Get, 6.0, 6.5, Res::Got((1, 2))),
        ];
        let r = checker().check(&h);
        assert_eq!(r.stale_reads.len(), 2, "{r:?}");
        assert_eq!(r.failed_but_applied.len(), 1, "{r:?}");
    }

    #[test]
    fn final_reads_must_find_the_last_acknowledged_write() {
        let mut fin = op(9, 1, Kind::Get, 20.0, 20.1, Res::NotFound);
        fin.last = true;
        let h = vec![
            op(1, 1, Kind::Remove, 0.0, 1.0, Res::Ok),
            op(1, 2, Kind::Put, 2.0, 3.0, Res::Ok),
            fin,
        ];
        let r = checker().check(&h);
        assert_eq!(r.definite_puts, 1);
        assert_eq!(r.lost_writes.len(), 1, "{r:?}");
    }

    #[test]
    fn a_put_after_a_failed_write_may_have_been_a_no_op() {
        // The failed upsert may have left an unfinished write that makes the put a no-op.
        let mut fin = op(9, 1, Kind::Get, 20.0, 20.1, Res::NotFound);
        fin.last = true;
        let h = vec![
            op(2, 1, Kind::Upsert, 0.0, 1.0, Res::Unknown(-800)),
            op(1, 1, Kind::Remove, 2.0, 2.5, Res::Ok),
            op(1, 2, Kind::Put, 3.0, 4.0, Res::Ok),
            fin,
        ];
        let r = checker().check(&h);
        assert_eq!(r.definite_puts, 0);
        assert_eq!(r.violations(), 0, "{r:?}");
    }

    #[test]
    fn history_lines_parse_back() {
        let mut fin = op(0, 12, Kind::Get, 1.5, 2.25, Res::Got((3, 44)));
        fin.last = true;
        for o in [
            fin,
            op(1, 2, Kind::Put, 0.0, 1.0, Res::Ok),
            op(1, 3, Kind::Upsert, 0.0, 1.0, Res::Unknown(-800)),
            op(2, 3, Kind::Remove, 0.0, 1.0, Res::Refused(-706)),
            op(2, 4, Kind::Get, 0.0, 1.0, Res::ReadErr(-707)),
            op(2, 5, Kind::Get, 0.0, 1.0, Res::NotFound),
            op(2, 6, Kind::Get, 0.0, 1.0, Res::Corrupt),
        ] {
            let line = history_line(&o);
            let back = parse_line(line.trim_end()).expect("parses");
            assert_eq!(history_line(&back), line);
        }
        assert!(parse_line("1\t2\tthree").is_none());
    }

    #[test]
    fn bad_values_and_wrong_outcomes_are_reported() {
        let h = vec![
            op(1, 1, Kind::Upsert, 0.0, 1.0, Res::Ok),
            op(1, 2, Kind::Remove, 2.0, 3.0, Res::NotFound),
            op(2, 1, Kind::Upsert, 4.0, 5.0, Res::Refused(-714)),
            op(3, 1, Kind::Get, 6.0, 6.5, Res::Got((2, 1))),
            op(3, 2, Kind::Get, 7.0, 7.5, Res::Got((4, 4))),
            op(3, 3, Kind::Get, 8.0, 8.5, Res::Corrupt),
        ];
        let r = checker().check(&h);
        assert_eq!(r.bad_values.len(), 3, "{r:?}");
        assert_eq!(r.remove_not_found_on_present.len(), 1, "{r:?}");
    }
}
