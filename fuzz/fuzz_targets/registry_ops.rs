//! Fuzzes `MemoryRegistry` with sequences of operations checked against a simple model.
//!
//! Buffers come from two sources: owned `AlignedBuffer`s (`register_owned`) and caller-owned
//! ranges carved, possibly overlapping, out of one 64 KiB arena (`register`), which is how the
//! overlap check gets exercised with real, valid memory. Checks after every operation:
//! - registering succeeds exactly when the range is non-empty and overlaps nothing registered,
//!   and a refused overlap is reported as `AddressOverlapped`;
//! - unregistering succeeds exactly for the start address of a registered buffer;
//! - `resolve` agrees with a naive u128 containment check, attributes the region to a buffer that
//!   contains it (a zero-length range where two buffers meet lies in both), and writes through
//!   accepted regions read back;
//! - `descriptors()` lists exactly the model's buffers in address order, and `version()` moves
//!   on every successful change and only then.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mooncake_core::{AlignedBuffer, Error, Location, MemoryRegistry};

const ARENA_LEN: usize = 64 * 1024;
const MAX_OPS: usize = 512;

#[derive(Arbitrary, Debug)]
enum Op {
    /// Registers a fresh owned buffer of `size + 1` bytes.
    RegisterOwned { size: u16 },
    /// Registers `[offset, offset + len)` of the arena (clamped to the arena's end).
    RegisterArena { offset: u16, len: u16 },
    /// Unregisters the `index`-th registered buffer (modulo their number).
    Unregister { index: u8 },
    /// Unregisters whatever starts at the `index`-th buffer's address plus `delta`.
    UnregisterNear { index: u8, delta: i16 },
    /// Resolves a range relative to the `index`-th buffer.
    Resolve { index: u8, offset: i32, len: u32 },
    /// Resolves a range relative to the arena.
    ResolveArena { offset: i32, len: u32 },
    /// Resolves any range.
    ResolveWild { addr: u64, len: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Model {
    addr: u64,
    len: u64,
}

fn overlaps(a: &Model, addr: u64, len: u64) -> bool {
    let (s1, e1) = (a.addr as u128, a.addr as u128 + a.len as u128);
    let (s2, e2) = (addr as u128, addr as u128 + len as u128);
    s1 < e2 && s2 < e1
}

/// The buffers `[addr, addr + len)` lies in: at most one, except that a zero-length range at the
/// boundary of two adjacent buffers lies in both.
fn containing(m: &[Model], addr: u64, len: u64) -> Vec<Model> {
    m.iter()
        .copied()
        .filter(|b| {
            addr as u128 >= b.addr as u128
                && addr as u128 + len as u128 <= b.addr as u128 + b.len as u128
        })
        .collect()
}

fuzz_target!(|ops: Vec<Op>| {
    // Declared before the registry so it outlives it: arena ranges are registered caller-owned.
    let arena = AlignedBuffer::new(ARENA_LEN).expect("arena");
    let reg = MemoryRegistry::new();
    let mut model: Vec<Model> = Vec::new();

    for (n, op) in ops.iter().take(MAX_OPS).enumerate() {
        let before = reg.version();
        let changed = match *op {
            Op::RegisterOwned { size } => {
                let len = size as usize + 1;
                let addr = reg
                    .register_owned(AlignedBuffer::new(len).expect("alloc"), Location::cpu(0))
                    .expect("a fresh allocation overlaps nothing registered");
                assert!(
                    !model.iter().any(|b| overlaps(b, addr, len as u64)),
                    "model has a buffer overlapping a fresh allocation"
                );
                model.push(Model {
                    addr,
                    len: len as u64,
                });
                true
            }
            Op::RegisterArena { offset, len } => {
                let offset = offset as u64 % ARENA_LEN as u64;
                let len = (len as u64).min(ARENA_LEN as u64 - offset);
                let addr = arena.addr() + offset;
                let clash = model.iter().any(|b| overlaps(b, addr, len));
                // SAFETY: the range lies inside `arena`, which outlives `reg`, and is only ever
                // accessed through regions of the registry.
                let res = unsafe { reg.register(addr, len, Location::cpu(1)) };
                let expect_ok = len > 0 && !clash;
                assert_eq!(
                    res.is_ok(),
                    expect_ok,
                    "register({addr:#x}, {len}) = {res:?}, model {model:?}"
                );
                if len > 0 && clash {
                    assert!(
                        matches!(res, Err(Error::AddressOverlapped { .. })),
                        "{res:?}"
                    );
                }
                if expect_ok {
                    model.push(Model { addr, len });
                }
                expect_ok
            }
            Op::Unregister { index } => {
                if model.is_empty() {
                    assert!(reg.unregister(arena.addr()).is_err());
                    false
                } else {
                    let b = model.remove(index as usize % model.len());
                    reg.unregister(b.addr)
                        .expect("registered buffer unregisters");
                    true
                }
            }
            Op::UnregisterNear { index, delta } => {
                let base = if model.is_empty() {
                    arena.addr()
                } else {
                    model[index as usize % model.len()].addr
                };
                let addr = base.wrapping_add_signed(delta as i64);
                let res = reg.unregister(addr);
                match model.iter().position(|b| b.addr == addr) {
                    Some(i) => {
                        res.expect("registered start unregisters");
                        model.remove(i);
                        true
                    }
                    None => {
                        assert!(
                            matches!(res, Err(Error::NotRegistered(a)) if a == addr),
                            "unregister({addr:#x}) = {res:?}"
                        );
                        false
                    }
                }
            }
            Op::Resolve { index, offset, len } => {
                let base = if model.is_empty() {
                    arena.addr()
                } else {
                    model[index as usize % model.len()].addr
                };
                probe(
                    &reg,
                    &model,
                    base.wrapping_add_signed(offset as i64),
                    len as u64,
                    n,
                );
                false
            }
            Op::ResolveArena { offset, len } => {
                let addr = arena.addr().wrapping_add_signed(offset as i64);
                probe(&reg, &model, addr, len as u64, n);
                false
            }
            Op::ResolveWild { addr, len } => {
                probe(&reg, &model, addr, len, n);
                false
            }
        };
        let after = reg.version();
        if changed {
            assert!(after > before, "version did not move on a change");
        } else {
            assert_eq!(after, before, "version moved without a change");
        }

        let mut want: Vec<(u64, u64)> = model.iter().map(|b| (b.addr, b.len)).collect();
        want.sort_unstable();
        let got: Vec<(u64, u64)> = reg.descriptors().iter().map(|d| (d.addr, d.len)).collect();
        assert_eq!(got, want, "descriptors disagree with the model");
    }

    // Unregister everything before the arena goes away.
    for b in model {
        reg.unregister(b.addr).expect("unregister at the end");
    }
    assert!(reg.descriptors().is_empty());
    drop(reg);
    drop(arena);
});

fn probe(reg: &MemoryRegistry, model: &[Model], addr: u64, len: u64, n: usize) {
    let expected = containing(model, addr, len);
    assert!(expected.len() <= 1 || len == 0, "model overlaps: {model:?}");
    let got = reg.resolve(addr, len);
    assert_eq!(
        got.is_ok(),
        !expected.is_empty(),
        "resolve({addr:#x}, {len}) = {got:?}, model {model:?}"
    );
    if let Ok(region) = got {
        assert_eq!((region.addr(), region.len()), (addr, len));
        let owner = (region.buffer().addr(), region.buffer().len());
        assert!(
            expected.iter().any(|b| (b.addr, b.len) == owner),
            "{region:?} attributed to {owner:?}, not one of {expected:?}"
        );
        let pattern: Vec<u8> = (0..len).map(|i| (i as u8) ^ (n as u8)).collect();
        region.write_from(&pattern).expect("exact length");
        assert_eq!(region.to_vec(), pattern);
    }
}
