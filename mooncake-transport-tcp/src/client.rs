//! Initiator side: pooled connections ("lanes") to each peer, pipelined requests, completions.
//!
//! Performance-critical: every request passes through `Lane::send` and `read_loop`.
//!
//! A lane is one TCP connection with a send half guarded by an async mutex and a reader task.
//! Requests are queued as pending *before* their header is written, and the target answers in
//! order, so the reader matches each response to the front of the queue. READ payloads are
//! received straight into the op's registered memory; large WRITE payloads are sent straight
//! from it.
//!
//! Every op is completed exactly once, by whoever holds it, after its last memory access: the
//! reader when the response arrives, the lane's killer for ops still queued, or the drop guard of
//! [`Completion`] when a holder goes away (an aborted reader, a cancelled send).

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use mooncake_core::{BatchState, Error, ErrorCode, MemRegion, Result};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::auth::Auth;
use crate::frame::{self, Op, Request};
use crate::sys::{self, ReadBuf};
use crate::TcpConfig;

/// Tracks one `transfer` call: how many ops are outstanding, and why they fail if abandoned.
pub(crate) struct Call {
    remaining: AtomicUsize,
    notify: Notify,
    failure: OnceLock<Error>,
}

impl Call {
    pub(crate) fn new(ops: usize) -> Arc<Self> {
        Arc::new(Call {
            remaining: AtomicUsize::new(ops),
            notify: Notify::new(),
            failure: OnceLock::new(),
        })
    }

    fn done_one(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.notify.notify_waiters();
        }
    }

    pub(crate) async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.remaining.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// The error given to ops of this call that are abandoned from now on.
    pub(crate) fn fail_abandoned_with(&self, e: Error) {
        let _ = self.failure.set(e);
    }
}

/// A large op split over several lanes: completes when every part has.
pub(crate) struct Split {
    remaining: AtomicUsize,
    error: Mutex<Option<Error>>,
    batch: Arc<BatchState>,
    index: usize,
}

impl Split {
    pub(crate) fn new(parts: usize, batch: Arc<BatchState>, index: usize) -> Arc<Self> {
        Arc::new(Split {
            remaining: AtomicUsize::new(parts),
            error: Mutex::new(None),
            batch,
            index,
        })
    }
}

pub(crate) enum Kind {
    Op {
        batch: Arc<BatchState>,
        index: usize,
    },
    Part(Arc<Split>),
    Describe(oneshot::Sender<Result<Vec<u8>>>),
}

/// Completes one op (or part, or handshake) exactly once; completes it with an error on drop.
pub(crate) struct Completion {
    kind: Option<Kind>,
    call: Arc<Call>,
}

impl Completion {
    pub(crate) fn new(kind: Kind, call: &Arc<Call>) -> Self {
        Completion {
            kind: Some(kind),
            call: call.clone(),
        }
    }

    pub(crate) fn finish(mut self, result: Result<Vec<u8>>) {
        self.finish_inner(result);
    }

    fn finish_inner(&mut self, result: Result<Vec<u8>>) {
        let Some(kind) = self.kind.take() else { return };
        match kind {
            Kind::Op { batch, index } => {
                batch.complete(index, result.map(|_| ()));
                self.call.done_one();
            }
            Kind::Part(split) => {
                if let Err(e) = result {
                    split.error.lock().expect("split error").get_or_insert(e);
                }
                if split.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    let r = match split.error.lock().expect("split error").take() {
                        Some(e) => Err(e),
                        None => Ok(()),
                    };
                    split.batch.complete(split.index, r);
                    self.call.done_one();
                }
            }
            Kind::Describe(tx) => {
                let _ = tx.send(result);
                self.call.done_one();
            }
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        if self.kind.is_some() {
            let e = self
                .call
                .failure
                .get()
                .cloned()
                .unwrap_or_else(|| Error::PeerUnreachable {
                    peer: String::new(),
                    reason: "connection closed before the request completed".into(),
                });
            self.finish_inner(Err(e));
        }
    }
}

/// One request to put on a lane.
pub(crate) struct Outgoing {
    pub(crate) op: Op,
    pub(crate) addr: u64,
    /// Local memory: destination of a READ, source of a WRITE; `None` for DESCRIBE.
    pub(crate) local: Option<MemRegion>,
    pub(crate) completion: Completion,
    /// WRITE only: ask for a landing notice.
    pub(crate) notify: bool,
    /// WRITE only: no byte may land after this (sent as the time left; see the frame docs).
    pub(crate) deadline: Option<std::time::Instant>,
}

