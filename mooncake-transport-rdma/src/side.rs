//! The side channel: a small request/response protocol over TCP that carries what RDMA itself
//! cannot, namely the handshake (the segment descriptor, for `P2PHANDSHAKE` discovery), the
//! exchange of queue pair addresses that connects a path (both ends' QPN, LID, GID, PSN and
//! MTU), and landing notices. Bytes never go through it.
//!
//! A connection starts with [`MAGIC`] from the client; then each request is answered in order.
//! Frames are a little-endian `u32` length and a postcard body of at most [`MAX_FRAME`] bytes.
//! The queue pairs a peer connected through a connection live as long as it: when the
//! connection closes (the peer died or shut down), they are destroyed.

use std::sync::Arc;
use std::time::Duration;

use mooncake_core::admission::Admission;
use mooncake_core::{Error, LocalSegment, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::sched::{Core, ServedConnection};
use crate::verbs::{negotiate_mtu, QpAddress};

/// First bytes a client sends.
pub const MAGIC: &[u8; 8] = b"MCRDMA01";
/// Largest frame either side accepts.
pub const MAX_FRAME: usize = 64 << 20;
/// Most queue pairs one connection may have the server keep.
pub const MAX_QPS_PER_CONNECTION: usize = 4096;
/// Most ranges one landing notice may carry.
pub const MAX_LANDED: usize = 1 << 20;

/// One path to connect: the client's queue pair on one of its NICs, to one of the server's.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PathRequest {
    /// The client's name for the path (a new request for the same key replaces the queue pair).
    pub key: u32,
    /// The server's NIC (index into its device list).
    pub server_nic: u16,
    /// The client's queue pair.
    pub qp: QpAddress,
}

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Request {
    /// The current segment descriptor (encoded).
    Describe,
    /// Make, connect and keep a queue pair per path, and say how to reach each.
    Connect(Vec<PathRequest>),
    /// These WRITEs (address, length) have landed: report them to the segment's observer and
    /// flush before answering.
    Landed(Vec<(u64, u64)>),
}

/// A response, in the order of requests.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Response {
    /// The encoded descriptor.
    Descriptor(Vec<u8>),
    /// Per path: the server's queue pair, or why it could not make one.
    Connected(Vec<std::result::Result<QpAddress, String>>),
    /// The landings were reported.
    Ack,
    /// The request was refused.
    Refused(String),
}

async fn write_frame<T: Serialize>(stream: &mut TcpStream, msg: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    stream.write_all(&buf).await
}

/// Reads one frame. Waits for its first byte as long as it takes (an idle connection); from
/// then on, with `within`, the whole frame must arrive within it. The body grows as its bytes
/// arrive, never to the announced length ahead of them.
async fn read_frame<T: for<'de> Deserialize<'de>>(
    stream: &mut TcpStream,
    within: Option<Duration>,
) -> std::io::Result<T> {
    use std::io::{Error as IoError, ErrorKind};
    let mut len = [0u8; 4];
    stream.read_exact(&mut len[..1]).await?;
    let rest = async {
        stream.read_exact(&mut len[1..]).await?;
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(IoError::new(
                ErrorKind::InvalidData,
                format!("frame of {len} bytes exceeds {MAX_FRAME}"),
            ));
        }
        let mut body = Vec::new();
        (&mut *stream)
            .take(len as u64)
            .read_to_end(&mut body)
            .await?;
        if body.len() != len {
            return Err(IoError::new(
                ErrorKind::UnexpectedEof,
                format!("closed {} bytes into a {len}-byte frame", body.len()),
            ));
        }
        postcard::from_bytes(&body).map_err(|e| IoError::new(ErrorKind::InvalidData, e))
    };
    match within {
        None => rest.await,
        Some(t) => tokio::time::timeout(t, rest).await.map_err(|_| {
            IoError::new(
                ErrorKind::TimedOut,
                format!("a frame did not arrive whole within {t:?}"),
            )
        })?,
    }
}

/// The client end of one peer's side channel (one request at a time).
#[derive(Debug)]
pub(crate) struct Client {
    address: String,
    stream: Option<TcpStream>,
}

impl Client {
    pub(crate) fn new(address: String) -> Self {
        Client {
            address,
            stream: None,
        }
    }

