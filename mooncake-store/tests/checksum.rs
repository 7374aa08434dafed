//! Per-object checksums end to end: a replica whose bytes are not the committed value's (a
//! corrupted range, a WRITE that landed late in space handed to another object) is never
//! returned; the read takes another replica, or fails with `CHECKSUM_MISMATCH` (-801).

use mooncake_testkit as common;

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::{AlignedBuffer, ErrorCode, TransferRequest};
use mooncake_master::{Command, MasterConfig, ReplicaDescriptor, Response};
use mooncake_store::{ReplicateConfig, Store, StoreConfig};

use common::{serve_master, store_config};

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(seed ^ 0x5a))
        .collect()
}

/// The store among `stores` whose segment holds `replica`.
fn owner<'a>(stores: &'a [&Arc<Store>], replica: &ReplicaDescriptor) -> &'a Arc<Store> {
    let name = &replica.memory().unwrap().segment_name;
    stores
        .iter()
        .find(|s| s.engine().segment_name() == name)
        .expect("a store of this process holds the replica")
}

/// Overwrites the bytes of `replica` in its owner's segment (this process's memory).
fn corrupt(stores: &[&Arc<Store>], replica: &ReplicaDescriptor, bytes: &[u8]) {
    let mem = replica.memory().unwrap();
    owner(stores, replica)
        .engine()
        .memory()
        .resolve(mem.buffer_address, bytes.len() as u64)
        .unwrap()
        .write_from(bytes)
        .unwrap();
}

/// A registered buffer of `len` bytes in `store`, holding `bytes` at its start.
fn registered(store: &Store, len: usize, bytes: &[u8]) -> AlignedBuffer {
    let buf = AlignedBuffer::new(len).unwrap();
    // SAFETY: `buf` is owned by the test, `len` bytes long, and outlives its registration (the
    // store is closed before the buffer is dropped).
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), buf.addr() as *mut u8, bytes.len());
        store.register_buffer(buf.addr(), len as u64).unwrap();
    }
    buf
}

