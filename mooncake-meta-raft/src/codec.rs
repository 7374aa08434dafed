//! Length + CRC32 framed records, shared by the log files and the peer wire protocol.
//!
//! A record is `[len: u32 LE][crc32(payload): u32 LE][payload]`. Readers check the length
//! against a cap before allocating and the CRC before decoding.

use std::io;

/// Bytes of a record header (length and CRC).
pub(crate) const HEADER_LEN: usize = 8;

/// Appends one framed record to `out`; a payload of 4 GiB or more cannot be framed (an error,
/// not a panic: a state that large is refused, the node keeps its older snapshot).
pub(crate) fn frame_into(out: &mut Vec<u8>, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "a record of {} bytes is too large to frame (at most 4 GiB)",
                payload.len()
            ),
        )
    })?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// What [`parse_record`] found at an offset of a buffer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed<'a> {
    /// A whole record whose CRC matches; the next record starts at `next`.
    Record {
        /// The payload.
        payload: &'a [u8],
        /// Offset of the next record.
        next: usize,
    },
    /// The buffer ends inside the record (a torn append).
    Truncated,
    /// The header or the CRC is wrong.
    Bad(String),
}

/// Parses the record at `offset` of `buf`, refusing lengths above `max_len`.
pub(crate) fn parse_record(buf: &[u8], offset: usize, max_len: usize) -> Parsed<'_> {
    let rest = &buf[offset..];
    if rest.len() < HEADER_LEN {
        return Parsed::Truncated;
    }
    let len = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
    if len > max_len {
        return Parsed::Bad(format!("record length {len} exceeds the cap of {max_len}"));
    }
    if rest.len() < HEADER_LEN + len {
        return Parsed::Truncated;
    }
    let payload = &rest[HEADER_LEN..HEADER_LEN + len];
    let actual = crc32fast::hash(payload);
    if actual != crc {
        return Parsed::Bad(format!(
            "CRC mismatch (stored {crc:#010x}, computed {actual:#010x}, length {len})"
        ));
    }
    Parsed::Record {
        payload,
        next: offset + HEADER_LEN + len,
    }
}

pub(crate) fn check_len(len: usize, max_len: usize) -> io::Result<()> {
    if len > max_len {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the cap of {max_len}"),
        ));
    }
    Ok(())
}

pub(crate) fn check_crc(payload: &[u8], crc: u32) -> io::Result<()> {
    if crc32fast::hash(payload) != crc {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame CRC mismatch",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let mut buf = Vec::new();
        frame_into(&mut buf, b"hello").unwrap();
        frame_into(&mut buf, b"").unwrap();
        let Parsed::Record { payload, next } = parse_record(&buf, 0, 100) else {
            panic!("first record")
        };
        assert_eq!(payload, b"hello");
        assert_eq!(
            parse_record(&buf, next, 100),
            Parsed::Record {
                payload: b"",
                next: buf.len()
            }
        );
        assert_eq!(parse_record(&buf[..10], 0, 100), Parsed::Truncated);
        assert!(matches!(parse_record(&buf, 0, 4), Parsed::Bad(_)));
        let mut flipped = buf.clone();
        flipped[9] ^= 1;
        assert!(matches!(parse_record(&flipped, 0, 100), Parsed::Bad(_)));
        assert!(check_len(5, 4).is_err());
        assert!(check_crc(b"hello", crc32fast::hash(b"hello")).is_ok());
        assert!(check_crc(b"hellO", crc32fast::hash(b"hello")).is_err());
    }
}
