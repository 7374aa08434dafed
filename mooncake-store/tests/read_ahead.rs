//! Reads sent ahead of the master's answer (the location cache): a repeated get overlaps its
//! transfer with GetReplicaList, and must still never return bytes the answer does not vouch
//! for. A master front holds one GetReplicaList back until the read sent ahead has landed, then
//! changes the object (remove, put again in the same place; upsert; remove) before the master
//! answers: the worst timing for a read that went out early.

use mooncake_testkit as common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use mooncake_core::{AlignedBuffer, ErrorCode, Result};
use mooncake_master::{Command, MasterConfig};
use mooncake_master_service::{MasterService, ServiceConfig};
use mooncake_rpc::RpcClientConfig;
use mooncake_rpc::{MasterApi, MasterReply, MasterRequest};
use mooncake_store::{ReadAheadStats, ReplicateConfig, Store, StoreConfig};

use common::serve_master;

type Hook = BoxFuture<'static, ()>;

const LEASE: Duration = Duration::from_millis(1000);
const HOLD_BACK: Duration = Duration::from_millis(200);

/// Forwards calls to the master; when armed, the next GetReplicaList waits (the read sent ahead
/// lands meanwhile) and runs the hook before it reaches the master.
#[derive(Debug)]
struct HeldBack {
    master: Arc<MasterService>,
    hook: Mutex<Option<HookSlot>>,
    session: AtomicU64,
}

struct HookSlot(Hook);

impl std::fmt::Debug for HookSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HookSlot")
    }
}

impl HeldBack {
    fn arm(&self, hook: Hook) {
        *self.hook.lock().unwrap() = Some(HookSlot(hook));
    }
}

#[async_trait::async_trait]
impl MasterApi for HeldBack {
    fn session(&self) -> u64 {
        self.session.load(Ordering::SeqCst)
    }

    async fn call(&self, request: MasterRequest) -> Result<MasterReply> {
        if matches!(
            request,
            MasterRequest::Apply(
                Command::GetReplicaList { .. } | Command::BatchGetReplicaList { .. }
            )
        ) {
            let hook = self.hook.lock().unwrap().take();
            if let Some(HookSlot(hook)) = hook {
                tokio::time::sleep(HOLD_BACK).await;
                hook.await;
            }
        }
        self.master.call(request).await
    }
}

fn config(master: &str, segment: u64) -> StoreConfig {
    StoreConfig {
        local_hostname: "127.0.0.1".into(),
        master_server_addr: master.into(),
        global_segment_size: segment,
        local_buffer_size: 16 << 20,
        rpc: RpcClientConfig {
            call_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        },
        heartbeat_interval: Duration::from_millis(100),
        ..StoreConfig::default()
    }
}

