//! A [`MetadataStore`] shared by several test processes: a [`MemoryMetadataStore`] served over
//! loopback TCP (length-prefixed postcard frames). It predates compare-and-swap and listing in
//! the HTTP metadata protocol (`tests/http_catalog.rs` covers that one); it stays as a second,
//! independent store implementation.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use mooncake_core::{Error, MemoryMetadataStore, MetadataStore, Result, Versioned};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Serialize, Deserialize)]
enum Request {
    Get(String),
    Put(String, Vec<u8>),
    Delete(String),
    Cas(String, u64, Option<Vec<u8>>),
    List(String),
}

#[derive(Serialize, Deserialize)]
enum Response {
    Get(Option<(Vec<u8>, u64)>),
    Revision(u64),
    Deleted(bool),
    Cas(Option<u64>),
    List(Vec<(String, Vec<u8>, u64)>),
    Failed(String),
}

async fn send<T: Serialize>(s: &mut TcpStream, value: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(value).expect("encodes");
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&body);
    s.write_all(&frame).await
}

async fn recv<T: for<'de> Deserialize<'de>>(s: &mut TcpStream) -> std::io::Result<T> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await?;
    let mut bytes = vec![0u8; u32::from_le_bytes(len) as usize];
    s.read_exact(&mut bytes).await?;
    postcard::from_bytes(&bytes).map_err(|e| std::io::Error::other(e.to_string()))
}

async fn answer(store: &MemoryMetadataStore, request: Request) -> Result<Response> {
    Ok(match request {
        Request::Get(k) => Response::Get(store.get(&k).await?.map(|v| (v.value, v.revision))),
        Request::Put(k, v) => Response::Revision(store.put(&k, v).await?),
        Request::Delete(k) => Response::Deleted(store.delete(&k).await?),
        Request::Cas(k, e, v) => Response::Cas(store.compare_and_swap(&k, e, v).await?),
        Request::List(p) => Response::List(
            store
                .list(&p)
                .await?
                .into_iter()
                .map(|(k, v)| (k, v.value, v.revision))
                .collect(),
        ),
    })
}

/// Serves `store` on a free loopback port until the runtime ends.
pub(crate) async fn serve(store: Arc<MemoryMetadataStore>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let store = store.clone();
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                while let Ok(request) = recv::<Request>(&mut s).await {
                    let response = answer(&store, request)
                        .await
                        .unwrap_or_else(|e| Response::Failed(e.to_string()));
                    if send(&mut s, &response).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A client of [`serve`]: one connection, one request at a time.
#[derive(Debug)]
pub(crate) struct NetMeta {
    conn: tokio::sync::Mutex<TcpStream>,
}

impl NetMeta {
    /// Connects to a [`serve`]r.
    pub(crate) async fn connect(addr: &str) -> NetMeta {
        let conn = TcpStream::connect(addr).await.unwrap();
        conn.set_nodelay(true).unwrap();
        NetMeta {
            conn: tokio::sync::Mutex::new(conn),
        }
    }

    async fn call(&self, request: Request) -> Result<Response> {
        let mut s = self.conn.lock().await;
        let io = |e: std::io::Error| Error::Metadata(e.to_string());
        send(&mut s, &request).await.map_err(io)?;
        match recv(&mut s).await.map_err(io)? {
            Response::Failed(e) => Err(Error::Metadata(e)),
            r => Ok(r),
        }
    }
}

fn unexpected() -> Error {
    Error::Metadata("unexpected response".into())
}

#[async_trait]
impl MetadataStore for NetMeta {
    async fn get(&self, key: &str) -> Result<Option<Versioned>> {
        match self.call(Request::Get(key.into())).await? {
            Response::Get(v) => Ok(v.map(|(value, revision)| Versioned { value, revision })),
            _ => Err(unexpected()),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<u64> {
        match self.call(Request::Put(key.into(), value)).await? {
            Response::Revision(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        match self.call(Request::Delete(key.into())).await? {
            Response::Deleted(d) => Ok(d),
            _ => Err(unexpected()),
        }
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected: u64,
        value: Option<Vec<u8>>,
    ) -> Result<Option<u64>> {
        match self.call(Request::Cas(key.into(), expected, value)).await? {
            Response::Cas(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<(String, Versioned)>> {
        match self.call(Request::List(prefix.into())).await? {
            Response::List(v) => Ok(v
                .into_iter()
                .map(|(k, value, revision)| (k, Versioned { value, revision }))
                .collect()),
            _ => Err(unexpected()),
        }
    }
}
