//! Hostile input from an authenticated peer: requests outside registered memory, absurd lengths
//! and malformed headers get errors, limits on streams and connections hold, and the target
//! keeps serving everyone else.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{
    conformance::pattern, EngineConfig, ErrorCode, Location, TransferEngine, TransferRequest,
};
use mooncake_transport_quic::frame::{self, Op, Request, Response};
use mooncake_transport_quic::{QuicConfig, QuicTransport};

const LEN: usize = 1 << 16;

struct Target {
    engine: Arc<TransferEngine>,
    buffer: u64,
    address: SocketAddr,
}

async fn target(tweak: impl FnOnce(&mut QuicConfig)) -> Target {
    common::init_logging();
    let mut config = common::config(common::identity("target"));
    tweak(&mut config);
    let engine = TransferEngine::start(
        EngineConfig::new("127.0.0.1"),
        vec![QuicTransport::new(config).unwrap()],
    )
    .await
    .unwrap();
    let buffer = engine.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    engine
        .memory()
        .resolve(buffer, LEN as u64)
        .unwrap()
        .write_from(&pattern(1, LEN))
        .unwrap();
    let address = engine
        .local_descriptor()
        .endpoint("quic")
        .unwrap()
        .address
        .parse()
        .unwrap();
    Target {
        engine,
        buffer,
        address,
    }
}

impl Target {
    fn memory(&self) -> Vec<u8> {
        self.engine
            .memory()
            .resolve(self.buffer, LEN as u64)
            .unwrap()
            .to_vec()
    }

    /// An authenticated raw connection.
    async fn connect(&self, endpoint: &quinn::Endpoint) -> Result<quinn::Connection, String> {
        let connecting = endpoint
            .connect(self.address, "127.0.0.1")
            .map_err(|e| e.to_string())?;
        let conn = connecting.await.map_err(|e| e.to_string())?;
        Ok(conn)
    }

    /// An initiator engine reads the whole buffer and sees its bytes.
    async fn still_serves(&self) {
        let e = TransferEngine::start(
            EngineConfig::new("127.0.0.1"),
            vec![common::transport("initiator")],
        )
        .await
        .unwrap();
        let local = e.allocate_buffer(LEN, Location::cpu(0)).unwrap();
        let seg = e.open_segment(self.engine.segment_name()).await.unwrap();
        let r = e
            .transfer(vec![TransferRequest::read(
                &seg,
                self.buffer,
                local,
                LEN as u64,
            )])
            .await;
        r[0].as_ref().expect("the target still serves others");
        assert!(e.memory().resolve(local, LEN as u64).unwrap().to_vec() == self.memory());
        e.shutdown().await;
    }
}

/// Sends raw header bytes (and a payload) on a new stream; returns the response and its payload.
async fn raw(
    conn: &quinn::Connection,
    header: &[u8],
    payload: &[u8],
) -> Result<(Response, Vec<u8>), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    // A refusing target may stop the stream before the payload is in: the response says why.
    let _ = send.write_all(header).await;
    let _ = send.write_all(payload).await;
    let _ = send.finish();
    let mut h = [0u8; frame::RESPONSE_LEN];
    recv.read_exact(&mut h).await.map_err(|e| e.to_string())?;
    let resp = frame::decode_response(&h).map_err(|e| e.to_string())?;
    let body = recv.read_to_end(LEN).await.map_err(|e| e.to_string())?;
    Ok((resp, body))
}

fn header(op: Op, addr: u64, len: u64) -> Vec<u8> {
    frame::encode_request(&Request {
        op,
        addr,
        len,
        notify: false,
    })
    .to_vec()
}

