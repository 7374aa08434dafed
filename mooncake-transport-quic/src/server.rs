//! Target side: accepts authenticated connections and serves the requests of each stream, one
//! after the other, against the local segment.
//!
//! Bounds on what a peer can make this side hold: at most [`QuicConfig::max_connections`]
//! connections (more are refused before their handshake) and [`QuicConfig::max_incoming`]
//! handshakes in progress; per connection one task, serving at most
//! [`QuicConfig::max_streams_per_connection`] open streams; buffered data per connection bounded
//! by the receive window. Every range is checked against the registered buffers before memory is
//! touched, and payloads move between the stream and registered memory piece by piece, so no
//! length from the network sizes an allocation. A stream that does not finish within the request
//! timeout is reset.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use mooncake_core::{ErrorCode, LocalSegment, MemRegion};
use mooncake_tls::{PeerIdentity, Revocation};
use quinn::{RecvStream, SendStream, VarInt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::frame::{self, FrameError, Op, Request, Response};
use crate::QuicConfig;

/// Largest piece a received payload is copied in.
pub(crate) const CHUNK: usize = 256 * 1024;
/// Largest refused WRITE payload skipped to serve the requests behind it on its stream; a larger
/// one ends the stream. Initiators put only requests up to this size on a shared stream.
pub(crate) const MAX_DISCARD: u64 = 64 * 1024;
/// Largest piece of registered memory copied into one send buffer.
const SEND_PIECE: u64 = 64 * 1024;

/// Application error codes on streams and connections.
pub(crate) mod code {
    /// A stream or connection closed in the ordinary way.
    pub(crate) const DONE: u32 = 0;
    /// The request was malformed.
    pub(crate) const MALFORMED: u32 = 1;
    /// The target refused the request's range: stop sending its payload.
    pub(crate) const REFUSED: u32 = 2;
    /// The request did not finish in time.
    pub(crate) const TIMEOUT: u32 = 3;
    /// The peer's certificate is valid but the node does not serve it.
    pub(crate) const UNAUTHORIZED: u32 = 4;
    /// The node is shutting down.
    pub(crate) const SHUTDOWN: u32 = 5;
    /// The peer's certificate was revoked while the connection was open.
    pub(crate) const REVOKED: u32 = 6;
}

/// Why a stream ended badly.
#[derive(Debug, thiserror::Error)]
enum StreamError {
    #[error("malformed request: {0}")]
    Frame(#[from] FrameError),
    #[error("reading: {0}")]
    Read(#[from] quinn::ReadExactError),
    #[error("reading: {0}")]
    ReadChunk(#[from] quinn::ReadError),
    #[error("writing: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("request not finished within {0:?}")]
    Timeout(std::time::Duration),
    /// The peer's certificate was revoked: the whole connection closes.
    #[error("{0}")]
    Revoked(String),
}

/// The peer of one connection, re-checked against the revocation list before each request of
/// any of its streams.
struct Admitted {
    peer: PeerIdentity,
    revocation: Option<Revocation>,
    /// The list's generation the certificate was last checked against (0: never), shared by
    /// the connection's streams so that only a change of the list costs a lookup.
    seen: AtomicU64,
}

impl Admitted {
    /// `Ok` while the certificate is not revoked.
    fn check(&self) -> Result<(), StreamError> {
        let Some(revocation) = &self.revocation else {
            return Ok(());
        };
        let mut seen = self.seen.load(Ordering::Relaxed);
        let checked = revocation.check(&self.peer, &mut seen);
        self.seen.store(seen, Ordering::Relaxed);
        checked.map_err(|e| {
            StreamError::Revoked(match e {
                mooncake_core::Error::PermissionDenied(why) => why,
                e => e.to_string(),
            })
        })
    }
}

/// Accepts connections until the endpoint closes or the task is aborted; aborting it also ends
/// every connection task.
pub(crate) async fn accept_loop(
    endpoint: quinn::Endpoint,
    segment: Arc<LocalSegment>,
    config: Arc<QuicConfig>,
    revocation: Option<Revocation>,
) {
    let slots = Arc::new(Semaphore::new(config.max_connections));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    tracing::warn!(%remote, limit = config.max_connections,
                        "refusing QUIC connection: connection limit reached");
                    incoming.refuse();
                    continue;
                };
                let segment = segment.clone();
                let config = config.clone();
                let revocation = revocation.clone();
                connections.spawn(async move {
                    let _slot = slot;
                    serve_incoming(incoming, remote, segment, config, revocation).await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn serve_incoming(
    incoming: quinn::Incoming,
    remote: SocketAddr,
    segment: Arc<LocalSegment>,
    config: Arc<QuicConfig>,
    revocation: Option<Revocation>,
) {
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, "refused QUIC handshake: {e}");
            return;
        }
    };
    let conn = match tokio::time::timeout(config.connect_timeout, connecting).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::warn!(%remote, "QUIC handshake failed ({}): {e}", crate::client::refused_by(&e));
            return;
        }
        Err(_) => {
            tracing::warn!(%remote, timeout = ?config.connect_timeout,
                "refused QUIC handshake: not completed in time");
            return;
        }
    };
    let peer = match crate::tls::peer_of(&conn) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(%remote, "refused QUIC peer: {e}");
            conn.close(VarInt::from_u32(code::UNAUTHORIZED), b"no peer identity");
            return;
        }
    };
    if let Some(authorizer) = &config.authorizer {
        if !authorizer.authorize(&peer, remote) {
            tracing::warn!(%remote, peer = %peer.name(), "refused QUIC peer: not authorized");
            conn.close(VarInt::from_u32(code::UNAUTHORIZED), b"not authorized");
            return;
        }
    }
    tracing::debug!(%remote, peer = %peer.name(), "QUIC peer connected");
    let admitted = Admitted {
        peer,
        revocation,
        seen: AtomicU64::new(0),
    };
    let peer = &admitted.peer;
    // The connection's requests are served by this task: they share one connection state
    // anyway, and a task per request costs more in wake-ups than it gains.
    let mut streams = FuturesUnordered::new();
    let reason = loop {
        tokio::select! {
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    let (segment, config, admitted) = (&segment, &config, &admitted);
                    streams.push(async move {
                        serve_stream(send, recv, segment, config, admitted).await
                    });
                }
                Err(e) => break e.to_string(),
            },
            Some(done) = streams.next(), if !streams.is_empty() => match done {
                Err(StreamError::Revoked(why)) => {
                    tracing::warn!(%remote, certificate = %peer.name(),
                        "closing a QUIC transfer connection from {remote}: {why}");
                    conn.close(VarInt::from_u32(code::REVOKED), b"certificate revoked");
                    break why;
                }
                Err(e) => tracing::debug!(%remote, peer = %peer.name(), "stream failed: {e}"),
                Ok(()) => {}
            }
        }
    };
    tracing::debug!(%remote, peer = %peer.name(), "QUIC peer disconnected: {reason}");
}