struct Pending {
    id: u32,
    op: Op,
    addr: u64,
    local: Option<MemRegion>,
    completion: Completion,
}

struct Queue {
    pending: VecDeque<Pending>,
    closed: Option<Error>,
}

struct SendState {
    buf: Vec<u8>,
    next_id: u32,
}

/// One pooled connection to a peer.
pub(crate) struct Lane {
    peer: String,
    stream: Arc<TcpStream>,
    send: tokio::sync::Mutex<SendState>,
    queue: Mutex<Queue>,
    reader: Mutex<Option<JoinHandle<()>>>,
    dead: AtomicBool,
    inline_payload: usize,
    /// This node's certificate when the lane authenticated (for the refusal's message).
    authenticated_as: Option<String>,
}

impl Lane {
    /// Connects to `peer`, authenticating both ends first when `auth` is given, all within the
    /// connect timeout.
    pub(crate) async fn connect(
        peer: &str,
        config: &TcpConfig,
        auth: Option<&Auth>,
    ) -> Result<Arc<Lane>> {
        let unreachable = |reason: String| Error::PeerUnreachable {
            peer: peer.to_owned(),
            reason,
        };
        let open = async {
            let stream = TcpStream::connect(peer)
                .await
                .map_err(|e| unreachable(format!("connect: {e}")))?;
            stream
                .set_nodelay(true)
                .map_err(|e| unreachable(format!("setting TCP_NODELAY: {e}")))?;
            match auth {
                Some(auth) => auth.connect(stream, peer).await,
                None => Ok(stream),
            }
        };
        let stream = tokio::time::timeout(config.connect_timeout, open)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "connect{} timed out after {:?}",
                    if auth.is_some() {
                        " and authentication"
                    } else {
                        ""
                    },
                    config.connect_timeout
                ))
            })??;
        let stream = Arc::new(stream);
        sys::send_all(&stream, &frame::encode_preamble())
            .await
            .map_err(|e| unreachable(format!("sending preamble: {e}")))?;
        let lane = Arc::new(Lane {
            peer: peer.to_owned(),
            stream,
            send: tokio::sync::Mutex::new(SendState {
                buf: Vec::with_capacity(256 * 1024),
                next_id: 0,
            }),
            queue: Mutex::new(Queue {
                pending: VecDeque::new(),
                closed: None,
            }),
            reader: Mutex::new(None),
            dead: AtomicBool::new(false),
            inline_payload: config.inline_payload,
            authenticated_as: auth.map(|a| a.own().to_owned()),
        });
        let handle = tokio::spawn(read_loop(lane.clone()));
        *lane.reader.lock().expect("reader slot") = Some(handle);
        Ok(lane)
    }

    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The error of a connection the target refused ([`frame::encode_refusal`]).
    fn refused(&self) -> Error {
        Error::PermissionDenied(match &self.authenticated_as {
            None => format!(
                "transfer target {} requires a certificate of its cluster CA and refused this \
                 unauthenticated connection (configure TcpConfig::auth; a store node reads it \
                 from MC_TLS_CA, MC_TLS_CERT and MC_TLS_KEY)",
                self.peer
            ),
            Some(own) => format!(
                "transfer target {} refused this node's certificate ({own}): its roles are not \
                 admitted there, or it was revoked",
                self.peer
            ),
        })
    }

    fn peer_error(&self, what: &str, e: std::io::Error) -> Error {
        Error::PeerUnreachable {
            peer: self.peer.clone(),
            reason: format!("{what}: {e}"),
        }
    }

    /// Queues and sends `items` in order. Failures complete the affected ops.
    pub(crate) async fn send(&self, items: Vec<Outgoing>) {
        let mut s = self.send.lock().await;
        let mut items = items.into_iter();
        while let Some(item) = items.next() {
            // The time left, read as late as possible: just before the header goes out.
            let deadline_ms = match item.deadline.filter(|_| item.op == Op::Write) {
                None => None,
                Some(d) => {
                    let left = d.saturating_duration_since(std::time::Instant::now());
                    // Whole ms, rounded down (a fraction of one counts as none left); a longer
                    // budget than the field holds is cut to the most it holds, which is safe.
                    match u16::try_from(left.as_millis()).unwrap_or(u16::MAX) {
                        0 => {
                            let len = item.local.as_ref().map_or(0, MemRegion::len);
                            item.completion
                                .finish(Err(mooncake_core::past_deadline(len)));
                            continue;
                        }
                        ms => Some(ms),
                    }
                }
            };
            let id = s.next_id;
            s.next_id = s.next_id.wrapping_add(1);
            let len = item.local.as_ref().map_or(0, MemRegion::len);
            let payload = match item.op {
                Op::Write => item.local.clone(),
                _ => None,
            };
            {
                let mut q = self.queue.lock().expect("lane queue");
                if let Some(e) = &q.closed {
                    let e = e.clone();
                    drop(q);
                    item.completion.finish(Err(e.clone()));
                    for rest in items {
                        rest.completion.finish(Err(e.clone()));
                    }
                    return;
                }
                q.pending.push_back(Pending {
                    id,
                    op: item.op,
                    addr: item.addr,
                    local: item.local,
                    completion: item.completion,
                });
            }
            frame::encode_request(
                &Request {
                    op: item.op,
                    id,
                    addr: item.addr,
                    len,
                    notify: item.notify,
                    deadline_ms,
                },
                &mut s.buf,
            );
            let mut result = Ok(());
            if let Some(region) = payload {
                if region.len() <= self.inline_payload as u64 {
                    let at = s.buf.len();
                    s.buf.resize(at + region.len() as usize, 0);
                    region.read_into(&mut s.buf[at..]).expect("lengths match");
                } else {
                    result = sys::send_all(&self.stream, &s.buf).await;
                    s.buf.clear();
                    if result.is_ok() {
                        // SAFETY: `region` is a validated range of a registered buffer, kept
                        // registered while `region` lives.
                        result = unsafe {
                            sys::send_raw(
                                &self.stream,
                                region.as_ptr() as usize,
                                region.len() as usize,
                            )
                            .await
                        };
                    }
                }
            }
            if result.is_ok() && s.buf.len() >= 256 * 1024 {
                result = sys::send_all(&self.stream, &s.buf).await;
                s.buf.clear();
            }
            if let Err(e) = result {
                s.buf.clear();
                self.kill(self.peer_error("send", e));
                return;
            }
        }
        if !s.buf.is_empty() {
            let r = sys::send_all(&self.stream, &s.buf).await;
            s.buf.clear();
            if let Err(e) = r {
                self.kill(self.peer_error("send", e));
            }
        }
    }

    /// Closes the lane: fails queued ops with `reason`, shuts the socket down so blocked sends
    /// and receives return, and stops the reader (whose current op completes when dropped).
    pub(crate) fn kill(&self, reason: Error) {
        self.dead.store(true, Ordering::Release);
        let drained = {
            let mut q = self.queue.lock().expect("lane queue");
            if q.closed.is_none() {
                q.closed = Some(reason.clone());
            }
            std::mem::take(&mut q.pending)
        };
        // SAFETY: plain shutdown(2) on a socket we own; the fd stays open until the stream drops.
        unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(h) = self.reader.lock().expect("reader slot").take() {
            h.abort();
        }
        for p in drained {
            p.completion.finish(Err(reason.clone()));
        }
    }
}

