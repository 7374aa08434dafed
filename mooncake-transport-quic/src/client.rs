//! Initiator side: a pool of connections to each peer and one stream per request.
//!
//! Each pooled connection has its own endpoint (its own UDP socket), so the connections of a
//! peer are independent state machines that the runtime drives on different cores. A dead or
//! closed connection is replaced on next use.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use mooncake_core::{Error, ErrorCode, MemRegion, Result};
use quinn::{Connection, VarInt};

use crate::frame::{self, Op, Request};
use crate::server::{code, receive_region, send_region};
use crate::QuicConfig;

/// One live connection and the endpoint it runs on.
struct Slot {
    endpoint: quinn::Endpoint,
    conn: Connection,
}

/// The connections to one peer address.
pub(crate) struct PeerPool {
    address: String,
    slots: Vec<tokio::sync::Mutex<Option<Slot>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for PeerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PeerPool({}, {} connections)",
            self.address,
            self.slots.len()
        )
    }
}

/// True for a close that came from TLS: the handshake was refused by one side or the other.
fn is_tls_refusal(e: &quinn::ConnectionError) -> bool {
    let crypto = |code: quinn::TransportErrorCode| (0x100..0x200).contains(&u64::from(code));
    match e {
        quinn::ConnectionError::TransportError(t) => crypto(t.code),
        quinn::ConnectionError::ConnectionClosed(c) => crypto(c.error_code),
        quinn::ConnectionError::ApplicationClosed(c) => {
            c.error_code == VarInt::from_u32(code::UNAUTHORIZED)
        }
        _ => false,
    }
}

/// True for the close of a target that found this node's certificate revoked.
fn is_revocation(e: &quinn::ConnectionError) -> bool {
    matches!(e, quinn::ConnectionError::ApplicationClosed(c)
        if c.error_code == VarInt::from_u32(code::REVOKED))
}

/// Who refused a TLS handshake that failed with `e`: this side, or the peer.
pub(crate) fn refused_by(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::ApplicationClosed(_) => "refused by the peer",
        _ => "refused by this side",
    }
}

/// Splits `host:port` (host may be `[v6]`).
pub(crate) fn split_address(address: &str) -> Result<(&str, u16)> {
    let bad = || Error::InvalidArgument(format!("segment address {address:?} is not host:port"));
    let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Err(bad());
    }
    Ok((host, port))
}

impl PeerPool {
    pub(crate) fn new(address: String, connections: usize) -> Arc<Self> {
        Arc::new(PeerPool {
            address,
            slots: (0..connections)
                .map(|_| tokio::sync::Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
        })
    }

    pub(crate) fn address(&self) -> &str {
        &self.address
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// A starting connection for the next call, rotating.
    pub(crate) fn rotate(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len()
    }

    fn unreachable(&self, reason: String) -> Error {
        Error::PeerUnreachable {
            peer: self.address.clone(),
            reason,
        }
    }

    /// Connection `i`, connecting (again) if it is missing or closed.
    pub(crate) async fn connection(
        &self,
        i: usize,
        config: &QuicConfig,
        client: &quinn::ClientConfig,
    ) -> Result<Connection> {
        let mut slot = self.slots[i].lock().await;
        if let Some(s) = slot.as_ref() {
            if s.conn.close_reason().is_none() {
                return Ok(s.conn.clone());
            }
            s.endpoint.close(VarInt::from_u32(code::DONE), b"");
        }
        *slot = None;
        let fresh = tokio::time::timeout(config.connect_timeout, self.connect(config, client))
            .await
            .map_err(|_| {
                self.unreachable(format!(
                    "QUIC connect timed out after {:?}",
                    config.connect_timeout
                ))
            })??;
        let conn = fresh.conn.clone();
        *slot = Some(fresh);
        Ok(conn)
    }

    async fn connect(&self, config: &QuicConfig, client: &quinn::ClientConfig) -> Result<Slot> {
        let (host, port) = split_address(&self.address)?;
        let target: SocketAddr = match host.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| self.unreachable(format!("resolving {host}: {e}")))?
                .next()
                .ok_or_else(|| self.unreachable(format!("{host} resolves to no address")))?,
        };
        let local_ip = if config.bind.is_ipv4() == target.is_ipv4() {
            config.bind.ip()
        } else if target.is_ipv4() {
            std::net::Ipv4Addr::UNSPECIFIED.into()
        } else {
            std::net::Ipv6Addr::UNSPECIFIED.into()
        };
        let endpoint = config
            .endpoint(SocketAddr::new(local_ip, 0), None)
            .map_err(|e| self.unreachable(format!("binding a QUIC client socket: {e}")))?;
        let connecting = endpoint
            .connect_with(client.clone(), target, host)
            .map_err(|e| self.unreachable(format!("QUIC connect: {e}")))?;
        match connecting.await {
            Ok(conn) => {
                let peer = self.address.clone();
                let watched = conn.clone();
                tokio::spawn(async move {
                    let e = watched.closed().await;
                    let stats = watched.stats();
                    tracing::debug!(%peer, rtt = ?stats.path.rtt, cwnd = stats.path.cwnd,
                        mtu = stats.path.current_mtu, lost = stats.path.lost_packets,
                        sent = stats.path.sent_packets, "QUIC connection statistics");
                    if is_tls_refusal(&e) {
                        tracing::warn!(%peer, "QUIC peer refused our TLS handshake: {e}");
                    } else if is_revocation(&e) {
                        tracing::warn!(%peer,
                            "QUIC peer closed the connection: this node's certificate was revoked");
                    } else {
                        tracing::debug!(%peer, "QUIC connection closed: {e}");
                    }
                });
                Ok(Slot { endpoint, conn })
            }
            Err(e) => {
                if is_tls_refusal(&e) {
                    tracing::warn!(peer = %self.address, "QUIC handshake failed ({}): {e}",
                        refused_by(&e));
                }
                endpoint.close(VarInt::from_u32(code::DONE), b"");
                Err(self.unreachable(format!("QUIC handshake: {e}")))
            }
        }
    }

