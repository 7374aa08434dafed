//! Writes the seed corpus of the fuzz targets whose inputs are structured (postcard-encoded
//! commands and frames), with the encoders the code itself uses, so the seeds stay valid as the
//! types change. Run from the fuzz directory: `cargo run --example make_seeds`. Deterministic;
//! rewrites the files it owns.

use std::path::Path;

use mooncake_core::{BufferDesc, Endpoint, Location, SegmentDesc};
use mooncake_master::{ClientId, Command, ReplicateConfig, RequestId, SegmentSpec};
use mooncake_meta_raft::raft::prelude::MessageType;
use mooncake_meta_raft::Message;
use mooncake_rpc::rpc::RPC_VERSION;
use mooncake_rpc::MasterRequest;
use mooncake_store::real_client::PROTOCOL_VERSION;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    std::fs::create_dir_all(&dir).expect("corpus dir");
    std::fs::write(dir.join(name), bytes).expect("seed");
}

/// One RPC request frame: `len | version | kind | id | body`.
fn frame(id: u64, request: &MasterRequest) -> Vec<u8> {
    let body = postcard::to_stdvec(request).expect("encodes");
    let mut f = Vec::new();
    f.extend_from_slice(&((body.len() + 10) as u32).to_le_bytes());
    f.push(RPC_VERSION);
    f.push(1);
    f.extend_from_slice(&id.to_le_bytes());
    f.extend_from_slice(&body);
    f
}

/// A master-commands step: `delay | len | command`.
fn step(delay: u8, command: &Command) -> Vec<u8> {
    let body = postcard::to_stdvec(command).expect("encodes");
    assert!(body.len() <= 255, "seed command too long: {command:?}");
    let mut s = vec![delay, body.len() as u8];
    s.extend_from_slice(&body);
    s
}

