//! The 4 KiB latency breakdown: the store's get and put next to the same steps issued by hand
//! through public APIs (master RPCs with `RemoteMaster` + `apply_via`, transfers with B's
//! engine), and the pieces alone (RPC with no command log, raw READ/WRITE, socket ping-pong), in
//! interleaved rounds so background noise hits all alike.
//!
//! Round trips per call: get = GetReplicaList RPC + one READ; put = PutStart RPC + one WRITE +
//! PutEnd RPC. The manual path does exactly those steps with no store code around them, so
//! `store - manual` is what the store adds (staging, copies, bookkeeping, scheduling). The
//! store's repeated gets send the READ with the RPC (read ahead from its location cache), so
//! there the difference is negative: what overlapping the two round trips saves.

use std::time::{Duration, Instant};

use mooncake_core::TransferRequest;
use mooncake_master::{Command, PutItem, Response};
use mooncake_rpc::RpcClientConfig;
use mooncake_rpc::{apply_via, MasterApi, MasterReply, MasterRequest, RemoteMaster};

use crate::client::{err, Ctx};
use crate::stats::percentiles;
use crate::util::{self, fmt_ns};

const SIZE: u64 = 4096;
const ROUNDS: usize = 10;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    Ping,
    RpcMetrics,
    RpcGetReplicaList,
    StoreGet,
    StoreGetInto,
    ManualGet,
    ManualGetRpc,
    ManualGetTe,
    StorePut,
    StorePutFrom,
    ManualPut,
    ManualPutStart,
    ManualPutTe,
    ManualPutEnd,
    TeRead,
    TeWrite,
    StoreGetBatch,
    ManualGetBatch,
    ManualGetBatchRpc,
    ManualGetBatchTe,
    StoreBatchGetInto,
    StorePutBatch,
    ManualPutBatch,
    ManualPutBatchStart,
    ManualPutBatchTe,
    ManualPutBatchEnd,
}

const STEPS: [(Step, &str); 26] = [
    (Step::Ping, "ping-pong 64 B (std socket)"),
    (Step::RpcMetrics, "rpc Metrics (no command log)"),
    (Step::RpcGetReplicaList, "rpc GetReplicaList (back to back)"),
    (Step::StoreGet, "store get"),
    (Step::ManualGet, "  manual get (rpc + READ)"),
    (Step::ManualGetRpc, "    GetReplicaList rpc"),
    (Step::ManualGetTe, "    te READ of the replica"),
    (Step::StoreGetInto, "store get_into"),
    (Step::StorePut, "store put"),
    (Step::ManualPut, "  manual put (rpc+WRITE+rpc)"),
    (Step::ManualPutStart, "    PutStart rpc"),
    (Step::ManualPutTe, "    te WRITE of the replica"),
    (Step::ManualPutEnd, "    PutEnd rpc"),
    (Step::StorePutFrom, "store put_from"),
    (Step::TeRead, "te READ 4 KiB (A's scratch)"),
    (Step::TeWrite, "te WRITE 4 KiB (A's scratch)"),
    (Step::StoreGetBatch, "store get_batch"),
    (Step::ManualGetBatch, "  manual (rpc + 1 transfer call)"),
    (Step::ManualGetBatchRpc, "    BatchGetReplicaList rpc"),
    (Step::ManualGetBatchTe, "    te READ batch (one call)"),
    (Step::StoreBatchGetInto, "store batch_get_into"),
    (Step::StorePutBatch, "store put_batch"),
    (Step::ManualPutBatch, "  manual (rpc + 1 transfer + rpc)"),
    (Step::ManualPutBatchStart, "    BatchPutStart rpc"),
    (Step::ManualPutBatchTe, "    te WRITE batch (one call)"),
    (Step::ManualPutBatchEnd, "    BatchPutEnd rpc"),
];

/// Steps whose calls carry a whole batch.
const BATCH_STEPS: [Step; 10] = [
    Step::StoreGetBatch,
    Step::ManualGetBatch,
    Step::ManualGetBatchRpc,
    Step::ManualGetBatchTe,
    Step::StoreBatchGetInto,
    Step::StorePutBatch,
    Step::ManualPutBatch,
    Step::ManualPutBatchStart,
    Step::ManualPutBatchTe,
    Step::ManualPutBatchEnd,
];

struct Samples(Vec<(Step, Vec<u64>)>);

impl Samples {
    fn push(&mut self, step: Step, d: Duration) {
        self.get(step).push(d.as_nanos() as u64);
    }
    fn get(&mut self, step: Step) -> &mut Vec<u64> {
        let i = self
            .0
            .iter()
            .position(|(s, _)| *s == step)
            .expect("known step");
        &mut self.0[i].1
    }
    fn p50(&mut self, step: Step) -> u64 {
        percentiles(self.get(step)).0
    }
}

