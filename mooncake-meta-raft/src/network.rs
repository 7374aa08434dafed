//! TCP transport between raft peers: length + CRC framed protobuf messages.
//!
//! Each peer gets a writer task fed by a bounded queue; the raft loop only ever `try_send`s, so a
//! slow or dead peer never blocks it (messages are dropped when the queue is full; raft
//! retransmits). Writers reconnect with exponential backoff. Inbound connections get a reader
//! task that checks each frame's length against a cap before allocating (protobuf 2.x must not
//! see unbounded input, RUSTSEC-2024-0437) and hands messages to the raft loop.
//!
//! With TLS ([`NodeConfig::tls`](crate::NodeConfig::tls)) both directions run TLS 1.3 with
//! mutual certificates and the ALPN protocol [`RAFT_ALPN`]. An inbound connection is read only
//! when its certificate has the `master` role and names a member ([`member_cert_name`]), and
//! only messages `from` that member are handed on; an outbound connection is used only when the
//! certificate of the peer dialled names the member it was dialled as.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use mooncake_tls::{PeerIdentity, Role, TlsAcceptor, TlsConnector, TlsIdentity};
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, watch};

use crate::codec;
use mooncake_core::admission::RefusalLogByPeer;

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
    /// Mutual TLS on every connection; `None`: plain TCP.
    pub(crate) tls: Option<NetTls>,
}

/// The ALPN protocol of a member's raft port under TLS (one name per kind of listener, so a
/// connection meant for another listener is not taken for a raft peer).
pub const RAFT_ALPN: &[u8] = b"mooncake-raft/1";

/// How long a TLS handshake with a peer may take, either way. The raft port has no other
/// deadline before a peer's first frame: a connection that never completes its handshake holds
/// a place under the inbound caps for this long at most.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The common name of member `id`'s certificate: `master-<id>` (`master-1`, `master-2`, ...).
pub fn member_cert_name(id: u64) -> String {
    format!("master-{id}")
}

/// The member a certificate names: `N` for the common name `master-N` written as
/// [`member_cert_name`] writes it (N non-zero, no sign or leading zero), else `None`.
pub fn cert_member_id(cert: &PeerIdentity) -> Option<u64> {
    let name = cert.common_name.as_deref()?;
    let id: u64 = name.strip_prefix("master-")?.parse().ok()?;
    (id != 0 && member_cert_name(id) == name).then_some(id)
}

/// Why `identity` cannot be member `id`'s: its certificate must parse, have the `master` role
/// and the common name [`member_cert_name`]`(id)` (peers refuse it otherwise).
pub(crate) fn check_own_certificate(id: u64, identity: &TlsIdentity) -> Result<(), String> {
    identity
        .configs(RAFT_ALPN)
        .map_err(|e| format!("tls: {e}"))?;
    let own = identity.own().map_err(|e| format!("tls: {e}"))?;
    let want = member_cert_name(id);
    if !own.has_role(Role::Master) || own.common_name.as_deref() != Some(want.as_str()) {
        return Err(format!(
            "tls: member {id} needs a certificate with the master role and the common name \
             {want:?} (mooncake_certs issue {want} --role master --name <its raft address>); \
             this one is {:?} with roles {:?}, which the other members would refuse",
            own.name(),
            own.roles
        ));
    }
    Ok(())
}

/// The TLS side of the transport: how to accept and connect, and who may connect.
#[derive(Clone, Debug)]
pub(crate) struct NetTls {
    acceptor: TlsAcceptor,
    connector: TlsConnector,
    /// The ids of the group's members as this node knows them (its peer directory and its
    /// address book), kept current by the raft loop: an inbound connection whose certificate
    /// names another node is closed.
    pub(crate) members: Arc<RwLock<BTreeSet<u64>>>,
}

impl NetTls {
    pub(crate) fn new(identity: &TlsIdentity) -> Result<Self, String> {
        let configs = identity
            .configs(RAFT_ALPN)
            .map_err(|e| format!("tls: {e}"))?;
        Ok(NetTls {
            acceptor: TlsAcceptor::from_configs(&configs).with_timeout(TLS_HANDSHAKE_TIMEOUT),
            connector: TlsConnector::from_configs(&configs).with_timeout(TLS_HANDSHAKE_TIMEOUT),
            members: Arc::default(),
        })
    }

    fn is_member(&self, id: u64) -> bool {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&id)
    }
}

/// How often one refusal from one address is logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The writing half of a connection to a peer (plain TCP or TLS).
type PeerWriter = Box<dyn AsyncWrite + Unpin + Send>;
/// The reading half of a connection from a peer (plain TCP or TLS).
type PeerReader = Box<dyn AsyncRead + Unpin + Send>;

/// The member an inbound TLS connection's certificate names.
#[derive(Debug)]
struct CertMember {
    id: u64,
    /// The certificate's name, for logs.
    name: String,
    /// The certificate, re-checked against the revocation list while the connection lasts.
    cert: PeerIdentity,
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

/// The host part of a raft address (`host:port`, `[v6]:port`), which the peer's certificate
/// must name.
fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':').map_or(addr, |(host, _)| host)
}

/// Whether the certificate of the peer dialled as member `to` is that member's.
fn check_dialled(to: u64, cert: &PeerIdentity) -> Result<(), String> {
    if !cert.has_role(Role::Master) {
        return Err(format!(
            "its certificate {:?} lacks the master role",
            cert.name()
        ));
    }
    match cert_member_id(cert) {
        Some(id) if id == to => Ok(()),
        _ => Err(format!(
            "its certificate is {:?}, not member {to}'s ({:?})",
            cert.name(),
            member_cert_name(to)
        )),
    }
}

