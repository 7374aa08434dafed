//! A small HTTP/1.1 server and client for the metadata, metrics and health endpoints.
//!
//! [`serve_http`] speaks upstream Mooncake's HTTP metadata protocol (`GET`/`PUT`/`DELETE
//! /metadata?key=K`, with which transfer engines publish segment descriptors) and serves
//! `/metrics` (Prometheus text) and `/health`. [`HttpMetadataStore`] is the other side: a
//! [`MetadataStore`] over that protocol, for `http://host:port/metadata` metadata URLs.
//!
//! Hand-rolled on tokio, and defensive: request heads and bodies are bounded, each request must
//! arrive within a timeout, malformed input gets `400` and a closed connection. Not supported:
//! TLS, chunked request bodies (`411`), revisions (the protocol has none).

#![deny(unsafe_code)]

mod client;
mod server;
#[cfg(test)]
mod tests;

pub use client::{HttpClientConfig, HttpMetadataStore};
pub use server::{serve_http, serve_http_with, HttpEndpoints, HttpServerConfig};

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