/// What a stream does after a request.
enum Flow {
    /// Read the next request.
    Next,
    /// The peer finished the stream, or this side stopped it: no more requests.
    End,
}

async fn serve_stream(
    mut send: SendStream,
    mut recv: RecvStream,
    segment: &LocalSegment,
    config: &QuicConfig,
    admitted: &Admitted,
) -> Result<(), StreamError> {
    let mut header = [0u8; frame::REQUEST_LEN];
    let mut first = true;
    let result = loop {
        let work = async {
            match recv.read_exact(&mut header).await {
                Ok(()) => {}
                // A clean end between requests (not before the first) closes the stream.
                Err(quinn::ReadExactError::FinishedEarly(0)) if !first => return Ok(Flow::End),
                Err(e) => return Err(e.into()),
            }
            let req = frame::decode_request(&header)?;
            admitted.check()?;
            handle(&req, &mut send, &mut recv, segment).await
        };
        match tokio::time::timeout(config.request_timeout, work).await {
            Ok(Ok(Flow::Next)) => first = false,
            Ok(Ok(Flow::End)) => break Ok(()),
            Ok(Err(e)) => break Err(e),
            Err(_) => break Err(StreamError::Timeout(config.request_timeout)),
        }
    };
    match &result {
        Ok(()) => {
            let _ = send.finish();
        }
        Err(e) => {
            let code = match e {
                StreamError::Frame(_) => code::MALFORMED,
                StreamError::Timeout(_) => code::TIMEOUT,
                StreamError::Revoked(_) => code::REVOKED,
                _ => code::DONE,
            };
            let _ = send.reset(VarInt::from_u32(code));
            let _ = recv.stop(VarInt::from_u32(code));
        }
    }
    result
}

async fn respond(send: &mut SendStream, status: ErrorCode, len: u64) -> Result<(), StreamError> {
    let header = frame::encode_response(&Response {
        status: status.code(),
        len,
    });
    send.write_all(&header).await?;
    Ok(())
}

