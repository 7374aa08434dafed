//! The embedded store demo: one process is master, storage node and client at once (no external
//! service); a second process joins as a storage node, so replicas and reads cross processes
//! over loopback TCP.
//!
//! ```text
//! cargo run --release --example demo
//! ```

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use mooncake::master::MasterConfig;
use mooncake::master_service::{MasterService, ServiceConfig};
use mooncake::store::{ReplicateConfig, Store, StoreConfig};
use mooncake::AlignedBuffer;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn config(master: &str) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: 512 << 20,
        local_buffer_size: 128 << 20,
        ..StoreConfig::default()
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--storage") {
        return storage_node(args.get(2).ok_or("--storage needs the master address")?).await;
    }

    // 1. Master, storage and client in this one process.
    let master = MasterService::new(MasterConfig::default(), ServiceConfig::default())?;
    let rpc = master.serve_rpc("127.0.0.1:0".parse()?).await?.to_string();
    let store = Store::setup_embedded(config(&rpc), master.clone()).await?;
    println!(
        "embedded master (rpc {rpc}) + storage node {} in process {}",
        store.hostname(),
        std::process::id()
    );

    // 2. A second storage node in its own process, joining through the master's RPC port.
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--storage", &rpc])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let other = BufReader::new(child.stdout.take().ok_or("no stdout")?)
        .lines()
        .next()
        .ok_or("storage node printed nothing")??;
    println!("storage node {other} joined from process {}", child.id());

    let result = exercise(&store, &master, &other).await;

    store.close().await?;
    drop(child.stdin.take());
    child.wait()?;
    master.shutdown();
    result?;
    println!("demo OK");
    Ok(())
}

async fn exercise(store: &Arc<Store>, master: &Arc<MasterService>, other: &str) -> Res<()> {
    let rc = ReplicateConfig::default();
    // 3. Put and get bytes.
    store
        .put("hello_key", b"Hello, Mooncake Store!", &rc)
        .await?;
    println!(
        "get(hello_key) = {:?}",
        String::from_utf8(store.get("hello_key").await?)?
    );

    // 4. Two replicas per object: one in each process.
    let two = ReplicateConfig::with_replicas(2);
    let values: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 1 << 20]).collect();
    let keys: Vec<String> = (0..64).map(|i| format!("kv_block_{i}")).collect();
    let items: Vec<(&str, &[u8])> = keys
        .iter()
        .map(String::as_str)
        .zip(values.iter().map(Vec::as_slice))
        .collect();
    let t = Instant::now();
    for r in store.put_batch(&items, &two).await {
        r?;
    }
    println!(
        "put_batch: 64 x 1 MiB with 2 replicas in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let replicas = store.get_replica_desc("kv_block_0").await?;
    let where_: Vec<String> = replicas
        .iter()
        .filter_map(|d| d.memory())
        .map(|m| m.segment_name.clone())
        .collect();
    println!("kv_block_0 replicas: {}", where_.join(", "));
    assert!(
        where_.iter().any(|s| s == other),
        "a replica lives in the other process"
    );
    let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let t = Instant::now();
    let got = store.get_batch(&key_refs).await;
    for (g, v) in got.iter().zip(&values) {
        assert!(
            g.as_ref().map_err(|e| e.to_string())? == v,
            "get_batch returned wrong bytes"
        );
    }
    println!(
        "get_batch: 64 x 1 MiB verified in {:.1} ms (local replicas read by memcpy)",
        t.elapsed().as_secs_f64() * 1e3
    );

    // 5. Zero-copy: 64 MiB from a registered buffer, placed in the other process, read back.
    let src = AlignedBuffer::new(64 << 20)?;
    let dst = AlignedBuffer::new(64 << 20)?;
    let pattern: Vec<u8> = (0..64usize << 20).map(|i| (i % 251) as u8).collect();
    // SAFETY: both buffers live until they are unregistered below.
    unsafe {
        std::ptr::copy_nonoverlapping(pattern.as_ptr(), src.addr() as *mut u8, pattern.len());
        store.register_buffer(src.addr(), src.len() as u64)?;
        store.register_buffer(dst.addr(), dst.len() as u64)?;
    }
    let remote = ReplicateConfig {
        preferred_segment: other.to_owned(),
        ..Default::default()
    };
    let t = Instant::now();
    store
        .put_from("large_tensor", src.addr(), 64 << 20, &remote)
        .await?;
    let put_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let n = store.get_into("large_tensor", dst.addr(), 64 << 20).await?;
    let get_s = t.elapsed().as_secs_f64();
    // SAFETY: dst is registered and no transfer is running.
    let back = unsafe { std::slice::from_raw_parts(dst.addr() as *const u8, n as usize) };
    assert!(
        back == &pattern[..],
        "zero-copy round trip returned wrong bytes"
    );
    println!(
        "zero-copy 64 MiB to the other process: put_from {:.2} GB/s, get_into {:.2} GB/s, verified",
        (64 << 20) as f64 / put_s / 1e9,
        (64 << 20) as f64 / get_s / 1e9
    );
    store.unregister_buffer(src.addr())?;
    store.unregister_buffer(dst.addr())?;

    // 6. Misses, leases and removal keep upstream's codes.
    let miss = store
        .get("no_such_key")
        .await
        .err()
        .ok_or("a miss must fail")?;
    println!("get(no_such_key) -> {}", miss.code());
    let leased = store
        .remove("hello_key", false)
        .await
        .err()
        .ok_or("leased remove must fail")?;
    println!("remove(hello_key) while leased -> {}", leased.code());
    store.remove("hello_key", true).await?;
    println!(
        "removed by regex: {}",
        store.remove_by_regex("^kv_block_", true).await?
    );
    let m = master.metrics();
    println!(
        "master: {} keys, {} segments, {} / {} bytes used ({} retired until read leases end, {} \
         reserved for writers)",
        m.key_count,
        m.segment_count,
        m.used_bytes,
        m.capacity_bytes,
        m.retired_bytes,
        m.reserved_bytes
    );
    Ok(())
}

async fn storage_node(master: &str) -> Res<()> {
    let store = Store::setup(config(master)).await?;
    println!("{}", store.hostname());
    // Serve until the demo closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut b = [0u8; 1];
        let _ = std::io::stdin().read(&mut b);
    })
    .await?;
    store.close().await?;
    Ok(())
}
