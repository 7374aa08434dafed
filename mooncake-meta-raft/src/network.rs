//! TCP transport between raft peers: length + CRC framed protobuf messages.
//!
//! Each peer gets a writer task fed by a bounded queue; the raft loop only ever `try_send`s, so a
//! slow or dead peer never blocks it (messages are dropped when the queue is full; raft
//! retransmits). Writers reconnect with exponential backoff. Inbound connections get a reader
//! task that checks each frame's length against a cap before allocating (protobuf 2.x must not
//! see unbounded input, RUSTSEC-2024-0437) and hands messages to the raft loop.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use crate::codec;

/// Events the transport reports to the raft loop.
#[derive(Debug)]
pub(crate) enum NetEvent {
    /// A message from a peer, with the address its connection came from (the raft loop admits
    /// it only from a member at that member's configured address).
    Message(Box<Message>, SocketAddr),
    /// A snapshot message to `to` was written (`true`) or lost (`false`).
    SnapshotStatus { to: u64, delivered: bool },
    /// The connection to `to` failed.
    Unreachable(u64),
}

/// Settings shared by the transport's tasks.
#[derive(Clone, Debug)]
pub(crate) struct NetConfig {
    pub(crate) max_frame: usize,
    pub(crate) peer_queue: usize,
    pub(crate) inbound_queue: usize,
    pub(crate) min_backoff: Duration,
    pub(crate) max_backoff: Duration,
}

/// Where the transport delivers inbound traffic: the raft loop's input channel, with a counter
/// bounding how many network messages may wait in it.
pub(crate) struct Inbox<T> {
    pub(crate) tx: Sender<T>,
    pub(crate) queued: Arc<AtomicUsize>,
    pub(crate) wrap: fn(NetEvent) -> T,
}

impl<T> Clone for Inbox<T> {
    fn clone(&self) -> Self {
        Inbox {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            wrap: self.wrap,
        }
    }
}

impl<T> Inbox<T> {
    /// Delivers a message unless too many wait already; returns whether it was queued.
    fn deliver(&self, ev: NetEvent, cap: usize) -> bool {
        if matches!(ev, NetEvent::Message(..)) {
            if self.queued.load(Ordering::Relaxed) >= cap {
                return false;
            }
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        self.tx.send((self.wrap)(ev)).is_ok()
    }
}

struct PeerLink {
    addr: String,
    tx: mpsc::Sender<Message>,
}

/// The outbound side, owned by the raft loop.
pub(crate) struct Transport<T> {
    runtime: Handle,
    config: NetConfig,
    inbox: Inbox<T>,
    links: HashMap<u64, PeerLink>,
    shutdown: watch::Receiver<bool>,
}

impl<T: Send + 'static> Transport<T> {
    pub(crate) fn new(
        runtime: Handle,
        config: NetConfig,
        inbox: Inbox<T>,
        shutdown: watch::Receiver<bool>,
    ) -> Self {
        Transport {
            runtime,
            config,
            inbox,
            links: HashMap::new(),
            shutdown,
        }
    }

    /// Queues messages to their peers; `addr_of` resolves a node id to its raft address.
    /// Never blocks: a full queue drops the message (a dropped snapshot is reported lost).
    pub(crate) fn send(&mut self, msgs: Vec<Message>, addr_of: &dyn Fn(u64) -> Option<String>) {
        for m in msgs {
            let to = m.to;
            let Some(addr) = addr_of(to) else {
                tracing::debug!(to, "no address for raft peer; dropping message");
                continue;
            };
            let link = match self.links.get(&to) {
                Some(l) if l.addr == addr && !l.tx.is_closed() => l,
                _ => {
                    let (tx, rx) = mpsc::channel(self.config.peer_queue);
                    self.runtime.spawn(writer(
                        to,
                        addr.clone(),
                        rx,
                        self.config.clone(),
                        self.inbox.clone(),
                        self.shutdown.clone(),
                    ));
                    self.links.insert(to, PeerLink { addr, tx });
                    &self.links[&to]
                }
            };
            let is_snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
            if link.tx.try_send(m).is_err() && is_snapshot {
                self.inbox.deliver(
                    NetEvent::SnapshotStatus {
                        to,
                        delivered: false,
                    },
                    usize::MAX,
                );
            }
        }
    }
}

/// `m` as one frame of the peer protocol (`[len u32 LE][crc32 u32 LE][protobuf]`), for tools
/// and tests that speak to a member's raft port.
pub fn frame_message(m: &Message) -> std::io::Result<Vec<u8>> {
    let payload = m
        .write_to_bytes()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let mut out = Vec::with_capacity(payload.len() + codec::HEADER_LEN);
    codec::frame_into(&mut out, &payload)?;
    Ok(out)
}