    /// Closes every connection and its endpoint.
    pub(crate) async fn close(&self, code: u32, reason: &[u8]) {
        for slot in &self.slots {
            if let Some(s) = slot.lock().await.take() {
                s.conn.close(VarInt::from_u32(code), reason);
                s.endpoint.close(VarInt::from_u32(code), reason);
            }
        }
    }
}

fn stream_error(peer: &str, what: &str, e: impl std::fmt::Display) -> Error {
    Error::PeerUnreachable {
        peer: peer.to_owned(),
        reason: format!("{what}: {e}"),
    }
}

fn status_error(op: Op, addr: u64, len: u64, status: i32) -> Error {
    match ErrorCode::from_i32(status) {
        Some(ErrorCode::INVALID_PARAMS) if op != Op::Describe => {
            Error::RemoteRangeInvalid { addr, len }
        }
        Some(code) => Error::with_code(code, format!("target refused {op:?} of {len} bytes")),
        None => Error::Protocol(format!("unknown status {status}")),
    }
}

/// The sending half of a request's stream, reset when dropped before the target answered: a
/// request abandoned midway (its call timed out) sends nothing more. (Dropping a plain
/// `SendStream` would finish it, and quinn would go on sending what it buffered.)
struct ResetOnDrop(quinn::SendStream, bool);

impl Drop for ResetOnDrop {
    fn drop(&mut self) {
        if self.1 {
            let _ = self.0.reset(VarInt::from_u32(code::DONE));
        }
    }
}

/// One request of a stream: `local` is the destination of a READ and the source of a WRITE,
/// `None` for a DESCRIBE.
pub(crate) struct Req<'a> {
    pub(crate) op: Op,
    pub(crate) addr: u64,
    pub(crate) local: Option<&'a MemRegion>,
    pub(crate) notify: bool,
}

/// Runs one request on its own stream; a DESCRIBE returns the descriptor's bytes.
pub(crate) async fn request(
    conn: &Connection,
    peer: &str,
    op: Op,
    addr: u64,
    local: Option<&MemRegion>,
    notify: bool,
) -> Result<Vec<u8>> {
    let req = Req {
        op,
        addr,
        local,
        notify,
    };
    requests(conn, peer, std::slice::from_ref(&req))
        .await
        .pop()
        .expect("one result per request")
}

