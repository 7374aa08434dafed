//! Whether a raw pointer from Python is memory of this process that peers may read and write:
//! a bad `(ptr, size)` must be a clear error, not a segfault in a later transfer (or in a
//! remote peer's READ of it).

/// Checks that `[addr, addr + len)` is mapped readable and writable in this process.
pub(crate) fn check_mapped(addr: u64, len: u64) -> Result<(), String> {
    check_in(&parse_maps(&read_maps()?), addr, len, true)
}

/// Checks that `[addr, addr + len)` is mapped readable in this process (for copying out of it).
pub(crate) fn check_readable(addr: u64, len: u64) -> Result<(), String> {
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
