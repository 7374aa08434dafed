//! A small HTTP/1.1 server and client for the metadata, metrics and health endpoints.
//!
//! [`serve_http`] speaks upstream Mooncake's HTTP metadata protocol (`GET`/`PUT`/`DELETE
//! /metadata?key=K`, with which transfer engines publish segment descriptors) and serves
//! `/metrics` (Prometheus text) and `/health`; [`serve_http_routes`] lets the program embedding it
//! serve further paths on the same server (the master's admin endpoints). [`HttpMetadataStore`] is the other side: a
//! complete [`MetadataStore`](mooncake_core::MetadataStore) over that protocol, for
//! `http://host:port/metadata` metadata URLs, so that the P2P store's catalog can live in the
//! HTTP metadata server (or in `mooncake_master --enable_http_metadata_server`).
//!
//! # The protocol and its extension
//!
//! Upstream's requests get upstream's answers (status, body, content type), with one header
//! added; the extension is only new headers and query parameters, which upstream's clients
//! neither send nor read:
//!
//! | request | answer |
//! |---|---|
//! | `GET /metadata?key=K` | `200` with the value (`application/octet-stream`) and `X-Mooncake-Revision: R`; `404 metadata not found` |
//! | `PUT /metadata?key=K` (body: the value) | `200 metadata updated` and `X-Mooncake-Revision: R` (the new revision) |
//! | `DELETE /metadata?key=K` | `200 metadata deleted`; `404 metadata not found` |
//! | `PUT /metadata?key=K&expected_revision=E` | written only if the key's revision is `E` (`0`: the key must not exist): `200 metadata updated` and the new revision; otherwise `412 revision mismatch` and nothing written |
//! | `DELETE /metadata?key=K&expected_revision=E` | the same for a delete: `200 metadata deleted` and the revision of the delete, or `412` |
//! | `GET /metadata?prefix=P[&after=A]` | `200`, one page of the keys starting with `P` (and after `A`), in key order; `X-Mooncake-More: 1` when more pages follow |
//!
//! Revisions are the backing store's: store-wide, growing, never 0. A listing body is a
//! sequence of entries, each `key_len: u32 | key (UTF-8) | revision: u64 | value_len: u64 |
//! value`, integers big-endian, nothing else (values are binary). A page stops before the entry
//! that would take it past [`HttpServerConfig::max_list_page`] (16 MiB by default) but always
//! holds at least one entry; [`HttpMetadataStore`]'s `list` asks for the next page with
//! `after=` the last key it got, until no `X-Mooncake-More` comes. Each page is read at one
//! moment; a listing of several pages is not one snapshot (keys written meanwhile may or may not
//! appear). `key` with `prefix`, `after` without `prefix`, `expected_revision` on a `GET`, or a
//! malformed number get `400`; a backing store that cannot compare-and-swap or list gets `501`.
//!
//! Against upstream's servers (no revisions) the client reports revision 1 on reads and writes,
//! and fails `compare_and_swap` with [`NotSupported`](mooncake_core::Error::NotSupported) when
//! the answer carries no revision: such a server ignored the condition and wrote anyway.
//! Listing there fails with `NotSupported` too.
//!
//! Hand-rolled on tokio, and defensive: request heads and bodies are bounded, each request must
//! arrive within a timeout, malformed input gets `400` and a closed connection, and the client
//! checks every listing entry (bounds, UTF-8 keys inside the prefix, strictly ascending across
//! pages). Not supported: chunked request bodies (`411`), revisions on plain `DELETE`
//! answers (the store's delete does not report one), watches.
//!
//! # TLS
//!
//! With [`HttpServerConfig::tls`] the server speaks HTTPS only and every connection must present
//! a certificate of the cluster CA; [`HttpTls`] says which roles each request needs (reads:
//! any; `PUT`/`DELETE` of metadata: `client` or `master`; other paths: `admin`), and a refusal
//! is `403` with the reason. The client connects with TLS for `https://` URLs, with the
//! certificate of [`HttpClientConfig::tls`] or else of the `MC_TLS_CA`, `MC_TLS_CERT` and
//! `MC_TLS_KEY` environment variables. Without TLS both sides work exactly as described above.

#![deny(unsafe_code)]

mod client;
mod server;
#[cfg(test)]
mod tests;