/// Frames `m` onto `out`; a message larger than peers accept (`max_frame`) is dropped with a
/// warning (raft sends smaller ones again: entries in smaller batches, or a snapshot).
fn encode(m: &Message, out: &mut Vec<u8>, max_frame: usize) -> bool {
    let payload = match m.write_to_bytes() {
        Ok(p) if p.len() <= max_frame => p,
        Ok(p) => {
            tracing::warn!(
                to = m.to,
                bytes = p.len(),
                max_frame,
                "raft message larger than peers accept; dropped"
            );
            return false;
        }
        Err(e) => {
            tracing::warn!(to = m.to, error = %e, "raft message does not encode; dropped");
            return false;
        }
    };
    codec::frame_into(out, &payload).is_ok()
}

async fn connect(
    to: u64,
    addr: &str,
    cfg: &NetConfig,
    inbox: &Inbox<impl Send>,
    shutdown: &mut watch::Receiver<bool>,
    rx: &mpsc::Receiver<Message>,
) -> Option<TcpStream> {
    let mut backoff = cfg.min_backoff;
    loop {
        if *shutdown.borrow() || rx.is_closed() {
            return None;
        }
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Some(s);
            }
            Err(e) => {
                tracing::debug!(to, addr, error = %e, "raft peer connect failed");
                inbox.deliver(NetEvent::Unreachable(to), usize::MAX);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return None,
        }
        backoff = (backoff * 2).min(cfg.max_backoff);
    }
}

/// Writes one peer's queue to its connection, reconnecting as needed.
async fn writer<T: Send>(
    to: u64,
    addr: String,
    mut rx: mpsc::Receiver<Message>,
    cfg: NetConfig,
    inbox: Inbox<T>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = Vec::new();
    let mut batch: Vec<Message> = Vec::new();
    'connection: loop {
        let Some(mut stream) = connect(to, &addr, &cfg, &inbox, &mut shutdown, &rx).await else {
            return;
        };
        loop {
            if batch.is_empty() {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(m) => batch.push(m),
                        None => return,
                    },
                    _ = shutdown.changed() => return,
                }
                while batch.len() < 256 {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
            }
            buf.clear();
            let encoded: Vec<bool> = batch
                .iter()
                .map(|m| encode(m, &mut buf, cfg.max_frame))
                .collect();
            let ok = stream.write_all(&buf).await.is_ok();
            for (m, framed) in batch.drain(..).zip(encoded) {
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    let delivered = ok && framed;
                    inbox.deliver(NetEvent::SnapshotStatus { to, delivered }, usize::MAX);
                }
            }
            if !ok {
                tracing::debug!(to, addr, "raft peer connection lost; reconnecting");
                inbox.deliver(NetEvent::Unreachable(to), usize::MAX);
                continue 'connection;
            }
        }
    }
}

/// Inbound connections a member keeps open at once: members reconnect after failures, so a
/// few per member, far below this.
const MAX_INBOUND: usize = 256;

/// Accepts peer connections until shutdown.
pub(crate) async fn listen<T: Send + 'static>(
    listener: TcpListener,
    cfg: NetConfig,
    inbox: Inbox<T>,
    mut shutdown: watch::Receiver<bool>,
) {
    let admission = mooncake_core::admission::Admission::new("raft", MAX_INBOUND, MAX_INBOUND);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let Ok(admitted) = admission.admit(peer.ip()) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (cfg, inbox, shutdown) = (cfg.clone(), inbox.clone(), shutdown.clone());
                    tokio::spawn(async move {
                        let _admitted = admitted;
                        reader(stream, peer, cfg, inbox, shutdown).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "raft listener accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn read_one(
    r: &mut BufReader<TcpStream>,
    max_frame: usize,
) -> std::io::Result<Option<Message>> {
    let mut header = [0u8; codec::HEADER_LEN];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    codec::check_len(len, max_frame)?;
    // Grown as the bytes arrive, not to the announced length ahead of them.
    let mut payload = Vec::new();
    let got = (&mut *r).take(len as u64).read_to_end(&mut payload).await?;
    if got != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    codec::check_crc(&payload, crc)?;
    Message::parse_from_bytes(&payload)
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))
}

/// Reads frames from one inbound connection into the raft loop.
async fn reader<T: Send>(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: NetConfig,
    inbox: Inbox<T>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut r = BufReader::with_capacity(64 << 10, stream);
    loop {
        let m = tokio::select! {
            m = read_one(&mut r, cfg.max_frame) => m,
            _ = shutdown.changed() => return,
        };
        match m {
            Ok(Some(m)) => {
                // Dropped when the raft loop is behind: raft retransmits.
                if !inbox.deliver(NetEvent::Message(Box::new(m), peer), cfg.inbound_queue)
                    && *shutdown.borrow()
                {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing raft connection after a bad frame");
                return;
            }
        }
    }
}