fn value(seed: u8) -> Vec<u8> {
    (0..64 * 1024u32)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Compares a read with `value(seed)`, naming the value it holds instead of printing it.
#[track_caller]
fn assert_value(got: &[u8], seed: u8) {
    if got != value(seed) {
        let held = (0..=255u8).find(|s| got == value(*s));
        panic!(
            "read {} bytes holding value {held:?}, expected value {seed}",
            got.len()
        );
    }
}

async fn address_of(store: &Store, key: &str) -> u64 {
    store.get_replica_desc(key).await.unwrap()[0]
        .memory()
        .unwrap()
        .buffer_address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_sent_ahead_is_used_only_when_the_master_confirms_it() {
    // Short leases, so that the hook may remove what the reader read before; still longer than
    // the hold-back, which the reader counts against the lease of the held-back answer.
    let master_config = MasterConfig {
        default_kv_lease_ttl_ms: LEASE.as_millis() as u64,
        ..MasterConfig::default()
    };
    let (svc, addr) = serve_master(master_config).await;
    let writer = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let front = Arc::new(HeldBack {
        master: svc.clone(),
        hook: Mutex::new(None),
        session: AtomicU64::new(1),
    });
    let reader = Store::setup_with_master(config(&addr, 0), front.clone())
        .await
        .unwrap();
    let rc = ReplicateConfig::default();
    let stats = |confirmed, discarded| ReadAheadStats {
        confirmed,
        discarded,
    };

    writer.put("k", &value(1), &rc).await.unwrap();
    assert_value(&reader.get("k").await.unwrap(), 1);
    assert_eq!(
        reader.read_ahead_stats(),
        stats(0, 0),
        "a first read has no guess"
    );
    assert_value(&reader.get("k").await.unwrap(), 1);
    assert_eq!(
        reader.read_ahead_stats(),
        stats(1, 0),
        "a second read goes ahead"
    );

    // Removed and put again, in the same place, while the read sent ahead was in flight.
    let first_place = address_of(&writer, "k").await;
    tokio::time::sleep(LEASE).await;
    let w = writer.clone();
    let rc2 = rc.clone();
    front.arm(Box::pin(async move {
        w.remove("k", false).await.unwrap();
        w.put("k", &value(2), &rc2).await.unwrap();
    }));
    assert_value(&reader.get("k").await.unwrap(), 2);
    assert_eq!(reader.read_ahead_stats(), stats(1, 1));
    assert_eq!(
        address_of(&writer, "k").await,
        first_place,
        "the new value reuses the old range, so the early read saw the old bytes there"
    );

    // Upserted during the read (new replicas; the old ones stay readable meanwhile), zero-copy.
    let dst = AlignedBuffer::new(64 * 1024).unwrap();
    // SAFETY: dst outlives its registration (unregistered below).
    unsafe {
        reader
            .register_buffer(dst.addr(), dst.len() as u64)
            .unwrap()
    };
    let read_into = || async {
        let n = reader.get_into("k", dst.addr(), dst.len() as u64).await?;
        // SAFETY: dst is registered and no transfer into it is running.
        Ok::<_, mooncake_core::Error>(
            unsafe { std::slice::from_raw_parts(dst.addr() as *const u8, n as usize) }.to_vec(),
        )
    };
    assert_value(&read_into().await.unwrap(), 2);
    assert_eq!(reader.read_ahead_stats(), stats(2, 1));
    let w = writer.clone();
    let rc2 = rc.clone();
    front.arm(Box::pin(async move {
        w.upsert("k", &value(3), &rc2).await.unwrap();
    }));
    assert_value(&read_into().await.unwrap(), 3);
    assert_eq!(reader.read_ahead_stats(), stats(2, 2));

    // Another master session (a reconnect, another member of a group): the guess is not used,
    // even where the answer names the same replica.
    front.session.fetch_add(1, Ordering::SeqCst);
    assert_value(&reader.get("k").await.unwrap(), 3);
    assert_eq!(
        reader.read_ahead_stats(),
        stats(2, 2),
        "no guess of this session"
    );
    assert_value(&reader.get("k").await.unwrap(), 3);
    assert_eq!(reader.read_ahead_stats(), stats(3, 2));

    // Batches: one key changed under the read, one unchanged, one unknown.
    writer.put("other", &value(4), &rc).await.unwrap();
    let _ = reader.get_batch(&["k", "other"]).await;
    let before = reader.read_ahead_stats();
    tokio::time::sleep(LEASE).await;
    let w = writer.clone();
    let rc2 = rc.clone();
    front.arm(Box::pin(async move {
        w.remove("k", false).await.unwrap();
        w.put("k", &value(5), &rc2).await.unwrap();
    }));
    let got = reader.get_batch(&["k", "other", "missing"]).await;
    assert_value(got[0].as_ref().unwrap(), 5);
    assert_value(got[1].as_ref().unwrap(), 4);
    assert_eq!(
        got[2].as_ref().unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    let s = reader.read_ahead_stats();
    assert_eq!(
        (
            s.confirmed - before.confirmed,
            s.discarded - before.discarded
        ),
        (1, 1),
        "\"other\" confirmed, \"k\" discarded"
    );

    // Removed during the read: not found, whatever the early read saw.
    assert_value(&reader.get("k").await.unwrap(), 5);
    tokio::time::sleep(LEASE).await;
    let s = reader.read_ahead_stats();
    let w = writer.clone();
    front.arm(Box::pin(async move {
        w.remove("k", false).await.unwrap();
    }));
    assert_eq!(
        reader.get("k").await.unwrap_err().code(),
        ErrorCode::OBJECT_NOT_FOUND
    );
    let s2 = reader.read_ahead_stats();
    assert_eq!(s2.discarded, s.discarded + 1);

    reader.unregister_buffer(dst.addr()).unwrap();
    reader.close().await.unwrap();
    writer.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_ahead_over_rpc_and_not_when_turned_off() {
    let (svc, addr) = serve_master(MasterConfig::default()).await;
    let writer = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let reader = Store::setup(config(&addr, 0)).await.unwrap();
    let off = Store::setup(StoreConfig {
        location_cache_entries: 0,
        ..config(&addr, 0)
    })
    .await
    .unwrap();
    let rc = ReplicateConfig::default();
    for i in 0..8u8 {
        writer.put(&format!("k{i}"), &value(i), &rc).await.unwrap();
    }
    for _ in 0..3 {
        for i in 0..8u8 {
            assert_value(&reader.get(&format!("k{i}")).await.unwrap(), i);
            assert_value(&off.get(&format!("k{i}")).await.unwrap(), i);
        }
    }
    assert_eq!(reader.read_ahead_stats().confirmed, 16);
    assert_eq!(off.read_ahead_stats(), ReadAheadStats::default());

    // The writer's own segment holds the values: its reads are local copies, never sent ahead.
    for i in 0..8u8 {
        assert_value(&writer.get(&format!("k{i}")).await.unwrap(), i);
        assert_value(&writer.get(&format!("k{i}")).await.unwrap(), i);
    }
    assert_eq!(writer.read_ahead_stats(), ReadAheadStats::default());

    // A master restart ends the session: a fresh master on the same port, the writer remounts
    // and puts again; the reader's guesses from before are not used.
    svc.shutdown();
    drop(svc);
    let svc2 = MasterService::new(MasterConfig::default(), ServiceConfig::default()).unwrap();
    // The old server's listener closes once its aborted task is dropped.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = svc2.serve_rpc(addr.parse().unwrap()).await {
        assert!(
            std::time::Instant::now() < deadline,
            "rebinding {addr}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match writer.put("k0", &value(9), &rc).await {
            Ok(()) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::debug!("waiting for the remount: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no remount: {e}"),
        }
    }
    let before = reader.read_ahead_stats();
    assert_value(&reader.get("k0").await.unwrap(), 9);
    assert_eq!(
        reader.read_ahead_stats(),
        before,
        "the old session's guess is not used"
    );
    assert_value(&reader.get("k0").await.unwrap(), 9);
    assert_eq!(reader.read_ahead_stats().confirmed, before.confirmed + 1);

    off.close().await.unwrap();
    reader.close().await.unwrap();
    writer.close().await.unwrap();
    svc2.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guess_on_a_departed_peer_costs_one_failed_read() {
    let (_svc, addr) = serve_master(MasterConfig::default()).await;
    let a = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let b = Store::setup(config(&addr, 32 << 20)).await.unwrap();
    let reader = Store::setup(config(&addr, 0)).await.unwrap();
    let rc = ReplicateConfig {
        replica_num: 2,
        ..ReplicateConfig::default()
    };
    let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
    for (i, k) in keys.iter().enumerate() {
        a.put(k, &value(i as u8), &rc).await.unwrap();
    }
    // Warm: every key is read through a replica, some of them in b's segment.
    for (i, k) in keys.iter().enumerate() {
        assert_value(&reader.get(k).await.unwrap(), i as u8);
    }
    let on_b = {
        let mut n = 0;
        for k in &keys {
            let first = reader.get_replica_desc(k).await.unwrap();
            let name = &first[0].memory().unwrap().segment_name;
            n += usize::from(*name == b.hostname());
        }
        n
    };
    assert!(on_b > 1, "{on_b} keys read from b; the test needs several");
    let before = reader.read_ahead_stats();
    // b leaves (its segment is unmounted, its transfer engine stops); a holds every object.
    b.close().await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert_value(&reader.get(k).await.unwrap(), i as u8);
    }
    let after = reader.read_ahead_stats();
    assert_eq!(
        after.discarded - before.discarded,
        1,
        "one failed read from b; the other guesses on b were dropped with it"
    );
    assert_eq!(
        after.confirmed - before.confirmed,
        (keys.len() - on_b) as u64,
        "the guesses on a still hold"
    );
    reader.close().await.unwrap();
    a.close().await.unwrap();
}
