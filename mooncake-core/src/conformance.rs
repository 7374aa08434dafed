//! The conformance suite every [`Transport`] must pass.
//!
//! A transport crate implements [`Harness`] and expands [`conformance_tests!`] in its tests; each
//! case becomes one `#[tokio::test]`. Cases use two engines in one process (initiator and target)
//! talking through the transport under test, so real transports use real sockets.

use std::sync::Arc;
use std::time::Duration;

use crate::engine::{EngineConfig, TransferEngine, TransferRequest};
use crate::error::Error;
use crate::memory::{AlignedBuffer, Location};
use crate::transport::{OpCode, TransferStatus, Transport};

/// What a transport's tests provide to the suite.
pub trait Harness: Send + Sync {
    /// A fresh transport for a new engine.
    fn transport(&self) -> Arc<dyn Transport>;
    /// The transports of a new engine, in preference order: [`Harness::transport`] alone, or
    /// with others that carry what it does not reach.
    fn transports(&self) -> Vec<Arc<dyn Transport>> {
        vec![self.transport()]
    }
    /// Host name for engines (`127.0.0.1`).
    fn hostname(&self) -> String;
    /// How long the suite lets a failing transfer take before calling it hung.
    fn failure_bound(&self) -> Duration {
        Duration::from_secs(10)
    }
    /// Protocols whose transport publishes keys ([`BufferDesc::key`](crate::BufferDesc::key))
    /// for every buffer the engine allocates. Default: none.
    fn keyed_protocols(&self) -> Vec<&'static str> {
        Vec::new()
    }
}

/// Expands to one `#[tokio::test]` per conformance case, each building its harness with `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@cases $make;
            read_and_write, batch_of_mixed_requests, zero_length_requests,
            local_bounds_violation, remote_bounds_violation, large_requests,
            peer_death, concurrent_batches, submit_reports_status, unknown_segment,
            landing_notices, registration_after_serve, unregistration_during_transfer);
    };
    (@cases $make:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let harness = $make;
                $crate::conformance::$case(&harness).await;
            }
        )*
    };
}

struct Pair {
    initiator: Arc<TransferEngine>,
    target: Arc<TransferEngine>,
}

impl Pair {
    /// A registered buffer of `remote` bytes on the target and one of `local` bytes on the
    /// initiator.
    fn buffers(&self, remote: usize, local: usize) -> (u64, u64) {
        let alloc = |e: &TransferEngine, len| e.allocate_buffer(len, Location::cpu(0)).unwrap();
        (alloc(&self.target, remote), alloc(&self.initiator, local))
    }
}

async fn pair(h: &dyn Harness) -> Pair {
    let start = |t| TransferEngine::start(EngineConfig::new(h.hostname()), t);
    let target = start(h.transports()).await.expect("target engine starts");
    let initiator = start(h.transports())
        .await
        .expect("initiator engine starts");
    Pair { initiator, target }
}

/// A deterministic byte pattern: byte `i` of stream `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn fill(engine: &TransferEngine, addr: u64, bytes: &[u8]) {
    engine
        .memory()
        .resolve(addr, bytes.len() as u64)
        .expect("registered")
        .write_from(bytes)
        .expect("lengths match");
}

fn read(engine: &TransferEngine, addr: u64, len: usize) -> Vec<u8> {
    engine
        .memory()
        .resolve(addr, len as u64)
        .expect("registered")
        .to_vec()
}

