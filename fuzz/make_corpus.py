#!/usr/bin/env python3
"""Writes the committed seed corpus under fuzz/corpus/<target>/.

Run from anywhere: `python3 fuzz/make_corpus.py`. Deterministic; rewrites the files it owns and
leaves any others alone. Check what the structured seeds decode to with
`cd fuzz && cargo fuzz fmt <target> corpus/<target>/<file> --sanitizer none`.

Wire format (see mooncake-transport-tcp/src/frame.rs), little-endian:
  preamble (8):  "MCTP" | version u16 | flags u16
  request  (24): op u8 | flags u8 | reserved u16 | id u32 | addr u64 | len u64
  response (16): status i32 | id u32 | len u64

The structured targets take `arbitrary` 1.x input: integers are little-endian and read in field
order, a Vec element is preceded by one byte whose low bit says "one more", and an enum variant
is a u32 `t` mapped to variant `(t * N) >> 32`.
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
READ, WRITE, DESCRIBE = 1, 2, 3
MAX_REQUEST_LEN = 1 << 40


def preamble(magic=b"MCTP", version=1, flags=0):
    return magic + struct.pack("<HH", version, flags)


def request(op, rid, addr, length, flags=0, reserved=0):
    return struct.pack("<BBHIQQ", op, flags, reserved, rid, addr, length)


def response(status, rid, length):
    return struct.pack("<iIQ", status, rid, length)


def tcp_frame():
    p = preamble()
    return {
        "valid_session": p
        + request(READ, 1, 0x7F00_0000_1000, 64)
        + request(WRITE, 2, 0x7F00_0000_1000, 8)
        + b"payload!"
        + request(DESCRIBE, 3, 0, 0)
        + request(READ, 4, 0x7F00_0000_2000, 0),
        "preamble_only": p,
        "truncated_preamble": p[:5],
        "truncated_header": p + request(READ, 1, 0x1000, 16)[:13],
        "opcode_9": p + request(9, 1, 0x1000, 16),
        "opcode_0": request(0, 0, 0, 0),
        "len_2_pow_63": p + request(READ, 5, 0x1000, 1 << 63),
        "len_max": p + request(READ, 6, 0x1000, MAX_REQUEST_LEN)
        + request(WRITE, 7, 0x1000, MAX_REQUEST_LEN + 1),
        "describe_nonzero_addr": p + request(DESCRIBE, 8, 0x1000, 0),
        "describe_nonzero_len": p + request(DESCRIBE, 9, 0, 4),
        "reserved_bits": p + request(READ, 10, 0x1000, 16, flags=1)
        + request(READ, 11, 0x1000, 16, reserved=0x100),
        "bad_magic": b"HTTP/1.1 200 OK\r\n\r\n" + request(READ, 1, 0, 0),
        "bad_version": preamble(version=2) + request(READ, 1, 0, 0),
        "preamble_flags": preamble(flags=1) + request(READ, 1, 0, 0),
        "write_payload_short": p + request(WRITE, 12, 0x1000, 1000) + b"abcd",
        "write_then_request": p + request(WRITE, 13, 0x1000, 24)
        + request(READ, 99, 0x4000, 24) + request(READ, 14, 0x2000, 1),
        # Also decoded as response headers (decode_response runs on every input).
        "response_ok": response(0, 1, 4096) + response(-600, 2, 0),
        "response_error_payload": response(-704, 3, 5),
        "response_unknown_status": response(-2, 4, 0),
        "response_len_too_large": response(0, 5, MAX_REQUEST_LEN + 1),
    }


def u8(v):
    return struct.pack("<B", v)


def u16(v):
    return struct.pack("<H", v)


def i16(v):
    return struct.pack("<h", v)


def u32(v):
    return struct.pack("<I", v)


def i32(v):
    return struct.pack("<i", v)


def u64(v):
    return struct.pack("<Q", v)


def variant(k, n):
    """A u32 selecting variant k of an n-variant derived enum."""
    return u32(((2 * k + 1) << 32) // (2 * n))


def vec(items):
    return b"".join(b"\x01" + it for it in items) + b"\x00"


# request_validation: struct Input { sizes: Vec<u16>, probes: Vec<Probe> }
def wild(addr, length):
    return variant(0, 5) + u64(addr) + u64(length)


def near(buf, offset, length):
    return variant(1, 5) + u8(buf) + i32(offset) + u32(length)


def near_end(buf, back, length):
    return variant(2, 5) + u8(buf) + i16(back) + u16(length)


def overflow(buf, offset, minus):
    return variant(3, 5) + u8(buf) + u16(offset) + u16(minus)


def slice_(buf, offset, length, sub_offset, sub_len):
    return variant(4, 5) + u8(buf) + u16(offset) + u16(length) + u64(sub_offset) + u64(sub_len)


def request_validation():
    def inp(sizes, probes):
        return vec([u16(s) for s in sizes]) + vec(probes)

    return {
        "one_buffer_inside": inp([4095], [near(0, 0, 4096), near(0, 100, 200), near(0, 4095, 1)]),
        "edges": inp(
            [4095, 99],
            [
                near_end(1, 0, 0),  # zero-length at the end: accepted
                near_end(1, 1, 1),
                near_end(1, 1, 2),  # one past the end
                near_end(0, -1, 0),  # starts one past the end
                near(0, -1, 2),  # starts one before the start
                near(1, 0, 100),
                near(1, 0, 101),
            ],
        ),
        "overflow": inp([65535], [overflow(0, 0, 0), overflow(0, 16, 15), wild(2**64 - 3, 10)]),
        "wild": inp([0, 1, 2], [wild(0, 0), wild(0, 2**64 - 1), wild(4096, 16), wild(2**63, 1)]),
        "slices": inp(
            [8191, 8191],
            [
                slice_(0, 10, 100, 0, 100),
                slice_(1, 10, 100, 50, 51),
                slice_(1, 0, 8192, 2**64 - 1, 2),
            ],
        ),
        "eight_buffers": inp(list(range(0, 8000, 1000)), [near(i, 0, i * 1000 + 1) for i in range(8)]),
        "no_buffers": inp([], [wild(0x1000, 1), near(3, 5, 5)]),
    }


# registry_ops: Vec<Op>, Op has 7 variants.
def register_owned(size):
    return variant(0, 7) + u16(size)


def register_arena(offset, length):
    return variant(1, 7) + u16(offset) + u16(length)


def unregister(index):
    return variant(2, 7) + u8(index)


def unregister_near(index, delta):
    return variant(3, 7) + u8(index) + i16(delta)


def resolve(index, offset, length):
    return variant(4, 7) + u8(index) + i32(offset) + u32(length)


def resolve_arena(offset, length):
    return variant(5, 7) + i32(offset) + u32(length)


def resolve_wild(addr, length):
    return variant(6, 7) + u64(addr) + u64(length)


def registry_ops():
    return {
        "owned_lifecycle": vec(
            [register_owned(4095), resolve(0, 0, 4096), resolve(0, 1, 4096), unregister(0), resolve_wild(0x1000, 1)]
        ),
        "arena_overlaps": vec(
            [
                register_arena(0, 4096),
                register_arena(4095, 10),  # overlaps the first
                register_arena(4096, 10),  # adjacent: fine
                register_arena(100, 0),  # empty: refused
                register_arena(0, 4096),  # duplicate: refused
                resolve_arena(4090, 12),  # spans two adjacent buffers: refused
                resolve_arena(4096, 0),
                unregister_near(0, 1),  # not a start
                unregister_near(0, 0),
                register_arena(10, 20),  # inside the freed range: fine now
            ]
        ),
        "mixed": vec(
            [register_owned(100), register_arena(60000, 60000), register_owned(65535), resolve(1, -1, 2)]
            + [resolve(2, 65535, 1), resolve_wild(2**64 - 1, 1), unregister(1), unregister(7), unregister(0)]
        ),
        "empty": b"",
    }


def main():
    for target, seeds in [
        ("tcp_frame", tcp_frame()),
        ("request_validation", request_validation()),
        ("registry_ops", registry_ops()),
    ]:
        d = os.path.join(HERE, "corpus", target)
        os.makedirs(d, exist_ok=True)
        for name, data in seeds.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(data)
        print(f"{target}: {len(seeds)} seeds, {sum(map(len, seeds.values()))} bytes")


if __name__ == "__main__":
    main()