fn main() {
    let c = ClientId;
    let one = ReplicateConfig::default();
    let two = ReplicateConfig::with_replicas(2);
    let life = vec![
        Command::MountSegment {
            client_id: c(1),
            segment: SegmentSpec::new("10.0.0.1:1", 0x10_0000, 64 << 20),
        },
        Command::MountSegment {
            client_id: c(2),
            segment: SegmentSpec::new("10.0.0.2:1", 0x10_0000, 64 << 20),
        },
        Command::PutStart {
            client_id: c(1),
            key: "a".into(),
            size: 4096,
            config: one.clone(),
        },
        Command::PutEnd {
            client_id: c(1),
            key: "a".into(),
        },
        Command::PutStart {
            client_id: c(2),
            key: "b".into(),
            size: 1 << 20,
            config: two,
        },
        Command::GetReplicaList { key: "a".into() },
        Command::Heartbeat { client_id: c(1) },
        Command::Remove {
            key: "a".into(),
            force: false,
        },
        Command::Reserve {
            client_id: c(1),
            size: 1 << 20,
            min_size: 4096,
        },
        Command::ExpireClient { client_id: c(2) },
        Command::Evict,
        Command::UnmountSegment {
            client_id: c(1),
            name: "10.0.0.1:1".into(),
        },
    ];
    // A remove named with a request id, then its retry (answered from memory).
    let mut life = life;
    let remove_once = Command::Once {
        id: RequestId {
            client: c(2),
            seq: 1,
        },
        done_below: 1,
        command: Box::new(Command::Remove {
            key: "b".into(),
            force: true,
        }),
    };
    life.push(remove_once.clone());
    life.push(remove_once);
    let mut seq = Vec::new();
    for (i, command) in life.iter().enumerate() {
        seq.extend(step((i * 37 % 200) as u8, command));
    }
    write("master_commands", "lifecycle", &seq);
    // The leader's view: each command routed (op 0), its entry applied (op 3), with a timer
    // round (op 6) and a change of leader (op 7) between; and the same with entries applied
    // late, after several routes.
    let view_step = |op: u8, delay: u8, command: Option<&Command>| {
        let body = command.map_or(Vec::new(), |c| postcard::to_stdvec(c).expect("encodes"));
        let mut s = vec![op, delay, body.len() as u8];
        s.extend_from_slice(&body);
        s
    };
    let mut in_order = Vec::new();
    let mut late = Vec::new();
    for (i, command) in life.iter().enumerate() {
        in_order.extend(view_step(0, (i * 37 % 200) as u8, Some(command)));
        in_order.extend(view_step(3, 0, None));
        late.extend(view_step(0, 3, Some(command)));
        if i % 3 == 2 {
            for _ in 0..3 {
                late.extend(view_step(3, 1, None));
            }
        }
    }
    in_order.extend(view_step(6, 200, None));
    in_order.extend(view_step(7, 10, None));
    write("leader_view", "in-order", &in_order);
    write("leader_view", "late", &late);

    // The HTTP metadata server: each request kind, a pipelined pair, and a body cut short.
    let http: [(&str, &[u8]); 6] = [
        ("get", b"GET /metadata?key=a HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "put",
            b"PUT /metadata?key=a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
        ),
        ("delete", b"DELETE /metadata?key=a HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "list-metrics-health",
            b"GET /metadata?prefix=a&after=b HTTP/1.1\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n\
              HEAD /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
        ),
        (
            "cut-body",
            b"PUT /metadata?key=b HTTP/1.1\r\nContent-Length: 100\r\nExpect: 100-continue\r\n\r\nabc",
        ),
        (
            "conditional",
            b"PUT /metadata?key=c&if_revision=0 HTTP/1.1\r\nContent-Length: 1\r\n\r\nx",
        ),
    ];
    for (name, bytes) in http {
        write("http_requests", name, bytes);
    }
    for (i, command) in life.iter().enumerate() {
        write("master_commands", &format!("one-{i:02}"), &step(1, command));
    }

    let requests = vec![
        MasterRequest::Apply(life[0].clone()),
        MasterRequest::Apply(life[2].clone()),
        MasterRequest::Segments,
        MasterRequest::Metrics,
        MasterRequest::Landed {
            client_id: c(1),
            segment: "10.0.0.1:1".into(),
            ranges: vec![(0x10_0000, 4096)],
        },
    ];
    let mut stream = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let f = frame(i as u64 + 1, r);
        write("rpc_stream", &format!("request-{i}"), &f);
        stream.extend(f);
    }
    write("rpc_stream", "stream", &stream);

    let desc = SegmentDesc {
        name: "10.0.0.1:7000".into(),
        endpoints: vec![
            Endpoint {
                protocol: "tcp".into(),
                address: "10.0.0.1:7000".into(),
            },
            Endpoint {
                protocol: "shm".into(),
                address: "10.0.0.1/mooncake-shm-1".into(),
            },
        ],
        buffers: vec![BufferDesc {
            addr: 0x10_0000,
            len: 64 << 20,
            location: Location::cpu(0),
            keys: Vec::new(),
        }],
    };
    write(
        "segment_desc",
        "two-endpoints",
        &desc.encode().expect("encodes"),
    );

    write("raft_wal", "empty", b"");
    // A record header announcing 8 bytes with a wrong CRC, and a torn one.
    write(
        "raft_wal",
        "bad-crc",
        &[8, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9],
    );
    write("raft_wal", "torn", &[200, 0, 0, 0, 0, 0, 0, 0, 1]);
    // Logs in the current format: a base and three entries split over records, and the same
    // with its last record cut short.
    let entries: Vec<_> = (1..=3u64)
        .map(|i| {
            let mut e = mooncake_meta_raft::wal::Entry::default();
            e.index = i;
            e.term = 1;
            e.data = vec![i as u8; 40].into();
            e
        })
        .collect();
    let log = mooncake_meta_raft::wal::encode_log((0, 0), &entries, 160).expect("encodes");
    write("raft_wal", "current-format", &log);
    write("raft_wal", "current-format-torn", &log[..log.len() - 7]);

    raft_seeds();
    real_client_seeds();
    shm_seeds();
}