/// READ and WRITE of one request each, bytes verified on both sides.
pub async fn read_and_write(h: &dyn Harness) {
    let p = pair(h).await;
    let (remote, local) = p.buffers(1 << 16, 1 << 16);
    let data = pattern(1, 1 << 16);
    fill(&p.target, remote, &data);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let r = p
        .initiator
        .transfer(vec![TransferRequest::read(&seg, remote + 10, local, 5000)])
        .await;
    r[0].as_ref().expect("read succeeds");
    assert_eq!(read(&p.initiator, local, 5000), data[10..5010]);

    let out = pattern(2, 3000);
    fill(&p.initiator, local + 100, &out);
    let r = p
        .initiator
        .transfer(vec![TransferRequest::write(
            &seg,
            remote + 7,
            local + 100,
            3000,
        )])
        .await;
    r[0].as_ref().expect("write succeeds");
    assert_eq!(read(&p.target, remote + 7, 3000), out);
    assert_eq!(
        read(&p.target, remote, 7),
        data[..7],
        "bytes before are untouched"
    );
    assert_eq!(
        read(&p.target, remote + 3007, 100),
        data[3007..3107],
        "bytes after are untouched"
    );
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// 300 READs and WRITEs of assorted sizes in one batch, to disjoint ranges.
pub async fn batch_of_mixed_requests(h: &dyn Harness) {
    let p = pair(h).await;
    const SLOT: u64 = 8192;
    const N: u64 = 300;
    let (remote, local) = p.buffers((SLOT * N) as usize, (SLOT * N) as usize);
    let remote_data = pattern(3, (SLOT * N) as usize);
    let local_data = pattern(4, (SLOT * N) as usize);
    fill(&p.target, remote, &remote_data);
    fill(&p.initiator, local, &local_data);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let reqs: Vec<_> = (0..N)
        .map(|i| {
            let len = 1 + (i * 977) % SLOT;
            if i % 2 == 0 {
                TransferRequest::read(&seg, remote + i * SLOT, local + i * SLOT, len)
            } else {
                TransferRequest::write(&seg, remote + i * SLOT, local + i * SLOT, len)
            }
        })
        .collect();
    let results = p.initiator.transfer(reqs).await;
    for (i, r) in results.iter().enumerate() {
        r.as_ref()
            .unwrap_or_else(|e| panic!("request {i} failed: {e}"));
    }
    for i in 0..N {
        let len = (1 + (i * 977) % SLOT) as usize;
        let at = (i * SLOT) as usize;
        if i % 2 == 0 {
            assert_eq!(
                read(&p.initiator, local + i * SLOT, len),
                remote_data[at..at + len]
            );
        } else {
            assert_eq!(
                read(&p.target, remote + i * SLOT, len),
                local_data[at..at + len]
            );
        }
    }
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// Zero-length requests complete successfully and move nothing.
pub async fn zero_length_requests(h: &dyn Harness) {
    let p = pair(h).await;
    let (remote, local) = p.buffers(4096, 4096);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let r = p
        .initiator
        .transfer(vec![
            TransferRequest::read(&seg, remote, local, 0),
            TransferRequest::write(&seg, remote + 4096, local + 4096, 0),
        ])
        .await;
    assert!(r.iter().all(|r| r.is_ok()), "{r:?}");
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// A local range outside registered memory fails that request only, before anything is sent.
pub async fn local_bounds_violation(h: &dyn Harness) {
    let p = pair(h).await;
    let (remote, local) = p.buffers(4096, 4096);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let r = p
        .initiator
        .transfer(vec![
            TransferRequest::read(&seg, remote, local + 4000, 200),
            TransferRequest::read(&seg, remote, 0x10, 8),
            TransferRequest::read(&seg, remote, u64::MAX - 4, 64),
            TransferRequest::read(&seg, remote, local, 64),
        ])
        .await;
    for bad in &r[..3] {
        assert!(
            matches!(bad, Err(Error::LocalRangeNotRegistered { .. })),
            "{bad:?}"
        );
    }
    r[3].as_ref()
        .expect("the valid request of the batch succeeds");
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// A target range outside the target's registered memory is refused by the transport, and the
/// transport keeps working afterwards.
pub async fn remote_bounds_violation(h: &dyn Harness) {
    let p = pair(h).await;
    let (remote, local) = p.buffers(4096, 1 << 20);
    let before = pattern(5, 4096);
    fill(&p.target, remote, &before);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let bad = vec![
        TransferRequest::write(&seg, remote + 4000, local, 200),
        TransferRequest::read(&seg, remote + 4000, local, 200),
        TransferRequest::write(&seg, 0x1000, local, 16),
        TransferRequest::read(&seg, u64::MAX - 8, local, 64),
        TransferRequest::write(&seg, remote, local, 1 << 20),
        TransferRequest::read(&seg, remote, local, 64),
    ];
    let r = p.initiator.transfer(bad).await;
    for (i, res) in r[..5].iter().enumerate() {
        match res {
            Err(Error::RemoteRangeInvalid { .. }) => {}
            other => panic!("bad request {i}: expected RemoteRangeInvalid, got {other:?}"),
        }
    }
    r[5].as_ref()
        .expect("the valid request of the batch succeeds");
    assert_eq!(
        read(&p.target, remote, 4096),
        before,
        "target memory untouched"
    );
    let r = p
        .initiator
        .transfer(vec![TransferRequest::read(&seg, remote, local, 4096)])
        .await;
    r[0].as_ref().expect("transport still works after refusals");
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// 24 MiB + 3 bytes each way at unaligned addresses.
pub async fn large_requests(h: &dyn Harness) {
    let p = pair(h).await;
    let len = (24 << 20) + 3;
    let (remote, local) = p.buffers(len + 64, len + 64);
    let data = pattern(6, len);
    fill(&p.target, remote + 5, &data);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let r = p
        .initiator
        .transfer(vec![TransferRequest::read(
            &seg,
            remote + 5,
            local + 11,
            len as u64,
        )])
        .await;
    r[0].as_ref().expect("large read");
    assert!(
        read(&p.initiator, local + 11, len) == data,
        "large read bytes differ"
    );
    let back = pattern(7, len);
    fill(&p.initiator, local + 1, &back);
    let r = p
        .initiator
        .transfer(vec![TransferRequest::write(
            &seg,
            remote + 13,
            local + 1,
            len as u64,
        )])
        .await;
    r[0].as_ref().expect("large write");
    assert!(
        read(&p.target, remote + 13, len) == back,
        "large write bytes differ"
    );
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// After the target shuts down, transfers to it fail with an error within the failure bound.
pub async fn peer_death(h: &dyn Harness) {
    let p = pair(h).await;
    let (remote, local) = p.buffers(4096, 4096);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let r = p
        .initiator
        .transfer(vec![TransferRequest::read(&seg, remote, local, 64)])
        .await;
    r[0].as_ref().expect("works while alive");
    p.target.shutdown().await;
    for _ in 0..3 {
        let r = tokio::time::timeout(
            h.failure_bound(),
            p.initiator
                .transfer(vec![TransferRequest::read(&seg, remote, local, 64)]),
        )
        .await
        .expect("a dead peer fails requests within the bound");
        assert!(r[0].is_err(), "transfer to a dead peer must fail");
    }
    p.initiator.shutdown().await;
}

/// Eight tasks run batches at once over the same engines.
pub async fn concurrent_batches(h: &dyn Harness) {
    let p = pair(h).await;
    const SLOT: u64 = 65536;
    let (remote, local) = p.buffers((SLOT * 8) as usize, (SLOT * 8) as usize);
    let data = Arc::new(pattern(8, (SLOT * 8) as usize));
    fill(&p.target, remote, &data);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let e = p.initiator.clone();
        let seg = seg.clone();
        let data = data.clone();
        tasks.push(tokio::spawn(async move {
            for round in 0..20u64 {
                let reqs = (0..16u64)
                    .map(|k| {
                        let off = t * SLOT + k * 4096;
                        let len = 1 + (round * 131 + k * 17) % 4096;
                        TransferRequest::read(&seg, remote + off, local + off, len)
                    })
                    .collect();
                for r in e.transfer(reqs).await {
                    r.expect("concurrent read");
                }
                for k in 0..16u64 {
                    let off = t * SLOT + k * 4096;
                    let len = (1 + (round * 131 + k * 17) % 4096) as usize;
                    let got = read(&e, local + off, len);
                    assert!(
                        got == data[off as usize..off as usize + len],
                        "task {t} round {round}"
                    );
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// `submit` returns at once; statuses go from pending to completed or failed per request.
pub async fn submit_reports_status(h: &dyn Harness) {
    let p = pair(h).await;
    let (remote, local) = p.buffers(1 << 20, 1 << 20);
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let batch = p.initiator.submit(vec![
        TransferRequest::read(&seg, remote, local, 1 << 20),
        TransferRequest::read(&seg, remote + (1 << 20), local, 1),
        TransferRequest {
            opcode: OpCode::Write,
            local_addr: 1,
            len: 1,
            target: seg.clone(),
            target_addr: remote,
            notify: false,
            deadline: None,
        },
    ]);
    let results = tokio::time::timeout(h.failure_bound(), batch.wait())
        .await
        .expect("batch finishes");
    assert!(results[0].is_ok());
    assert_eq!(batch.status(0), TransferStatus::Completed);
    assert_eq!(batch.status(1), TransferStatus::Failed);
    assert!(matches!(
        batch.error(1),
        Some(Error::RemoteRangeInvalid { .. })
    ));
    assert_eq!(batch.status(2), TransferStatus::Failed);
    assert!(batch.is_done());
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// Opening a segment nobody serves fails with a clear error within the bound.
pub async fn unknown_segment(h: &dyn Harness) {
    let e = TransferEngine::start(EngineConfig::new(h.hostname()), h.transports())
        .await
        .unwrap();
    // Port 9 (discard) on loopback is closed on test machines; names without a port are invalid.
    for name in ["127.0.0.1:9", "no-port-here"] {
        let r = tokio::time::timeout(h.failure_bound(), e.open_segment(name))
            .await
            .expect("bounded");
        assert!(r.is_err(), "opening {name} must fail");
    }
    e.shutdown().await;
}

/// A WRITE that asks for a landing notice is reported to the target's observer, in one or more
/// pieces that exactly cover it, each with its bytes already in memory, and flushed before the
/// initiator sees it complete; other requests (plain WRITEs, READs, failed WRITEs) are not
/// reported.
pub async fn landing_notices(h: &dyn Harness) {
    let p = pair(h).await;
    const BIG: usize = 3 << 20;
    let (remote, local) = p.buffers(BIG + 8192, BIG + 16384);
    let data = pattern(9, BIG + 8192);
    fill(&p.initiator, local, &data);
    // (addr, len, bytes in place when reported)
    let seen: Arc<std::sync::Mutex<Vec<(u64, u64, bool)>>> = Arc::default();
    // Reports are gathered until a flush, which must come before the acknowledgement.
    struct Observer {
        memory: Arc<crate::memory::MemoryRegistry>,
        expected: Vec<u8>,
        remote: u64,
        gathered: std::sync::Mutex<Vec<(u64, u64, bool)>>,
        seen: Arc<std::sync::Mutex<Vec<(u64, u64, bool)>>>,
    }
    impl crate::transport::LandingObserver for Observer {
        fn landed(&self, addr: u64, len: u64) {
            let off = (addr - self.remote) as usize;
            let landed = self
                .memory
                .resolve(addr, len)
                .is_ok_and(|r| r.to_vec() == self.expected[off..off + len as usize]);
            self.gathered.lock().unwrap().push((addr, len, landed));
        }
        fn flush(&self) {
            let mut gathered = std::mem::take(&mut *self.gathered.lock().unwrap());
            self.seen.lock().unwrap().append(&mut gathered);
        }
    }
    p.target
        .set_landing_observer(Arc::new(Observer {
            memory: p.target.memory().clone(),
            expected: data.clone(),
            remote,
            gathered: Default::default(),
            seen: seen.clone(),
        }))
        .unwrap();
    let seg = p
        .initiator
        .open_segment(p.target.segment_name())
        .await
        .unwrap();
    let results = p
        .initiator
        .transfer(vec![
            TransferRequest::write(&seg, remote, local, BIG as u64).with_landing_notice(),
            TransferRequest::write(&seg, remote + BIG as u64, local + BIG as u64, 4096),
            TransferRequest::read(&seg, remote, local + BIG as u64 + 8192, 4096)
                .with_landing_notice(),
            TransferRequest::write(&seg, remote + (64 << 20), local, 4096).with_landing_notice(),
            TransferRequest::write(
                &seg,
                remote + BIG as u64 + 4096,
                local + BIG as u64 + 4096,
                100,
            )
            .with_landing_notice(),
        ])
        .await;
    assert!(results[0].is_ok() && results[1].is_ok() && results[2].is_ok());
    assert!(results[3].is_err(), "out of bounds");
    assert!(results[4].is_ok());
    let mut seen = seen.lock().unwrap().clone();
    seen.sort();
    assert!(
        seen.iter().all(|s| s.2),
        "reported before its bytes landed: {seen:?}"
    );
    // The pieces tile [remote, remote + BIG) and [remote + BIG + 4096, +100), nothing else.
    let mut at = remote;
    let mut pieces = seen.iter();
    while at < remote + BIG as u64 {
        let &(addr, len, _) = pieces.next().expect("the big WRITE is covered");
        assert_eq!(addr, at, "pieces are contiguous: {seen:?}");
        at += len;
    }
    assert_eq!(at, remote + BIG as u64);
    let rest: Vec<(u64, u64)> = pieces.map(|s| (s.0, s.1)).collect();
    assert_eq!(rest, vec![(remote + BIG as u64 + 4096, 100)]);
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// Buffers registered after both engines started (after every transport's `serve`) reach the
/// transports: a peer that looks the segment up again sees them with the keys the target's
/// transports published, and moves bytes to and from them; requests into an engine-allocated
/// one go to the first transport. Caller-owned memory registered late works too.
pub async fn registration_after_serve(h: &dyn Harness) {
    let p = pair(h).await;
    const LEN: usize = 1 << 16;
    let name = p.target.segment_name().to_owned();
    let local = p.initiator.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let before = p.initiator.open_segment(&name).await.unwrap();
    let allocated = p.target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
    let owned = AlignedBuffer::new(LEN).unwrap();
    // SAFETY: `owned` outlives its registration: unregistered (and waited for) before it drops.
    unsafe {
        p.target
            .register_memory(owned.addr(), LEN as u64, Location::cpu(0))
            .unwrap();
    }
    p.target.publish().await.unwrap();
    assert!(
        !before.buffers.iter().any(|b| b.addr == allocated),
        "the cached descriptor predates the buffer"
    );
    let seg = p.initiator.refresh_segment(&name).await.unwrap();
    let theirs = p.target.local_descriptor();
    for addr in [allocated, owned.addr()] {
        let seen = seg
            .buffers
            .iter()
            .find(|b| b.addr == addr)
            .expect("the peer sees the late buffer");
        let own = theirs.buffers.iter().find(|b| b.addr == addr).unwrap();
        assert_eq!(seen, own, "the peer sees the same keys");
        for k in &seen.keys {
            assert!(
                theirs.endpoint(&k.protocol).is_some(),
                "key of a transport the target does not serve: {k:?}"
            );
        }
    }
    let seen = seg.buffers.iter().find(|b| b.addr == allocated).unwrap();
    for protocol in h.keyed_protocols() {
        assert!(
            seen.key(protocol).is_some(),
            "{protocol} published no key for a buffer allocated after serve: {seen:?}"
        );
    }
    let first = p.initiator.transports()[0].protocol();
    assert_eq!(
        p.initiator
            .carrier(&seg, allocated, LEN as u64)
            .map(|t| t.protocol()),
        Some(first)
    );
    for (i, remote) in [allocated, owned.addr()].into_iter().enumerate() {
        let data = pattern(20 + i as u64, LEN);
        fill(&p.target, remote, &data);
        let r = p
            .initiator
            .transfer(vec![TransferRequest::read(&seg, remote, local, LEN as u64)])
            .await;
        r[0].as_ref().expect("read from a late buffer");
        assert!(read(&p.initiator, local, LEN) == data);
        let back = pattern(30 + i as u64, LEN);
        fill(&p.initiator, local, &back);
        let r = p
            .initiator
            .transfer(vec![TransferRequest::write(
                &seg, remote, local, LEN as u64,
            )])
            .await;
        r[0].as_ref().expect("write into a late buffer");
        assert!(read(&p.target, remote, LEN) == back);
    }
    tokio::time::timeout(
        h.failure_bound(),
        p.target.unregister_memory_async(owned.addr()).unwrap(),
    )
    .await
    .expect("nothing holds the buffer");
    drop(owned);
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}

/// Unregistering a buffer while a transfer uses it, on either side: the transfer completes
/// entirely or fails cleanly, the unregistration's future completes only once the transfer has
/// let go of the buffer (so a caller may free it then), and later requests into it fail.
/// Repeated with the unregistration at several points of the transfer.
pub async fn unregistration_during_transfer(h: &dyn Harness) {
    let p = pair(h).await;
    const LEN: usize = 8 << 20;
    let name = p.target.segment_name().to_owned();
    let bound = h.failure_bound();
    let data = pattern(11, LEN);
    for delay in [0, 200, 1000, 3000].map(Duration::from_micros) {
        // The initiator's source (caller-owned) is unregistered under a WRITE.
        let remote = p.target.allocate_buffer(LEN, Location::cpu(0)).unwrap();
        let src = AlignedBuffer::new(LEN).unwrap();
        // SAFETY: `src` is freed only after its unregistration's future completed.
        unsafe {
            p.initiator
                .register_memory(src.addr(), LEN as u64, Location::cpu(0))
                .unwrap();
        }
        fill(&p.initiator, src.addr(), &data);
        let seg = p.initiator.refresh_segment(&name).await.unwrap();
        let batch = p.initiator.submit(vec![TransferRequest::write(
            &seg,
            remote,
            src.addr(),
            LEN as u64,
        )]);
        tokio::time::sleep(delay).await;
        let released = p.initiator.unregister_memory_async(src.addr()).unwrap();
        tokio::time::timeout(bound, released)
            .await
            .expect("the unregistration completes once the transfer is done");
        let done_when_released = batch.is_done();
        let src_addr = src.addr();
        drop(src);
        let r = tokio::time::timeout(bound, batch.wait())
            .await
            .expect("the transfer finishes");
        match &r[0] {
            Ok(()) => {
                assert!(done_when_released, "released before the WRITE completed");
                assert!(
                    read(&p.target, remote, LEN) == data,
                    "a WRITE reported complete moved every byte ({delay:?})"
                );
            }
            // Unregistered before the batch resolved its local range: nothing was sent.
            Err(Error::LocalRangeNotRegistered { .. }) => {}
            Err(e) => assert!(done_when_released, "released before the WRITE failed ({e})"),
        }
        let r = p
            .initiator
            .transfer(vec![TransferRequest::write(&seg, remote, src_addr, 1)])
            .await;
        assert!(r[0].is_err(), "the unregistered source is refused");

        // The target's buffer is unregistered under a READ from it.
        let dst = p.initiator.allocate_buffer(LEN, Location::cpu(0)).unwrap();
        fill(&p.target, remote, &data);
        let batch = p
            .initiator
            .submit(vec![TransferRequest::read(&seg, remote, dst, LEN as u64)]);
        tokio::time::sleep(delay).await;
        let released = p.target.unregister_memory_async(remote).unwrap();
        tokio::time::timeout(bound, released)
            .await
            .expect("the target's unregistration completes");
        let r = tokio::time::timeout(bound, batch.wait())
            .await
            .expect("the transfer finishes");
        if r[0].is_ok() {
            assert!(
                read(&p.initiator, dst, LEN) == data,
                "a READ reported complete moved every byte ({delay:?})"
            );
        }
        let r = p
            .initiator
            .transfer(vec![TransferRequest::read(&seg, remote, dst, 4096)])
            .await;
        assert!(r[0].is_err(), "the unregistered target buffer is refused");
        p.initiator.unregister_memory_async(dst).unwrap().await;
    }
    p.initiator.shutdown().await;
    p.target.shutdown().await;
}
