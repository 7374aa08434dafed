//! Whether a raw address range is memory of this process that peers may read and write: a bad
//! `(addr, len)` handed to a registration (from Rust, Python or C) must be a clear error, not a
//! segfault in a later transfer or in a remote peer's READ of it.

/// Checks that `[addr, addr + len)` is mapped readable and writable in this process.
pub fn check_mapped(addr: u64, len: u64) -> Result<(), String> {
    check_in(&parse_maps(&read_maps()?), addr, len, true)
}

/// Checks that `[addr, addr + len)` is mapped readable in this process (for copying out of it).
pub fn check_readable(addr: u64, len: u64) -> Result<(), String> {
    check_in(&parse_maps(&read_maps()?), addr, len, false)
}

fn read_maps() -> Result<String, String> {
    std::fs::read_to_string("/proc/self/maps")
        .map_err(|e| format!("cannot check a raw pointer: reading /proc/self/maps: {e}"))
}

/// This process's mappings from `/proc/self/maps`: `(start, end, readable, writable)`, sorted.
fn parse_maps(text: &str) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<_> = text
        .lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let (s, e) = f.next()?.split_once('-')?;
            let perms = f.next()?.as_bytes();
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
                perms.first() == Some(&b'r'),
                perms.get(1) == Some(&b'w'),
            ))
        })
        .collect();
    out.sort_unstable();
    out
}

/// Checks that `[addr, addr + len)` is mapped readable (and writable, with `write`) in `maps`.
fn check_in(
    maps: &[(u64, u64, bool, bool)],
    addr: u64,
    len: u64,
    write: bool,
) -> Result<(), String> {
    let end = addr.saturating_add(len);
    let mut at = addr;
    for &(s, e, r, w) in maps {
        if e <= at {
            continue;
        }
        if s > at {
            break;
        }
        if !r || (write && !w) {
            return Err(if write {
                format!(
                    "{addr:#x}+{len} includes memory at {at:#x} that is not readable and \
                     writable (peers may write registered memory)"
                )
            } else {
                format!("{addr:#x}+{len} includes memory at {at:#x} that is not readable")
            });
        }
        at = e;
        if at >= end {
            return Ok(());
        }
    }
    Err(format!(
        "{addr:#x}+{len} is not mapped memory of this process (at {at:#x})"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryRegistry;
    use crate::Location;

    static READ_ONLY: [u8; 4096] = [7; 4096];

    #[test]
    fn registration_refuses_memory_that_is_not_read_write_here() {
        let registry = MemoryRegistry::new();
        let mut heap = vec![0u8; 1 << 16];
        let addr = heap.as_mut_ptr() as u64;
        // Page zero is never mapped; a read-only static is not writable.
        for (what, a, len) in [
            ("unmapped", 0x1000u64, 4096u64),
            ("read-only", READ_ONLY.as_ptr() as u64, 4096),
            ("past the end of the address space", u64::MAX - 10, 100),
        ] {
            // SAFETY: the registry refuses these ranges before touching them.
            let err = unsafe { registry.register(a, len, Location::default()) }.unwrap_err();
            assert!(
                matches!(err, crate::Error::InvalidArgument(_)),
                "{what}: {err}"
            );
        }
        assert!(check_readable(READ_ONLY.as_ptr() as u64, 4096).is_ok());
        // SAFETY: `heap` outlives the registry's use of it; it is unregistered below.
        unsafe { registry.register(addr, heap.len() as u64, Location::default()) }.unwrap();
        registry.unregister_blocking(addr).unwrap();
        drop(heap);
    }
}
