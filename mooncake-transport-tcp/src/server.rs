//! Target side: accepts connections and serves requests against the local segment.
//!
//! Performance-critical: `serve_connection` runs for every request a peer sends.
//!
//! Each connection is one task that answers requests in order. Small responses are gathered in
//! an output buffer that is flushed whenever no further complete request is buffered, so a
//! pipelined burst of requests costs few syscalls; large READ payloads are sent straight from
//! registered memory and large WRITE payloads received straight into it. Every range is checked
//! against the registered buffers first. A malformed frame closes only its connection.

use std::sync::Arc;

use mooncake_core::{ErrorCode, LocalSegment};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

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
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let segment = segment.clone();
                    let config = config.clone();
                    connections.spawn(async move {
                        match serve_connection(&stream, &segment, &config).await {
                            Ok(()) | Err(Close::Eof) => {
                                tracing::debug!(%peer, "connection closed by peer")
                            }
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

async fn serve_connection(
    stream: &TcpStream,
    segment: &LocalSegment,
    config: &TcpConfig,
) -> Result<(), Close> {
    let mut input = ReadBuf::new(256 * 1024);
    input.fill_to(stream, frame::PREAMBLE_LEN).await?;
    let preamble: [u8; frame::PREAMBLE_LEN] = input.data()[..frame::PREAMBLE_LEN]
        .try_into()
        .expect("8 bytes");
    frame::decode_preamble(&preamble)?;
    input.consume(frame::PREAMBLE_LEN);

    let mut out: Vec<u8> = Vec::with_capacity(256 * 1024);
    let memory = segment.memory();
    loop {
        let req = loop {
            if let Some(req) = frame::decode_request(input.data())? {
                input.consume(frame::REQUEST_LEN);
                break req;
            }
            // Nothing complete buffered: answer what we have before waiting for more.
            if !out.is_empty() {
                segment.flush_landings();
                sys::send_all(stream, &out).await?;
                out.clear();
            }
            input.fill(stream).await?;
        };
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
                        sys::send_all(stream, &out).await?;
                        out.clear();
                        // SAFETY: `region` is a validated range of a registered buffer, kept
                        // registered while `region` lives.
                        unsafe {
                            sys::send_raw(stream, region.as_ptr() as usize, region.len() as usize)
                                .await?
                        };
                    }
                }
                Err(_) => respond(&mut out, &req, ErrorCode::INVALID_PARAMS, 0),
            },
            Op::Write => match memory.resolve(req.addr, req.len) {
                Ok(region) => {
                    // SAFETY: as above; the range is writable registered memory.
                    unsafe {
                        input
                            .read_payload_into(
                                stream,
                                region.as_ptr() as usize,
                                region.len() as usize,
                            )
                            .await?
                    };
                    if req.notify {
                        segment.landed(req.addr, req.len);
                    }
                    respond(&mut out, &req, ErrorCode::OK, 0);
                }
                Err(_) => {
                    respond(&mut out, &req, ErrorCode::INVALID_PARAMS, 0);
                    if req.len > config.max_discard {
                        segment.flush_landings();
                        sys::send_all(stream, &out).await?;
                        return Err(Close::Unskippable(req.len));
                    }
                    input.discard(stream, req.len).await?;
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
            sys::send_all(stream, &out).await?;
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