async fn handle(
    req: &Request,
    send: &mut SendStream,
    recv: &mut RecvStream,
    segment: &LocalSegment,
) -> Result<Flow, StreamError> {
    let memory = segment.memory();
    match req.op {
        Op::Read => match memory.resolve(req.addr, req.len) {
            Ok(region) => {
                respond(send, ErrorCode::OK, req.len).await?;
                send_region(send, &region).await?;
            }
            Err(_) => respond(send, ErrorCode::INVALID_PARAMS, 0).await?,
        },
        Op::Write => match memory.resolve(req.addr, req.len) {
            Ok(region) => {
                receive_region(recv, &region).await?;
                drop(region);
                if req.notify {
                    segment.landed(req.addr, req.len);
                    segment.flush_landings();
                }
                respond(send, ErrorCode::OK, 0).await?;
            }
            Err(_) if req.len <= MAX_DISCARD => {
                // A small refused payload is skipped, so the requests behind it are served.
                discard(recv, req.len).await?;
                respond(send, ErrorCode::INVALID_PARAMS, 0).await?;
            }
            Err(_) => {
                // Nothing of a large payload is wanted: tell the peer to stop sending it. The
                // requests behind it on this stream are lost with it.
                let _ = recv.stop(VarInt::from_u32(code::REFUSED));
                respond(send, ErrorCode::INVALID_PARAMS, 0).await?;
                return Ok(Flow::End);
            }
        },
        Op::Describe => match segment.descriptor().encode() {
            Ok(bytes) if bytes.len() as u64 <= frame::MAX_DESCRIPTOR_LEN => {
                respond(send, ErrorCode::OK, bytes.len() as u64).await?;
                send.write_chunk(Bytes::from(bytes)).await?;
            }
            Ok(bytes) => {
                tracing::warn!(len = bytes.len(), "segment descriptor too large to send");
                respond(send, ErrorCode::SERIALIZE_FAIL, 0).await?;
            }
            Err(e) => {
                tracing::warn!("encoding the segment descriptor failed: {e}");
                respond(send, ErrorCode::SERIALIZE_FAIL, 0).await?;
            }
        },
    }
    Ok(Flow::Next)
}

/// Reads and drops exactly `len` bytes.
async fn discard(recv: &mut RecvStream, len: u64) -> Result<(), quinn::ReadExactError> {
    let mut left = len;
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        match recv
            .read_chunk(want, true)
            .await
            .map_err(quinn::ReadExactError::ReadError)?
        {
            Some(chunk) => left -= chunk.bytes.len() as u64,
            None => return Err(quinn::ReadExactError::FinishedEarly((len - left) as usize)),
        }
    }
    Ok(())
}

/// Sends the bytes of `region`, copied out of registered memory in pieces of at most
/// [`SEND_PIECE`] bytes (registered memory is never lent out as a slice: peers and the
/// application may write it at any time). Pieces stay below the allocator's mmap threshold, so
/// their buffers are reused rather than mapped, faulted in and unmapped each time.
pub(crate) async fn send_region(
    send: &mut SendStream,
    region: &MemRegion,
) -> Result<(), quinn::WriteError> {
    let len = region.len();
    let mut offset = 0;
    while offset < len {
        let n = (len - offset).min(SEND_PIECE);
        let mut piece = vec![0u8; n as usize];
        region
            .slice(offset, n)
            .and_then(|r| r.read_into(&mut piece))
            .expect("within the region");
        send.write_chunk(Bytes::from(piece)).await?;
        offset += n;
    }
    Ok(())
}

/// Receives exactly `region.len()` bytes into `region`.
pub(crate) async fn receive_region(
    recv: &mut RecvStream,
    region: &MemRegion,
) -> Result<(), quinn::ReadExactError> {
    let len = region.len();
    let mut offset = 0;
    while offset < len {
        let want = (len - offset).min(CHUNK as u64) as usize;
        let Some(chunk) = recv
            .read_chunk(want, true)
            .await
            .map_err(quinn::ReadExactError::ReadError)?
        else {
            return Err(quinn::ReadExactError::FinishedEarly(offset as usize));
        };
        let n = chunk.bytes.len() as u64;
        region
            .slice(offset, n)
            .and_then(|r| r.write_from(&chunk.bytes))
            .expect("read_chunk returns at most `want` bytes");
        offset += n;
    }
    Ok(())
}
