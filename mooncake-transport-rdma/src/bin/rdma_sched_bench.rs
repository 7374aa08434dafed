//! The scheduler's own cost: slices per second through submit and poll, on the fake verbs
//! backend with copying off (every check and completion still happens), on one core (a
//! current-thread runtime). Prints one line per configuration.
//!
//! `rdma_sched_bench [seconds per configuration, default 2]`

use std::time::{Duration, Instant};

use mooncake_core::{EngineConfig, Location, TransferEngine, TransferRequest};
use mooncake_transport_rdma::fake::FakeFabric;
use mooncake_transport_rdma::{RdmaConfig, RdmaTransport};

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for (nics, slice) in [(1, 4096u64), (2, 4096), (4, 4096), (4, 65536)] {
            let rate = run(nics, slice, Duration::from_secs_f64(secs)).await;
            println!(
                "nics={nics} slice={slice}B: {:.2} M slices/s ({:.1} GB/s of scheduled bytes)",
                rate / 1e6,
                rate * slice as f64 / 1e9
            );
        }
    });
}

async fn run(nics: usize, slice: u64, duration: Duration) -> f64 {
    let fabric = FakeFabric::new();
    fabric.set_copy(false);
    let config = RdmaConfig {
        slice_size: slice,
        ..RdmaConfig::default()
    };
    let start = |host| {
        let t = RdmaTransport::with_provider(config.clone(), host).expect("fake NICs");
        TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![t])
    };
    let target = start(fabric.host(nics)).await.expect("target");
    let initiator = start(fabric.host(nics)).await.expect("initiator");
    const LEN: u64 = 64 << 20;
    let remote = target
        .allocate_buffer(LEN as usize, Location::cpu(0))
        .expect("buffer");
    let local = initiator
        .allocate_buffer(LEN as usize, Location::cpu(0))
        .expect("buffer");
    let seg = initiator
        .open_segment(target.segment_name())
        .await
        .expect("segment");
    // 16 requests of 4 MiB per batch, half READs, half WRITEs.
    let batch = || {
        (0..16u64)
            .map(|i| {
                let off = i * (4 << 20);
                if i % 2 == 0 {
                    TransferRequest::read(&seg, remote + off, local + off, 4 << 20)
                } else {
                    TransferRequest::write(&seg, remote + off, local + off, 4 << 20)
                }
            })
            .collect::<Vec<_>>()
    };
    // Warm up: connects the queue pairs.
    for r in initiator.transfer(batch()).await {
        r.expect("warm-up transfer");
    }
    let t0 = Instant::now();
    let mut slices = 0u64;
    while t0.elapsed() < duration {
        for r in initiator.transfer(batch()).await {
            r.expect("transfer");
        }
        slices += LEN / slice;
    }
    let rate = slices as f64 / t0.elapsed().as_secs_f64();
    initiator.shutdown().await;
    target.shutdown().await;
    rate
}
