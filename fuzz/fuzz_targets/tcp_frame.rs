//! Fuzzes the TCP transport's wire decoders (`mooncake_transport_tcp::frame`) with raw bytes.
//!
//! Checks, for any input:
//! - no decoder panics;
//! - `decode_preamble` accepts exactly the bytes `encode_preamble` produces;
//! - `decode_request` / `decode_response` return `Ok(None)` exactly when the header is incomplete,
//!   accept exactly the headers an independent validity check accepts, and every accepted header
//!   re-encodes to the same bytes;
//! - accepted lengths are at most `MAX_REQUEST_LEN`, DESCRIBE carries zero address and length, and
//!   error responses carry no payload;
//! - a server-style streaming loop (preamble, then requests back to back, WRITE payloads skipped
//!   when they fit in what is left) never panics and only ever advances.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_core::ErrorCode;
use mooncake_transport_tcp::frame::{
    decode_preamble, decode_request, decode_response, encode_preamble, encode_request,
    encode_response, FrameError, Op, Request, Response, MAX_REQUEST_LEN, PREAMBLE_LEN, REQUEST_LEN,
    RESPONSE_LEN,
};

fuzz_target!(|data: &[u8]| {
    let preamble_ok = check_preamble(data);
    check_request(data);
    check_response(data);
    // Responses are also decoded at arbitrary offsets inside a stream by the client; sliding the
    // window finds more shapes from one input.
    for start in 1..data.len().min(RESPONSE_LEN) {
        check_request(&data[start..]);
        check_response(&data[start..]);
    }
    stream_requests(data, if preamble_ok { PREAMBLE_LEN } else { 0 });
});

/// Returns whether `data` opens with a valid preamble.
fn check_preamble(data: &[u8]) -> bool {
    let Some(head) = data.get(..PREAMBLE_LEN) else {
        return false;
    };
    let head: [u8; PREAMBLE_LEN] = head.try_into().expect("8 bytes");
    let res = decode_preamble(&head);
    assert_eq!(
        res.is_ok(),
        head == encode_preamble(),
        "preamble {head:02x?} -> {res:?}"
    );
    if let Err(e) = &res {
        let _ = e.to_string();
        if let FrameError::BadMagic(m) = e {
            assert_eq!(&m[..], &head[..4]);
        }
    }
    res.is_ok()
}

/// Independent statement of which 24-byte request headers are valid.
fn request_is_valid(h: &[u8]) -> bool {
    let op = h[0];
    let addr = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let len = u64::from_le_bytes(h[16..24].try_into().unwrap());
    // Flags: only the landing notice (bit 0) and the deadline (bit 1), and only on WRITE; the
    // budget field is non-zero exactly when the deadline flag is set.
    let budget = u16::from_le_bytes([h[2], h[3]]);
    (1..=3).contains(&op)
        && (h[1] == 0 || (op == 2 && h[1] & !3 == 0))
        && (budget != 0) == (h[1] & 2 != 0)
        && len <= MAX_REQUEST_LEN
        && (op != 3 || (addr == 0 && len == 0))
}

/// Independent statement of which 16-byte response headers are valid.
fn response_is_valid(h: &[u8]) -> bool {
    let status = i32::from_le_bytes(h[0..4].try_into().unwrap());
    let len = u64::from_le_bytes(h[8..16].try_into().unwrap());
    let known = ErrorCode::ALL.iter().any(|c| c.code() == status);
    known && (status == 0 || len == 0) && len <= MAX_REQUEST_LEN
}

