//! What the shared-memory transport does beyond the conformance suite: which requests it takes,
//! revoked buffers, and a target process that dies.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::conformance::pattern;
use mooncake_core::{
    AlignedBuffer, EngineConfig, Error, Location, TransferEngine, TransferRequest, Transport,
};
use mooncake_transport_shm::{ShmConfig, ShmTransport};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

async fn engine(shm: bool) -> (Arc<TransferEngine>, Option<Arc<ShmTransport>>) {
    let tcp: Arc<dyn Transport> = TcpTransport::new(TcpConfig::default()).unwrap();
    let s = shm.then(|| ShmTransport::new(ShmConfig::default()).unwrap());
    let mut transports: Vec<Arc<dyn Transport>> = Vec::new();
    if let Some(s) = &s {
        transports.push(s.clone());
    }
    transports.push(tcp);
    let e = TransferEngine::start(EngineConfig::new("127.0.0.1"), transports)
        .await
        .unwrap();
    (e, s)
}

fn fill(e: &TransferEngine, addr: u64, data: &[u8]) {
    e.memory()
        .resolve(addr, data.len() as u64)
        .unwrap()
        .write_from(data)
        .unwrap();
}

fn read(e: &TransferEngine, addr: u64, len: usize) -> Vec<u8> {
    e.memory().resolve(addr, len as u64).unwrap().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_buffers_by_memcpy_private_ones_over_tcp() {
    let (target, _) = engine(true).await;
    let (initiator, shm) = engine(true).await;
    let shm = shm.unwrap();
    let shared = target.allocate_buffer(1 << 20, Location::cpu(0)).unwrap();
    // Caller-owned memory cannot be passed to another process: it is served over TCP.
    let private = AlignedBuffer::new(1 << 16).unwrap();
    // SAFETY: `private` outlives the engines' use of it (unregistered before it drops).
    unsafe {
        target
            .register_memory(private.addr(), 1 << 16, Location::cpu(0))
            .unwrap();
    }
    let desc = target.local_descriptor();
    assert!(desc
        .buffers
        .iter()
        .any(|b| b.addr == shared && b.key("shm") == Some(&[])));
    assert!(desc
        .buffers
        .iter()
        .any(|b| b.addr == private.addr() && b.keys.is_empty()));
    let local = initiator
        .allocate_buffer(2 << 20, Location::cpu(0))
        .unwrap();
    let data = pattern(1, 1 << 20);
    fill(&initiator, local, &data);
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let r = initiator
        .transfer(vec![
            TransferRequest::write(&seg, shared, local, 1 << 20),
            TransferRequest::write(&seg, private.addr(), local, 1 << 16),
        ])
        .await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let s = shm.stats();
    assert_eq!((s.copies, s.bytes, s.mappings), (1, 1 << 20, 1), "{s:?}");
    assert_eq!(read(&target, shared, 1 << 20), data);
    assert_eq!(read(&target, private.addr(), 1 << 16), data[..1 << 16]);
    // Reads back through both paths; the mapping is reused.
    let r = initiator
        .transfer(vec![
            TransferRequest::read(&seg, shared + 7, local + (1 << 20), 1000),
            TransferRequest::read(&seg, private.addr() + 3, local + (1 << 20) + 1000, 500),
        ])
        .await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    assert_eq!(read(&initiator, local + (1 << 20), 1000), data[7..1007]);
    assert_eq!(
        read(&initiator, local + (1 << 20) + 1000, 500),
        data[3..503]
    );
    let s = shm.stats();
    assert_eq!((s.copies, s.mappings), (2, 1), "{s:?}");
    target.unregister_memory(private.addr()).unwrap();
    initiator.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unregistered_buffers_are_refused_not_written() {
    let (target, _) = engine(true).await;
    let (initiator, shm) = engine(true).await;
    let shm = shm.unwrap();
    let a = target.allocate_buffer(1 << 16, Location::cpu(0)).unwrap();
    let local = initiator
        .allocate_buffer(1 << 16, Location::cpu(0))
        .unwrap();
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let r = initiator
        .transfer(vec![TransferRequest::write(&seg, a, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(shm.stats().mappings, 1);
    // The initiator still holds the mapping and the old descriptor.
    target.unregister_memory(a).unwrap();
    for req in [
        TransferRequest::write(&seg, a, local, 4096),
        TransferRequest::read(&seg, a + 100, local, 100),
    ] {
        let r = initiator.transfer(vec![req]).await;
        assert!(
            matches!(r[0], Err(Error::RemoteRangeInvalid { .. })),
            "{:?}",
            r[0]
        );
    }
    // A new buffer is mapped afresh and works.
    let b = target.allocate_buffer(1 << 16, Location::cpu(0)).unwrap();
    let seg = initiator
        .refresh_segment(target.segment_name())
        .await
        .unwrap();
    fill(&initiator, local, &pattern(2, 4096));
    let r = initiator
        .transfer(vec![TransferRequest::write(&seg, b, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(read(&target, b, 4096), pattern(2, 4096));
    assert_eq!(shm.stats().mappings, 2);
    initiator.shutdown().await;
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_without_shm_uses_tcp() {
    let (target, _) = engine(true).await;
    let (initiator, _) = engine(false).await;
    let a = target.allocate_buffer(4096, Location::cpu(0)).unwrap();
    let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
    fill(&target, a, &pattern(3, 4096));
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let r = initiator
        .transfer(vec![TransferRequest::read(&seg, a, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(read(&initiator, local, 4096), pattern(3, 4096));
    initiator.shutdown().await;
    target.shutdown().await;
}

/// The child side of `a_killed_target_fails_requests`: serves one shared buffer filled with a
/// pattern and prints its segment name and address, then waits to be killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_target() {
    if std::env::var_os("MOONCAKE_SHM_CHILD").is_none() {
        return;
    }
    let (target, _) = engine(true).await;
    let a = target.allocate_buffer(1 << 20, Location::cpu(0)).unwrap();
    fill(&target, a, &pattern(4, 1 << 20));
    println!("READY {} {a}", target.segment_name());
    tokio::time::sleep(Duration::from_secs(60)).await;
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_target_fails_requests() {
    let mut child = Killed(
        Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_target", "--nocapture", "--test-threads=1"])
            .env("MOONCAKE_SHM_CHILD", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            // The test harness prints "test child_target ... " on the same line first.
            .find_map(|l| l.split_once("READY ").map(|(_, rest)| rest.to_owned()))
    })
    .await
    .unwrap()
    .expect("the child reports its segment");
    let mut words = line.split_whitespace();
    let (name, addr) = (
        words.next().unwrap().to_owned(),
        words.next().unwrap().parse::<u64>().unwrap(),
    );
    let (initiator, shm) = engine(true).await;
    let shm = shm.unwrap();
    let local = initiator
        .allocate_buffer(1 << 20, Location::cpu(0))
        .unwrap();
    let seg = initiator.open_segment(&name).await.unwrap();
    let r = initiator
        .transfer(vec![TransferRequest::read(&seg, addr, local, 1 << 20)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(read(&initiator, local, 1 << 20), pattern(4, 1 << 20));
    assert_eq!(
        shm.stats().copies,
        1,
        "read from the other process by memcpy"
    );
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    // The mapping outlives the process; requests through it must not.
    let start = Instant::now();
    for req in [
        TransferRequest::write(&seg, addr, local, 4096),
        TransferRequest::read(&seg, addr, local, 4096),
        TransferRequest::write(&seg, addr, local, 4096),
    ] {
        let r = initiator.transfer(vec![req]).await;
        assert!(r[0].is_err(), "a request to a killed process succeeded");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    initiator.shutdown().await;
}

/// A hostile or confused peer on the socket gets refusals and a closed connection; the target
/// keeps serving everyone else and reports nothing for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_close_only_their_connection() {
    use std::io::{Read, Write};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};

    let (target, _) = engine(true).await;
    let a = target.allocate_buffer(1 << 16, Location::cpu(0)).unwrap();
    let landed = Arc::new(std::sync::Mutex::new(Vec::new()));
    struct Seen(Arc<std::sync::Mutex<Vec<(u64, u64)>>>);
    impl mooncake_core::LandingObserver for Seen {
        fn landed(&self, addr: u64, len: u64) {
            self.0.lock().unwrap().push((addr, len));
        }
    }
    target
        .set_landing_observer(Arc::new(Seen(landed.clone())))
        .unwrap();
    let desc = target.local_descriptor();
    let ep = desc.endpoint("shm").unwrap();
    let name = ep.address.split_once('/').unwrap().1.to_owned();
    let connect = || {
        let s = UnixStream::connect_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut hello = [0u8; 16];
        (&s).read_exact(&mut hello).unwrap();
        assert_eq!(&hello[..4], b"MCSH");
        s
    };
    let request = |op: u32, count: u32, x: u64, y: u64| {
        let mut b = Vec::new();
        b.extend_from_slice(&op.to_le_bytes());
        b.extend_from_slice(&count.to_le_bytes());
        b.extend_from_slice(&x.to_le_bytes());
        b.extend_from_slice(&y.to_le_bytes());
        b
    };
    let status = |s: &UnixStream| {
        let mut reply = [0u8; 32];
        (&*s).read_exact(&mut reply).map(|()| reply[0])
    };
    // Ranges outside registered memory, or wrapping, are refused one by one.
    let s = connect();
    for (x, y) in [(a + (1 << 16), 1), (0, 8), (u64::MAX - 4, 16), (a, 1 << 17)] {
        (&s).write_all(&request(1, 0, x, y)).unwrap();
        assert_eq!(status(&s).unwrap(), 1, "MAP {x:#x}+{y}");
    }
    // LANDED reports of foreign ranges are acknowledged and dropped.
    let mut msg = request(2, 2, 0, 0);
    for (x, y) in [(0x1000u64, 64u64), (a + 100, 10)] {
        msg.extend_from_slice(&x.to_le_bytes());
        msg.extend_from_slice(&y.to_le_bytes());
    }
    (&s).write_all(&msg).unwrap();
    assert_eq!(status(&s).unwrap(), 0);
    assert_eq!(*landed.lock().unwrap(), vec![(a + 100, 10)]);
    // An unknown opcode, and a LANDED count past the limit, end the connection.
    for bad in [request(9, 0, 0, 0), request(2, u32::MAX, 0, 0)] {
        let s = connect();
        (&s).write_all(&bad).unwrap();
        assert_eq!(status(&s).unwrap(), 3);
        let mut rest = [0u8; 1];
        assert_eq!(
            (&s).read(&mut rest).unwrap(),
            0,
            "closed after a bad request"
        );
    }
    // Half a request, then a hang-up: nothing happens.
    let s = connect();
    (&s).write_all(&request(1, 0, a, 8)[..10]).unwrap();
    drop(s);
    // The target still serves a real initiator.
    let (initiator, shm) = engine(true).await;
    let local = initiator.allocate_buffer(4096, Location::cpu(0)).unwrap();
    fill(&target, a, &pattern(5, 4096));
    let seg = initiator.open_segment(target.segment_name()).await.unwrap();
    let r = initiator
        .transfer(vec![TransferRequest::read(&seg, a, local, 4096)])
        .await;
    r[0].as_ref().unwrap();
    assert_eq!(read(&initiator, local, 4096), pattern(5, 4096));
    assert_eq!(shm.unwrap().stats().copies, 1);
    assert_eq!(landed.lock().unwrap().len(), 1);
    initiator.shutdown().await;
    target.shutdown().await;
}

/// A target that accepts the connection but never answers fails its requests within the
/// transport's timeout, and meanwhile requests to another target go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_target_fails_within_the_timeout_and_holds_up_no_one_else() {
    use mooncake_core::{BatchState, BufferDesc, BufferKey, OpCode, SegmentDesc, TransferOp};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};

    let (target, _) = engine(true).await;
    let shared = target.allocate_buffer(4096, Location::cpu(0)).unwrap();
    fill(&target, shared, &pattern(6, 4096));
    let (initiator, _) = engine(false).await;
    let local = initiator.allocate_buffer(8192, Location::cpu(0)).unwrap();
    let shm = ShmTransport::new(ShmConfig {
        timeout: Duration::from_millis(800),
        ..ShmConfig::default()
    })
    .unwrap();
    // The kernel completes connections to a listener that never accepts: the hello never comes.
    let silent_name = format!("mooncake-shm-test-silent.{}", std::process::id());
    let _silent =
        UnixListener::bind_addr(&SocketAddr::from_abstract_name(silent_name.as_bytes()).unwrap())
            .unwrap();
    let real = target.local_descriptor();
    let host = real
        .endpoint("shm")
        .unwrap()
        .address
        .split_once('/')
        .unwrap()
        .0;
    let silent = SegmentDesc {
        name: "silent:1".into(),
        endpoints: vec![mooncake_core::Endpoint {
            protocol: "shm".into(),
            address: format!("{host}/{silent_name}"),
        }],
        buffers: vec![BufferDesc {
            addr: 0x10_0000,
            len: 4096,
            location: Location::cpu(0),
            keys: vec![BufferKey {
                protocol: "shm".into(),
                values: Vec::new(),
            }],
        }],
    };
    assert!(shm.reaches(&silent, 0x10_0000, 64));
    let op = |target_addr: u64, local_off: u64| TransferOp {
        opcode: OpCode::Read,
        local: initiator.memory().resolve(local + local_off, 64).unwrap(),
        target_addr,
        index: 0,
        notify: false,
        deadline: None,
    };
    let started = Instant::now();
    let stuck = {
        let shm = shm.clone();
        let op = op(0x10_0000, 0);
        let silent = silent.clone();
        tokio::spawn(async move {
            let batch = BatchState::new(1);
            shm.transfer(&silent, vec![op], &batch).await;
            (batch.results(), started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let batch = BatchState::new(1);
    shm.transfer(&real, vec![op(shared, 4096)], &batch).await;
    batch.results()[0].as_ref().unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "the real target waited for the silent one: {:?}",
        started.elapsed()
    );
    assert_eq!(read(&initiator, local + 4096, 64), pattern(6, 4096)[..64]);
    let (results, took) = stuck.await.unwrap();
    assert!(
        matches!(results[0], Err(Error::PeerUnreachable { .. })),
        "{results:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Marked unreachable for a while: its requests go to the other transports.
    assert!(!shm.reaches(&silent, 0x10_0000, 64));
    initiator.shutdown().await;
    target.shutdown().await;
}
