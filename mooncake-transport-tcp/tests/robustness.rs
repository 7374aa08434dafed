//! Bad input and bad peers: hostile frames against a real target, a peer that never answers, and
//! a target process killed in the middle of transfers.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{
    EngineConfig, Error, Location, SegmentDesc, TransferEngine, TransferRequest, TransferStatus,
};
use mooncake_transport_tcp::frame::{self, Op, Request};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

fn tcp(timeout: Duration) -> Arc<TcpTransport> {
    TcpTransport::new(TcpConfig {
        request_timeout: timeout,
        connect_timeout: Duration::from_secs(2),
        ..TcpConfig::default()
    })
    .unwrap()
}

async fn target() -> (Arc<TransferEngine>, u64, String) {
    let e = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![tcp(Duration::from_secs(5))],
    )
    .await
    .unwrap();
    let buf = e.allocate_buffer(1 << 16, Location::cpu(0)).unwrap();
    let addr = e
        .local_descriptor()
        .endpoint("tcp")
        .unwrap()
        .address
        .clone();
    (e, buf, addr)
}

/// A raw client speaking the wire protocol by hand.
fn raw(addr: &str) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn request(op: Op, id: u32, addr: u64, len: u64) -> Vec<u8> {
    let mut b = Vec::new();
    let notify = false;
    frame::encode_request(
        &Request {
            op,
            id,
            addr,
            len,
            notify,
            deadline_ms: None,
        },
        &mut b,
    );
    b
}

fn read_response(s: &mut TcpStream) -> frame::Response {
    let mut h = [0u8; frame::RESPONSE_LEN];
    s.read_exact(&mut h).unwrap();
    frame::decode_response(&h).unwrap().unwrap()
}