fn status_error(p: &Pending, status: i32) -> Error {
    let len = p.local.as_ref().map_or(0, MemRegion::len);
    match ErrorCode::from_i32(status) {
        Some(ErrorCode::INVALID_PARAMS) if p.op != Op::Describe => {
            Error::RemoteRangeInvalid { addr: p.addr, len }
        }
        Some(code) => Error::with_code(code, format!("target refused {:?} of {len} bytes", p.op)),
        None => Error::Protocol(format!("unknown status {status}")),
    }
}

async fn read_loop(lane: Arc<Lane>) {
    let reason = read_responses(&lane).await;
    if !lane.is_dead() {
        tracing::debug!(peer = %lane.peer, %reason, "lane closed");
    }
    lane.kill(reason);
}

/// Reads responses until the connection fails; returns why.
async fn read_responses(lane: &Lane) -> Error {
    let stream = &*lane.stream;
    let mut input = ReadBuf::new(256 * 1024);
    loop {
        if let Err(e) = input.fill_to(stream, frame::RESPONSE_LEN).await {
            return lane.peer_error("receive", e);
        }
        let resp = match frame::decode_response(input.data()) {
            Ok(Some(r)) => r,
            Ok(None) => unreachable!("a full header is buffered"),
            Err(e) => return Error::Protocol(format!("from {}: {e}", lane.peer)),
        };
        input.consume(frame::RESPONSE_LEN);
        if frame::is_refusal(&resp) {
            let e = lane.refused();
            tracing::warn!(peer = %lane.peer, "{e}");
            return e;
        }
        let Some(p) = lane.queue.lock().expect("lane queue").pending.pop_front() else {
            return Error::Protocol(format!("{} answered a request never sent", lane.peer));
        };
        if resp.id != p.id {
            let e = Error::Protocol(format!(
                "{} answered request {} when {} was next",
                lane.peer, resp.id, p.id
            ));
            p.completion.finish(Err(e.clone()));
            return e;
        }
        if resp.status != 0 {
            let e = status_error(&p, resp.status);
            p.completion.finish(Err(e));
            continue;
        }
        match p.op {
            Op::Read => {
                let region = p.local.as_ref().expect("READ has local memory");
                if resp.len != region.len() {
                    let e = Error::Protocol(format!(
                        "{} sent {} bytes for a READ of {}",
                        lane.peer,
                        resp.len,
                        region.len()
                    ));
                    p.completion.finish(Err(e.clone()));
                    return e;
                }
                // SAFETY: `region` is a validated range of a registered buffer, kept registered
                // while `p` lives; nothing else writes it for this op.
                let r = unsafe {
                    input
                        .read_payload_into(stream, region.as_ptr() as usize, region.len() as usize)
                        .await
                };
                if let Err(e) = r {
                    let e = lane.peer_error("receiving READ payload", e);
                    p.completion.finish(Err(e.clone()));
                    return e;
                }
                p.completion.finish(Ok(Vec::new()));
            }
            Op::Write => {
                if resp.len != 0 {
                    let e = Error::Protocol(format!("{} sent a payload for a WRITE", lane.peer));
                    p.completion.finish(Err(e.clone()));
                    return e;
                }
                p.completion.finish(Ok(Vec::new()));
            }
            Op::Describe => {
                if resp.len > frame::MAX_DESCRIPTOR_LEN {
                    let e = Error::Protocol(format!(
                        "{} sent a {}-byte descriptor",
                        lane.peer, resp.len
                    ));
                    p.completion.finish(Err(e.clone()));
                    return e;
                }
                let mut bytes = vec![0u8; resp.len as usize];
                // SAFETY: `bytes` is our own vector of exactly that length.
                let r = unsafe {
                    input
                        .read_payload_into(stream, bytes.as_mut_ptr() as usize, bytes.len())
                        .await
                };
                if let Err(e) = r {
                    let e = lane.peer_error("receiving descriptor", e);
                    p.completion.finish(Err(e.clone()));
                    return e;
                }
                p.completion.finish(Ok(bytes));
            }
        }
    }
}

