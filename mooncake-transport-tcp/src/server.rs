//! Target side: accepts connections and serves requests against the local segment.
//!
//! Performance-critical: `serve_connection` runs for every request a peer sends.
//!
//! Each connection is one task that answers requests in order. Small responses are gathered in
//! an output buffer that is flushed whenever no further complete request is buffered, so a
//! pipelined burst of requests costs few syscalls; large READ payloads are sent straight from
//! registered memory and large WRITE payloads received straight into it. Every range is checked
//! against the registered buffers first. A malformed frame closes only its connection.
//!
//! What a peer can hold: connections are capped per listener and per address (a connection
//! holds its place from the moment it is accepted, authenticated or not); authentication (when
//! configured) and the preamble must both be done within the connect timeout of the accept;
//! moving a payload (or flushing answers) must finish within the request timeout, and a WRITE
//! into a buffer that is being unregistered ends at once, closing the connection: a stalled
//! writer never keeps `unregister` waiting, and no byte lands in memory after its
//! unregistration returned (a READ from such a buffer may finish, within the timeout).

use std::net::SocketAddr;
use std::sync::Arc;

use mooncake_core::admission::Admission;
use mooncake_core::{ErrorCode, LocalSegment};
use mooncake_tls::PeerIdentity;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::auth::{self, Auth};
use crate::frame::{self, FrameError, Op, Request, Response};
use crate::sys::{self, ReadBuf};
use crate::TcpConfig;

/// Why a connection was closed by the server.
#[derive(Debug, thiserror::Error)]
enum Close {
    #[error("peer closed the connection")]
    Eof,
    #[error("i/o error: {0}")]
    Io(std::io::Error),
    #[error("malformed frame: {0}")]
    Frame(#[from] FrameError),
    #[error("refused WRITE of {0} bytes is too large to skip")]
    Unskippable(u64),
    #[error("{0} did not finish within {1:?}")]
    Stalled(&'static str, std::time::Duration),
    #[error("the buffer of a transfer in progress was unregistered")]
    Revoked,
    #[error(
        "the peer opened with a TLS handshake, but this target serves transfers without \
         authentication (it has no certificate: set TcpConfig::auth to authenticate peers)"
    )]
    TlsAtPlainTarget,
    /// The peer's certificate was revoked while the connection was open; the reason names it.
    #[error("{0}")]
    CertificateRevoked(String),
}

impl From<std::io::Error> for Close {
    fn from(e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            Close::Eof
        } else {
            Close::Io(e)
        }
    }
}