fn refused(r: &Result<(Response, Vec<u8>), String>) -> bool {
    matches!(r, Ok((resp, body)) if resp.status == ErrorCode::INVALID_PARAMS.code() && resp.len == 0 && body.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_the_target_keeps_serving() {
    let t = target(|_| {}).await;
    let endpoint = common::raw_client(common::ca(), Some(&common::identity("mallory")));
    let conn = t.connect(&endpoint).await.expect("authenticated");
    let b = t.buffer;
    let bound = Duration::from_secs(10);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, bool)> = vec![
        // (what, header, payload, answered with INVALID_PARAMS rather than a reset stream)
        (
            "READ past the end",
            header(Op::Read, b + LEN as u64 - 10, 100),
            vec![],
            true,
        ),
        (
            "READ before the buffer",
            header(Op::Read, b - 1, 16),
            vec![],
            true,
        ),
        (
            "READ of unregistered memory",
            header(Op::Read, 0x1000, 16),
            vec![],
            true,
        ),
        (
            "READ of 512 GiB",
            header(Op::Read, b, 1 << 39),
            vec![],
            true,
        ),
        (
            "READ wrapping the address space",
            header(Op::Read, u64::MAX - 8, 64),
            vec![],
            true,
        ),
        (
            "WRITE past the end",
            header(Op::Write, b + LEN as u64 - 100, 4096),
            vec![0xEE; 4096],
            true,
        ),
        (
            "WRITE of 1 TiB announced",
            header(Op::Write, b, 1 << 40),
            vec![0xEE; 65536],
            true,
        ),
        (
            "READ beyond the length limit",
            header(Op::Read, b, u64::MAX),
            vec![],
            false,
        ),
        (
            "unknown opcode",
            {
                let mut h = header(Op::Read, b, 16);
                h[0] = 77;
                h
            },
            vec![],
            false,
        ),
        (
            "reserved bits",
            {
                let mut h = header(Op::Read, b, 16);
                h[6] = 1;
                h
            },
            vec![],
            false,
        ),
        (
            "DESCRIBE with an address",
            header(Op::Describe, b, 0),
            vec![],
            false,
        ),
        (
            "truncated header",
            header(Op::Read, b, 16)[..10].to_vec(),
            vec![],
            false,
        ),
        (
            "WRITE with a short payload",
            header(Op::Write, b, 4096),
            vec![0xEE; 100],
            false,
        ),
    ];
    for (what, h, payload, answered) in cases {
        let r = tokio::time::timeout(bound, raw(&conn, &h, &payload))
            .await
            .unwrap_or_else(|_| panic!("{what}: no answer in time"));
        if answered {
            assert!(refused(&r), "{what}: expected INVALID_PARAMS, got {r:?}");
        } else {
            assert!(
                r.is_err(),
                "{what}: expected the stream to be reset, got {r:?}"
            );
        }
    }
    let mut expected = pattern(1, LEN);
    // The short WRITE's first bytes may have landed (inside the buffer); nothing else changed.
    let now = t.memory();
    expected[..100].copy_from_slice(&now[..100]);
    assert!(now == expected, "nothing outside the short WRITE changed");
    // The same connection still serves valid requests.
    let (resp, body) = raw(&conn, &header(Op::Read, b + 100, 1000), &[])
        .await
        .expect("a valid READ on the same connection");
    assert_eq!(resp.status, 0);
    assert!(body == expected[100..1100]);
    t.still_serves().await;
    conn.close(0u32.into(), b"");
    endpoint.close(0u32.into(), b"");
    t.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_streams_are_bounded_and_reset() {
    let t = target(|c| {
        c.max_streams_per_connection = 4;
        c.request_timeout = Duration::from_secs(1);
    })
    .await;
    let endpoint = common::raw_client(common::ca(), Some(&common::identity("mallory")));
    let conn = t.connect(&endpoint).await.expect("authenticated");
    // Four streams that never send a whole header hold every stream the target grants.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&[1, 0, 0]).await.unwrap();
        stalled.push((send, recv));
    }
    let fifth = tokio::time::timeout(Duration::from_millis(300), conn.open_bi()).await;
    assert!(
        fifth.is_err(),
        "the target granted more streams than its limit"
    );
    // The target gives up on them after its request timeout, which frees the streams.
    for (_, recv) in &mut stalled {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(5), recv.read_exact(&mut b))
            .await
            .expect("the target resets a stalled stream");
        assert!(r.is_err());
    }
    drop(stalled);
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        raw(&conn, &header(Op::Read, t.buffer, 64), &[]),
    )
    .await
    .expect("streams are granted again");
    assert_eq!(r.expect("a valid READ").0.status, 0);
    conn.close(0u32.into(), b"");
    endpoint.close(0u32.into(), b"");
    t.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused() {
    let t = target(|c| c.max_connections = 2).await;
    let endpoint = common::raw_client(common::ca(), Some(&common::identity("mallory")));
    let a = t.connect(&endpoint).await.expect("first");
    let b = t.connect(&endpoint).await.expect("second");
    for c in [&a, &b] {
        raw(c, &header(Op::Read, t.buffer, 64), &[])
            .await
            .expect("served");
    }
    let third = tokio::time::timeout(Duration::from_secs(5), t.connect(&endpoint))
        .await
        .expect("bounded");
    assert!(third.is_err(), "a third connection was accepted: {third:?}");
    a.close(0u32.into(), b"");
    let mut again = Err(String::new());
    for _ in 0..50 {
        again = t.connect(&endpoint).await;
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.expect("a closed connection frees its slot");
    raw(&again, &header(Op::Read, t.buffer, 64), &[])
        .await
        .expect("served");
    for c in [b, again] {
        c.close(0u32.into(), b"");
    }
    endpoint.close(0u32.into(), b"");
    t.engine.shutdown().await;
}

/// A target that accepts connections and requests but never answers, and reads slowly: the
/// initiator's requests fail as timed out within the request timeout, and the streams of the
/// WRITE it could not finish sending are reset rather than finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_never_answers_times_out() {
    common::init_logging();
    // 64 KiB per stream: a 1 MiB WRITE piece cannot be sent before the target reads it.
    let server = common::raw_server(&common::identity("silent"), 64 * 1024);
    let address = server.local_addr().unwrap();
    // Holds every stream, reads it to the end only after 2 s, answers nothing, and reports how
    // each stream ended: its length, or the error (a reset).
    let (fates_tx, mut fates) = tokio::sync::mpsc::unbounded_channel();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Some(incoming) = server.accept().await {
            let Ok(conn) = incoming.await else { continue };
            let fates_tx = fates_tx.clone();
            held.push(tokio::spawn(async move {
                let mut sends = Vec::new();
                while let Ok((send, mut recv)) = conn.accept_bi().await {
                    sends.push(send);
                    let fates_tx = fates_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        let fate = recv.read_to_end(usize::MAX).await.map(|b| b.len());
                        let _ = fates_tx.send(fate.map_err(|e| e.to_string()));
                    });
                }
            }));
        }
    });
    let initiator = QuicTransport::new(QuicConfig {
        request_timeout: Duration::from_secs(1),
        ..common::config(common::identity("initiator"))
    })
    .unwrap();
    let engine = TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![initiator])
        .await
        .unwrap();
    let local = engine.allocate_buffer(4 << 20, Location::cpu(0)).unwrap();
    let seg = Arc::new(mooncake_core::SegmentDesc {
        name: address.to_string(),
        endpoints: vec![mooncake_core::Endpoint {
            protocol: "quic".into(),
            address: address.to_string(),
        }],
        buffers: Vec::new(),
    });
    let start = std::time::Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        engine.transfer(vec![
            TransferRequest::read(&seg, 0x10000, local, 64),
            TransferRequest::write(&seg, 0x10000, local, 4 << 20),
        ]),
    )
    .await
    .expect("bounded");
    let took = start.elapsed();
    for res in &r {
        assert!(
            matches!(res, Err(mooncake_core::Error::Timeout(_))),
            "expected a timeout: {r:?}"
        );
    }
    assert!(took < Duration::from_secs(3), "took {took:?}");
    // One READ stream (its header, finished) and four WRITE pieces (reset).
    let mut ended = Vec::new();
    while ended.len() < 5 {
        match tokio::time::timeout(Duration::from_secs(5), fates.recv()).await {
            Ok(Some(fate)) => ended.push(fate),
            _ => break,
        }
    }
    let finished: Vec<_> = ended.iter().filter_map(|f| f.as_ref().ok()).collect();
    assert_eq!(
        finished,
        vec![&frame::REQUEST_LEN],
        "stream ends: {ended:?}"
    );
    assert_eq!(ended.len(), 5, "stream ends: {ended:?}");
    engine.shutdown().await;
    silent.abort();
}