/// Opens a connection to member `to` at `addr`; an error says whether the peer was refused
/// (TLS) rather than unreachable.
async fn open(to: u64, addr: &str, cfg: &NetConfig) -> Result<PeerWriter, (String, bool)> {
    let s = TcpStream::connect(addr)
        .await
        .map_err(|e| (e.to_string(), false))?;
    let _ = s.set_nodelay(true);
    let Some(tls) = &cfg.tls else {
        return Ok(Box::new(s));
    };
    let (stream, cert) = tls
        .connector
        .connect(s, host_of(addr))
        .await
        .map_err(|e| (e.to_string(), true))?;
    check_dialled(to, &cert).map_err(|why| (why, true))?;
    Ok(Box::new(stream))
}

async fn connect(
    to: u64,
    addr: &str,
    cfg: &NetConfig,
    inbox: &Inbox<impl Send>,
    shutdown: &mut watch::Receiver<bool>,
    rx: &mpsc::Receiver<Message>,
) -> Option<PeerWriter> {
    let mut backoff = cfg.min_backoff;
    let mut warned = false;
    loop {
        if *shutdown.borrow() || rx.is_closed() {
            return None;
        }
        match open(to, addr, cfg).await {
            Ok(s) => {
                if warned {
                    tracing::info!(to, addr, "raft peer connected");
                }
                return Some(s);
            }
            Err((e, true)) if !warned => {
                warned = true;
                tracing::warn!(to, addr, "not sending to raft peer {to} at {addr}: {e}");
                inbox.deliver(NetEvent::Unreachable(to), usize::MAX);
            }
            Err((e, _)) => {
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
            // A TLS stream holds written data until flushed; a TCP stream's flush is free.
            let ok = stream.write_all(&buf).await.is_ok() && stream.flush().await.is_ok();
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
    let log = RefusalLogByPeer::new(LOG_EVERY);
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let Ok(admitted) = admission.admit(peer.ip()) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let (cfg, inbox, mut shutdown) = (cfg.clone(), inbox.clone(), shutdown.clone());
                    let log = log.clone();
                    tokio::spawn(async move {
                        // The handshake runs under the connection's admission, like its reads.
                        let _admitted = admitted;
                        let Some((stream, member)) =
                            secure(stream, peer, &cfg, &log, &mut shutdown).await
                        else {
                            return;
                        };
                        reader(stream, peer, member, cfg, inbox, shutdown, log).await;
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

/// Runs the TLS handshake of an inbound connection (when TLS is on) and admits it only from a
/// member's certificate; `None` closes it (with a rate-limited log line).
async fn secure(
    stream: TcpStream,
    peer: SocketAddr,
    cfg: &NetConfig,
    log: &RefusalLogByPeer,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<(PeerReader, Option<CertMember>)> {
    let Some(tls) = &cfg.tls else {
        return Some((Box::new(stream), None));
    };
    let accepted = tokio::select! {
        r = tls.acceptor.accept(stream) => r,
        _ = shutdown.changed() => return None,
    };
    let refuse = |why: String| {
        if log.allow(peer.ip(), &why) {
            tracing::warn!(%peer, "refused a raft connection from {peer}: {why}");
        }
        None
    };
    let (stream, cert) = match accepted {
        Ok(accepted) => accepted,
        Err(e) => return refuse(e.to_string()),
    };
    if stream.get_ref().1.alpn_protocol() != Some(RAFT_ALPN) {
        return refuse(format!(
            "certificate {:?}: the connection did not negotiate the raft protocol",
            cert.name()
        ));
    }
    if !cert.has_role(Role::Master) {
        return refuse(format!(
            "certificate {:?} (roles {:?}) lacks the master role",
            cert.name(),
            cert.roles
        ));
    }
    match cert_member_id(&cert) {
        Some(id) if tls.is_member(id) => Some((
            Box::new(stream),
            Some(CertMember {
                id,
                name: cert.name(),
                cert,
            }),
        )),
        Some(id) => refuse(format!(
            "certificate {:?} names node {id}, which is not a member of the group",
            cert.name()
        )),
        None => refuse(format!(
            "certificate {:?} names no member (member N's certificate is named master-N)",
            cert.name()
        )),
    }
}

async fn read_one<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
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

/// Reads frames from one inbound connection into the raft loop; on a TLS connection, only
/// messages from the member its certificate names.
async fn reader<T: Send>(
    stream: PeerReader,
    peer: SocketAddr,
    member: Option<CertMember>,
    cfg: NetConfig,
    inbox: Inbox<T>,
    mut shutdown: watch::Receiver<bool>,
    log: RefusalLogByPeer,
) {
    let mut r = BufReader::with_capacity(64 << 10, stream);
    let mut dropped = 0u64;
    let mut list_seen = 0;
    loop {
        let m = tokio::select! {
            m = read_one(&mut r, cfg.max_frame) => m,
            _ = shutdown.changed() => return,
        };
        if let (Some(tls), Some(member)) = (&cfg.tls, &member) {
            // A member whose certificate was revoked while connected is cut off.
            if let Err(e) = tls.acceptor.recheck(&member.cert, &mut list_seen) {
                tracing::warn!(%peer, "closing a raft connection: {e}");
                return;
            }
        }
        match m {
            Ok(Some(m)) => {
                if let Some(member) = member.as_ref().filter(|c| c.id != m.from) {
                    dropped += 1;
                    if log.allow(peer.ip(), &member.name) {
                        tracing::warn!(
                            %peer,
                            certificate = %member.name,
                            claimed = m.from,
                            dropped,
                            "dropped raft messages from {peer}: certificate {:?} is member {}'s, \
                             the message claims to come from node {}",
                            member.name,
                            member.id,
                            m.from
                        );
                        dropped = 0;
                    }
                    continue;
                }
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