/// Accepts connections until the task is aborted; aborting it also ends every connection.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    segment: Arc<LocalSegment>,
    config: Arc<TcpConfig>,
    auth: Option<Arc<Auth>>,
) {
    let mut connections = JoinSet::new();
    let admission = Admission::new(
        "transfer server",
        config.max_connections,
        config.max_connections_per_address,
    );
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let Ok(admitted) = admission.admit(peer.ip()) else {
                        drop(stream);
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let segment = segment.clone();
                    let config = config.clone();
                    let auth = auth.clone();
                    connections.spawn(async move {
                        let _admitted = admitted;
                        let opened = tokio::time::Instant::now() + config.connect_timeout;
                        let (stream, identity) = match &auth {
                            None => (stream, None),
                            Some(auth) => match authenticate(stream, peer, auth, opened).await {
                                Some((stream, identity)) => (stream, Some(identity)),
                                None => return,
                            },
                        };
                        let checked = auth.as_deref().zip(identity.as_ref());
                        let served =
                            serve_connection(stream, peer, checked, &segment, &config, opened);
                        match served.await {
                            Ok(()) | Err(Close::Eof) => {
                                tracing::debug!(%peer, "connection closed by peer")
                            }
                            // Logged when it was found, before lingering on the connection.
                            Err(Close::CertificateRevoked(_)) => {}
                            Err(reason) => {
                                tracing::warn!(%peer, %reason, "closing connection")
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Authenticates an accepted connection before `deadline`; `None` (after logging why) when the
/// peer is refused.
async fn authenticate(
    stream: TcpStream,
    peer: SocketAddr,
    auth: &Auth,
    deadline: tokio::time::Instant,
) -> Option<(TcpStream, PeerIdentity)> {
    match tokio::time::timeout_at(deadline, auth.accept(stream, peer)).await {
        Ok(Ok((stream, identity))) => {
            tracing::debug!(%peer, name = %identity.name(), "transfer peer authenticated");
            Some((stream, identity))
        }
        Ok(Err(auth::Refused { reason, answered })) => {
            auth.log_refusal(peer, &reason);
            if let Some(stream) = answered {
                auth::linger(stream).await;
            }
            None
        }
        Err(_) => {
            auth.log_refusal(peer, "it did not authenticate within the connect timeout");
            None
        }
    }
}

/// Runs `io` within the request timeout, and (given a region) only while the region's buffer
/// stays registered.
async fn bounded<T>(
    what: &'static str,
    config: &TcpConfig,
    region: Option<&mooncake_core::MemRegion>,
    io: impl std::future::Future<Output = std::io::Result<T>>,
) -> Result<T, Close> {
    // Most moves finish without waiting (the socket has room, the bytes are there): no timer
    // for those.
    let mut io = std::pin::pin!(io);
    if let std::task::Poll::Ready(r) = futures::poll!(io.as_mut()) {
        return Ok(r?);
    }
    let revoked = async {
        match region {
            Some(r) => r.revoked().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        r = tokio::time::timeout(config.request_timeout, io) => match r {
            Ok(r) => Ok(r?),
            Err(_) => Err(Close::Stalled(what, config.request_timeout)),
        },
        () = revoked => Err(Close::Revoked),
    }
}

/// Serves one connection (authenticated already, when the transport authenticates: `checked`
/// holds the authentication and the peer's certificate, re-checked against the revocation list
/// before each request), whose preamble must arrive before `deadline`.
async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    checked: Option<(&Auth, &PeerIdentity)>,
    segment: &LocalSegment,
    config: &TcpConfig,
    deadline: tokio::time::Instant,
) -> Result<(), Close> {
    let mut input = ReadBuf::new(256 * 1024);
    let preamble = input.fill_to(&stream, frame::PREAMBLE_LEN);
    match tokio::time::timeout_at(deadline, preamble).await {
        Ok(r) => r?,
        Err(_) => return Err(Close::Stalled("the preamble", config.connect_timeout)),
    }
    let preamble: [u8; frame::PREAMBLE_LEN] = input.data()[..frame::PREAMBLE_LEN]
        .try_into()
        .expect("8 bytes");
    if let Err(e) = frame::decode_preamble(&preamble) {
        if preamble[0] == auth::TLS_HANDSHAKE_RECORD {
            // An authenticating initiator: tell it, in a way its TLS stack reports, that this
            // target does not authenticate, rather than resetting the connection.
            if sys::send_all(&stream, &auth::TLS_ALERT_NO_APPLICATION_PROTOCOL)
                .await
                .is_ok()
            {
                auth::linger(stream).await;
            }
            return Err(Close::TlsAtPlainTarget);
        }
        return Err(e.into());
    }
    input.consume(frame::PREAMBLE_LEN);
    let served = serve_requests(&stream, input, checked, segment, config).await;
    if let (Err(Close::CertificateRevoked(why)), Some((_, identity))) = (&served, checked) {
        tracing::warn!(%peer, certificate = %identity.name(),
            "closing a transfer connection from {peer}: {why}");
        // The refusal went out after the answers due: let it reach the peer before closing.
        auth::linger(stream).await;
    }
    served
}

/// Answers requests in order until the connection fails or closes. With `checked`, a request
/// that arrives once the peer's certificate is revoked is not served: the answers due go out,
/// then the refusal ([`frame::encode_refusal`]), and the connection ends.
async fn serve_requests(
    stream: &TcpStream,
    mut input: ReadBuf,
    checked: Option<(&Auth, &PeerIdentity)>,
    segment: &LocalSegment,
    config: &TcpConfig,
) -> Result<(), Close> {
    let mut out: Vec<u8> = Vec::with_capacity(256 * 1024);
    let memory = segment.memory();
    // The revocation list's generation this connection's certificate was last checked against.
    let mut list_seen = 0;
    loop {
        let req = loop {
            if let Some(req) = frame::decode_request(input.data())? {
                input.consume(frame::REQUEST_LEN);
                break req;
            }
            // Nothing complete buffered: answer what we have before waiting for more.
            if !out.is_empty() {
                segment.flush_landings();
                bounded("sending answers", config, None, sys::send_all(stream, &out)).await?;
                out.clear();
            }
            // Waiting for the next request: an idle connection may wait as long as it likes.
            input.fill(stream).await?;
        };
        if let Some((auth, identity)) = checked {
            if let Err(e) = auth.recheck(identity, &mut list_seen) {
                out.extend_from_slice(&frame::encode_refusal());
                segment.flush_landings();
                let _ = bounded("sending answers", config, None, sys::send_all(stream, &out)).await;
                return Err(Close::CertificateRevoked(match e {
                    mooncake_core::Error::PermissionDenied(why) => why,
                    e => e.to_string(),
                }));
            }
        }
        match req.op {
            Op::Read => match memory.resolve(req.addr, req.len) {
                Ok(region) => {
                    respond(&mut out, &req, ErrorCode::OK, req.len);
                    if req.len <= config.inline_payload as u64 {
                        let at = out.len();
                        out.resize(at + req.len as usize, 0);
                        region.read_into(&mut out[at..]).expect("lengths match");
                    } else {
                        segment.flush_landings();
                        bounded("sending answers", config, None, sys::send_all(stream, &out))
                            .await?;
                        out.clear();
                        // SAFETY: `region` is a validated range of a registered buffer, kept
                        // alive while `region` lives (the future is dropped before it).
                        let send = unsafe {
                            sys::send_raw(stream, region.as_ptr() as usize, region.len() as usize)
                        };
                        // Bytes leaving a buffer that is being unregistered harm nothing (the
                        // region keeps it alive): the send may finish, within the timeout.
                        bounded("a READ payload", config, None, send).await?;
                    }
                }
                Err(_) => respond(&mut out, &req, ErrorCode::INVALID_PARAMS, 0),
            },
            Op::Write => match memory.resolve(req.addr, req.len) {
                Ok(region) => {
                    // Counted from now, when the header is read (see the frame docs).
                    let deadline = req.deadline_ms.map(|ms| {
                        tokio::time::Instant::now()
                            + std::time::Duration::from_millis(u64::from(ms))
                    });
                    // SAFETY: as above; the range is writable registered memory. If the buffer
                    // is unregistered meanwhile, the receive stops (and the connection closes)
                    // before the region is dropped, so nothing lands after that. The same holds
                    // when the WRITE's deadline passes: the receive is dropped, and the
                    // connection closed, before another byte lands.
                    let recv = unsafe {
                        input.read_payload_into(
                            stream,
                            region.as_ptr() as usize,
                            region.len() as usize,
                        )
                    };
                    let fenced = async {
                        match deadline {
                            None => recv.await,
                            Some(at) => match tokio::time::timeout_at(at, recv).await {
                                Ok(r) => r,
                                Err(_) => Err(std::io::Error::new(
                                    std::io::ErrorKind::TimedOut,
                                    format!(
                                        "a WRITE of {} bytes at {:#x} went past its deadline \
                                         ({} ms); its space may belong to others now",
                                        req.len,
                                        req.addr,
                                        req.deadline_ms.unwrap_or(0)
                                    ),
                                )),
                            },
                        }
                    };
                    bounded("a WRITE payload", config, Some(&region), fenced).await?;
                    if req.notify {
                        segment.landed(req.addr, req.len);
                    }
                    respond(&mut out, &req, ErrorCode::OK, 0);
                }
                Err(_) => {
                    respond(&mut out, &req, ErrorCode::INVALID_PARAMS, 0);
                    if req.len > config.max_discard {
                        segment.flush_landings();
                        bounded("sending answers", config, None, sys::send_all(stream, &out))
                            .await?;
                        return Err(Close::Unskippable(req.len));
                    }
                    bounded(
                        "a refused payload",
                        config,
                        None,
                        input.discard(stream, req.len),
                    )
                    .await?;
                }
            },
            Op::Describe => match segment.descriptor().encode() {
                Ok(bytes) => {
                    respond(&mut out, &req, ErrorCode::OK, bytes.len() as u64);
                    out.extend_from_slice(&bytes);
                }
                Err(e) => {
                    tracing::warn!("encoding the segment descriptor failed: {e}");
                    respond(&mut out, &req, ErrorCode::SERIALIZE_FAIL, 0);
                }
            },
        }
        if out.len() >= 256 * 1024 {
            segment.flush_landings();
            bounded("sending answers", config, None, sys::send_all(stream, &out)).await?;
            out.clear();
        }
    }
}

fn respond(out: &mut Vec<u8>, req: &Request, status: ErrorCode, len: u64) {
    frame::encode_response(
        &Response {
            status: status.code(),
            id: req.id,
            len,
        },
        out,
    );
}
