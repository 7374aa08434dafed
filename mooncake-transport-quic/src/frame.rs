//! Wire format of the QUIC transport. Pure functions, no I/O.
//!
//! Requests travel on bidirectional QUIC streams: the initiator opens a stream, sends one or more
//! requests back to back, each a header followed, for a WRITE, by exactly `len` payload bytes,
//! and finishes its side; the target answers each in order with a response header followed, for
//! a READ or DESCRIBE, by exactly `len` payload bytes, and finishes its side after the last. So
//! there are no request ids, and streams are independent of each other (large requests get a
//! stream each; small ones share). A refused WRITE of at most 64 KiB is skipped and the stream
//! goes on; a larger one is answered, then the target stops the stream. The protocol version is
//! the ALPN name ([`crate::ALPN`]).
//!
//! ```text
//! request  (24 bytes): opcode u8 | flags u8 | reserved u16 | reserved u32 | addr u64 | len u64
//!                      flags: bit 0 (WRITE only) = report the landing to the segment's observer
//! response (16 bytes): status i32 | reserved u32 | len u64
//! ```
//!
//! All integers are little-endian. `status` is 0 or a value of the `ErrorCode` table. Lengths
//! are checked here against [`MAX_REQUEST_LEN`]; the target then checks every range against its
//! registered buffers before touching memory, and the initiator checks every response length
//! against what it asked for, so no length read from the network sizes an allocation.

use mooncake_core::ErrorCode;

/// Length of a request header.
pub const REQUEST_LEN: usize = 24;
/// Length of a response header.
pub const RESPONSE_LEN: usize = 16;
/// Largest length a single request may carry (1 TiB); larger is malformed.
pub const MAX_REQUEST_LEN: u64 = 1 << 40;
/// Largest descriptor a DESCRIBE response may carry.
pub const MAX_DESCRIPTOR_LEN: u64 = 16 << 20;
/// Request flag (WRITE only): report the landed bytes to the segment's observer before answering.
pub const FLAG_NOTIFY: u8 = 1;

/// Request kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Send `len` bytes at `addr` back.
    Read = 1,
    /// Store the `len` payload bytes that follow at `addr`.
    Write = 2,
    /// Send the segment descriptor back (`addr` and `len` are zero).
    Describe = 3,
}

/// A decoded request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Request {
    /// Kind.
    pub op: Op,
    /// Target address.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// WRITE only: report the landing ([`FLAG_NOTIFY`]).
    pub notify: bool,
}

/// A decoded response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Response {
    /// 0 or an error code.
    pub status: i32,
    /// Payload length that follows.
    pub len: u64,
}

/// Why bytes are not a valid header. Any of these ends the stream with an error.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Unknown opcode.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// Flags or reserved bits set.
    #[error("reserved bits set: flags {flags:#x}, reserved {reserved:#x}")]
    ReservedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved fields, or-ed.
        reserved: u32,
    },
    /// A length beyond what any request may carry.
    #[error("length {0} exceeds the {MAX_REQUEST_LEN}-byte limit")]
    LengthTooLarge(u64),
    /// DESCRIBE with a non-zero address or length.
    #[error("DESCRIBE must carry zero address and length")]
    BadDescribe,
    /// A status that is not in the error-code table.
    #[error("unknown status {0}")]
    UnknownStatus(i32),
    /// An error response that claims a payload.
    #[error("error response with a {0}-byte payload")]
    ErrorWithPayload(u64),
}

/// Encodes a request header.
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0] = req.op as u8;
    b[1] = if req.notify { FLAG_NOTIFY } else { 0 };
    b[8..16].copy_from_slice(&req.addr.to_le_bytes());
    b[16..24].copy_from_slice(&req.len.to_le_bytes());
    b
}

