//! A WRITE's deadline is enforced by the target: a payload held past it never lands, and the
//! initiator does not start a WRITE that is already late.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::{EngineConfig, ErrorCode, Location, TransferEngine, TransferRequest};
use mooncake_transport_tcp::frame::{self, Op, Request};
use mooncake_transport_tcp::{TcpConfig, TcpTransport};

async fn engine() -> Arc<TransferEngine> {
    let tcp = TcpTransport::new(TcpConfig {
        request_timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(2),
        ..TcpConfig::default()
    })
    .unwrap();
    TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![tcp])
        .await
        .unwrap()
}

fn tcp_address(e: &TransferEngine) -> String {
    e.local_descriptor()
        .endpoint("tcp")
        .unwrap()
        .address
        .clone()
}

fn header(id: u32, addr: u64, len: u64, deadline_ms: Option<u16>) -> Vec<u8> {
    let mut b = Vec::new();
    frame::encode_request(
        &Request {
            op: Op::Write,
            id,
            addr,
            len,
            notify: false,
            deadline_ms,
        },
        &mut b,
    );
    b
}

fn read_at(e: &TransferEngine, addr: u64, len: u64) -> Vec<u8> {
    e.memory().resolve(addr, len).unwrap().to_vec()
}

/// True when the target closed the connection (EOF or reset) within the read timeout.
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
async fn a_payload_held_past_its_deadline_never_lands() {
    let target = engine().await;
    let len = 1u64 << 20;
    let buf = target
        .allocate_buffer(len as usize, Location::cpu(0))
        .unwrap();
    let addr = tcp_address(&target);
    let half = (len / 2) as usize;

    // In time: a WRITE with a generous deadline lands whole.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame::encode_preamble()).unwrap();
    s.write_all(&header(1, buf, 4096, Some(5000))).unwrap();
    s.write_all(&[0x11; 4096]).unwrap();
    let mut h = [0u8; frame::RESPONSE_LEN];
    s.read_exact(&mut h).unwrap();
    let r = frame::decode_response(&h).unwrap().unwrap();
    assert_eq!((r.id, r.status), (1, 0));
    assert_eq!(read_at(&target, buf, 4096), vec![0x11; 4096]);

    // Held: the header and half the payload go out, then the writer stalls past the deadline
    // (paused, swapped, throttled), then sends the rest.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame::encode_preamble()).unwrap();
    s.write_all(&header(2, buf, len, Some(100))).unwrap();
    s.write_all(&vec![0xAB; half]).unwrap();
    let sent_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The rest may no longer be accepted (the target closed the connection).
    let _ = s.write_all(&vec![0xCD; half]);
    assert!(
        closed(&mut s),
        "the target closes a WRITE past its deadline"
    );
    assert!(sent_at.elapsed() >= Duration::from_millis(400));
    let got = read_at(&target, buf, len);
    assert!(
        !got[half..].contains(&0xCD),
        "no byte sent after the deadline landed"
    );
    target.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_fences_writes_by_their_deadline() {
    let target = engine().await;
    let writer = engine().await;
    let len = 256u64 << 10;
    let dst = target
        .allocate_buffer(len as usize, Location::cpu(0))
        .unwrap();
    let src = writer
        .allocate_buffer(len as usize, Location::cpu(0))
        .unwrap();
    writer
        .memory()
        .resolve(src, len)
        .unwrap()
        .write_from(&vec![0x5A; len as usize])
        .unwrap();
    let seg = writer.open_segment(&tcp_address(&target)).await.unwrap();

    // In time: written.
    let on_time = TransferRequest::write(&seg, dst, src, len)
        .with_deadline(Instant::now() + Duration::from_secs(5));
    assert!(writer.transfer(vec![on_time]).await[0].is_ok());
    assert_eq!(read_at(&target, dst, len), vec![0x5A; len as usize]);

    // Already late when it would start: refused at the initiator, nothing sent.
    writer
        .memory()
        .resolve(src, len)
        .unwrap()
        .write_from(&vec![0x77; len as usize])
        .unwrap();
    let late = TransferRequest::write(&seg, dst, src, len).with_deadline(Instant::now());
    let r = writer.transfer(vec![late]).await;
    assert_eq!(r[0].as_ref().unwrap_err().code(), ErrorCode::LEASE_EXPIRED);
    assert_eq!(read_at(&target, dst, len), vec![0x5A; len as usize]);
    // A READ ignores deadlines.
    let read = TransferRequest::read(&seg, dst, src, 16).with_deadline(Instant::now());
    assert!(read.deadline.is_none());
    writer.shutdown().await;
    target.shutdown().await;
}