/// Runs `reqs` on one stream of `conn`, sent back to back and answered in order: one result per
/// request. Only the last may be a WRITE larger than what a target skips when it refuses one
/// (`MAX_DISCARD`): a refused larger WRITE ends the stream.
pub(crate) async fn requests(
    conn: &Connection,
    peer: &str,
    reqs: &[Req<'_>],
) -> Vec<Result<Vec<u8>>> {
    let (send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => {
            let e = stream_error(peer, "opening a stream", e);
            return reqs.iter().map(|_| Err(e.clone())).collect();
        }
    };
    let mut guard = ResetOnDrop(send, true);
    let send = &mut guard.0;
    // Requests go out while responses come in: a target answering READs fills this side's
    // receive window and stops reading requests until this side reads.
    let writer = async {
        for r in reqs {
            let header = frame::encode_request(&Request {
                op: r.op,
                addr: r.addr,
                len: r.local.map_or(0, MemRegion::len),
                notify: r.notify && r.op == Op::Write,
            });
            send.write_all(&header).await?;
            if r.op == Op::Write {
                send_region(send, r.local.expect("WRITE has local memory")).await?;
            }
        }
        let _ = send.finish();
        Ok::<_, quinn::WriteError>(())
    };
    let reader = async {
        let mut responses = Vec::with_capacity(reqs.len());
        for r in reqs {
            // A target that refuses a large WRITE stops the stream: its response still says why.
            let response = response(&mut recv, peer, r).await;
            let lost = matches!(&response, Err(Failure::Stream(_)));
            responses.push(response);
            if lost {
                break;
            }
        }
        responses
    };
    let mut writer = std::pin::pin!(writer);
    let mut reader = std::pin::pin!(reader);
    let mut sent = None;
    let responses = loop {
        tokio::select! {
            biased;
            responses = &mut reader => break responses,
            w = &mut writer, if sent.is_none() => sent = Some(w),
        }
    };
    let sent = sent.unwrap_or(Ok(()));
    let mut results: Vec<Result<Vec<u8>>> = responses
        .into_iter()
        .map(|response| {
            response.map_err(|f| match (f, &sent) {
                (Failure::Stream(_), Err(w)) => stream_error(peer, "sending the request", w),
                (Failure::Stream(e) | Failure::Request(e), _) => e,
            })
        })
        .collect();
    if results.len() == reqs.len() {
        // The target has read every request: nothing is left to abandon.
        guard.1 = false;
    }
    // Requests behind a broken stream fail with its error.
    let last = results.last().cloned();
    while results.len() < reqs.len() {
        results.push(match &last {
            Some(Err(e)) => Err(e.clone()),
            _ => Err(Error::Protocol("stream ended early".into())),
        });
    }
    results
}

/// Why a response was not had: the stream broke (later responses are lost too), or the
/// request failed on its own.
enum Failure {
    Stream(Error),
    Request(Error),
}

/// Reads the response to `r` and its payload.
async fn response(
    recv: &mut quinn::RecvStream,
    peer: &str,
    r: &Req<'_>,
) -> std::result::Result<Vec<u8>, Failure> {
    let len = r.local.map_or(0, MemRegion::len);
    let mut h = [0u8; frame::RESPONSE_LEN];
    recv.read_exact(&mut h)
        .await
        .map_err(|e| Failure::Stream(stream_error(peer, "receiving the response", e)))?;
    let resp = frame::decode_response(&h)
        .map_err(|e| Failure::Stream(Error::Protocol(format!("from {peer}: {e}"))))?;
    if resp.status != 0 {
        return Err(Failure::Request(status_error(
            r.op,
            r.addr,
            len,
            resp.status,
        )));
    }
    match r.op {
        Op::Read => {
            let region = r.local.expect("READ has local memory");
            if resp.len != region.len() {
                return Err(Failure::Stream(Error::Protocol(format!(
                    "{peer} sent {} bytes for a READ of {}",
                    resp.len,
                    region.len()
                ))));
            }
            receive_region(recv, region)
                .await
                .map_err(|e| Failure::Stream(stream_error(peer, "receiving READ data", e)))?;
            Ok(Vec::new())
        }
        Op::Write => {
            if resp.len != 0 {
                return Err(Failure::Stream(Error::Protocol(format!(
                    "{peer} sent a payload for a WRITE"
                ))));
            }
            Ok(Vec::new())
        }
        Op::Describe => {
            if resp.len > frame::MAX_DESCRIPTOR_LEN {
                return Err(Failure::Stream(Error::Protocol(format!(
                    "{peer} sent a {}-byte descriptor",
                    resp.len
                ))));
            }
            let mut bytes = vec![0u8; resp.len as usize];
            recv.read_exact(&mut bytes)
                .await
                .map_err(|e| Failure::Stream(stream_error(peer, "receiving the descriptor", e)))?;
            Ok(bytes)
        }
    }
}