/// Seeds of `shm_protocol` (mode 0: bytes to a real target; mode 1: a fake target's hello and
/// replies to a real initiator).
fn shm_seeds() {
    let req = |op: u32, count: u32, a: u64, b: u64| {
        let mut r = Vec::new();
        r.extend_from_slice(&op.to_le_bytes());
        r.extend_from_slice(&count.to_le_bytes());
        r.extend_from_slice(&a.to_le_bytes());
        r.extend_from_slice(&b.to_le_bytes());
        r
    };
    // MAP of memory the target does not have, LANDED with two ranges, then an unknown op.
    let mut s = vec![0];
    s.extend(req(1, 0, 0x10_0000, 4096));
    s.extend(req(2, 2, 0, 0));
    for v in [0x10_0000u64, 64, 0x20_0000, 8] {
        s.extend_from_slice(&v.to_le_bytes());
    }
    s.extend(req(9, 0, 0, 0));
    write("shm_protocol", "target-requests", &s);
    // A LANDED announcing more ranges than allowed, and one cut short.
    let mut s = vec![0];
    s.extend(req(2, 4097, 0, 0));
    write("shm_protocol", "target-too-many", &s);
    let mut s = vec![0];
    s.extend(req(2, 4096, 0, 0));
    s.extend_from_slice(&[7; 40]);
    write("shm_protocol", "target-cut", &s);

    let reply = |status: u32, slot: u32, addr: u64, len: u64, generation: u64| {
        let mut r = Vec::new();
        r.extend_from_slice(&status.to_le_bytes());
        r.extend_from_slice(&slot.to_le_bytes());
        r.extend_from_slice(&addr.to_le_bytes());
        r.extend_from_slice(&len.to_le_bytes());
        r.extend_from_slice(&generation.to_le_bytes());
        r
    };
    let mut hello = b"MCSH".to_vec();
    hello.extend_from_slice(&1u32.to_le_bytes());
    hello.extend_from_slice(&1234u64.to_le_bytes());
    // A well-behaved fake target: a table of the right size, the buffer mapped with a memfd of
    // its size, the landing acknowledged.
    let mut s = vec![1, 0x05];
    s.extend_from_slice(&hello);
    s.extend(reply(0, 1, 0x10_0000, 4096, 0));
    s.extend(reply(0, 0, 0, 0, 0));
    write("shm_protocol", "initiator-mapped", &s);
    // A buffer announced larger than the memfd passed, and a table too small.
    let mut s = vec![1, 0x09];
    s.extend_from_slice(&hello);
    s.extend(reply(0, 1, 0x10_0000, 1 << 20, 0));
    write("shm_protocol", "initiator-short-memfd", &s);
    let mut s = vec![1, 0x06];
    s.extend_from_slice(&hello);
    s.extend(reply(0, 1, 0x10_0000, 4096, 0));
    write("shm_protocol", "initiator-small-table", &s);
    // A wrong hello.
    let mut s = vec![1, 0x05];
    s.extend_from_slice(b"MCSH\x02\0\0\0\0\0\0\0\0\0\0\0");
    write("shm_protocol", "initiator-bad-hello", &s);
}

/// A `real_client` request op: `1 | len u16 | variant | postcard fields`.
fn rc_request<T: serde::Serialize>(variant: u8, fields: &T) -> Vec<u8> {
    let mut body = vec![variant];
    body.extend(postcard::to_stdvec(fields).expect("encodes"));
    let mut s = vec![1];
    s.extend_from_slice(&(body.len() as u16).to_le_bytes());
    s.extend(body);
    s
}

/// A `real_client` registration op: `0 | slot | flags | len | bytes`.
fn rc_register(slot: u8, flags: u8, bytes: &[u8]) -> Vec<u8> {
    let mut s = vec![0, slot, flags, bytes.len() as u8];
    s.extend_from_slice(bytes);
    s
}