pub use client::{HttpClientConfig, HttpMetadataStore};
pub use server::{
    serve_http, serve_http_routes, serve_http_with, ExtraRoutes, HttpEndpoints, HttpServerConfig,
    HttpTls, RouteRequest, RouteResponse, HTTP_ALPN,
};

use std::io;
use std::result::Result;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt};

/// Outcome of reading one line of a message head.
enum Line {
    Text(Vec<u8>),
    Eof,
    TooLong,
}

/// Reads one `\n`-terminated line (returned without `\r\n`), charging it to `budget`.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R, budget: &mut usize) -> io::Result<Line> {
    let mut line = Vec::new();
    let n = (&mut *r)
        .take(*budget as u64)
        .read_until(b'\n', &mut line)
        .await?;
    *budget -= n;
    if line.pop() != Some(b'\n') {
        return Ok(if *budget == 0 {
            Line::TooLong
        } else {
            Line::Eof
        });
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Line::Text(line))
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty()
        && s.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Splits `Name: value` into the name and the trimmed value.
fn parse_header(line: &[u8]) -> Option<(&[u8], &[u8])> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
    is_token(name).then_some((name, value))
}

fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = std::str::from_utf8(value).ok()?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())?
}

/// The decoded value of the first `name` parameter in a query string.
fn query_param(query: &str, name: &str) -> Result<Option<String>, &'static str> {
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if percent_decode(k)? == name {
            return percent_decode(v).map(Some);
        }
    }
    Ok(None)
}

/// Decodes `%XX` escapes and `+` (a space, as in forms and Go's `Query().Get`).
fn percent_decode(s: &str) -> Result<String, &'static str> {
    let (mut out, mut bytes) = (Vec::with_capacity(s.len()), s.bytes());
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'+' => b' ',
            b'%' => {
                let hex = [bytes.next(), bytes.next()];
                let hex = hex.map(|d| d.and_then(|d| (d as char).to_digit(16)));
                match hex {
                    [Some(hi), Some(lo)] => (hi * 16 + lo) as u8,
                    _ => return Err("bad percent-escape in query"),
                }
            }
            b => b,
        });
    }
    String::from_utf8(out).map_err(|_| "query is not UTF-8 after decoding")
}

/// Escapes everything but RFC 3986 unreserved characters, as `curl_easy_escape` does.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

/// Bytes [`encode_entry`] appends for one entry.
fn entry_len(key: &str, value: &[u8]) -> usize {
    4 + key.len() + 8 + 8 + value.len()
}

/// Appends one listing entry: `key_len: u32 | key (UTF-8) | revision: u64 | value_len: u64 |
/// value`, integers big-endian. A listing body is a sequence of entries, nothing else.
fn encode_entry(out: &mut Vec<u8>, key: &str, revision: u64, value: &[u8]) {
    out.extend_from_slice(&(key.len() as u32).to_be_bytes());
    out.extend_from_slice(key.as_bytes());
    out.extend_from_slice(&revision.to_be_bytes());
    out.extend_from_slice(&(value.len() as u64).to_be_bytes());
    out.extend_from_slice(value);
}

/// One decoded listing entry: key, revision, value.
type Entry = (String, u64, Vec<u8>);

/// Decodes a listing body into entries; fails on anything that is not exactly a sequence of
/// well-formed entries.
fn decode_entries(mut body: &[u8]) -> Result<Vec<Entry>, &'static str> {
    fn take<'a>(body: &mut &'a [u8], n: u64) -> Result<&'a [u8], &'static str> {
        let n = usize::try_from(n).map_err(|_| "entry length overflows")?;
        if body.len() < n {
            return Err("truncated listing entry");
        }
        let (head, rest) = body.split_at(n);
        *body = rest;
        Ok(head)
    }
    let number = |b: &[u8]| b.iter().fold(0u64, |n, &d| n << 8 | u64::from(d));
    let mut out = Vec::new();
    while !body.is_empty() {
        let key_len = number(take(&mut body, 4)?);
        let key = std::str::from_utf8(take(&mut body, key_len)?)
            .map_err(|_| "listing key is not UTF-8")?;
        let revision = number(take(&mut body, 8)?);
        let value_len = number(take(&mut body, 8)?);
        let value = take(&mut body, value_len)?;
        out.push((key.to_owned(), revision, value.to_vec()));
    }
    Ok(out)
}