/// Decodes and checks a request header.
pub fn decode_request(h: &[u8; REQUEST_LEN]) -> Result<Request, FrameError> {
    let op = match h[0] {
        1 => Op::Read,
        2 => Op::Write,
        3 => Op::Describe,
        other => return Err(FrameError::UnknownOpcode(other)),
    };
    let flags = h[1];
    let reserved = u32::from(u16::from_le_bytes([h[2], h[3]]))
        | u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let allowed = if op == Op::Write { FLAG_NOTIFY } else { 0 };
    if flags & !allowed != 0 || reserved != 0 {
        return Err(FrameError::ReservedBits { flags, reserved });
    }
    let addr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if len > MAX_REQUEST_LEN {
        return Err(FrameError::LengthTooLarge(len));
    }
    if op == Op::Describe && (addr != 0 || len != 0) {
        return Err(FrameError::BadDescribe);
    }
    Ok(Request {
        op,
        addr,
        len,
        notify: flags & FLAG_NOTIFY != 0,
    })
}

/// Encodes a response header.
pub fn encode_response(resp: &Response) -> [u8; RESPONSE_LEN] {
    let mut b = [0u8; RESPONSE_LEN];
    b[0..4].copy_from_slice(&resp.status.to_le_bytes());
    b[8..16].copy_from_slice(&resp.len.to_le_bytes());
    b
}

/// Decodes and checks a response header.
pub fn decode_response(h: &[u8; RESPONSE_LEN]) -> Result<Response, FrameError> {
    let status = i32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let reserved = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if reserved != 0 {
        return Err(FrameError::ReservedBits { flags: 0, reserved });
    }
    if ErrorCode::from_i32(status).is_none() {
        return Err(FrameError::UnknownStatus(status));
    }
    if status != 0 && len != 0 {
        return Err(FrameError::ErrorWithPayload(len));
    }
    if len > MAX_REQUEST_LEN {
        return Err(FrameError::LengthTooLarge(len));
    }
    Ok(Response { status, len })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip() {
        for (op, notify) in [(Op::Read, false), (Op::Write, true), (Op::Write, false)] {
            let req = Request {
                op,
                addr: 0x7f00_1234_5678,
                len: 1 << 30,
                notify,
            };
            assert_eq!(decode_request(&encode_request(&req)), Ok(req));
        }
        let d = Request {
            op: Op::Describe,
            addr: 0,
            len: 0,
            notify: false,
        };
        assert_eq!(decode_request(&encode_request(&d)), Ok(d));
        for code in ErrorCode::ALL {
            let len = if *code == ErrorCode::OK { 77 } else { 0 };
            let resp = Response {
                status: code.code(),
                len,
            };
            assert_eq!(decode_response(&encode_response(&resp)), Ok(resp));
        }
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let good = encode_request(&Request {
            op: Op::Read,
            addr: 0,
            len: 0,
            notify: false,
        });
        let mut bad = good;
        bad[0] = 9;
        assert_eq!(decode_request(&bad), Err(FrameError::UnknownOpcode(9)));
        let mut bad = good;
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            decode_request(&bad),
            Err(FrameError::LengthTooLarge(u64::MAX))
        );
        let mut bad = good;
        bad[1] = FLAG_NOTIFY;
        assert!(
            matches!(decode_request(&bad), Err(FrameError::ReservedBits { .. })),
            "the landing notice is for WRITEs only"
        );
        let mut bad = good;
        bad[5] = 1;
        assert!(matches!(
            decode_request(&bad),
            Err(FrameError::ReservedBits { .. })
        ));
        let mut bad = good;
        bad[0] = Op::Describe as u8;
        bad[8] = 1;
        assert_eq!(decode_request(&bad), Err(FrameError::BadDescribe));
        let mut resp = encode_response(&Response {
            status: ErrorCode::INVALID_PARAMS.code(),
            len: 0,
        });
        resp[8] = 1;
        assert_eq!(decode_response(&resp), Err(FrameError::ErrorWithPayload(1)));
        let resp = encode_response(&Response {
            status: 12345,
            len: 0,
        });
        assert_eq!(
            decode_response(&resp),
            Err(FrameError::UnknownStatus(12345))
        );
    }
}
