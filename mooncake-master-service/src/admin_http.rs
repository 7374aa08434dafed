//! The master's HTTP admin endpoints, served on its metrics port beside `/metrics` and `/health`,
//! with the paths, parameters and bodies of upstream's `mooncake_master`:
//!
//! | request | answer |
//! |---|---|
//! | `GET /get_all_segments` | `200`, the name of every mounted segment, one a line (each `\n`-terminated), in name order |
//! | `GET /get_segments_detail` | `200`, `{"total_segments":N,"segments":[{"segment_name","segment_id","client_id","base_address":"0x..","size_bytes","size_human":"X GiB","te_endpoint","status":"OK","allocator_used_bytes","allocator_capacity_bytes","allocator_usage_percent"}]}` (JSON); `segment_id` is this master's mount number, and `protocol` is left out as below |
//! | `GET /query_segment?segment=NAME` | `200`, `NAME\nUsed(bytes): U\nCapacity(bytes) : C\n` (a name mounted more than once adds up its mounts); `404 SEGMENT_NOT_FOUND` |
//! | `GET /get_all_keys` | `200`, every key, one a line (each `\n`-terminated), in key order; at most [`MAX_LISTED_KEYS`] a page (see below) |
//! | `GET /query_key?key=K` | `200`, one JSON buffer descriptor a line, one line per in-memory replica; `404` with the error name (`OBJECT_NOT_FOUND`, `REPLICA_IS_NOT_READY`) |
//! | `GET /batch_query_keys?keys=a,b` | `200`, `{"success":true,"data":{"a":{"ok":true,"values":[DESCRIPTOR,...]},"b":{"ok":false,"error":"OBJECT_NOT_FOUND"}}}`; `400` without keys |
//! | `GET /metrics/summary` | `200`, one human-readable line: storage used / capacity, keys, request counts, eviction |
//!
//! A buffer descriptor is `{"size":N,"buffer_address":N,"transport_endpoint":"host:port"}` (this
//! master does not record a mount's transport protocol, so upstream's `protocol` member is left
//! out). Keys and segment names are percent-decoded from the query. Inspection grants no read
//! lease and counts no request in the metrics.
//!
//! # With TLS
//!
//! A master started with certificates (`--tls_*` or `MC_TLS_*`) serves this port over HTTPS
//! with client certificates (`mooncake-meta-http`'s `HttpTls`): `/metrics` and `/health` answer
//! any certificate of the cluster CA, the endpoints above only one with the `admin` role
//! (`403` with the reason otherwise); a connection without a certificate, with another CA's or
//! an expired one is refused during the handshake.
//!
//! # The listing bound
//!
//! A store may hold millions of keys, and the whole listing is built under the master's lock,
//! so `/get_all_keys` answers at most [`MAX_LISTED_KEYS`] keys (fewer with `limit=N`). When
//! keys are left out the answer carries `X-Mooncake-More: 1`, and `?after=LAST` (the last key of
//! the page, percent-encoded) asks for the page after it. Without that header the listing is
//! complete. Clients that do not know the header (upstream's) see the first keys only.
//!
//! # Members of a master group
//!
//! Like upstream's standby masters, a member that is not the leader answers the state endpoints
//! with `503` and `{"success":false,"error_code":-1011,"error_message":"..."}`
//! (`UNAVAILABLE_IN_CURRENT_MODE`; the message names the leader when known): its state may lag
//! the leader's, and a checker polling it (SGLang's `MOONCAKE_CHECK_SERVER`) should go to the
//! leader. `/metrics`, `/metrics/summary` and `/health` answer on every member.

use std::fmt::Write as _;
use std::sync::Weak;

use mooncake_core::ErrorCode;
use mooncake_master::{MasterMetrics, ReplicaDescriptor, SegmentDetail};
use mooncake_meta_http::{ExtraRoutes, RouteRequest, RouteResponse};

use crate::service::MasterService;

/// Most keys one `/get_all_keys` answer lists (see the module docs).
pub const MAX_LISTED_KEYS: usize = 100_000;

/// Upstream's content type for the text endpoints.
const TEXT: &str = "text/plain; version=0.0.4";
const JSON: &str = "application/json; charset=utf-8";

/// The admin endpoints of `service`, for [`mooncake_meta_http::serve_http_routes`]. Holds the
/// service weakly: once it is gone every path answers `503`.
pub fn admin_routes(service: Weak<MasterService>) -> ExtraRoutes {
    std::sync::Arc::new(move |req: &RouteRequest<'_>| {
        if !is_admin_path(req.path) {
            return None;
        }
        if !req.is_read() {
            return Some(RouteResponse::new(405, TEXT, "method not allowed"));
        }
        Some(match service.upgrade() {
            Some(service) => answer(&service, req),
            None => unavailable("the master is shutting down"),
        })
    })
}

fn is_admin_path(path: &str) -> bool {
    matches!(
        path,
        "/get_all_segments"
            | "/get_segments_detail"
            | "/query_segment"
            | "/get_all_keys"
            | "/query_key"
            | "/batch_query_keys"
            | "/metrics/summary"
    )
}