/// Runs the breakdown and prints it; returns the ping-pong samples (they join the baseline).
pub(crate) async fn run(ctx: &Ctx) -> Result<Vec<u64>, String> {
    let args = &ctx.args;
    let addr: String = args.master.clone().ok_or("no --master")?;
    let master = RemoteMaster::new(addr, RpcClientConfig::default());
    let echo = args.echo.ok_or("no --echo")?;
    let slice = Duration::from_secs_f64(args.profile_seconds / ROUNDS as f64);
    let batch = args.batch;
    let mut s = Samples(STEPS.iter().map(|(k, _)| (*k, Vec::new())).collect());
    // Working set for the gets.
    let keys: Vec<String> = (0..batch).map(|_| ctx.key(SIZE, "prof_g")).collect();
    for (j, k) in keys.iter().enumerate() {
        ctx.store
            .put(k, ctx.src_slot(SIZE, j), &ctx.rc)
            .await
            .map_err(|e| err(format!("put {k:?}"), e))?;
    }
    let mut live: Vec<String> = Vec::new();
    let client_id = ctx.store.client_id();
    let mut checked = false;
    for _ in 0..ROUNDS {
        s.get(Step::Ping).extend(util::ping(echo, slice)?);

        let end = Instant::now() + slice;
        while Instant::now() < end {
            let t = Instant::now();
            let r = master.call(MasterRequest::Metrics).await;
            s.push(Step::RpcMetrics, t.elapsed());
            match r {
                Ok(MasterReply::Metrics(_)) => {}
                other => return Err(format!("Metrics answered {other:?}")),
            }
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        while Instant::now() < end {
            let t = Instant::now();
            let r = apply_via(
                &master,
                Command::GetReplicaList {
                    key: keys[i % batch].clone(),
                },
            )
            .await;
            s.push(Step::RpcGetReplicaList, t.elapsed());
            match r {
                Ok((_, Response::Replicas(Ok(_)))) => {}
                other => return Err(format!("GetReplicaList answered {other:?}")),
            }
            i += 1;
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        while Instant::now() < end {
            let k = &keys[i % batch];
            let t = Instant::now();
            let r = ctx.store.get(k).await;
            s.push(Step::StoreGet, t.elapsed());
            let v = r.map_err(|e| err(format!("get {k:?}"), e))?;
            ctx.check("profile get", &v, SIZE, i % batch)?;
            i += 1;
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        while Instant::now() < end {
            let j = i % batch;
            let t0 = Instant::now();
            let (_, resp) = apply_via(
                &master,
                Command::GetReplicaList {
                    key: keys[j].clone(),
                },
            )
            .await
            .map_err(|e| err("GetReplicaList", e))?;
            let t1 = Instant::now();
            let list = match resp {
                Response::Replicas(Ok(l)) => l,
                other => return Err(format!("GetReplicaList answered {other:?}")),
            };
            let mem = list
                .replicas
                .first()
                .and_then(|r| r.memory())
                .ok_or("no memory replica")?;
            let ep = if mem.transport_endpoint.is_empty() {
                &mem.segment_name
            } else {
                &mem.transport_endpoint
            };
            let seg = ctx
                .store
                .engine()
                .open_segment(ep)
                .await
                .map_err(|e| err("open_segment", e))?;
            ctx.te(vec![TransferRequest::read(
                &seg,
                mem.buffer_address,
                ctx.dst_addr(SIZE, j),
                SIZE,
            )])
            .await?;
            let t2 = Instant::now();
            s.push(Step::ManualGetRpc, t1 - t0);
            s.push(Step::ManualGetTe, t2 - t1);
            s.push(Step::ManualGet, t2 - t0);
            if !checked {
                let got = ctx
                    .store
                    .engine()
                    .memory()
                    .resolve(ctx.dst_addr(SIZE, j), SIZE)
                    .map_err(|e| err("reading back", e))?
                    .to_vec();
                ctx.check("manual get", &got, SIZE, j)?;
                checked = true;
            }
            i += 1;
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        while Instant::now() < end {
            let j = i % batch;
            let t = Instant::now();
            let r = ctx
                .store
                .get_into(&keys[j], ctx.dst_addr(SIZE, j), SIZE)
                .await;
            s.push(Step::StoreGetInto, t.elapsed());
            r.map_err(|e| err("get_into", e))?;
            i += 1;
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        while Instant::now() < end {
            let k = ctx.key(SIZE, "prof_put");
            let t = Instant::now();
            let r = ctx
                .store
                .put(&k, ctx.src_slot(SIZE, i % batch), &ctx.rc)
                .await;
            s.push(Step::StorePut, t.elapsed());
            r.map_err(|e| err(format!("put {k:?}"), e))?;
            live.push(k);
            i += 1;
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        let mut put_checked = false;
        while Instant::now() < end {
            let j = i % batch;
            let k = ctx.key(SIZE, "prof_mput");
            let t0 = Instant::now();
            let (_, resp) = apply_via(
                &master,
                Command::PutStart {
                    client_id,
                    key: k.clone(),
                    size: SIZE,
                    config: ctx.rc.clone(),
                },
            )
            .await
            .map_err(|e| err("PutStart", e))?;
            let t1 = Instant::now();
            let started = resp
                .into_put_start()
                .map_err(|c| err(format!("PutStart {k:?}"), c))?;
            let mem = started
                .replicas
                .first()
                .and_then(|r| r.memory())
                .ok_or("no memory replica")?;
            let ep = if mem.transport_endpoint.is_empty() {
                &mem.segment_name
            } else {
                &mem.transport_endpoint
            };
            let seg = ctx
                .store
                .engine()
                .open_segment(ep)
                .await
                .map_err(|e| err("open_segment", e))?;
            ctx.te(vec![TransferRequest::write(
                &seg,
                mem.buffer_address,
                ctx.src_addr(SIZE, j),
                SIZE,
            )])
            .await?;
            let t2 = Instant::now();
            let (_, resp) = apply_via(
                &master,
                Command::PutEnd {
                    client_id,
                    key: k.clone(),
                },
            )
            .await
            .map_err(|e| err("PutEnd", e))?;
            let t3 = Instant::now();
            resp.into_unit()
                .map_err(|c| err(format!("PutEnd {k:?}"), c))?;
            s.push(Step::ManualPutStart, t1 - t0);
            s.push(Step::ManualPutTe, t2 - t1);
            s.push(Step::ManualPutEnd, t3 - t2);
            s.push(Step::ManualPut, t3 - t0);
            if !put_checked {
                let got = ctx
                    .store
                    .get(&k)
                    .await
                    .map_err(|e| err(format!("get {k:?}"), e))?;
                ctx.check("manual put, read back", &got, SIZE, j)?;
                put_checked = true;
            }
            live.push(k);
            i += 1;
        }

        let end = Instant::now() + slice;
        let mut i = 0;
        while Instant::now() < end {
            let k = ctx.key(SIZE, "prof_put_from");
            let t = Instant::now();
            let r = ctx
                .store
                .put_from(&k, ctx.src_addr(SIZE, i % batch), SIZE, &ctx.rc)
                .await;
            s.push(Step::StorePutFrom, t.elapsed());
            r.map_err(|e| err(format!("put_from {k:?}"), e))?;
            live.push(k);
            i += 1;
        }

        for (step, write) in [(Step::TeRead, false), (Step::TeWrite, true)] {
            let end = Instant::now() + slice;
            let mut i = 0;
            while Instant::now() < end {
                let j = i % batch;
                let reqs = ctx.te_requests(write, SIZE, j..j + 1);
                let t = Instant::now();
                let r = ctx.te(reqs).await;
                s.push(step, t.elapsed());
                r?;
                i += 1;
            }
        }

        batch_round(ctx, &master, &keys, slice, &mut s, &mut live).await?;

        remove_all(ctx, &mut live).await?;
    }
    let mut keys = keys;
    remove_all(ctx, &mut keys).await?;
    print(ctx, &mut s);
    Ok(std::mem::take(s.get(Step::Ping)))
}

/// The memory replica's segment (opened) and address.
async fn replica_of(
    ctx: &Ctx,
    r: Option<&mooncake_master::ReplicaDescriptor>,
) -> Result<(mooncake_core::SegmentHandle, u64), String> {
    let mem = r.and_then(|r| r.memory()).ok_or("no memory replica")?;
    let ep = if mem.transport_endpoint.is_empty() {
        &mem.segment_name
    } else {
        &mem.transport_endpoint
    };
    let seg = ctx
        .store
        .engine()
        .open_segment(ep)
        .await
        .map_err(|e| err("open_segment", e))?;
    Ok((seg, mem.buffer_address))
}

/// One round of the batch steps (`batch` objects of 4 KiB per call).
async fn batch_round(
    ctx: &Ctx,
    master: &RemoteMaster,
    keys: &[String],
    slice: Duration,
    s: &mut Samples,
    live: &mut Vec<String>,
) -> Result<(), String> {
    let n = keys.len();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let client_id = ctx.store.client_id();

    let end = Instant::now() + slice;
    while Instant::now() < end {
        let t = Instant::now();
        let r = ctx.store.get_batch(&refs).await;
        s.push(Step::StoreGetBatch, t.elapsed());
        if let Some(e) = r.into_iter().find_map(Result::err) {
            return Err(err("get_batch", e));
        }
    }

    let end = Instant::now() + slice;
    while Instant::now() < end {
        let t0 = Instant::now();
        let (_, resp) = apply_via(
            master,
            Command::BatchGetReplicaList {
                keys: keys.to_vec(),
            },
        )
        .await
        .map_err(|e| err("BatchGetReplicaList", e))?;
        let t1 = Instant::now();
        let lists = match resp {
            Response::ReplicasBatch(l) if l.len() == n => l,
            other => return Err(format!("BatchGetReplicaList answered {other:?}")),
        };
        let mut reqs = Vec::with_capacity(n);
        for (j, l) in lists.into_iter().enumerate() {
            let l = l.map_err(|c| err("BatchGetReplicaList item", c))?;
            let (seg, addr) = replica_of(ctx, l.replicas.first()).await?;
            reqs.push(TransferRequest::read(
                &seg,
                addr,
                ctx.dst_addr(SIZE, j),
                SIZE,
            ));
        }
        ctx.te(reqs).await?;
        let t2 = Instant::now();
        s.push(Step::ManualGetBatchRpc, t1 - t0);
        s.push(Step::ManualGetBatchTe, t2 - t1);
        s.push(Step::ManualGetBatch, t2 - t0);
    }

    let items: Vec<(&str, u64, u64)> = keys
        .iter()
        .enumerate()
        .map(|(j, k)| (k.as_str(), ctx.dst_addr(SIZE, j), SIZE))
        .collect();
    let end = Instant::now() + slice;
    while Instant::now() < end {
        let t = Instant::now();
        let r = ctx.store.batch_get_into(&items).await;
        s.push(Step::StoreBatchGetInto, t.elapsed());
        if let Some(e) = r.into_iter().find_map(Result::err) {
            return Err(err("batch_get_into", e));
        }
    }

    let end = Instant::now() + slice;
    while Instant::now() < end {
        let fresh: Vec<String> = (0..n).map(|_| ctx.key(SIZE, "prof_pb")).collect();
        let items: Vec<(&str, &[u8])> = fresh
            .iter()
            .enumerate()
            .map(|(j, k)| (k.as_str(), ctx.src_slot(SIZE, j)))
            .collect();
        let t = Instant::now();
        let r = ctx.store.put_batch(&items, &ctx.rc).await;
        s.push(Step::StorePutBatch, t.elapsed());
        if let Some(e) = r.into_iter().find_map(Result::err) {
            return Err(err("put_batch", e));
        }
        live.extend(fresh);
    }

    let end = Instant::now() + slice;
    while Instant::now() < end {
        let fresh: Vec<String> = (0..n).map(|_| ctx.key(SIZE, "prof_mpb")).collect();
        let t0 = Instant::now();
        let (_, resp) = apply_via(
            master,
            Command::BatchPutStart {
                client_id,
                items: fresh
                    .iter()
                    .map(|k| PutItem {
                        key: k.clone(),
                        size: SIZE,
                    })
                    .collect(),
                config: ctx.rc.clone(),
            },
        )
        .await
        .map_err(|e| err("BatchPutStart", e))?;
        let t1 = Instant::now();
        let started = match resp {
            Response::PutStartBatch(v) if v.len() == n => v,
            other => return Err(format!("BatchPutStart answered {other:?}")),
        };
        let mut reqs = Vec::with_capacity(n);
        for (j, st) in started.into_iter().enumerate() {
            let st = st.map_err(|c| err("BatchPutStart item", c))?;
            let (seg, addr) = replica_of(ctx, st.replicas.first()).await?;
            reqs.push(TransferRequest::write(
                &seg,
                addr,
                ctx.src_addr(SIZE, j),
                SIZE,
            ));
        }
        ctx.te(reqs).await?;
        let t2 = Instant::now();
        let (_, resp) = apply_via(
            master,
            Command::BatchPutEnd {
                client_id,
                keys: fresh.clone(),
            },
        )
        .await
        .map_err(|e| err("BatchPutEnd", e))?;
        let t3 = Instant::now();
        match resp {
            Response::UnitBatch(v) if v.len() == n && v.iter().all(Result::is_ok) => {}
            other => return Err(format!("BatchPutEnd answered {other:?}")),
        }
        s.push(Step::ManualPutBatchStart, t1 - t0);
        s.push(Step::ManualPutBatchTe, t2 - t1);
        s.push(Step::ManualPutBatchEnd, t3 - t2);
        s.push(Step::ManualPutBatch, t3 - t0);
        live.extend(fresh);
    }
    Ok(())
}

async fn remove_all(ctx: &Ctx, live: &mut Vec<String>) -> Result<(), String> {
    for chunk in live.chunks(16_384) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        let rs = ctx
            .store
            .batch_remove(&refs, true)
            .await
            .map_err(|e| err("batch_remove", e))?;
        if let Some(e) = rs.into_iter().find_map(Result::err) {
            return Err(err("removing profile keys", e));
        }
    }
    live.clear();
    Ok(())
}

fn print(ctx: &Ctx, s: &mut Samples) {
    println!();
    println!(
        "== 4 KiB latency breakdown ({ROUNDS} interleaved rounds, {:.2} s per step per round) ==",
        ctx.args.profile_seconds / ROUNDS as f64
    );
    println!("{:<34} {:>9} {:>9} {:>8}", "step", "p50", "p99", "n");
    let batch = ctx.args.batch;
    for (step, name) in STEPS {
        if step == Step::StoreGetBatch {
            println!("-- batches of {batch} x 4 KiB (p50 per call; objects/s at p50) --");
        }
        let v = s.get(step);
        let n = v.len();
        let (p50, p99) = percentiles(v);
        let rate = if BATCH_STEPS.contains(&step) {
            format!(
                "{:>10}/s",
                util::fmt_rate(batch as f64 / (p50.max(1) as f64 / 1e9))
            )
        } else {
            String::new()
        };
        println!(
            "{name:<34} {:>9} {:>9} {n:>8}{rate}",
            fmt_ns(p50),
            fmt_ns(p99)
        );
    }
    if !ctx.args.server_apply.is_empty() {
        println!("-- master cost in A, in-process (no socket), same commands --");
    }
    for (name, p50, p99) in &ctx.args.server_apply {
        println!(
            "{:<34} {:>9} {:>9}",
            format!("A in-process {name}"),
            fmt_ns(*p50),
            fmt_ns(*p99)
        );
    }
    let ping = s.p50(Step::Ping).max(1) as f64;
    let in_ping = |v: u64| v as f64 / ping;
    let (get, mget, rpc, te_r) = (
        s.p50(Step::StoreGet),
        s.p50(Step::ManualGet),
        s.p50(Step::ManualGetRpc),
        s.p50(Step::ManualGetTe),
    );
    let (put, mput, ps, te_w, pe) = (
        s.p50(Step::StorePut),
        s.p50(Step::ManualPut),
        s.p50(Step::ManualPutStart),
        s.p50(Step::ManualPutTe),
        s.p50(Step::ManualPutEnd),
    );
    let metrics = s.p50(Step::RpcMetrics);
    let grl = s.p50(Step::RpcGetReplicaList);
    println!(
        "get: 2 round trips (1 rpc + 1 READ; the store overlaps them on repeated keys). store {} = \
         {:.2} pings; manual {} = rpc {} + READ {}; store adds {}",
        fmt_ns(get),
        in_ping(get),
        fmt_ns(mget),
        fmt_ns(rpc),
        fmt_ns(te_r),
        signed_ns(get as i64 - mget as i64),
    );
    println!(
        "put: 3 round trips (2 rpc + 1 WRITE). store {} = {:.2} pings; manual {} = PutStart {} + \
         WRITE {} + PutEnd {}; store adds {}",
        fmt_ns(put),
        in_ping(put),
        fmt_ns(mput),
        fmt_ns(ps),
        fmt_ns(te_w),
        fmt_ns(pe),
        signed_ns(put as i64 - mput as i64),
    );
    println!(
        "back to back: rpc Metrics {:.2} pings, rpc GetReplicaList {:.2} pings, te READ {:.2} \
         pings, te WRITE {:.2} pings; inside a get the rpc costs {} more than back to back",
        in_ping(metrics),
        in_ping(grl),
        in_ping(s.p50(Step::TeRead)),
        in_ping(s.p50(Step::TeWrite)),
        signed_ns(rpc as i64 - grl as i64),
    );
}

fn signed_ns(v: i64) -> String {
    if v < 0 {
        format!("-{}", fmt_ns(v.unsigned_abs()))
    } else {
        fmt_ns(v as u64)
    }
}