/// Seeds of `real_client`. Request variants, in the order the wire enum declares them: 0 Hello,
/// 1 PutInline, 2 PutBatchInline, 3 PutFrom, 4 GetInline, 5 GetInto, 6 GetSizes, 7 IsExist,
/// 8 BatchIsExist, 9 Remove, 10 BatchRemove, 11 RemoveByRegex, 12 RemoveAll,
/// 13 GetReplicaDesc, 14 BatchGetReplicaDesc, 15 CreateCopyTask, 16 CreateMoveTask,
/// 17 QueryTask, 18 MasterMetrics. Registration flags: bits 0-1 the descriptor (none, sealed
/// memfd, unsealed memfd, /dev/null), bits 2-3 its size (4 KiB, 64 KiB, 1 MiB, 3 bytes), bit 6
/// a well-formed message at the base address given.
fn real_client_seeds() {
    use mooncake_master::WriteKind;
    let config = ReplicateConfig::default();
    let base: u64 = 0x7000_0000;
    let part = |off: u64, len: u64| vec![("k".to_string(), vec![(base + off, len)])];
    // A pool registered in slot 0 (64 KiB sealed memfd), a zero-copy put and get through it, a
    // read inline, the dummy hanging up, and the key removed.
    let mut s = rc_register(0, 0x45, &base.to_le_bytes());
    s.extend(rc_request(
        3,
        &(0u64, WriteKind::Put, part(0, 4096), &config),
    ));
    s.extend(rc_request(5, &(0u64, part(4096, 4096))));
    s.extend(rc_request(4, &("k",)));
    s.extend([2, 0]);
    s.extend(rc_request(9, &("k", false)));
    write("real_client", "session-io", &s);
    // Ranges outside the pool, a multi-buffer upsert, a session that never was.
    let mut s = rc_register(1, 0x45, &base.to_le_bytes());
    s.extend(rc_request(
        3,
        &(1u64, WriteKind::Put, part(65536 - 8, 16), &config),
    ));
    let two = vec![("u".to_string(), vec![(base, 8u64), (base + 8, 8)])];
    s.extend(rc_request(3, &(1u64, WriteKind::Upsert, two, &config)));
    s.extend(rc_request(5, &(3u64, part(0, 16))));
    s.extend(rc_request(5, &(1u64, part(u64::MAX - base, 2))));
    write("real_client", "session-bounds", &s);
    // Registrations to refuse: no descriptor, an unsealed memfd, not a memfd, a short message,
    // a length past the memfd, a wrong version.
    let mut s = Vec::new();
    s.extend(rc_register(0, 0x40, &base.to_le_bytes()));
    s.extend(rc_register(1, 0x46, &base.to_le_bytes()));
    s.extend(rc_register(2, 0x47, &base.to_le_bytes()));
    s.extend(rc_register(3, 0x01, b"MCDM"));
    let mut long = b"MCDM".to_vec();
    long.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    long.extend_from_slice(&(1u64 << 20).to_le_bytes());
    long.extend_from_slice(&base.to_le_bytes());
    s.extend(rc_register(0, 0x01, &long));
    let mut other = long.clone();
    other[4..8].copy_from_slice(&(PROTOCOL_VERSION + 1).to_le_bytes());
    other[8..16].copy_from_slice(&4096u64.to_le_bytes());
    s.extend(rc_register(1, 0x01, &other));
    write("real_client", "registrations", &s);
    // Inline requests of every other kind.
    let mut s = rc_request(0, &(1u32,));
    let blob: &[u8] = b"value";
    s.extend(rc_request(
        1,
        &(WriteKind::Put, "a", vec![blob, blob], &config),
    ));
    s.extend(rc_request(
        2,
        &(WriteKind::Upsert, vec![("b", blob)], &config),
    ));
    s.extend(rc_request(4, &("a",)));
    s.extend(rc_request(6, &(vec!["a", "b", "c"],)));
    s.extend(rc_request(7, &("a",)));
    s.extend(rc_request(8, &(vec!["a", "z"],)));
    s.extend(rc_request(10, &(vec!["a"], true)));
    s.extend(rc_request(11, &("^b.*", false)));
    s.extend(rc_request(13, &("b",)));
    s.extend(rc_request(14, &(vec!["b"],)));
    s.extend(rc_request(15, &("b", vec!["127.0.0.1:1"])));
    s.extend(rc_request(16, &("b", "127.0.0.1:1", "127.0.0.1:2")));
    s.extend(rc_request(17, &(7u64,)));
    s.extend(rc_request(18, &()));
    s.extend(rc_request(12, &(true,)));
    write("real_client", "requests", &s);
}

