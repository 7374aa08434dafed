//! Wire format of the TCP transport. Pure functions, no I/O: fuzzed and property-tested.
//!
//! Performance-critical: every request and response goes through these encoders and decoders.
//!
//! A connection starts with an 8-byte preamble from the initiator (`MCTP`, version, flags). Then
//! the initiator sends requests and the target answers each, in order:
//!
//! ```text
//! request  (24 bytes): opcode u8 | flags u8 | budget u16 | request id u32 | addr u64 | len u64
//!                      followed by `len` payload bytes for WRITE
//!                      flags: bit 0 (WRITE only) = report the landing to the segment's observer
//!                             bit 1 (WRITE only) = `budget` is a deadline: the target stores
//!                             no byte of the payload later than `budget` ms (1..=65535) after
//!                             it read the header; without the flag `budget` is 0
//! response (16 bytes): status i32 | request id u32 | len u64
//!                      followed by `len` payload bytes (READ data, DESCRIBE descriptor)
//! ```
//!
//! All integers are little-endian. `status` is 0 or a value of the `ErrorCode` table.
//!
//! A WRITE's deadline fences it: the space it writes may be handed to other data after the
//! writer's deadline (the master frees an abandoned write's or a reservation's range on a
//! timer), so its bytes must not land later, however long the writer was held (paused,
//! swapped, throttled) or the payload took. The initiator sends the time left, measured just
//! before the header goes out (a request already late is not sent); the target counts it from
//! when it reads the header and closes the connection rather than store a payload byte after
//! it (the initiator's op fails). The budget is relative, so the peers' clocks need not agree;
//! what it cannot see is time the header spent between the initiator's clock reading and the
//! target's reading of it (in flight, or queued behind a busy connection): writers keep a
//! margin for that, and the store's per-object checksums catch what lands regardless.
//!
//! A target that authenticates its peers (see `TcpConfig::auth`) and refuses a connection (a
//! peer without a certificate, or whose certificate's roles it does not admit) answers it with
//! one response header whose status is `ILLEGAL_CLIENT` (request id 0, no payload) and closes
//! it, serving none of its requests ([`encode_refusal`]). No request is ever answered with that
//! status, so an initiator reads it as the refusal of the whole connection.

use mooncake_core::ErrorCode;

/// Magic bytes opening every connection.
pub const MAGIC: [u8; 4] = *b"MCTP";
/// Protocol version carried in the preamble.
pub const VERSION: u16 = 1;
/// Length of the connection preamble.
pub const PREAMBLE_LEN: usize = 8;
/// Length of a request header.
pub const REQUEST_LEN: usize = 24;
/// Length of a response header.
pub const RESPONSE_LEN: usize = 16;
/// Largest length a single request may carry (1 TiB); larger is malformed.
pub const MAX_REQUEST_LEN: u64 = 1 << 40;
/// Request flag (WRITE only): the target reports the landed bytes to its segment's observer
/// before answering.
pub const FLAG_NOTIFY: u8 = 1;
/// Request flag (WRITE only): the header's budget field is the WRITE's deadline, in ms from
/// the target's reading of the header.
pub const FLAG_DEADLINE: u8 = 2;
/// Largest descriptor a DESCRIBE response may carry.
pub const MAX_DESCRIPTOR_LEN: u64 = 16 << 20;

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
    /// Request id, echoed in the response.
    pub id: u32,
    /// Target address.
    pub addr: u64,
    /// Length.
    pub len: u64,
    /// WRITE only: report the landing ([`FLAG_NOTIFY`]).
    pub notify: bool,
    /// WRITE only: store no payload byte later than this many ms after reading the header
    /// ([`FLAG_DEADLINE`]; 1 or more).
    pub deadline_ms: Option<u16>,
}

/// A decoded response header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Response {
    /// 0 or an error code.
    pub status: i32,
    /// Id of the request answered.
    pub id: u32,
    /// Payload length that follows.
    pub len: u64,
}

