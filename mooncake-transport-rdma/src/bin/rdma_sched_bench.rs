//! The scheduler's own cost: slices per second through submit and poll, on the fake verbs
//! backend with copying off (every check and completion still happens), on one core (a
//! current-thread runtime). Prints one line per configuration.
//!
//! `rdma_sched_bench [seconds per configuration, default 2]`
//!
//! Built with feature `rdma`, `rdma_sched_bench --real [seconds]` measures instead the transfer
//! rate through this host's real devices (two engines in this process, 1 MiB and 16 MiB
//! requests, bytes copied by the NICs), in total and per NIC.

use std::time::{Duration, Instant};

use mooncake_core::{EngineConfig, Location, TransferEngine, TransferRequest};
use mooncake_transport_rdma::fake::FakeFabric;
use mooncake_transport_rdma::{RdmaConfig, RdmaTransport};

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let real = args.first().is_some_and(|a| a == "--real");
    if real {
        args.remove(0);
    }
    let secs: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    if real {
        real_devices(secs);
        return;
    }
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

#[cfg(feature = "rdma")]
fn real_devices(secs: f64) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let make = || RdmaTransport::new(RdmaConfig::default());
        let (a, b) = match (make(), make()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        };
        let nics = a.nics();
        for request in [1u64 << 20, 16 << 20] {
            let rate = measure(a.clone(), b.clone(), request, Duration::from_secs_f64(secs)).await;
            println!(
                "{} NICs ({}), {} MiB requests: {:.2} GB/s total, {:.2} GB/s per NIC",
                nics.len(),
                nics.join(","),
                request >> 20,
                rate / 1e9,
                rate / 1e9 / nics.len() as f64
            );
        }
    });
}

#[cfg(not(feature = "rdma"))]
fn real_devices(_secs: f64) {
    eprintln!("no RDMA devices: built without the `rdma` feature");
    std::process::exit(1);
}

async fn run(nics: usize, slice: u64, duration: Duration) -> f64 {
    let fabric = FakeFabric::new();
    fabric.set_copy(false);
    let config = RdmaConfig {
        slice_size: slice,
        ..RdmaConfig::default()
    };
    let make = |host| RdmaTransport::with_provider(config.clone(), host).expect("fake NICs");
    let (a, b) = (make(fabric.host(nics)), make(fabric.host(nics)));
    measure(a, b, 4 << 20, duration).await / slice as f64
}

/// Runs batches of 16 requests of `request` bytes (half READs, half WRITEs) from an engine on
/// `a` to one on `b` for `duration`. Returns the bytes moved per second.
async fn measure(
    a: std::sync::Arc<RdmaTransport>,
    b: std::sync::Arc<RdmaTransport>,
    request: u64,
    duration: Duration,
) -> f64 {
    let start = |t: std::sync::Arc<RdmaTransport>| {
        TransferEngine::start(EngineConfig::new("127.0.0.1"), vec![t])
    };
    let target = start(b).await.expect("target");
    let initiator = start(a).await.expect("initiator");
    let len: u64 = 16 * request;
    let remote = target
        .allocate_buffer(len as usize, Location::cpu(0))
        .expect("buffer");
    let local = initiator
        .allocate_buffer(len as usize, Location::cpu(0))
        .expect("buffer");
    let seg = initiator
        .open_segment(target.segment_name())
        .await
        .expect("segment");
    let batch = || {
        (0..16u64)
            .map(|i| {
                let off = i * request;
                if i % 2 == 0 {
                    TransferRequest::read(&seg, remote + off, local + off, request)
                } else {
                    TransferRequest::write(&seg, remote + off, local + off, request)
                }
            })
            .collect::<Vec<_>>()
    };
    // Warm up: connects the queue pairs.
    for r in initiator.transfer(batch()).await {
        r.expect("warm-up transfer");
    }
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed() < duration {
        for r in initiator.transfer(batch()).await {
            r.expect("transfer");
        }
        bytes += len;
    }
    let rate = bytes as f64 / t0.elapsed().as_secs_f64();
    initiator.shutdown().await;
    target.shutdown().await;
    rate
}
