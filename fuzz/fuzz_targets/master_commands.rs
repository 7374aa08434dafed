//! Fuzzes the master's state machine with any sequence of commands, as clients (through the
//! log) or a hostile peer could get them applied.
//!
//! The input is a sequence of `[delay_ms: u8][len: u8][postcard Command; len]`; each command that
//! decodes is applied at the current master time, every few steps the timeout handler's own
//! commands too. After each, the master's invariants must hold. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_master::{Command, Master, MasterConfig, Timestamp};

fuzz_target!(|data: &[u8]| {
    let mut m = Master::new(MasterConfig::default()).expect("default config");
    let mut now = 1_000_000u64;
    let mut rest = data;
    let mut step = 0u32;
    while rest.len() >= 2 {
        now += u64::from(rest[0]) * 16;
        let len = usize::from(rest[1]).min(rest.len() - 2);
        let body = &rest[2..2 + len];
        rest = &rest[2 + len..];
        if let Ok(command) = postcard::from_bytes::<Command>(body) {
            let shown = format!("{command:?}");
            m.apply(Timestamp(now), command);
            if let Err(e) = m.check_invariants() {
                panic!("invariant broken after {shown}: {e}");
            }
        }
        step += 1;
        if step % 4 == 0 {
            for command in m.handle_timeout(Timestamp(now)) {
                let shown = format!("{command:?}");
                m.apply(Timestamp(now), command);
                if let Err(e) = m.check_invariants() {
                    panic!("invariant broken after the timer's {shown}: {e}");
                }
            }
        }
    }
});