/// True when the server closed the connection (EOF or reset), within the read timeout.
fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_frames_close_only_their_connection() {
    let (engine, buf, addr) = target().await;
    let preamble = frame::encode_preamble();

    // A connection that stays well-behaved throughout.
    let mut good = raw(&addr);
    good.write_all(&preamble).unwrap();

    // Out-of-range READ and WRITE: error replies, connection kept, payload of the WRITE skipped.
    let mut s = raw(&addr);
    s.write_all(&preamble).unwrap();
    s.write_all(&request(Op::Read, 1, buf + 65_000, 1000))
        .unwrap();
    let mut w = request(Op::Write, 2, buf - 4096, 100);
    w.extend_from_slice(&[0xEE; 100]);
    s.write_all(&w).unwrap();
    s.write_all(&request(Op::Read, 3, buf, 8)).unwrap();
    let r1 = read_response(&mut s);
    assert_eq!(
        (r1.id, r1.status),
        (1, mooncake_core::ErrorCode::INVALID_PARAMS.code())
    );
    let r2 = read_response(&mut s);
    assert_eq!(
        (r2.id, r2.status),
        (2, mooncake_core::ErrorCode::INVALID_PARAMS.code())
    );
    let r3 = read_response(&mut s);
    assert_eq!((r3.id, r3.status, r3.len), (3, 0, 8));
    let mut data = [1u8; 8];
    s.read_exact(&mut data).unwrap();
    assert_eq!(
        data, [0u8; 8],
        "fresh buffer is zeroed and the refused WRITE touched nothing"
    );

    // Unknown opcode: closed.
    let mut bad = request(Op::Read, 4, buf, 8);
    bad[0] = 9;
    s.write_all(&bad).unwrap();
    assert!(closed(&mut s), "unknown opcode must close the connection");

    // Length 2^63: closed.
    let mut s = raw(&addr);
    s.write_all(&preamble).unwrap();
    let mut huge = request(Op::Write, 1, buf, 0);
    huge[16..24].copy_from_slice(&(1u64 << 63).to_le_bytes());
    s.write_all(&huge).unwrap();
    assert!(closed(&mut s), "length 2^63 must close the connection");

    // A refused WRITE too large to skip: error reply, then closed.
    let mut s = raw(&addr);
    s.write_all(&preamble).unwrap();
    s.write_all(&request(Op::Write, 7, buf, 1 << 30)).unwrap();
    let r = read_response(&mut s);
    assert_eq!(r.status, mooncake_core::ErrorCode::INVALID_PARAMS.code());
    assert!(closed(&mut s));

    // Wrong preamble: closed.
    let mut s = raw(&addr);
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert!(closed(&mut s), "a foreign protocol must be closed");

    // Truncated header, then the client goes away: nothing to answer, server unaffected.
    let mut s = raw(&addr);
    s.write_all(&preamble).unwrap();
    s.write_all(&request(Op::Read, 1, buf, 8)[..10]).unwrap();
    drop(s);

    // The well-behaved connection and the engine still work.
    good.write_all(&request(Op::Read, 0, buf, 4)).unwrap();
    let r = read_response(&mut good);
    assert_eq!((r.status, r.len), (0, 4));
    let initiator = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![tcp(Duration::from_secs(5))],
    )
    .await
    .unwrap();
    let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let seg = initiator.open_segment(engine.segment_name()).await.unwrap();
    let res = initiator
        .transfer(vec![TransferRequest::read(&seg, buf, local, 4096)])
        .await;
    res[0].as_ref().unwrap();
    initiator.shutdown().await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_peer_times_out_within_the_configured_bound() {
    // A "peer" that accepts and reads but never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut b = [0u8; 4096];
        while matches!(s.read(&mut b), Ok(n) if n > 0) {}
    });
    let timeout = Duration::from_millis(400);
    let e = TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![tcp(timeout)])
        .await
        .unwrap();
    let local = e.allocate_buffer(1 << 20, Location::cpu(0)).unwrap();
    let target = Arc::new(SegmentDesc {
        name: "hung:1".into(),
        endpoints: vec![mooncake_core::Endpoint {
            protocol: "tcp".into(),
            address: addr,
        }],
        buffers: vec![],
    });
    let started = Instant::now();
    let batch = e.submit(vec![
        TransferRequest::read(&target, 0x1000, local, 4096),
        TransferRequest::write(&target, 0x1000, local, 1 << 20),
    ]);
    let results = batch.wait().await;
    let took = started.elapsed();
    assert!(took >= timeout && took < timeout * 5, "took {took:?}");
    for (i, r) in results.iter().enumerate() {
        assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
        assert_eq!(batch.status(i), TransferStatus::TimedOut);
    }
    e.shutdown().await;
    sink.join().unwrap();
}