fn read_registered(buf: &AlignedBuffer, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: `buf` is at least `len` bytes and no transfer into it is in flight.
    unsafe { std::ptr::copy_nonoverlapping(buf.addr() as *const u8, v.as_mut_ptr(), len) };
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_replica_is_passed_over_and_none_correct_is_checksum_mismatch() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let a = Store::setup(store_config(&addr, 32 << 20)).await.unwrap();
    let b = Store::setup(store_config(&addr, 32 << 20)).await.unwrap();
    let reader = Store::setup(store_config(&addr, 0)).await.unwrap();
    let checking = Store::setup(StoreConfig {
        verify_zero_copy: true,
        ..store_config(&addr, 0)
    })
    .await
    .unwrap();
    let stores = [&a, &b];
    let two = ReplicateConfig::with_replicas(2);
    let len = 256 << 10;
    let value = pattern(7, len);
    reader.put("k", &value, &two).await.unwrap();
    let small = pattern(9, 4096);
    reader.put("small", &small, &two).await.unwrap();
    // Read once, so that the next reads go ahead of the master's answer to where they were.
    assert_eq!(reader.get("k").await.unwrap(), value);
    assert_eq!(checking.get("k").await.unwrap(), value);

    let replicas = reader.get_replica_desc("k").await.unwrap();
    assert_eq!(replicas.len(), 2);
    let garbage = pattern(200, len);
    corrupt(&stores, &replicas[0], &garbage);
    let small_replicas = reader.get_replica_desc("small").await.unwrap();
    corrupt(&stores, &small_replicas[1], &pattern(201, 4096));

    // Bytes paths: the other replica's bytes, whichever replica is tried first (the owners
    // read their own replica first, by memcpy).
    for s in [&reader, &checking, &a, &b] {
        assert_eq!(s.get("k").await.unwrap(), value);
        assert_eq!(s.get("small").await.unwrap(), small);
        let both = s.get_batch(&["k", "small"]).await;
        assert_eq!(both[0].as_ref().unwrap(), &value);
        assert_eq!(both[1].as_ref().unwrap(), &small);
        let staged = s.get_staged("k").await.unwrap();
        assert_eq!(staged.into_vec().unwrap(), value);
    }
    // Zero-copy paths check when asked to (MOONCAKE_STORE_CHECKSUM=1 sets it).
    let into = registered(&checking, len, &[]);
    let n = checking
        .get_into("k", into.addr(), len as u64)
        .await
        .unwrap();
    assert_eq!(n, len as u64);
    assert_eq!(read_registered(&into, len), value);
    let r = checking
        .batch_get_into(&[("small", into.addr(), 4096)])
        .await;
    assert_eq!(r[0].as_ref().unwrap(), &4096);
    assert_eq!(read_registered(&into, 4096), small);

    // No correct replica left: CHECKSUM_MISMATCH, never the bytes.
    corrupt(&stores, &replicas[1], &garbage);
    for s in [&reader, &checking, &a, &b] {
        let e = s.get("k").await.unwrap_err();
        assert_eq!(e.code(), ErrorCode::CHECKSUM_MISMATCH, "{e}");
        assert_eq!(e.code().code(), -801);
        let batch = s.get_batch(&["k", "small"]).await;
        assert_eq!(
            batch[0].as_ref().unwrap_err().code(),
            ErrorCode::CHECKSUM_MISMATCH
        );
        assert_eq!(batch[1].as_ref().unwrap(), &small);
    }
    let e = checking
        .get_into("k", into.addr(), len as u64)
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::CHECKSUM_MISMATCH);
    // Without the switch, a zero-copy read is not checked (the caller asked for raw speed).
    let unchecked = registered(&reader, len, &[]);
    reader
        .get_into("k", unchecked.addr(), len as u64)
        .await
        .unwrap();

    for s in [checking, reader, b, a] {
        s.close().await.unwrap();
    }
    drop((into, unchecked));
}

/// A writer's WRITE is held past the time its space was its own: the master took the write over
/// and handed the range to another key, whose value was committed. Then the held WRITE lands
/// (over whatever transport reaches the segment, here unfenced: the test sends it raw). The
/// reader of the other key never gets the late bytes: `CHECKSUM_MISMATCH` (with a second,
/// intact replica it would get that one's bytes, as the test above shows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_lands_late_in_reused_space_is_never_read() {
    let (svc, addr) = serve_master(MasterConfig {
        put_takeover_ms: 50,
        ..MasterConfig::default()
    })
    .await;
    let plain = |segment| StoreConfig {
        // PutStart/PutEnd only, so every value's space comes from the same allocator calls.
        reservation_bytes: 0,
        ..store_config(&addr, segment)
    };
    let storage = Store::setup(plain(4 << 20)).await.unwrap();
    let late = Store::setup(plain(0)).await.unwrap();
    let writer = Store::setup(plain(0)).await.unwrap();
    let reader = Store::setup(plain(0)).await.unwrap();
    let len = 64 << 10;

    // The late writer starts a put and is then held (paused, swapped, throttled).
    let started = svc
        .apply(Command::PutStart {
            client_id: late.client_id(),
            key: "stale".into(),
            size: len as u64,
            config: ReplicateConfig::default(),
        })
        .await
        .unwrap()
        .1;
    let Response::PutStart(Ok(started)) = started else {
        panic!("PutStart answered {started:?}");
    };
    let target = started.replicas[0].memory().unwrap().clone();
    // A value next to the held range, so that the range stays a hole of its own when freed.
    writer
        .put("neighbour", &pattern(98, len), &ReplicateConfig::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(80)).await;

    // Past the takeover age another writer takes the key over (with a larger value, placed
    // elsewhere); the held write's range is freed at once, and the allocator (best fit) hands
    // it to the next value of its size: another key's.
    writer
        .put("stale", &pattern(99, 2 * len), &ReplicateConfig::default())
        .await
        .unwrap();
    let victim = "victim";
    let value = pattern(3, len);
    writer
        .put(victim, &value, &ReplicateConfig::default())
        .await
        .unwrap();
    let d = reader.get_replica_desc(victim).await.unwrap();
    assert_eq!(
        d[0].memory().unwrap().buffer_address,
        target.buffer_address,
        "the held write's range was handed to another key"
    );
    assert_eq!(reader.get(victim).await.unwrap(), value);

    // The held WRITE lands now.
    let stale = pattern(250, len);
    let src = registered(&late, len, &stale);
    let seg = late
        .engine()
        .open_segment(&target.transport_endpoint)
        .await
        .unwrap();
    let results = late
        .engine()
        .transfer(vec![TransferRequest::write(
            &seg,
            target.buffer_address,
            src.addr(),
            len as u64,
        )])
        .await;
    results[0].as_ref().unwrap();

    // The reader never returns the late bytes.
    let e = reader.get(victim).await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::CHECKSUM_MISMATCH, "{e}");
    assert!(late.get(victim).await.is_err());

    for s in [reader, writer, late, storage] {
        s.close().await.unwrap();
    }
    drop(src);
}