fn answer(service: &MasterService, req: &RouteRequest<'_>) -> RouteResponse {
    if req.path == "/metrics/summary" {
        return RouteResponse::new(200, TEXT, summary(&service.metrics()));
    }
    if let Some(leader) = service.not_leader() {
        let why = match leader {
            Some(addr) => format!("this master is not the leader; the leader is {addr}"),
            None => "this master is not the leader; no leader is known".to_owned(),
        };
        return unavailable(&why);
    }
    let param = |name| req.param(name);
    match req.path {
        "/get_all_segments" => {
            let mut names: Vec<String> = service
                .inspect(|m, _| m.segments().into_iter().map(|s| s.name).collect::<Vec<_>>());
            names.sort_unstable();
            names.dedup();
            RouteResponse::new(200, TEXT, lines(names.iter().map(String::as_str)))
        }
        "/get_segments_detail" => {
            let details = service.inspect(|m, _| m.segment_details());
            RouteResponse::new(200, JSON, segments_detail_json(&details))
        }
        "/query_segment" => {
            let name = match param("segment") {
                Ok(Some(name)) => name,
                Ok(None) => String::new(),
                Err(why) => return RouteResponse::new(400, TEXT, why),
            };
            let found = service.inspect(|m, _| {
                m.segments().into_iter().filter(|s| s.name == name).fold(
                    None,
                    |acc: Option<(u64, u64)>, s| {
                        let (u, c) = acc.unwrap_or_default();
                        Some((u + s.used, c + s.capacity))
                    },
                )
            });
            match found {
                Some((used, capacity)) => RouteResponse::new(
                    200,
                    TEXT,
                    format!("{name}\nUsed(bytes): {used}\nCapacity(bytes) : {capacity}\n"),
                ),
                None => RouteResponse::new(404, TEXT, ErrorCode::SEGMENT_NOT_FOUND.name()),
            }
        }
        "/get_all_keys" => {
            let (after, limit) = match (param("after"), param("limit")) {
                (Ok(after), Ok(limit)) => (after, limit),
                (Err(why), _) | (_, Err(why)) => return RouteResponse::new(400, TEXT, why),
            };
            let limit = match limit.map(|l| l.parse::<usize>()) {
                None => MAX_LISTED_KEYS,
                Some(Ok(l)) if l > 0 => l.min(MAX_LISTED_KEYS),
                Some(_) => return RouteResponse::new(400, TEXT, "limit must be a positive number"),
            };
            let (keys, more) = service.inspect(|m, _| {
                let mut keys = m
                    .keys_after(after.as_deref())
                    .take(limit + 1)
                    .map(str::to_owned)
                    .collect::<Vec<_>>();
                let more = keys.len() > limit;
                keys.truncate(limit);
                (keys, more)
            });
            RouteResponse {
                more,
                ..RouteResponse::new(200, TEXT, lines(keys.iter().map(String::as_str)))
            }
        }
        "/query_key" => {
            let key = match param("key") {
                Ok(key) => key.unwrap_or_default(),
                Err(why) => return RouteResponse::new(400, TEXT, why),
            };
            match service.inspect(|m, now| m.replica_list_at(now, &key)) {
                Ok(list) => {
                    let mut body = String::new();
                    for d in list.replicas.iter().filter_map(descriptor_json) {
                        body += &d;
                        body.push('\n');
                    }
                    RouteResponse::new(200, TEXT, body)
                }
                Err(code) => RouteResponse::new(404, TEXT, code.name()),
            }
        }
        "/batch_query_keys" => {
            let keys: Vec<String> = match param("keys") {
                Ok(Some(keys)) if !keys.is_empty() => keys.split(',').map(str::to_owned).collect(),
                Ok(_) => {
                    return RouteResponse::new(
                        400,
                        JSON,
                        r#"{"success":false,"error":"No keys provided. Use ?keys=key1,key2,..."}"#,
                    )
                }
                Err(why) => {
                    let body = format!(r#"{{"success":false,"error":"{}"}}"#, json_escape(why));
                    return RouteResponse::new(400, JSON, body);
                }
            };
            let results: Vec<_> = service.inspect(|m, now| {
                keys.iter()
                    .map(|k| m.replica_list_at(now, k))
                    .collect::<Vec<_>>()
            });
            let mut body = String::from(r#"{"success":true,"data":{"#);
            for (i, (key, result)) in keys.iter().zip(results).enumerate() {
                if i > 0 {
                    body.push(',');
                }
                let _ = write!(body, "\"{}\":", json_escape(key));
                match result {
                    Ok(list) => {
                        let values: Vec<String> =
                            list.replicas.iter().filter_map(descriptor_json).collect();
                        let _ = write!(body, r#"{{"ok":true,"values":[{}]}}"#, values.join(","));
                    }
                    Err(code) => {
                        let _ = write!(body, r#"{{"ok":false,"error":"{}"}}"#, code.name());
                    }
                }
            }
            body += "}}";
            RouteResponse::new(200, JSON, body)
        }
        _ => RouteResponse::new(404, TEXT, "not found"),
    }
}

/// The body of `/get_segments_detail` (see the module docs).
fn segments_detail_json(details: &[SegmentDetail]) -> String {
    let mut out = format!(r#"{{"total_segments":{},"segments":["#, details.len());
    for (i, d) in details.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let (used, capacity) = (d.info.used, d.info.capacity);
        let percent = if capacity > 0 {
            used as f64 / capacity as f64 * 100.0
        } else {
            0.0
        };
        let _ = write!(
            out,
            r#"{{"segment_name":"{}","segment_id":"{}","client_id":"{}","base_address":"0x{:x}","size_bytes":{},"size_human":"{} GiB","te_endpoint":"{}","status":"OK","allocator_used_bytes":{used},"allocator_capacity_bytes":{capacity},"allocator_usage_percent":{percent}}}"#,
            json_escape(&d.info.name),
            d.info.id.0,
            d.client,
            d.info.base,
            d.size,
            d.size as f64 / (1u64 << 30) as f64,
            json_escape(&d.endpoint),
        );
    }
    out += "]}";
    out
}

/// Upstream's answer of a master that cannot serve state: `503` with a JSON error.
fn unavailable(why: &str) -> RouteResponse {
    let body = format!(
        r#"{{"success":false,"error_code":{},"error_message":"{}"}}"#,
        ErrorCode::UNAVAILABLE_IN_CURRENT_MODE as i32,
        json_escape(why)
    );
    RouteResponse::new(503, JSON, body)
}

/// Each item followed by a newline.
fn lines<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for item in items {
        out += item;
        out.push('\n');
    }
    out
}

/// An in-memory replica's buffer descriptor as JSON; `None` for other replicas.
fn descriptor_json(d: &ReplicaDescriptor) -> Option<String> {
    let m = d.memory()?;
    Some(format!(
        r#"{{"size":{},"buffer_address":{},"transport_endpoint":"{}"}}"#,
        m.size,
        m.buffer_address,
        json_escape(&m.transport_endpoint)
    ))
}

/// `s` as the inside of a JSON string.
pub(crate) fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out += "\\\"",
            '\\' => out += "\\\\",
            '\n' => out += "\\n",
            '\r' => out += "\\r",
            '\t' => out += "\\t",
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

/// Bytes in upstream's summary style (`1.5 GB`).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

/// The one-line summary of `/metrics/summary`, shaped like upstream's: storage, keys, requests
/// (successful/total), eviction. Where this master counts no failed requests of a kind (PutEnd,
/// PutRevoke, ExistKey, Remove answer without failing on a valid request), success equals total.
pub fn summary(m: &MasterMetrics) -> String {
    let c = &m.counters;
    let mut s = format!(
        "Storage: {} / {}",
        bytes(m.used_bytes),
        bytes(m.capacity_bytes)
    );
    if m.capacity_bytes > 0 {
        let pct = m.used_bytes as f64 / m.capacity_bytes as f64 * 100.0;
        let _ = write!(s, " ({pct:.1}%)");
    }
    let failed_puts = c.put_exists + c.put_no_space;
    let _ = write!(
        s,
        " | Keys: {} (complete: {}) | Segments: {} | Clients: {}",
        m.key_count, m.complete_key_count, m.segment_count, m.client_count
    );
    let _ = write!(
        s,
        " | Requests (Success/Total): PutStart={}/{}, PutEnd={}/{}, PutRevoke={}/{}, Get={}/{}, \
         Exist={}/{}, Del={}/{}",
        c.put_starts.saturating_sub(failed_puts),
        c.put_starts,
        c.put_ends,
        c.put_ends,
        c.put_revokes,
        c.put_revokes,
        c.get_hits,
        c.get_requests,
        c.exist_requests,
        c.exist_requests,
        c.removes,
        c.removes,
    );
    let _ = write!(
        s,
        " | Eviction: runs={}, keys={}, size={}",
        c.eviction_runs,
        c.evicted_objects,
        bytes(c.evicted_bytes)
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_are_escaped() {
        assert_eq!(json_escape("a\"b\\c\nd\u{1}é"), "a\\\"b\\\\c\\nd\\u0001é");
    }

    #[test]
    fn summary_reports_storage_keys_and_requests() {
        let mut m = MasterMetrics {
            key_count: 3,
            complete_key_count: 2,
            used_bytes: 512 << 20,
            capacity_bytes: 2 << 30,
            segment_count: 1,
            ..MasterMetrics::default()
        };
        m.counters.put_starts = 4;
        m.counters.put_exists = 1;
        m.counters.get_requests = 5;
        m.counters.get_hits = 3;
        let s = summary(&m);
        assert!(
            s.starts_with("Storage: 512.00 MB / 2.00 GB (25.0%) | Keys: 3 (complete: 2)"),
            "{s}"
        );
        assert!(s.contains("PutStart=3/4"), "{s}");
        assert!(s.contains("Get=3/5"), "{s}");
        assert_eq!(bytes(17), "17 B");
    }
}