/// Spawns this test binary as a target process (see `child_target`), returning it with its
/// segment name and buffer address.
fn spawn_target() -> (Child, String, u64) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_target",
            "--nocapture",
            "--include-ignored",
        ])
        .env("MOONCAKE_TEST_CHILD_TARGET", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in &mut lines {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("TARGET ") {
            let (name, addr) = rest.split_once(' ').unwrap();
            return (child, name.to_owned(), addr.parse().unwrap());
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("child target did not start");
}

/// Not a test on its own: the body of the target process of `killed_target_fails_transfers`.
#[test]
#[ignore = "runs only as the child process of killed_target_fails_transfers"]
fn child_target() {
    if std::env::var_os("MOONCAKE_TEST_CHILD_TARGET").is_none() {
        return;
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = TransferEngine::start(
            EngineConfig::new("127.0.0.1"),
            vec![tcp(Duration::from_secs(5))],
        )
        .await
        .unwrap();
        let buf = e.allocate_buffer(64 << 20, Location::cpu(0)).unwrap();
        println!("TARGET {} {}", e.segment_name(), buf);
        // Serve until the parent closes stdin (or kills us).
        tokio::task::spawn_blocking(|| {
            let mut b = [0u8; 1];
            let _ = std::io::stdin().read(&mut b);
        })
        .await
        .unwrap();
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_target_fails_transfers() {
    let (mut child, name, remote) = spawn_target();
    let e = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![tcp(Duration::from_secs(10))],
    )
    .await
    .unwrap();
    let local = e.allocate_buffer(64 << 20, Location::cpu(0)).unwrap();
    let seg = e.open_segment(&name).await.unwrap();
    let r = e
        .transfer(vec![TransferRequest::read(&seg, remote, local, 4096)])
        .await;
    r[0].as_ref().expect("target alive");

    // Keep transfers in flight while the target is killed with SIGKILL.
    let started = Instant::now();
    let load = {
        let e = e.clone();
        let seg = seg.clone();
        tokio::spawn(async move {
            let mut failures = 0;
            for _ in 0..200 {
                let reqs = (0..16u64)
                    .map(|k| {
                        TransferRequest::read(
                            &seg,
                            remote + k * (4 << 20),
                            local + k * (4 << 20),
                            4 << 20,
                        )
                    })
                    .collect();
                let results = e.transfer(reqs).await;
                if results.iter().any(|r| r.is_err()) {
                    failures += 1;
                    if failures >= 3 {
                        return results;
                    }
                }
            }
            panic!("transfers kept succeeding after the target was killed");
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    child.kill().unwrap();
    child.wait().unwrap();
    let results = tokio::time::timeout(Duration::from_secs(8), load)
        .await
        .expect("transfers to a dead peer must fail promptly, not hang")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(8));
    for r in &results {
        match r {
            Err(Error::PeerUnreachable { .. }) => {}
            other => panic!("expected PeerUnreachable, got {other:?}"),
        }
    }
    e.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_write_ends_when_its_buffer_is_unregistered() {
    let (engine, buf, addr) = target().await;
    let preamble = frame::encode_preamble();
    // A WRITE of the whole 64 KiB buffer, of which only 1 KiB is ever sent.
    let mut s = raw(&addr);
    s.write_all(&preamble).unwrap();
    let mut w = request(Op::Write, 1, buf, 1 << 16);
    w.extend_from_slice(&[0xAB; 1024]);
    s.write_all(&w).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Unregistering does not wait for the stalled peer (it used to, for a minute, then gave up
    // with the peer still able to write).
    let started = Instant::now();
    let unregistering = engine.unregister_memory_async(buf).unwrap();
    tokio::time::timeout(Duration::from_secs(2), unregistering)
        .await
        .expect("unregister waited for a stalled WRITE");
    assert!(started.elapsed() < Duration::from_secs(2));
    // The stalled connection was closed: the rest of its payload lands nowhere.
    let _ = s.write_all(&[0xCD; 4096]);
    assert!(tokio::task::block_in_place(|| closed(&mut s)));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_surplus_connections_are_closed() {
    let e = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![TcpTransport::new(TcpConfig {
            connect_timeout: Duration::from_millis(300),
            max_connections_per_address: 4,
            ..TcpConfig::default()
        })
        .unwrap()],
    )
    .await
    .unwrap();
    let buf = e.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let addr = e
        .local_descriptor()
        .endpoint("tcp")
        .unwrap()
        .address
        .clone();
    let preamble = frame::encode_preamble();
    // One well-behaved connection, then three that never send their preamble.
    let mut good = raw(&addr);
    good.write_all(&preamble).unwrap();
    // A READ of 8 bytes: its answer, then its payload.
    let read8 = |s: &mut TcpStream, id: u32| {
        s.write_all(&request(Op::Read, id, buf, 8)).unwrap();
        let r = read_response(s);
        assert_eq!((r.id, r.status, r.len), (id, 0, 8));
        let mut payload = [0u8; 8];
        s.read_exact(&mut payload).unwrap();
    };
    read8(&mut good, 1);
    let mut silent: Vec<TcpStream> = (0..3).map(|_| raw(&addr)).collect();
    std::thread::sleep(Duration::from_millis(50));
    // A fifth from this address is refused at once.
    let mut surplus = raw(&addr);
    assert!(tokio::task::block_in_place(|| closed(&mut surplus)));
    // The silent ones are closed after the connect timeout; the good one is still served.
    for s in &mut silent {
        assert!(tokio::task::block_in_place(|| closed(s)));
    }
    let mut fresh = raw(&addr);
    fresh.write_all(&preamble).unwrap();
    read8(&mut fresh, 2);
    read8(&mut good, 3);
    e.shutdown().await;
}