/// A put's WRITEs carry a deadline from when it asked for space: a WRITE that would land after
/// it is refused (by the engine before it starts, by a TCP target once it has), the put fails,
/// and nothing is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_whose_writes_would_land_past_their_deadline_fails_and_commits_nothing() {
    let (svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(StoreConfig {
        same_host_shm: false,
        ..store_config(&addr, 8 << 20)
    })
    .await
    .unwrap();
    let hurried = Store::setup(StoreConfig {
        same_host_shm: false,
        reservation_bytes: 0,
        // Gone before the WRITE can start: PutStart alone takes longer.
        put_write_deadline: Duration::from_nanos(1),
        ..store_config(&addr, 0)
    })
    .await
    .unwrap();
    let e = hurried
        .put("k", &pattern(5, 64 << 10), &ReplicateConfig::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), ErrorCode::TRANSFER_FAIL, "{e}");
    assert!(e.to_string().contains("deadline"), "{e}");
    assert_eq!(
        hurried.get("k").await.unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    assert_eq!(svc.metrics().used_bytes, 0, "the write was revoked");
    for s in [hurried, storage] {
        s.close().await.unwrap();
    }
}

/// A dummy client's `get` returns bytes, so the real client checks them whatever its
/// configuration says; its zero-copy `get_into` is checked only when asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dummys_get_never_returns_a_corrupted_value() {
    use mooncake_store::real_client::{DummyClient, RealClient};
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let storage = Store::setup(store_config(&addr, 16 << 20)).await.unwrap();
    let served = Store::setup(StoreConfig {
        verify_zero_copy: false,
        ..store_config(&addr, 0)
    })
    .await
    .unwrap();
    let rc = RealClient::serve(served, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let d = DummyClient::connect(&rc.rpc_address().to_string(), 4 << 20, 1 << 20)
        .await
        .unwrap();
    let value = pattern(11, 64 << 10);
    d.put("k", &value, &ReplicateConfig::default())
        .await
        .unwrap();
    assert_eq!(d.get("k").await.unwrap(), value);
    let replicas = rc.store().get_replica_desc("k").await.unwrap();
    corrupt(&[&storage], &replicas[0], &pattern(12, 64 << 10));
    let e = d.get("k").await.unwrap_err();
    assert_eq!(e.code(), ErrorCode::CHECKSUM_MISMATCH, "{e}");
    let e = d.get_batch(&["k"]).await.pop().unwrap().unwrap_err();
    assert_eq!(e.code(), ErrorCode::CHECKSUM_MISMATCH, "{e}");
    drop(d);
    for s in [rc.store().clone(), storage] {
        s.close().await.unwrap();
    }
}