/// Several requests on one stream are answered in order; a small refused WRITE is skipped and the
/// requests behind it are served; a large refused one ends the stream after its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sharing_a_stream() {
    let t = target(|_| {}).await;
    let endpoint = common::raw_client(common::ca(), Some(&common::identity("mallory")));
    let conn = t.connect(&endpoint).await.expect("authenticated");
    let b = t.buffer;
    let data = pattern(1, LEN);
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&header(Op::Read, b, 100)).await.unwrap();
    send.write_all(&header(Op::Write, b + LEN as u64, 1000))
        .await
        .unwrap();
    send.write_all(&[0xEE; 1000]).await.unwrap();
    send.write_all(&header(Op::Read, b + 200, 50))
        .await
        .unwrap();
    send.finish().unwrap();
    let ok = ErrorCode::OK.code();
    let refused = ErrorCode::INVALID_PARAMS.code();
    assert_eq!(
        read_response(&mut recv).await.unwrap(),
        (ok, data[..100].to_vec())
    );
    assert_eq!(read_response(&mut recv).await.unwrap(), (refused, vec![]));
    assert_eq!(
        read_response(&mut recv).await.unwrap(),
        (ok, data[200..250].to_vec())
    );
    assert!(read_response(&mut recv).await.is_err(), "nothing more");

    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&header(Op::Write, b + LEN as u64, 1 << 20))
        .await
        .unwrap();
    let _ = send.write_all(&vec![0xEE; 1 << 20]).await;
    let _ = send.write_all(&header(Op::Read, b, 100)).await;
    let _ = send.finish();
    assert_eq!(read_response(&mut recv).await.unwrap(), (refused, vec![]));
    assert!(
        read_response(&mut recv).await.is_err(),
        "a large refused WRITE ends its stream"
    );
    assert!(t.memory() == data, "nothing was written");
    t.still_serves().await;
    conn.close(0u32.into(), b"");
    endpoint.close(0u32.into(), b"");
    t.engine.shutdown().await;
}

/// One response and its payload, read by hand.
async fn read_response(recv: &mut quinn::RecvStream) -> Result<(i32, Vec<u8>), String> {
    let mut h = [0u8; frame::RESPONSE_LEN];
    recv.read_exact(&mut h).await.map_err(|e| e.to_string())?;
    let resp = frame::decode_response(&h).map_err(|e| e.to_string())?;
    let mut body = vec![0u8; resp.len as usize];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok((resp.status, body))
}
