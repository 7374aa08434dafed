//! Fuzzes the leader's view (reads and heartbeats served outside the log) together with the
//! master it fronts, under any interleaving a leader can see: commands routed, log entries
//! applied late, in order, or lost (a failed append), timers, pruning and a change of leader.
//!
//! The input is a sequence of `[op: u8][delay: u8][len: u8][postcard Command; len]`. Entries go
//! through the replicated path (`StateMachine::apply` of the encoded `LogEntry`, reads carried
//! with it). After each applied entry the master's invariants must hold; a read served by the
//! view must describe only complete replicas of the value the master holds; every ticket is
//! given back exactly once, after which no key stays barred. Never a panic.
#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use mooncake_core::StateMachine;
use mooncake_master::{
    decode_response, Command, LeaderView, LogEntry, Master, MasterConfig, Proposal, Response,
    Route, Timestamp,
};

fn check(m: &Master, what: &dyn Fn() -> String) {
    if let Err(e) = m.check_invariants() {
        panic!("invariant broken after {}: {e}", what());
    }
}

fn apply(m: &mut Master, view: &mut LeaderView, p: Proposal) {
    let shown = format!("{:?}", p.entry.command);
    let bytes = StateMachine::apply(m, &p.entry.encode());
    view.finish(p.ticket);
    if let Err(e) = decode_response(&bytes) {
        panic!("the response to {shown} does not decode: {e:?}");
    }
    check(m, &|| shown.clone());
}

fn check_local(m: &Master, now: Timestamp, command: &Command, response: &Response) {
    let key = match command {
        Command::GetReplicaList { key } => key,
        _ => return,
    };
    if let Response::Replicas(Ok(list)) = response {
        let fresh = m.replica_list_at(now, key);
        match fresh {
            Ok(f) if f.size == list.size && f.replicas == list.replicas => {}
            other => panic!("the view served {key:?} as {list:?}; the master holds {other:?}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut m = Master::new(MasterConfig::default()).expect("default config");
    let mut view = LeaderView::default();
    let mut pending: VecDeque<Proposal> = VecDeque::new();
    let mut now = 1_000_000u64;
    let first = view.take_over(&m, Timestamp(now), 0);
    StateMachine::apply(&mut m, &LogEntry::new(Timestamp(now), first).encode());
    let mut rest = data;
    while rest.len() >= 3 {
        let (op, delay) = (rest[0], rest[1]);
        let len = usize::from(rest[2]).min(rest.len() - 3);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        now += u64::from(delay) * 16;
        let t = Timestamp(now);
        match op % 8 {
            // Route a command; entries wait in `pending` until applied or lost.
            0..=2 => {
                if let Ok(command) = postcard::from_bytes::<Command>(body) {
                    let shown = command.clone();
                    match view.route(&m, t, command) {
                        Route::Local(r) => check_local(&m, t, &shown, &r),
                        Route::Log(p) => pending.push_back(p),
                    }
                }
            }
            // Apply the oldest pending entry (the log applies in order).
            3 | 4 => {
                if let Some(p) = pending.pop_front() {
                    apply(&mut m, &mut view, p);
                }
            }
            // An append that failed: its ticket comes back without the entry being applied.
            5 => {
                if let Some(p) = pending.pop_front() {
                    view.finish(p.ticket);
                }
            }
            // The timer: prune, then route what is due.
            6 => {
                view.prune(&m, t);
                for command in view.timeouts(&m, t) {
                    if let Route::Log(p) = view.route(&m, t, command) {
                        pending.push_back(p);
                    }
                }
            }
            // A change of leader: entries in flight are applied (they were committed), then
            // the new leader's view starts over with its first entry.
            _ => {
                while let Some(p) = pending.pop_front() {
                    apply(&mut m, &mut view, p);
                }
                view = LeaderView::default();
                let first = view.take_over(&m, t, u64::from(delay));
                StateMachine::apply(&mut m, &LogEntry::new(t, first).encode());
                check(&m, &|| "a takeover".into());
            }
        }
    }
    while let Some(p) = pending.pop_front() {
        apply(&mut m, &mut view, p);
    }
    // Every ticket is back: nothing stays barred, so a read is served again.
    let probe = Command::ExistKey {
        key: "probe".into(),
    };
    assert!(
        matches!(view.route(&m, Timestamp(now), probe), Route::Local(_)),
        "a key stays barred after every ticket came back"
    );
});
