//! The dummy-client mode end to end in one process, over real sockets: an in-process master, a
//! real client serving its store on loopback RPC, and dummy clients sharing memfd pools with it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_core::ErrorCode;
use mooncake_master::MasterConfig;
use mooncake_master_service::service::{MasterService, ServiceConfig};
use mooncake_rpc::RpcClientConfig;
use mooncake_store::real_client::{DummyClient, RealClient};
use mooncake_store::{ReplicateConfig, Store, StoreApi, StoreConfig, WriteKind};

async fn master() -> (Arc<MasterService>, String) {
    let svc = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
    let addr = svc.serve_rpc("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (svc, addr.to_string())
}

fn config(master: &str, segment: u64) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: segment,
        local_buffer_size: 16 << 20,
        rpc: RpcClientConfig {
            call_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
        },
        heartbeat_interval: Duration::from_millis(100),
        ..StoreConfig::default()
    }
}

async fn real_client(master: &str) -> Arc<RealClient> {
    let store = Store::setup(config(master, 64 << 20)).await.unwrap();
    RealClient::serve(store, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(seed)
                .wrapping_add(seed ^ (i >> 8) as u8)
        })
        .collect()
}

/// Writes `bytes` at `addr` inside a dummy's pool.
fn write_at(d: &DummyClient, addr: u64, bytes: &[u8]) {
    assert!(d.pool_contains(addr, bytes.len() as u64));
    // SAFETY: the range is inside the dummy's live pool mapping (checked above).
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) }
}