/// Why bytes are not a valid frame. Any of these closes the connection.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The preamble's magic bytes are wrong: not a peer of ours.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The peer speaks another protocol version.
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    BadVersion(u16),
    /// Unknown opcode.
    #[error("unknown opcode {0}")]
    UnknownOpcode(u8),
    /// Flags or reserved bits set.
    #[error("reserved bits set: flags {flags:#x}, reserved {reserved:#x}")]
    ReservedBits {
        /// The flags byte.
        flags: u8,
        /// The reserved field.
        reserved: u16,
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

/// Encodes the connection preamble.
pub fn encode_preamble() -> [u8; PREAMBLE_LEN] {
    let mut b = [0u8; PREAMBLE_LEN];
    b[..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&VERSION.to_le_bytes());
    b
}

/// Checks a connection preamble.
pub fn decode_preamble(b: &[u8; PREAMBLE_LEN]) -> Result<(), FrameError> {
    let magic: [u8; 4] = b[..4].try_into().expect("4 bytes");
    if magic != MAGIC {
        return Err(FrameError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([b[4], b[5]]);
    if version != VERSION {
        return Err(FrameError::BadVersion(version));
    }
    let flags = u16::from_le_bytes([b[6], b[7]]);
    if flags != 0 {
        return Err(FrameError::ReservedBits {
            flags: 0,
            reserved: flags,
        });
    }
    Ok(())
}

/// The answer of an authenticating target to a connection it refuses: a response header with
/// status `ILLEGAL_CLIENT`, id 0 and no payload (see the module's description).
pub fn encode_refusal() -> [u8; RESPONSE_LEN] {
    let mut out = Vec::with_capacity(RESPONSE_LEN);
    encode_response(
        &Response {
            status: ErrorCode::ILLEGAL_CLIENT.code(),
            id: 0,
            len: 0,
        },
        &mut out,
    );
    out.try_into().expect("a response header")
}

/// True for a response whose status refuses the whole connection ([`encode_refusal`]).
pub fn is_refusal(resp: &Response) -> bool {
    resp.status == ErrorCode::ILLEGAL_CLIENT.code()
}

/// Appends an encoded request header to `out`.
pub fn encode_request(req: &Request, out: &mut Vec<u8>) {
    out.push(req.op as u8);
    let deadline = req.deadline_ms.filter(|_| req.op == Op::Write);
    out.push(
        if req.notify { FLAG_NOTIFY } else { 0 }
            | if deadline.is_some() { FLAG_DEADLINE } else { 0 },
    );
    out.extend_from_slice(&deadline.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&req.id.to_le_bytes());
    out.extend_from_slice(&req.addr.to_le_bytes());
    out.extend_from_slice(&req.len.to_le_bytes());
}

/// Decodes a request header from the start of `b`: `Ok(None)` when fewer than
/// [`REQUEST_LEN`] bytes are there yet.
pub fn decode_request(b: &[u8]) -> Result<Option<Request>, FrameError> {
    let Some(h) = b.get(..REQUEST_LEN) else {
        return Ok(None);
    };
    let op = match h[0] {
        1 => Op::Read,
        2 => Op::Write,
        3 => Op::Describe,
        other => return Err(FrameError::UnknownOpcode(other)),
    };
    let flags = h[1];
    let budget = u16::from_le_bytes([h[2], h[3]]);
    let allowed = if op == Op::Write {
        FLAG_NOTIFY | FLAG_DEADLINE
    } else {
        0
    };
    let has_deadline = flags & FLAG_DEADLINE != 0;
    if flags & !allowed != 0 || (budget != 0) != has_deadline {
        return Err(FrameError::ReservedBits {
            flags,
            reserved: budget,
        });
    }
    let id = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let addr = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let len = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if len > MAX_REQUEST_LEN {
        return Err(FrameError::LengthTooLarge(len));
    }
    if op == Op::Describe && (addr != 0 || len != 0) {
        return Err(FrameError::BadDescribe);
    }
    Ok(Some(Request {
        op,
        id,
        addr,
        len,
        notify: flags & FLAG_NOTIFY != 0,
        deadline_ms: has_deadline.then_some(budget),
    }))
}

/// Appends an encoded response header to `out`.
pub fn encode_response(resp: &Response, out: &mut Vec<u8>) {
    out.extend_from_slice(&resp.status.to_le_bytes());
    out.extend_from_slice(&resp.id.to_le_bytes());
    out.extend_from_slice(&resp.len.to_le_bytes());
}

/// Decodes a response header from the start of `b`: `Ok(None)` when fewer than
/// [`RESPONSE_LEN`] bytes are there yet.
pub fn decode_response(b: &[u8]) -> Result<Option<Response>, FrameError> {
    let Some(h) = b.get(..RESPONSE_LEN) else {
        return Ok(None);
    };
    let status = i32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let id = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
    let len = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if ErrorCode::from_i32(status).is_none() {
        return Err(FrameError::UnknownStatus(status));
    }
    if status != 0 && len != 0 {
        return Err(FrameError::ErrorWithPayload(len));
    }
    if len > MAX_REQUEST_LEN {
        return Err(FrameError::LengthTooLarge(len));
    }
    Ok(Some(Response { status, id, len }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![Just(Op::Read), Just(Op::Write), Just(Op::Describe)]
    }

    proptest! {
        #[test]
        fn request_round_trips(op in op(), id: u32, addr: u64, len in 0..=MAX_REQUEST_LEN, notify: bool, deadline in proptest::option::of(1..=u16::MAX)) {
            let (addr, len) = if op == Op::Describe { (0, 0) } else { (addr, len) };
            let notify = notify && op == Op::Write;
            let deadline_ms = deadline.filter(|_| op == Op::Write);
            let req = Request { op, id, addr, len, notify, deadline_ms };
            let mut buf = Vec::new();
            encode_request(&req, &mut buf);
            prop_assert_eq!(buf.len(), REQUEST_LEN);
            prop_assert_eq!(decode_request(&buf).unwrap(), Some(req));
            for cut in 0..REQUEST_LEN {
                prop_assert_eq!(decode_request(&buf[..cut]).unwrap(), None);
            }
        }

        #[test]
        fn response_round_trips(code in proptest::sample::select(ErrorCode::ALL), id: u32, len in 0..=MAX_REQUEST_LEN) {
            let len = if code == ErrorCode::OK { len } else { 0 };
            let resp = Response { status: code.code(), id, len };
            let mut buf = Vec::new();
            encode_response(&resp, &mut buf);
            prop_assert_eq!(decode_response(&buf).unwrap(), Some(resp));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(Some(r)) = decode_request(&bytes) {
                prop_assert!(r.len <= MAX_REQUEST_LEN);
                let mut again = Vec::new();
                encode_request(&r, &mut again);
                prop_assert_eq!(&again[..], &bytes[..REQUEST_LEN]);
            }
            if let Ok(Some(r)) = decode_response(&bytes) {
                prop_assert!(r.status == 0 || r.len == 0);
            }
        }
    }

    #[test]
    fn hostile_headers_are_rejected() {
        let mut b = Vec::new();
        encode_request(
            &Request {
                op: Op::Read,
                id: 1,
                addr: 0,
                len: 0,
                notify: false,
                deadline_ms: None,
            },
            &mut b,
        );
        let mut bad = b.clone();
        bad[0] = 9;
        assert_eq!(decode_request(&bad), Err(FrameError::UnknownOpcode(9)));
        let mut bad = b.clone();
        bad[16..24].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert_eq!(
            decode_request(&bad),
            Err(FrameError::LengthTooLarge(1 << 63))
        );
        let mut bad = b.clone();
        bad[1] = FLAG_NOTIFY;
        assert!(
            matches!(decode_request(&bad), Err(FrameError::ReservedBits { .. })),
            "the landing notice is for WRITEs only"
        );
        bad[0] = Op::Write as u8;
        assert!(decode_request(&bad).unwrap().unwrap().notify);
        bad[1] = 4;
        assert!(matches!(
            decode_request(&bad),
            Err(FrameError::ReservedBits { .. })
        ));
        // A deadline flag needs a budget of 1 ms or more, and a budget needs the flag.
        bad[1] = FLAG_DEADLINE;
        assert!(matches!(
            decode_request(&bad),
            Err(FrameError::ReservedBits { .. })
        ));
        bad[2..4].copy_from_slice(&250u16.to_le_bytes());
        assert_eq!(
            decode_request(&bad).unwrap().unwrap().deadline_ms,
            Some(250)
        );
        bad[1] = 0;
        assert!(matches!(
            decode_request(&bad),
            Err(FrameError::ReservedBits { .. })
        ));
        bad[1] = FLAG_DEADLINE;
        bad[0] = Op::Read as u8;
        assert!(
            matches!(decode_request(&bad), Err(FrameError::ReservedBits { .. })),
            "deadlines are for WRITEs only"
        );
        let mut bad = b;
        bad[0] = Op::Describe as u8;
        bad[8] = 1;
        assert_eq!(decode_request(&bad), Err(FrameError::BadDescribe));
        assert!(decode_preamble(b"HTTP/1.1").is_err());
        assert!(decode_preamble(&encode_preamble()).is_ok());
        let mut p = encode_preamble();
        p[4] = 2;
        assert_eq!(decode_preamble(&p), Err(FrameError::BadVersion(2)));
    }
}