/// The lanes to one peer address.
pub(crate) struct PeerPool {
    address: String,
    lanes: Vec<tokio::sync::Mutex<Option<Arc<Lane>>>>,
    next: AtomicUsize,
}

impl PeerPool {
    pub(crate) fn new(address: String, lanes: usize) -> Arc<Self> {
        Arc::new(PeerPool {
            address,
            lanes: (0..lanes).map(|_| tokio::sync::Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) fn lane_count(&self) -> usize {
        self.lanes.len()
    }

    /// A starting lane for the next call, rotating.
    pub(crate) fn rotate(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len()
    }

    /// Lane `i`, connecting (again) if it is missing or dead.
    pub(crate) async fn lane(
        &self,
        i: usize,
        config: &TcpConfig,
        auth: Option<&Auth>,
    ) -> Result<Arc<Lane>> {
        let mut slot = self.lanes[i].lock().await;
        if let Some(l) = slot.as_ref() {
            if !l.is_dead() {
                return Ok(l.clone());
            }
        }
        let lane = Lane::connect(&self.address, config, auth).await?;
        *slot = Some(lane.clone());
        Ok(lane)
    }

    /// Kills every connected lane.
    pub(crate) async fn close(&self, reason: Error) {
        for slot in &self.lanes {
            if let Some(l) = slot.lock().await.take() {
                l.kill(reason.clone());
            }
        }
    }
}