fn check_request(b: &[u8]) -> Option<Request> {
    let res = decode_request(b);
    match &res {
        Ok(None) => assert!(b.len() < REQUEST_LEN, "complete header reported incomplete"),
        Ok(Some(req)) => {
            assert!(b.len() >= REQUEST_LEN);
            assert!(
                request_is_valid(&b[..REQUEST_LEN]),
                "accepted invalid {req:?}"
            );
            assert!(req.len <= MAX_REQUEST_LEN);
            if req.op == Op::Describe {
                assert_eq!((req.addr, req.len), (0, 0));
            }
            let mut again = Vec::new();
            encode_request(req, &mut again);
            assert_eq!(&again[..], &b[..REQUEST_LEN], "request does not re-encode");
            check_answers(req);
        }
        Err(e) => {
            assert!(
                b.len() >= REQUEST_LEN,
                "error {e:?} on an incomplete header"
            );
            assert!(
                !request_is_valid(&b[..REQUEST_LEN]),
                "rejected valid header {:02x?}: {e:?}",
                &b[..REQUEST_LEN]
            );
            let _ = e.to_string();
            match *e {
                FrameError::UnknownOpcode(op) => assert_eq!(op, b[0]),
                FrameError::LengthTooLarge(len) => assert!(len > MAX_REQUEST_LEN),
                FrameError::ReservedBits { flags, reserved } => {
                    assert!(flags != 0 || reserved != 0)
                }
                _ => {}
            }
        }
    }
    res.ok().flatten()
}

fn check_response(b: &[u8]) {
    let res = decode_response(b);
    match &res {
        Ok(None) => assert!(
            b.len() < RESPONSE_LEN,
            "complete header reported incomplete"
        ),
        Ok(Some(resp)) => {
            assert!(b.len() >= RESPONSE_LEN);
            assert!(
                response_is_valid(&b[..RESPONSE_LEN]),
                "accepted invalid {resp:?}"
            );
            assert!(resp.len <= MAX_REQUEST_LEN);
            assert!(ErrorCode::from_i32(resp.status).is_some());
            if resp.status != 0 {
                assert_eq!(resp.len, 0, "error response with a payload");
            }
            let mut again = Vec::new();
            encode_response(resp, &mut again);
            assert_eq!(
                &again[..],
                &b[..RESPONSE_LEN],
                "response does not re-encode"
            );
        }
        Err(e) => {
            assert!(
                b.len() >= RESPONSE_LEN,
                "error {e:?} on an incomplete header"
            );
            assert!(
                !response_is_valid(&b[..RESPONSE_LEN]),
                "rejected valid header {:02x?}: {e:?}",
                &b[..RESPONSE_LEN]
            );
            let _ = e.to_string();
            match *e {
                FrameError::ErrorWithPayload(len) => assert_ne!(len, 0),
                FrameError::LengthTooLarge(len) => assert!(len > MAX_REQUEST_LEN),
                _ => {}
            }
        }
    }
}

/// Encodes and decodes the responses a server could send for `req`: success with the request's
/// length (READ) or none (WRITE), and an error code picked from the request id.
fn check_answers(req: &Request) {
    let codes = ErrorCode::ALL;
    let err = codes[req.id as usize % codes.len()];
    let ok_len = if req.op == Op::Read { req.len } else { 0 };
    for resp in [
        Response {
            status: ErrorCode::OK.code(),
            id: req.id,
            len: ok_len,
        },
        Response {
            status: err.code(),
            id: req.id,
            len: 0,
        },
    ] {
        let mut buf = Vec::new();
        encode_response(&resp, &mut buf);
        assert_eq!(buf.len(), RESPONSE_LEN);
        assert_eq!(decode_response(&buf), Ok(Some(resp)));
        for cut in 0..RESPONSE_LEN {
            assert_eq!(decode_response(&buf[..cut]), Ok(None));
        }
    }
}

/// Decodes requests back to back from `data[start..]` as the server does: a header, then for
/// WRITE its payload, which is skipped when it fits in the input.
fn stream_requests(data: &[u8], start: usize) {
    let mut pos = start;
    loop {
        let rest = &data[pos..];
        let Some(req) = check_request(rest) else {
            // Incomplete header (waits for more) or malformed (closes): either way, done.
            return;
        };
        pos += REQUEST_LEN;
        if req.op == Op::Write {
            let remaining = (data.len() - pos) as u64;
            if req.len > remaining {
                return;
            }
            pos += req.len as usize;
        }
        assert!(pos <= data.len());
    }
}