/// An inject op of `raft_messages`: `0 | to | from | source | len u16 | protobuf`, with the
/// message's own `to` and `from` kept when `keep` (else the selectors pick them).
fn inject(to: u8, from: u8, source: u8, keep: bool, m: &Message) -> Vec<u8> {
    use protobuf::Message as _;
    let body = m.write_to_bytes().expect("encodes");
    let flag = if keep { 0x80 } else { 0 };
    let mut s = vec![0, to | flag, from | flag, source];
    s.extend_from_slice(&(body.len() as u16).to_le_bytes());
    s.extend_from_slice(&body);
    s
}

fn raft_message(t: MessageType, from: u64, to: u64, term: u64) -> Message {
    let mut m = Message::default();
    m.set_msg_type(t);
    m.from = from;
    m.to = to;
    m.term = term;
    m
}

/// Seeds of `raft_messages`. Members are 1..=3 at 127.0.0.<id>; selector `x` picks member
/// `x % 3 + 1`, `from` selector `f` node `f % 6`, source selector `s` address 127.0.0.<s % 4 + 1>.
fn raft_seeds() {
    // The group's own life: proposals, delivery, ticks, a transfer of leadership.
    let mut life = Vec::new();
    for i in 0..6u8 {
        life.extend([3, 0, 3, b'c', b'm', b'0' + i, 2]);
    }
    life.extend([
        7, 1, 2, 2, 2, 3, 1, 2, b'x', b'y', 2, 6, 2, 3, 1, 1, b'z', 2, 2,
    ]);
    write("raft_messages", "group-life", &life);

    // A heartbeat at a far higher term from a non-member (node 4), from member 2's id over
    // another member's address, and from member 2 at its own address.
    let hb = raft_message(MessageType::MsgHeartbeat, 0, 0, 100);
    let mut s = Vec::new();
    s.extend(inject(2, 4, 1, false, &hb));
    s.extend(inject(2, 2, 2, false, &hb));
    s.extend(inject(2, 2, 1, false, &hb));
    s.push(2);
    write("raft_messages", "heartbeat-sources", &s);

    // An append with entries and a commit index past them, from the leader's id.
    let mut app = raft_message(MessageType::MsgAppend, 1, 2, 1);
    app.index = 2;
    app.log_term = 1;
    app.commit = 50;
    app.entries = (3..6u64)
        .map(|i| {
            let mut e = mooncake_meta_raft::wal::Entry::default();
            e.index = i;
            e.term = 1;
            e.data = vec![b'e', i as u8].into();
            e
        })
        .collect::<Vec<_>>()
        .into();
    write("raft_messages", "append", &inject(1, 1, 0, true, &app));

    // A vote request, a heartbeat with a commit index past the log, an append response claiming
    // far more than the log holds, and a snapshot whose data does not decode.
    let mut s = Vec::new();
    let mut vote = raft_message(MessageType::MsgRequestVote, 3, 1, 5);
    vote.index = 9;
    vote.log_term = 4;
    s.extend(inject(0, 0, 0, true, &vote));
    let mut hb = raft_message(MessageType::MsgHeartbeat, 1, 3, 1);
    hb.commit = 1000;
    s.extend(inject(2, 0, 0, true, &hb));
    let mut resp = raft_message(MessageType::MsgAppendResponse, 2, 1, 1);
    resp.index = 1 << 40;
    s.extend(inject(0, 1, 1, true, &resp));
    let mut snap = raft_message(MessageType::MsgSnapshot, 1, 2, 1);
    let meta = snap.mut_snapshot().mut_metadata();
    meta.index = 40;
    meta.term = 1;
    meta.mut_conf_state().voters = vec![1, 2, 3];
    snap.mut_snapshot().data = b"not a snapshot".to_vec().into();
    s.extend(inject(1, 0, 0, true, &snap));
    s.push(2);
    write("raft_messages", "hostile-member", &s);
}