fn read_at(d: &DummyClient, addr: u64, len: usize) -> Vec<u8> {
    assert!(d.pool_contains(addr, len as u64));
    let mut v = vec![0u8; len];
    // SAFETY: as in `write_at`.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, v.as_mut_ptr(), len) }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dummy_put_get_batch_and_admin_calls() {
    let (_svc, addr) = master().await;
    let rc = real_client(&addr).await;
    let server = rc.rpc_address().to_string();
    // Staging of 1 MiB: small values go through it, a 3 MiB one goes inline.
    let d = DummyClient::connect(&server, 4 << 20, 1 << 20)
        .await
        .unwrap();
    assert_eq!(rc.session_count(), 1);
    assert_eq!(d.hostname(), rc.store().hostname());
    let cfg = ReplicateConfig::default();

    d.put("a", b"hello dummy", &cfg).await.unwrap();
    assert_eq!(d.get("a").await.unwrap(), b"hello dummy");
    // Put of an existing key keeps the value; upsert replaces it.
    d.put("a", b"other", &cfg).await.unwrap();
    assert_eq!(d.get("a").await.unwrap(), b"hello dummy");
    d.upsert_parts("a", &[b"up", b"sert"], &cfg).await.unwrap();
    assert_eq!(d.get("a").await.unwrap(), b"upsert");

    let big = pattern(7, 3 << 20);
    d.put("big", &big, &cfg).await.unwrap();
    assert_eq!(d.get("big").await.unwrap(), big);
    assert_eq!(d.get_size("big").await.unwrap(), big.len() as u64);

    let values: Vec<Vec<u8>> = (0..10u8)
        .map(|i| pattern(i + 1, 1000 * (i as usize + 1)))
        .collect();
    let keys: Vec<String> = (0..10).map(|i| format!("batch{i}")).collect();
    let items: Vec<(&str, &[u8])> = keys
        .iter()
        .map(String::as_str)
        .zip(values.iter().map(Vec::as_slice))
        .chain(std::iter::once(("batch_big", big.as_slice())))
        .collect();
    for r in d.put_batch(&items, &cfg).await {
        r.unwrap();
    }
    let mut ks: Vec<&str> = keys.iter().map(String::as_str).collect();
    ks.push("batch_big");
    ks.push("missing");
    let got = d.get_batch(&ks).await;
    for (i, v) in values.iter().enumerate() {
        assert_eq!(got[i].as_ref().unwrap(), v);
    }
    assert_eq!(got[10].as_ref().unwrap(), &big);
    assert_eq!(
        got[11].as_ref().unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );

    assert!(d.is_exist("batch3").await.unwrap());
    assert!(!d.is_exist("missing").await.unwrap());
    assert_eq!(
        d.batch_is_exist(&["batch1", "missing"]).await.unwrap(),
        vec![true, false]
    );
    assert_eq!(d.get_replica_desc("batch1").await.unwrap().len(), 1);
    assert_eq!(
        d.batch_get_replica_desc(&["batch1", "missing"])
            .await
            .unwrap()
            .len(),
        1
    );
    d.remove("batch1", true).await.unwrap();
    assert_eq!(
        d.remove("batch1", true).await.unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    assert_eq!(d.remove_by_regex("^batch[0-4]$", true).await.unwrap(), 4);
    assert!(d.master_metrics().await.is_ok());
    let id = d.create_copy_task("missing", &[]).await;
    assert!(id.is_err());

    d.close().await.unwrap();
    assert_eq!(
        d.get("a").await.unwrap_err().code(),
        ErrorCode::UNAVAILABLE_IN_CURRENT_STATUS
    );
    rc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_copy_through_the_shared_pool_and_bounds() {
    let (_svc, addr) = master().await;
    let rc = real_client(&addr).await;
    let server = rc.rpc_address().to_string();
    let d = DummyClient::connect(&server, 8 << 20, 1 << 20)
        .await
        .unwrap();
    let cfg = ReplicateConfig::default();

    let src = d.alloc_from_mem_pool(1 << 20).unwrap();
    let dst = d.alloc_from_mem_pool(1 << 20).unwrap();
    assert_eq!(src % 4096, 0);
    let data = pattern(3, 1 << 20);
    write_at(&d, src, &data);
    d.put_from("zc", src, data.len() as u64, &cfg)
        .await
        .unwrap();
    assert_eq!(
        d.get_into("zc", dst, 1 << 20).await.unwrap(),
        data.len() as u64
    );
    assert_eq!(read_at(&d, dst, data.len()), data);
    // Bytes written zero-copy read back through the byte API too, and the other way round.
    assert_eq!(d.get("zc").await.unwrap(), data);
    d.put("bytes", &data[..5000], &cfg).await.unwrap();
    assert_eq!(d.get_into("bytes", dst, 8192).await.unwrap(), 5000);
    assert_eq!(read_at(&d, dst, 5000), &data[..5000]);

    // Batch and multi-buffer forms.
    let half = (data.len() / 2) as u64;
    let r = d
        .batch_put_from(&[("zc1", src, half), ("zc2", src + half, half)], &cfg)
        .await;
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    let r = d
        .batch_get_into(&[("zc1", dst, half), ("zc2", dst + half, half)])
        .await;
    assert_eq!(
        r.iter().map(|r| *r.as_ref().unwrap()).sum::<u64>(),
        2 * half
    );
    assert_eq!(read_at(&d, dst, data.len()), data);
    d.batch_put_from_multi_buffers(&[("zc_multi", vec![(src + half, half), (src, half)])], &cfg)
        .await
        .pop()
        .unwrap()
        .unwrap();
    let mut swapped = data[half as usize..].to_vec();
    swapped.extend_from_slice(&data[..half as usize]);
    assert_eq!(d.get("zc_multi").await.unwrap(), swapped);

    // A regular store client reads what the dummy wrote zero-copy.
    let other = Store::setup(config(&addr, 0)).await.unwrap();
    assert_eq!(other.get("zc").await.unwrap(), data);

    // Pointers outside the pool (or reaching past it) are refused with -600, touching nothing.
    let outside = data.as_ptr() as u64;
    let (base, len) = d.pool_range();
    for (a, n) in [
        (outside, 100u64),
        (base + len - 10, 100),
        (base.wrapping_sub(4096), 100),
        (u64::MAX - 10, 100),
        (base, 0),
    ] {
        assert_eq!(
            d.put_from("bad", a, n, &cfg).await.unwrap_err().code(),
            ErrorCode::INVALID_PARAMS,
            "put_from {a:#x}+{n}"
        );
        assert_eq!(
            d.get_into("zc", a, n.max(1)).await.unwrap_err().code(),
            ErrorCode::INVALID_PARAMS,
            "get_into {a:#x}+{n}"
        );
    }
    // The staging tail of the mapping is not part of the pool either.
    assert!(!d.pool_contains(base + len, 1));
    assert!(!d.is_exist("bad").await.unwrap());
    // A buffer too small for the object is refused too.
    assert_eq!(
        d.get_into("zc", dst, 100).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );

    // Pool allocation: exhaustion and reuse.
    assert_eq!(
        d.alloc_from_mem_pool(7 << 20).unwrap_err().code(),
        ErrorCode::NO_AVAILABLE_HANDLE
    );
    d.free_from_mem_pool(dst).unwrap();
    assert_eq!(d.alloc_from_mem_pool(1 << 20).unwrap(), dst);

    other.close().await.unwrap();
    rc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dummies_share_objects_and_disconnects_release_pools() {
    let (_svc, addr) = master().await;
    let rc = real_client(&addr).await;
    let server = rc.rpc_address().to_string();
    let a = DummyClient::connect(&server, 2 << 20, 1 << 20)
        .await
        .unwrap();
    let b = DummyClient::connect(&server, 2 << 20, 1 << 20)
        .await
        .unwrap();
    assert_eq!(rc.session_count(), 2);
    let cfg = ReplicateConfig::default();

    let pa = a.alloc_from_mem_pool(4096).unwrap();
    write_at(&a, pa, &pattern(9, 4096));
    a.put_from("shared", pa, 4096, &cfg).await.unwrap();
    let pb = b.alloc_from_mem_pool(4096).unwrap();
    assert_eq!(b.get_into("shared", pb, 4096).await.unwrap(), 4096);
    assert_eq!(read_at(&b, pb, 4096), pattern(9, 4096));
    // b's pointers mean nothing in a's session.
    assert_eq!(
        a.get_into("shared", pb, 4096).await.unwrap_err().code(),
        ErrorCode::INVALID_PARAMS
    );

    // The real client sees b's pool registered; after b goes away it is unregistered.
    let registry = rc.store().engine().memory().clone();
    let before = registry.descriptors().len();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    while rc.session_count() != 1 {
        assert!(Instant::now() < deadline, "session not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(registry.descriptors().len(), before - 1);
    // a is unaffected.
    assert_eq!(a.get("shared").await.unwrap(), pattern(9, 4096));
    a.close().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while rc.session_count() != 0 {
        assert!(Instant::now() < deadline, "session not released");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(registry.descriptors().len(), before - 2);
    rc.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connecting_to_nothing_fails_cleanly() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let e = DummyClient::connect(&format!("127.0.0.1:{port}"), 1 << 20, 1 << 20)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::RPC_FAIL);
    let e = DummyClient::connect("127.0.0.1:1", 0, 0).await.unwrap_err();
    assert!(matches!(
        e.code(),
        ErrorCode::RPC_FAIL | ErrorCode::INVALID_PARAMS
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dummy_registers_its_pool_again_after_the_real_client_restarts() {
    let (_svc, addr) = master().await;
    let first = real_client(&addr).await;
    let server = first.rpc_address();
    let d = DummyClient::connect(&server.to_string(), 2 << 20, 1 << 20)
        .await
        .unwrap();
    let cfg = ReplicateConfig {
        replica_num: 1,
        ..ReplicateConfig::default()
    };
    let p = d.alloc_from_mem_pool(8192).unwrap();
    write_at(&d, p, &pattern(3, 8192));
    d.put_from("before", p, 8192, &cfg).await.unwrap();

    // The real client goes away and a new one serves on the same address.
    first.shutdown().await.unwrap();
    drop(first);
    let store = Store::setup(config(&addr, 64 << 20)).await.unwrap();
    let second = RealClient::serve(store, server).await.unwrap();
    assert_eq!(second.session_count(), 0);

    // Zero-copy calls re-register the same pool (same addresses on this side) and work.
    write_at(&d, p, &pattern(4, 8192));
    d.put_from("after", p, 8192, &cfg).await.unwrap();
    assert_eq!(second.session_count(), 1);
    let q = d.alloc_from_mem_pool(8192).unwrap();
    assert_eq!(d.get_into("after", q, 8192).await.unwrap(), 8192);
    assert_eq!(read_at(&d, q, 8192), pattern(4, 8192));
    // A value stored before the restart is still readable (it lives in the first real
    // client's segment only if placement put it there; either way the answer is clean).
    match d.get_into("before", q, 8192).await {
        Ok(n) => {
            assert_eq!(n, 8192);
            assert_eq!(read_at(&d, q, 8192), pattern(3, 8192));
        }
        Err(e) => assert!(
            matches!(
                e.code(),
                ErrorCode::OBJECT_NOT_FOUND | ErrorCode::TRANSFER_FAIL
            ),
            "{e}"
        ),
    }
    d.close().await.unwrap();
    second.shutdown().await.unwrap();
}

/// The same calls through [`StoreApi`], answered alike by a store client and a dummy client.
async fn store_api_scenario(api: &dyn StoreApi, p: &str) {
    let cfg = ReplicateConfig::default();
    let k = |s: &str| format!("{p}{s}");
    // A put of an existing key keeps the value; an upsert replaces it.
    api.put(&k("a"), b"first", &cfg).await.unwrap();
    api.write_parts(WriteKind::Put, &k("a"), &[b"sec", b"ond"], &cfg)
        .await
        .unwrap();
    assert_eq!(api.get(&k("a")).await.unwrap(), b"first");
    api.write_parts(WriteKind::Upsert, &k("a"), &[b"up", b"sert"], &cfg)
        .await
        .unwrap();
    let staged = api.get_staged(&k("a")).await.unwrap();
    assert_eq!(staged.into_vec().unwrap(), b"upsert");

    let (b, c) = (k("b"), k("c"));
    let items: Vec<(&str, &[u8])> = vec![(&b, b"bee"), (&c, b"sea")];
    for r in api.write_batch(WriteKind::Put, &items, &cfg).await {
        r.unwrap();
    }
    let items: Vec<(&str, &[u8])> = vec![(&b, b"bee2"), (&c, b"sea2")];
    for r in api.write_batch(WriteKind::Upsert, &items, &cfg).await {
        r.unwrap();
    }
    let got = api.get_batch_staged(&[&b, &c, &k("missing")]).await;
    assert_eq!(got[0].as_ref().unwrap().len(), 4);
    assert_eq!(
        got[2].as_ref().unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );

    // Zero-copy: memory from alloc_from_mem_pool is usable at once.
    let buf = api.alloc_from_mem_pool(4096).unwrap();
    // SAFETY: `buf` is 4096 bytes this client just allocated and still owns.
    unsafe { std::ptr::write_bytes(buf as *mut u8, 0x5a, 4096) };
    let z = k("z");
    for r in api
        .batch_write_from(WriteKind::Upsert, &[(&z, buf, 4096)], &cfg)
        .await
    {
        r.unwrap();
    }
    assert_eq!(api.get_size(&z).await.unwrap(), 4096);
    assert_eq!(api.get(&z).await.unwrap(), vec![0x5a; 4096]);

    assert!(api.is_exist(&b).await.unwrap());
    api.remove(&b, true).await.unwrap();
    assert_eq!(
        api.batch_is_exist(&[&b, &c]).await.unwrap(),
        vec![false, true]
    );
    assert_eq!(api.get_replica_desc(&c).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_dummy_answer_alike_through_store_api() {
    let (_svc, addr) = master().await;
    let rc = real_client(&addr).await;
    let d = DummyClient::connect(&rc.rpc_address().to_string(), 4 << 20, 1 << 20)
        .await
        .unwrap();
    let clients: [(Arc<dyn StoreApi>, &str); 2] = [(rc.store().clone(), "s/"), (Arc::new(d), "d/")];
    for (api, prefix) in &clients {
        store_api_scenario(api.as_ref(), prefix).await;
    }
    // A dummy can use only its shared pool.
    let (dummy, _) = &clients[1];
    let outside = [0u8; 64];
    // SAFETY: `outside` outlives the call; a dummy refuses it without touching it.
    let r = unsafe { dummy.register_buffer(outside.as_ptr() as u64, 64) };
    assert_eq!(r.unwrap_err().code(), ErrorCode::INVALID_PARAMS);
    for (api, _) in &clients {
        assert_eq!(api.hostname(), rc.store().hostname());
    }
    clients[1].0.close().await.unwrap();
    rc.shutdown().await.unwrap();
}

/// Threads of this process.
fn threads() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dummies_that_never_register_hold_no_thread_and_others_are_served() {
    use std::os::linux::net::SocketAddrExt;
    let (_svc, addr) = master().await;
    let rc = real_client(&addr).await;
    let name = rc.dummy_socket_name().to_owned();
    let before = threads();
    // 600 connections to the pool socket that never send a registration (more than tokio's
    // pool of blocking threads).
    let socket = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let silent: Vec<_> = (0..600)
        .map(|_| std::os::unix::net::UnixStream::connect_addr(&socket).unwrap())
        .collect();
    // A dummy connecting after them is accepted after them, and registers and works at once.
    let server = rc.rpc_address().to_string();
    let d = DummyClient::connect(&server, 2 << 20, 1 << 20)
        .await
        .unwrap();
    let p = d.alloc_from_mem_pool(4096).unwrap();
    write_at(&d, p, &pattern(3, 4096));
    d.put_from("while-silent", p, 4096, &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(d.get("while-silent").await.unwrap(), pattern(3, 4096));
    let during = threads();
    assert!(
        during < before + 64,
        "{before} threads before the silent dummies, {during} with them"
    );
    drop(silent);
    d.close().await.unwrap();
    rc.shutdown().await.unwrap();
}
