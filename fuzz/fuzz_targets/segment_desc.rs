//! Fuzzes the segment descriptor decoder (what a peer's DESCRIBE answer or a metadata entry
//! holds). Checks: no panic; a decoded descriptor re-encodes and decodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mooncake_core::SegmentDesc;

fuzz_target!(|data: &[u8]| {
    if let Ok(desc) = SegmentDesc::decode(data) {
        let again = desc.encode().expect("a decoded descriptor encodes");
        let back = SegmentDesc::decode(&again).expect("and decodes");
        assert_eq!(format!("{desc:?}"), format!("{back:?}"));
    }
});