    /// Sends `req` and returns the answer, connecting first if needed. Any failure closes the
    /// connection (the server then drops the queue pairs it kept for it).
    pub(crate) async fn call(
        &mut self,
        req: &Request,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Response> {
        let unreachable = |reason: String| Error::PeerUnreachable {
            peer: self.address.clone(),
            reason,
        };
        if self.stream.is_none() {
            let mut s = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.address))
                .await
                .map_err(|_| unreachable(format!("no connection within {connect_timeout:?}")))?
                .map_err(|e| unreachable(format!("side channel: {e}")))?;
            let _ = s.set_nodelay(true);
            s.write_all(MAGIC)
                .await
                .map_err(|e| unreachable(format!("side channel: {e}")))?;
            self.stream = Some(s);
        }
        let stream = self.stream.as_mut().expect("connected above");
        let exchange = async {
            write_frame(stream, req).await?;
            read_frame::<Response>(stream, None).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.stream = None;
                Err(unreachable(format!("side channel: {e}")))
            }
            Err(_) => {
                self.stream = None;
                Err(Error::Timeout(timeout))
            }
        }
    }

    /// Closes the connection (the server drops this client's queue pairs).
    pub(crate) fn close(&mut self) {
        self.stream = None;
    }
}

/// Accepts side-channel connections until the task is aborted, which ends every connection
/// and destroys the queue pairs they kept. Connections past `admission`'s caps are closed as
/// they are accepted; a connection may stay idle (its queue pairs live as long as it does), but
/// a frame, once begun, must arrive whole within `request_timeout`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    segment: Arc<LocalSegment>,
    core: Arc<Core>,
    request_timeout: Duration,
    admission: Admission,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // Refused (and logged, once a second at most) by closing it.
                    let Ok(admitted) = admission.admit(peer.ip()) else {
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    let segment = segment.clone();
                    let core = core.clone();
                    connections.spawn(async move {
                        let _admitted = admitted;
                        match serve(stream, &segment, &core, request_timeout).await {
                            Ok(()) => tracing::debug!(%peer, "rdma side channel closed by peer"),
                            Err(reason) => {
                                tracing::warn!(%peer, %reason, "closing rdma side channel")
                            }
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("rdma side channel accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Serves one connection; its queue pairs go when it ends.
async fn serve(
    mut stream: TcpStream,
    segment: &LocalSegment,
    core: &Core,
    request_timeout: Duration,
) -> std::result::Result<(), String> {
    let mut magic = [0u8; 8];
    tokio::time::timeout(request_timeout, stream.read_exact(&mut magic))
        .await
        .map_err(|_| "no preamble in time".to_owned())?
        .map_err(|e| format!("reading the preamble: {e}"))?;
    if &magic != MAGIC {
        return Err("not an rdma side channel client (bad preamble)".into());
    }
    let qps = core.serve_connection();
    loop {
        let req: Request = match read_frame(&mut stream, Some(request_timeout)).await {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("malformed request: {e}")),
        };
        let resp = match req {
            Request::Describe => match segment.descriptor().encode() {
                Ok(d) => Response::Descriptor(d),
                Err(e) => Response::Refused(e.to_string()),
            },
            Request::Connect(paths) => Response::Connected(
                paths
                    .into_iter()
                    .map(|p| connect_path(core, &qps, p))
                    .collect(),
            ),
            Request::Landed(ranges) => {
                if ranges.len() > MAX_LANDED {
                    Response::Refused(format!("more than {MAX_LANDED} ranges"))
                } else {
                    for (addr, len) in ranges {
                        // Only ranges of registered memory are reported; a bogus one is a peer
                        // bug, logged and skipped.
                        match segment.memory().resolve(addr, len) {
                            Ok(_) => segment.landed(addr, len),
                            Err(_) => tracing::warn!(
                                addr,
                                len,
                                "landing notice for unregistered memory ignored"
                            ),
                        }
                    }
                    segment.flush_landings();
                    Response::Ack
                }
            }
        };
        tokio::time::timeout(request_timeout, write_frame(&mut stream, &resp))
            .await
            .map_err(|_| "answer not taken in time".to_owned())?
            .map_err(|e| format!("writing an answer: {e}"))?;
    }
}

fn connect_path(
    core: &Core,
    qps: &ServedConnection<'_>,
    p: PathRequest,
) -> std::result::Result<QpAddress, String> {
    let nic = core
        .nics
        .get(p.server_nic as usize)
        .ok_or_else(|| format!("no NIC {} here ({} NICs)", p.server_nic, core.nics.len()))?;
    // The old queue pair of this path goes first.
    qps.forget(p.key);
    let mut qp = nic
        .create_qp(&core.cq(p.server_nic), core.qp_depth())
        .map_err(|e| format!("creating a queue pair on {}: {e}", nic.attrs().name))?;
    let mtu = negotiate_mtu(nic.attrs().active_mtu, p.qp.mtu);
    qp.connect(&p.qp, mtu)
        .map_err(|e| format!("connecting a queue pair on {}: {e}", nic.attrs().name))?;
    let address = qp.address();
    qps.keep(p.key, qp, MAX_QPS_PER_CONNECTION)?;
    Ok(address)
}
