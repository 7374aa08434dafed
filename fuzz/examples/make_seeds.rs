//! Writes the seed corpus of the fuzz targets whose inputs are structured (postcard-encoded
//! commands and frames), with the encoders the code itself uses, so the seeds stay valid as the
//! types change. Run from the fuzz directory: `cargo run --example make_seeds`. Deterministic;
//! rewrites the files it owns.

use std::path::Path;

use mooncake_core::{BufferDesc, Endpoint, Location, SegmentDesc};
use mooncake_master::{ClientId, Command, ReplicateConfig, RequestId, SegmentSpec};
use mooncake_rpc::rpc::RPC_VERSION;
use mooncake_rpc::MasterRequest;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
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
    write("segment_desc", "two-endpoints", &desc.encode().expect("encodes"));

    write("raft_wal", "empty", b"");
    // A record header announcing 8 bytes with a wrong CRC, and a torn one.
    write("raft_wal", "bad-crc", &[8, 0, 0, 0, 1, 2, 3, 4, 9, 9, 9, 9, 9, 9, 9, 9]);
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
}
