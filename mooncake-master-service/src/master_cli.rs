//! The `mooncake_master` command line: upstream's flags, parsed into a [`MasterOptions`], and a
//! runner that serves RPC, the HTTP metadata server and the metrics endpoint until told to stop.
//!
//! Flags take gflags' forms: `--flag=value`, `--flag value`, and for booleans `--flag`,
//! `--flag=true|false|1|0` and `--noflag`. Durations accept plain numbers in the flag's unit
//! (milliseconds for TTLs, seconds for `--client_ttl`) or a suffixed value (`500ms`, `10s`, `2m`).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mooncake_core::{Error, Result};
use mooncake_master::MasterConfig;

use crate::admin_http::{admin_routes, summary};
use crate::cli::{parse_raft_peers, run_program, shutdown_signal, tls_identity};
use crate::master_flags::{
    check_kind, expand_flagfiles, init_logging, load_config_file, no_effect_kind, refusal, Kind,
    LogOptions,
};
use crate::service::{MasterService, ServiceConfig};
use mooncake_meta_http::{
    serve_http_routes, serve_http_with, HttpEndpoints, HttpServerConfig, HttpTls,
};
use mooncake_tls::TlsIdentity;

/// Everything `mooncake_master` is told on its command line.
#[derive(Clone, Debug)]
pub struct MasterOptions {
    /// The state machine's configuration.
    pub master: MasterConfig,
    /// Address the RPC server binds (`--rpc_address`, default `0.0.0.0`).
    pub rpc_address: String,
    /// RPC port (`--rpc_port`, default 50051).
    pub rpc_port: u16,
    /// Serve `/metadata` (`--enable_http_metadata_server`, default false).
    pub enable_http_metadata_server: bool,
    /// Host of the HTTP metadata server (`--http_metadata_server_host`, default `0.0.0.0`).
    pub http_metadata_server_host: String,
    /// Port of the HTTP metadata server (`--http_metadata_server_port`, default 8080).
    pub http_metadata_server_port: u16,
    /// Port of `/metrics` and `/health` (`--metrics_port`, default 9003); bound on `rpc_address`.
    pub metrics_port: u16,
    /// Log the metrics summary every 10 s (`--enable_metric_reporting`, default true). The
    /// metrics port (`/metrics`, `/health`, the admin endpoints) is served either way, as
    /// upstream does: serving stacks poll it.
    pub enable_metrics: bool,
    /// Log output (glog's `--log_dir`, `--minloglevel`, `--v`, `--logtostderr`,
    /// `--alsologtostderr`).
    pub logging: LogOptions,
    /// Flags given that upstream defines and that have no effect here, as given (logged at
    /// start).
    pub no_effect: Vec<String>,
    /// Membership in a Raft master group (`--raft_id`, `--raft_peers`, `--raft_data_dir`);
    /// `None` runs a single master with its state in memory.
    pub raft: Option<RaftOptions>,
    /// This master's certificate (`--tls_ca`, `--tls_cert`, `--tls_key`, or `MC_TLS_CA`,
    /// `MC_TLS_CERT`, `MC_TLS_KEY` when the flags are absent): with it, the RPC and metrics
    /// ports admit only peers with a certificate of the cluster CA, and requests need the roles
    /// their certificates grant. `None` accepts any peer (logged at start).
    pub tls: Option<TlsIdentity>,
}

/// This master's place in a Raft master group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaftOptions {
    /// This member's id (`--raft_id`, non-zero).
    pub id: u64,
    /// Every member: id, Raft address, RPC address (`--raft_peers
    /// 1=127.0.0.1:7001/127.0.0.1:50051,2=...`). The same list on every member.
    pub peers: Vec<(u64, String, String)>,
    /// Where the log, hard state and snapshots live (`--raft_data_dir`, default
    /// `mooncake-raft-<id>`).
    pub data_dir: PathBuf,
    /// Length of one Raft tick (`--raft_tick_ms`, default 100 ms).
    pub tick_ms: u64,
    /// Ticks without a leader before a member campaigns, randomised up to twice this
    /// (`--raft_election_ticks`, default 10): with the default tick, a failover takes 1-2 s of
    /// detection plus the election.
    pub election_ticks: usize,
    /// Join an existing group instead of bootstrapping one (`--raft_join`): the member starts
    /// empty and waits until the leader adds it (`mooncake_master admin add-learner`).
    /// `--raft_peers` then lists the current members, as an address book, plus this one.
    pub join: bool,
}

impl Default for MasterOptions {
    fn default() -> Self {
        MasterOptions {
            master: MasterConfig::default(),
            rpc_address: "0.0.0.0".into(),
            rpc_port: 50051,
            enable_http_metadata_server: false,
            http_metadata_server_host: "0.0.0.0".into(),
            http_metadata_server_port: 8080,
            metrics_port: 9003,
            enable_metrics: true,
            logging: LogOptions::default(),
            no_effect: Vec::new(),
            raft: None,
            tls: None,
        }
    }
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
mooncake_master: metadata and allocation service of a Mooncake store

Flags (upstream names; --flag=value or --flag value):
  --rpc_address=0.0.0.0                  address the RPC server binds
  --rpc_port=50051                       RPC port
  --enable_http_metadata_server=false    serve transfer-engine metadata at /metadata
  --http_metadata_server_host=0.0.0.0
  --http_metadata_server_port=8080
  --metrics_port=9003                    /metrics (Prometheus), /health and the admin endpoints
  --enable_metric_reporting=true         log a metrics summary every 10 s (the metrics port is
                                         served either way)
  --default_kv_lease_ttl=10000           read lease, ms (or 500ms, 10s)
  --default_kv_soft_pin_ttl=1800000      soft pin lifetime, ms (or 30m)
  --client_ttl=10                        seconds of silence before a client's segments go
  --eviction_high_watermark_ratio=0.90
  --eviction_ratio=0.05
  --allocation_strategy=random           random | free_ratio_first | local_first
  --cluster_id=mooncake_cluster
  --enable_rereplication=true            restore replica_num after a segment is lost
  --reservation_ttl=500                  how long a client writes into space it reserved, ms
                                         (or 500ms); 0: every put asks the master first
  --port=50051                           deprecated RPC port, used when --rpc_port is absent
  --allow_evict_soft_pinned_objects=true
  --put_start_discard_timeout_sec=30     age after which another put may take over a write
  --put_start_release_timeout_sec=600    age after which an abandoned write's space is freed
  --max_total_pending_tasks=10000        most unfinished copy/move tasks
  --processing_task_timeout_sec=60       a task held longer counts as failed (0: never)
  --max_retry_attempts=3                 retries of a failed or timed-out task
  --config_path=FILE                     upstream's master config (.json, or flat .yaml/.yml);
                                         command-line flags win over it
  --flagfile=FILE                        more flags, one a line (# comments)

Logging (glog's flags; RUST_LOG overrides the level):
  --log_dir=DIR                          log to DIR/mooncake_master.INFO instead of stderr
  --logtostderr=false                    stderr only, even with --log_dir
  --alsologtostderr=false                with --log_dir, stderr as well
  --minloglevel=0                        0 info, 1 warning, 2 error, 3 fatal
  --v=0                                  1-2 debug, 3+ trace

Upstream flags accepted with no effect (they tune upstream's internals or features that stay
off): --max_threads --rpc_thread_num --rpc_conn_timeout_seconds --rpc_enable_tcp_no_delay
  --etcd_endpoints --global_file_segment_size --memory_allocator=offset|cachelib
  --enable_disk_eviction --quota_bytes --max_total_finished_tasks --max_total_processing_tasks
  --pending_task_timeout_sec --cxl_path --cxl_size --ha_backend_type --ha_backend_connstring
  --snapshot_* (backup_dir, interval_seconds, child_timeout_seconds, retention_count,
  object/payload/catalog store and backend types and connstrings), --enable_ha --enable_offload
  --enable_cxl --enable_gc --enable_snapshot --enable_snapshot_restore when false, an empty
  --root_fs_dir or --rpc_interface, and glog's --stderrthreshold
  --colorlogtostderr --max_log_size --stop_logging_if_full_disk --logbuflevel --logbufsecs
  --log_prefix --log_link --logfile_mode --vmodule --timestamp_in_logfile_name --log_utc_time.
Refused at start (features this master does not have): --enable_ha=true (etcd HA; use a Raft
group), --enable_offload=true, --enable_cxl=true, --enable_gc=true, --enable_snapshot=true,
--enable_snapshot_restore=true, a non-empty --root_fs_dir or --rpc_interface,
--allocation_strategy=cxl.

Mutual TLS (all three or none; without them MC_TLS_CA, MC_TLS_CERT and MC_TLS_KEY are used
when set; create certificates with mooncake_certs):
  --tls_ca=FILE                          the cluster CA's certificate (PEM)
  --tls_cert=FILE                        this master's certificate (role master; its SANs name
                                         the addresses clients dial)
  --tls_key=FILE                         its private key
  --tls_crl=FILE                         the CA's revocation list (mooncake_certs revoke; or
                                         MC_TLS_CRL): revoked certificates are refused, the
                                         file is re-read when it changes
With TLS every RPC connection needs a certificate of the cluster CA: data commands need the
client or master role, membership changes the admin role. The Raft port admits the group's
members only (a member's certificate: role master, common name master-<raft_id>). The metrics
port and the HTTP metadata server serve HTTPS: any cluster certificate for /metrics, /health
and metadata reads, the client or master role for metadata writes, the admin role for the
admin endpoints. Without TLS the master accepts any peer.

The metrics port also serves upstream's admin endpoints: /get_all_segments,
/query_segment?segment=S, /get_all_keys (100000 keys a page; after=K, limit=N),
/query_key?key=K, /batch_query_keys?keys=A,B, /metrics/summary.

Master group (Raft; every member gets the same --raft_peers):
  --raft_id=0                            this member's id; 0 runs a single in-memory master
  --raft_peers=1=HOST:PORT/HOST:PORT,... each member: id=raft_address/rpc_address
  --raft_data_dir=mooncake-raft-<id>     log, hard state and snapshots
  --raft_tick_ms=100                     Raft tick
  --raft_election_ticks=10               ticks of silence before an election (randomised up to 2x)
  --raft_join=false                      start as a new member of a running group: bootstrap
                                         nothing and wait to be added; --raft_peers lists the
                                         current members and this one (without it, a first start
                                         next to a running group that lacks this member is
                                         refused)

On becoming leader a member prints `mooncake_master raft: leader id=ID term=TERM` (and
`mooncake_master raft: stepped_down id=ID term=TERM` when that ends) on stdout.

Changing a group's members at run time (see `mooncake_master admin --help`):
  mooncake_master admin members|add-learner ID=RAFT/RPC|promote ID|remove ID \\
      --master_server_addr=HOST:PORT,...
";

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed {
    /// Run with these options.
    Run(Box<MasterOptions>),
    /// Print the usage.
    Help,
}

/// Parses a duration flag: a plain number in `unit_ms` milliseconds, or `N ms|s|m|h`.
pub fn parse_duration_ms(value: &str, unit_ms: u64) -> Result<u64> {
    let v = value.trim();
    let (digits, scale) = if let Some(d) = v.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = v.strip_suffix('s') {
        (d, 1000)
    } else if let Some(d) = v.strip_suffix('m') {
        (d, 60_000)
    } else if let Some(d) = v.strip_suffix('h') {
        (d, 3_600_000)
    } else {
        (v, unit_ms)
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| Error::InvalidArgument(format!("{value:?} is not a duration")))
}

fn parse_bool(name: &str, value: &str) -> Result<bool> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(Error::InvalidArgument(format!(
            "--{name}: {value:?} is not a boolean"
        ))),
    }
}

fn parse_num<T: std::str::FromStr>(name: &str, value: &str) -> Result<T> {
    value
        .parse()
        .map_err(|_| Error::InvalidArgument(format!("--{name}: {value:?} is not a valid number")))
}

/// Flags with a value that this master acts on.
const VALUED: &[&str] = &[
    "rpc_address",
    "rpc_port",
    "http_metadata_server_host",
    "http_metadata_server_port",
    "metrics_port",
    "default_kv_lease_ttl",
    "default_kv_soft_pin_ttl",
    "client_ttl",
    "eviction_high_watermark_ratio",
    "eviction_ratio",
    "allocation_strategy",
    "cluster_id",
    "reservation_ttl",
    "port",
    "put_start_discard_timeout_sec",
    "put_start_release_timeout_sec",
    "max_total_pending_tasks",
    "processing_task_timeout_sec",
    "max_retry_attempts",
    "config_path",
    "log_dir",
    "minloglevel",
    "v",
    "raft_id",
    "raft_peers",
    "raft_data_dir",
    "raft_tick_ms",
    "raft_election_ticks",
    "tls_ca",
    "tls_cert",
    "tls_key",
    "tls_crl",
];

const BOOLS: &[&str] = &[
    "enable_http_metadata_server",
    "enable_metric_reporting",
    "enable_rereplication",
    "raft_join",
    "allow_evict_soft_pinned_objects",
    "logtostderr",
    "alsologtostderr",
];

fn is_bool(name: &str) -> bool {
    BOOLS.contains(&name) || no_effect_kind(name) == Some(Kind::Bool)
}

fn is_known(name: &str) -> bool {
    VALUED.contains(&name) || is_bool(name) || no_effect_kind(name).is_some()
}

/// Upstream's "0 = no timeout" for task timeouts: a century, in ms.
const NO_TIMEOUT_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

/// Parses the arguments after the program name: `--flagfile`s are read in place, then the
/// `--config_path` file's settings apply, then the command line's flags in order (a later one
/// wins).
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed> {
    let args: Vec<String> = args.into_iter().collect();
    if args
        .iter()
        .any(|a| a == "-h" || a == "--help" || a == "-help")
    {
        return Ok(Parsed::Help);
    }
    let mut args = expand_flagfiles(args)?;
    let config_path = args.iter().rev().find_map(|a| {
        a.trim_start_matches('-')
            .strip_prefix("config_path=")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
    });
    // Upstream reads only the keys it knows from the config file; others are skipped here too.
    let mut skipped = Vec::new();
    if let Some(path) = config_path {
        let (mut from_file, unknown): (Vec<String>, Vec<String>) =
            load_config_file(&path)?.into_iter().partition(|f| {
                let name = f.trim_start_matches('-');
                is_known(name.split_once('=').map_or(name, |(n, _)| n))
            });
        skipped = unknown;
        from_file.append(&mut args);
        args = from_file;
    }
    let mut o = MasterOptions {
        no_effect: skipped,
        ..MasterOptions::default()
    };
    let (mut raft_id, mut raft_peers, mut raft_dir) = (0u64, None, None);
    let (mut raft_tick_ms, mut raft_election_ticks) = (100u64, 10usize);
    let mut raft_join = false;
    let (mut tls_ca, mut tls_cert, mut tls_key, mut tls_crl) = (None, None, None, None);
    let (mut rpc_port, mut port) = (None::<u16>, None::<u16>);
    let mut args = args.into_iter().peekable();
    while let Some(arg) = args.next() {
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(Error::InvalidArgument(format!(
                "unexpected argument {arg:?} (flags start with --)"
            )));
        };
        let bare = flag.split_once('=').map_or(flag, |(n, _)| n);
        if !is_known(bare) && !bare.strip_prefix("no").is_some_and(is_bool) {
            return Err(Error::InvalidArgument(format!(
                "unknown flag --{bare} (see --help)"
            )));
        }
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None if is_bool(flag) => (flag.to_owned(), "true".to_owned()),
            None if flag.strip_prefix("no").is_some_and(is_bool) => {
                (flag[2..].to_owned(), "false".to_owned())
            }
            None => match args.next() {
                Some(v) => (flag.to_owned(), v),
                None => return Err(Error::InvalidArgument(format!("--{flag} needs a value"))),
            },
        };
        if let Some(why) = refusal(&name, &value) {
            return Err(Error::NotSupported(why));
        }
        let m = &mut o.master;
        match name.as_str() {
            "rpc_address" => o.rpc_address = value,
            "rpc_port" => rpc_port = Some(parse_num(&name, &value)?),
            "port" => port = Some(parse_num(&name, &value)?),
            "enable_http_metadata_server" => {
                o.enable_http_metadata_server = parse_bool(&name, &value)?
            }
            "http_metadata_server_host" => o.http_metadata_server_host = value,
            "http_metadata_server_port" => o.http_metadata_server_port = parse_num(&name, &value)?,
            "metrics_port" => o.metrics_port = parse_num(&name, &value)?,
            "enable_metric_reporting" => o.enable_metrics = parse_bool(&name, &value)?,
            "default_kv_lease_ttl" => m.default_kv_lease_ttl_ms = parse_duration_ms(&value, 1)?,
            "default_kv_soft_pin_ttl" => {
                m.default_kv_soft_pin_ttl_ms = parse_duration_ms(&value, 1)?
            }
            "client_ttl" => m.client_ttl_ms = parse_duration_ms(&value, 1000)?,
            "eviction_high_watermark_ratio" => {
                m.eviction_high_watermark_ratio = parse_num(&name, &value)?
            }
            "eviction_ratio" => m.eviction_ratio = parse_num(&name, &value)?,
            "allocation_strategy" => m.allocation_strategy = value.parse()?,
            "cluster_id" => m.cluster_id = value,
            "reservation_ttl" => m.reservation_ttl_ms = parse_duration_ms(&value, 1)?,
            "enable_rereplication" => m.enable_rereplication = parse_bool(&name, &value)?,
            "allow_evict_soft_pinned_objects" => {
                m.allow_evict_soft_pinned_objects = parse_bool(&name, &value)?
            }
            "put_start_discard_timeout_sec" => m.put_takeover_ms = parse_duration_ms(&value, 1000)?,
            "put_start_release_timeout_sec" => m.put_reclaim_ms = parse_duration_ms(&value, 1000)?,
            "max_total_pending_tasks" => m.max_active_tasks = parse_num(&name, &value)?,
            "processing_task_timeout_sec" => {
                m.task_timeout_ms = match parse_duration_ms(&value, 1000)? {
                    0 => NO_TIMEOUT_MS,
                    ms => ms,
                }
            }
            "max_retry_attempts" => m.task_max_retries = parse_num(&name, &value)?,
            "config_path" => {} // read before the flags
            "log_dir" => {
                o.logging.dir = Some(value.into()).filter(|d: &PathBuf| !d.as_os_str().is_empty())
            }
            "minloglevel" => o.logging.min_level = parse_num(&name, &value)?,
            "v" => o.logging.verbosity = parse_num(&name, &value)?,
            "logtostderr" => o.logging.to_stderr = parse_bool(&name, &value)?,
            "alsologtostderr" => o.logging.also_to_stderr = parse_bool(&name, &value)?,
            "raft_id" => raft_id = parse_num(&name, &value)?,
            "raft_peers" => raft_peers = Some(parse_raft_peers(&value)?),
            "raft_data_dir" => raft_dir = Some(PathBuf::from(value)),
            "raft_tick_ms" => raft_tick_ms = parse_num(&name, &value)?,
            "raft_election_ticks" => raft_election_ticks = parse_num(&name, &value)?,
            "raft_join" => raft_join = parse_bool(&name, &value)?,
            "tls_ca" => tls_ca = Some(value),
            "tls_cert" => tls_cert = Some(value),
            "tls_key" => tls_key = Some(value),
            "tls_crl" => tls_crl = Some(value),
            other if no_effect_kind(other).is_some() => {
                let kind = no_effect_kind(other).unwrap_or(Kind::Text);
                check_kind(other, kind, &value)?;
                o.no_effect.push(format!("--{other}={value}"));
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown flag --{other} (see --help)"
                )))
            }
        }
    }
    // --rpc_port wins; upstream's deprecated --port stands in when --rpc_port is absent (or 0,
    // upstream's "use --port"); a lone --rpc_port=0 binds any free port.
    o.rpc_port = match (rpc_port, port) {
        (Some(p), _) if p != 0 => p,
        (_, Some(p)) => p,
        (Some(0), None) => 0,
        _ => 50051,
    };
    o.master.validate()?;
    o.tls = tls_identity(tls_ca, tls_cert, tls_key, tls_crl)?;
    o.raft = match (raft_id, raft_peers) {
        (0, None) if raft_join => {
            return Err(Error::InvalidArgument(
                "--raft_join needs --raft_id and --raft_peers".into(),
            ))
        }
        (0, None) => None,
        (0, Some(_)) => {
            return Err(Error::InvalidArgument(
                "--raft_peers needs --raft_id (this member's id)".into(),
            ))
        }
        (_, None) => {
            return Err(Error::InvalidArgument(
                "--raft_id needs --raft_peers (every member of the group)".into(),
            ))
        }
        (id, Some(peers)) => {
            if !peers.iter().any(|p| p.0 == id) {
                return Err(Error::InvalidArgument(format!(
                    "--raft_id {id} is not among --raft_peers (a member joining a running \
                     group lists itself too, with --raft_join)"
                )));
            }
            if raft_join && peers.len() < 2 {
                return Err(Error::InvalidArgument(
                    "--raft_join: --raft_peers must list the group's current members besides \
                     this one (the leader has to be reachable to answer it)"
                        .into(),
                ));
            }
            if raft_tick_ms == 0 || raft_election_ticks < 3 {
                return Err(Error::InvalidArgument(
                    "--raft_tick_ms must be positive and --raft_election_ticks at least 3".into(),
                ));
            }
            Some(RaftOptions {
                id,
                peers,
                data_dir: raft_dir.unwrap_or_else(|| format!("mooncake-raft-{id}").into()),
                tick_ms: raft_tick_ms,
                election_ticks: raft_election_ticks,
                join: raft_join,
            })
        }
    };
    Ok(Parsed::Run(Box::new(o)))
}

fn socket(host: &str, port: u16) -> Result<SocketAddr> {
    mooncake_rpc::bind_address(&format!("{host}:{port}"))
        .or_else(|_| mooncake_rpc::bind_address(&format!("[{host}]:{port}")))
}

/// The addresses a running master listens on.
#[derive(Clone, Debug)]
pub struct Listening {
    /// RPC.
    pub rpc: SocketAddr,
    /// HTTP metadata server, when enabled.
    pub http_metadata: Option<SocketAddr>,
    /// Metrics and health, when enabled.
    pub metrics: Option<SocketAddr>,
}

/// Starts the master's servers on the current runtime; they run until the service shuts down.
pub async fn start(options: &MasterOptions) -> Result<(Arc<MasterService>, Listening)> {
    // One identity for every listener of this master: its RPC, the Raft group's network (the
    // certificate's common name must then be `master-<raft_id>`), the HTTP metadata server and
    // the metrics port.
    let raft_tls: Option<TlsIdentity> = options.tls.clone();
    let http_metadata_tls: Option<TlsIdentity> = options.tls.clone();
    let rpc_tls = options
        .tls
        .as_ref()
        .map(mooncake_rpc::tls_acceptor)
        .transpose()?;
    match &options.tls {
        None => tracing::warn!(
            "mooncake_master accepts any peer: its RPC, metrics and admin ports authenticate \
             nobody. To admit only the cluster's members, create certificates with \
             `mooncake_certs init` and `mooncake_certs issue NAME --name ADDRESS --role master` \
             and start with --tls_ca, --tls_cert and --tls_key (or MC_TLS_CA, MC_TLS_CERT and \
             MC_TLS_KEY)"
        ),
        Some(id) => {
            let own = id.own()?;
            tracing::info!(
                "mutual TLS on: the RPC, Raft, metadata and metrics ports admit only \
                 certificates of the cluster CA (this master is {}, roles: {})",
                own.name(),
                own.roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    let service = match &options.raft {
        None => MasterService::new(options.master.clone(), ServiceConfig::default())?,
        Some(raft) => start_member(options, raft, raft_tls.as_ref()).await?,
    };
    let rpc = service
        .serve_rpc_tls(socket(&options.rpc_address, options.rpc_port)?, rpc_tls)
        .await?;
    let metrics_fn: Arc<dyn Fn() -> String + Send + Sync> = {
        let weak = Arc::downgrade(&service);
        Arc::new(move || {
            weak.upgrade()
                .map(|s| s.metrics().to_prometheus())
                .unwrap_or_default()
        })
    };
    let health: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(|| true);
    let mut listening = Listening {
        rpc,
        http_metadata: None,
        metrics: None,
    };
    if options.enable_http_metadata_server {
        let addr = socket(
            &options.http_metadata_server_host,
            options.http_metadata_server_port,
        )?;
        let listener = mooncake_rpc::rpc::bind(addr).await?;
        listening.http_metadata = Some(listener.local_addr()?);
        service.keep(serve_http_with(
            listener,
            HttpEndpoints {
                metadata: Some(service.metadata()),
                metrics: metrics_fn.clone(),
                health: health.clone(),
            },
            HttpServerConfig {
                tls: http_metadata_tls.as_ref().map(HttpTls::new).transpose()?,
                ..HttpServerConfig::default()
            },
        ));
    }
    {
        let listener =
            mooncake_rpc::rpc::bind(socket(&options.rpc_address, options.metrics_port)?).await?;
        listening.metrics = Some(listener.local_addr()?);
        // With TLS: HTTPS, any cluster certificate for /metrics and /health, the admin role for
        // the admin endpoints (HttpTls's default for extra routes).
        service.keep(serve_http_routes(
            listener,
            HttpEndpoints {
                metadata: None,
                metrics: metrics_fn,
                health,
            },
            Some(admin_routes(Arc::downgrade(&service))),
            HttpServerConfig {
                tls: options.tls.as_ref().map(HttpTls::new).transpose()?,
                ..HttpServerConfig::default()
            },
        ));
        if options.enable_metrics {
            service.keep(report_metrics(Arc::downgrade(&service)));
        }
    }
    Ok((service, listening))
}

/// How often a master with metric reporting on logs its summary (upstream's period).
const METRIC_REPORT_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// Logs the `/metrics/summary` line every [`METRIC_REPORT_INTERVAL`] while the service lives,
/// as upstream's master does with `--enable_metric_reporting`.
fn report_metrics(service: std::sync::Weak<MasterService>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(METRIC_REPORT_INTERVAL);
        interval.tick().await;
        loop {
            interval.tick().await;
            let Some(service) = service.upgrade() else {
                return;
            };
            tracing::info!("Master Metrics: {}", summary(&service.metrics()));
        }
    })
}

/// Starts this member of a Raft group. `tls` is this master's identity: the group's network
/// runs over mutual TLS with it, and its check for a running group connects with it.
#[cfg(feature = "raft")]
async fn start_member(
    options: &MasterOptions,
    raft: &RaftOptions,
    tls: Option<&TlsIdentity>,
) -> Result<Arc<MasterService>> {
    use crate::service::MasterState;
    use mooncake_meta_raft::{
        NodeConfig, PeerInfo, RaftMetadataStore, RoleEvent, RoleObserver, StoreConfig,
    };
    let voters: Vec<PeerInfo> = raft
        .peers
        .iter()
        .map(|(id, raft_addr, service_addr)| PeerInfo {
            id: *id,
            raft_addr: raft_addr.clone(),
            service_addr: service_addr.clone(),
        })
        .collect();
    let me = voters
        .iter()
        .find(|p| p.id == raft.id)
        .map(|p| p.raft_addr.clone())
        .ok_or_else(|| Error::InvalidArgument(format!("raft id {} not among peers", raft.id)))?;
    refuse_a_second_group(raft, tls).await?;
    let mut node = NodeConfig::new(raft.id, raft.data_dir.clone(), voters);
    node.election_ticks = raft.election_ticks;
    node.join = raft.join;
    node.tls = tls.cloned();
    let mut config = StoreConfig::new(node, me);
    config.tick_interval = std::time::Duration::from_millis(raft.tick_ms);
    // Role changes are printed by a task, so a slow reader of stdout never stalls the raft loop.
    let (lines, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    config.on_role = Some(RoleObserver(Arc::new(move |id, event| {
        let line = match event {
            RoleEvent::BecameLeader { term } => format!("leader id={id} term={term}"),
            RoleEvent::SteppedDown { term } => format!("stepped_down id={id} term={term}"),
            RoleEvent::LeaderChanged { .. } => return,
        };
        let _ = lines.send(line);
    })));
    // Every command goes through the group's log, only the leader serves requests and runs the
    // timers, and a restarted member recovers its state from its data directory.
    let state = MasterState::new(options.master.clone())?;
    let store = Arc::new(RaftMetadataStore::start(config, state.state_machine()).await?);
    let service = MasterService::start(
        state,
        store.clone(),
        store,
        ServiceConfig::default(),
        Arc::new(mooncake_core::SystemClock),
    );
    service.keep(tokio::spawn(async move {
        use std::io::Write;
        while let Some(line) = rx.recv().await {
            let _ = writeln!(std::io::stdout().lock(), "{ROLE_LINE_PREFIX}{line}");
        }
    }));
    Ok(service)
}

/// Before a member bootstraps (first start, not `--raft_join`), asks the other listed members
/// whether a group with a leader is already running; if one is and this member is not among its
/// members, bootstrapping would start a second group under the same addresses, so the start is
/// refused and the error says to join instead. Members that do not answer (not started yet, or
/// no leader yet: the usual first start of a group) let the bootstrap go on.
#[cfg(feature = "raft")]
async fn refuse_a_second_group(raft: &RaftOptions, tls: Option<&TlsIdentity>) -> Result<()> {
    use mooncake_rpc::admin::AdminRequest;
    use mooncake_rpc::RpcClientConfig;
    use mooncake_rpc::{MasterApi, MasterReply, MasterRequest, RemoteMaster};
    let initialized = raft
        .data_dir
        .join(mooncake_meta_raft::wal::SNAPSHOT_FILE)
        .exists();
    if raft.join || initialized {
        return Ok(());
    }
    let config = RpcClientConfig {
        call_timeout: std::time::Duration::from_secs(1),
        connect_timeout: std::time::Duration::from_millis(500),
    };
    let connector = tls.map(mooncake_rpc::tls_connector).transpose()?;
    let ask = |addr: String| {
        let config = config.clone();
        let connector = connector.clone();
        async move {
            let mut target = addr;
            // A follower names the leader: ask it once.
            for _ in 0..2 {
                let remote =
                    RemoteMaster::with_tls(target.as_str(), config.clone(), connector.clone());
                match remote
                    .call(MasterRequest::Admin(AdminRequest::Members))
                    .await
                {
                    Ok(MasterReply::Members(m)) => return Some(m),
                    Ok(MasterReply::NotLeader {
                        leader: Some(leader),
                    }) if leader != target => target = leader,
                    _ => return None,
                }
            }
            None
        }
    };
    let asks = raft
        .peers
        .iter()
        .filter(|(id, _, _)| *id != raft.id)
        .map(|(_, _, rpc)| ask(rpc.clone()));
    for m in futures::future::join_all(asks).await.into_iter().flatten() {
        let ids: Vec<u64> = m.members.iter().map(|p| p.id).collect();
        if !ids.contains(&raft.id) {
            return Err(Error::InvalidArgument(format!(
                "a master group is already running (member {} answered; its members are {ids:?}) \
                 and member {} is not one of them: starting it would begin a second group. Start \
                 a new member with --raft_join, then add it with `mooncake_master admin \
                 add-learner` and `promote`",
                m.answered_by, raft.id
            )));
        }
    }
    Ok(())
}

/// Start of the line a group member prints on stdout when it becomes leader
/// (`leader id=ID term=TERM`) or stops being it (`stepped_down id=ID term=TERM`).
pub const ROLE_LINE_PREFIX: &str = "mooncake_master raft: ";

#[cfg(not(feature = "raft"))]
async fn start_member(
    _: &MasterOptions,
    _: &RaftOptions,
    _: Option<&TlsIdentity>,
) -> Result<Arc<MasterService>> {
    Err(Error::NotSupported(
        "this build has no Raft support (enable the `raft` feature)".into(),
    ))
}

/// Runs a master until `stop` resolves: prints where it listens, serves, then shuts down.
pub async fn run(options: MasterOptions, stop: impl Future<Output = ()>) -> Result<()> {
    let (service, l) = start(&options).await?;
    println!(
        "mooncake_master listening: rpc={} http_metadata={} metrics={}",
        l.rpc,
        l.http_metadata.map_or("off".into(), |a| a.to_string()),
        l.metrics.map_or("off".into(), |a| a.to_string()),
    );
    let failure = tokio::select! {
        () = stop => None,
        () = removed_from_group(&service) => {
            println!("mooncake_master: this member was removed from its group; stopping");
            None
        }
        reason = log_failed(&service) => Some(reason),
    };
    service.shutdown_raft().await;
    if let Some(reason) = failure {
        // A supervisor restarts it from its data directory; the group carries on meanwhile.
        return Err(Error::Io(format!(
            "this member's replicated log stopped and it cannot serve: {reason}"
        )));
    }
    println!("mooncake_master stopped");
    Ok(())
}

/// Resolves with the reason once this master's replicated log stopped on a fatal error; never
/// for a single master.
async fn log_failed(service: &MasterService) -> String {
    match service.command_log().group() {
        Some(group) => group.failed().await,
        None => std::future::pending().await,
    }
}

/// Resolves once the group this master belongs to has removed it; never for a single master.
async fn removed_from_group(service: &MasterService) {
    match service.command_log().group() {
        Some(group) => group.removed().await,
        None => std::future::pending::<()>().await,
    }
}

/// The whole program: parses `args` (after the program name), runs until SIGINT or SIGTERM, and
/// returns the process exit code.
pub fn main_with_args<I: IntoIterator<Item = String>>(args: I) -> i32 {
    let mut args = args.into_iter().peekable();
    if args.peek().map(String::as_str) == Some("admin") {
        args.next();
        let _ = init_logging(&LogOptions::default());
        return crate::admin_cli::main_with_args(args);
    }
    let options = match parse_args(args) {
        Ok(Parsed::Run(o)) => *o,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("mooncake_master: {e}");
            return 2;
        }
    };
    if let Err(e) = init_logging(&options.logging) {
        eprintln!("mooncake_master: {e}");
        return 2;
    }
    for flag in &options.no_effect {
        tracing::info!("{flag} is accepted for compatibility with upstream and has no effect here");
    }
    run_program("mooncake_master", run(options, shutdown_signal()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<MasterOptions> {
        match parse_args(args.iter().map(|s| s.to_string()))? {
            Parsed::Run(o) => Ok(*o),
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn upstream_flag_forms() {
        let o = parse(&[
            "--enable_http_metadata_server=true",
            "--http_metadata_server_host=0.0.0.0",
            "--http_metadata_server_port",
            "8081",
            "--rpc_port=50052",
            "--default_kv_lease_ttl=500ms",
            "--client_ttl=3",
            "--eviction_high_watermark_ratio=0.8",
            "--allocation_strategy=free_ratio_first",
            "--noenable_metric_reporting",
            "--max_threads=8",
            "--reservation_ttl=250ms",
        ])
        .unwrap();
        assert_eq!(o.master.reservation_ttl_ms, 250);
        assert!(o.enable_http_metadata_server);
        assert_eq!(o.http_metadata_server_port, 8081);
        assert_eq!(o.rpc_port, 50052);
        assert_eq!(o.master.default_kv_lease_ttl_ms, 500);
        assert_eq!(o.master.client_ttl_ms, 3000);
        assert_eq!(o.master.eviction_high_watermark_ratio, 0.8);
        assert!(!o.enable_metrics);
        assert_eq!(
            parse(&["--default_kv_lease_ttl=10s"])
                .unwrap()
                .master
                .default_kv_lease_ttl_ms,
            10_000
        );
        assert_eq!(
            parse(&["--default_kv_lease_ttl", "2500"])
                .unwrap()
                .master
                .default_kv_lease_ttl_ms,
            2500
        );
        assert!(
            parse(&["--enable_http_metadata_server"])
                .unwrap()
                .enable_http_metadata_server
        );
    }

    #[test]
    fn bad_flags_are_refused_with_a_reason() {
        for bad in [
            &["--no_such_flag=1"][..],
            &["--rpc_port=seventy"],
            &["--rpc_port=70000"],
            &["--default_kv_lease_ttl=soon"],
            &["--allocation_strategy=best"],
            &["--eviction_ratio=2"],
            &["--rpc_port"],
            &["stray"],
            &["--raft_id=3", "--raft_peers=1=a:1/b:2"],
            &["--raft_id=1"],
            &["--raft_peers=1=a:1/b:2"],
            &["--raft_id=1", "--raft_peers=1=a:1"],
            &["--raft_id=1", "--raft_peers=1=a:1/b:2,1=c:3/d:4"],
            &["--raft_join"],
            &["--raft_id=1", "--raft_peers=1=a:1/b:2", "--raft_join"],
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.to_string().is_empty(), "{bad:?}");
        }
        assert!(matches!(
            parse_args(["--help".to_string()]).unwrap(),
            Parsed::Help
        ));
    }

    #[test]
    fn upstream_flags_with_effect() {
        let o = parse(&[
            "--port=50060",
            "--allow_evict_soft_pinned_objects=false",
            "--put_start_discard_timeout_sec=20",
            "--put_start_release_timeout_sec=120",
            "--max_total_pending_tasks=50",
            "--processing_task_timeout_sec=0",
            "--max_retry_attempts=7",
            "--log_dir=/var/log/mc",
            "--minloglevel=1",
            "--v=2",
            "--alsologtostderr",
        ])
        .unwrap();
        assert_eq!(o.rpc_port, 50060);
        assert!(!o.master.allow_evict_soft_pinned_objects);
        assert_eq!(o.master.put_takeover_ms, 20_000);
        assert_eq!(o.master.put_reclaim_ms, 120_000);
        assert_eq!(o.master.max_active_tasks, 50);
        assert_eq!(o.master.task_timeout_ms, NO_TIMEOUT_MS);
        assert_eq!(o.master.task_max_retries, 7);
        assert_eq!(o.logging.dir, Some(PathBuf::from("/var/log/mc")));
        assert_eq!((o.logging.min_level, o.logging.verbosity), (1, 2));
        assert!(o.logging.also_to_stderr && !o.logging.to_stderr);
        assert!(o.no_effect.is_empty());
        // --rpc_port wins over --port; a lone --rpc_port=0 is any free port.
        assert_eq!(parse(&["--port=1", "--rpc_port=2"]).unwrap().rpc_port, 2);
        assert_eq!(parse(&["--port=1", "--rpc_port=0"]).unwrap().rpc_port, 1);
        assert_eq!(parse(&["--rpc_port=0"]).unwrap().rpc_port, 0);
        assert_eq!(parse(&[]).unwrap().rpc_port, 50051);
        assert_eq!(
            parse(&["--processing_task_timeout_sec=5"])
                .unwrap()
                .master
                .task_timeout_ms,
            5000
        );
    }

    #[test]
    fn upstream_flags_without_effect_change_nothing() {
        let given = [
            "--max_threads=8",
            "--rpc_thread_num=4",
            "--rpc_conn_timeout_seconds=30",
            "--norpc_enable_tcp_no_delay",
            "--memory_allocator=cachelib",
            "--enable_ha=false",
            "--etcd_endpoints=127.0.0.1:2379",
            "--enable_offload=false",
            "--enable_cxl=0",
            "--root_fs_dir=",
            "--cxl_size=1024",
            "--quota_bytes=0",
            "--enable_disk_eviction",
            "--pending_task_timeout_sec=300",
            "--stderrthreshold=1",
            "--colorlogtostderr",
            "--max_log_size=100",
            "--ha_backend_type=redis",
            "--snapshot_interval_seconds=60",
            "--enable_snapshot=false",
            "--rpc_interface=",
        ];
        let o = parse(&given).unwrap();
        let d = MasterOptions::default();
        assert_eq!(o.master, d.master);
        assert_eq!(o.logging, d.logging);
        assert_eq!((o.rpc_port, o.metrics_port), (d.rpc_port, d.metrics_port));
        assert_eq!(o.no_effect.len(), given.len());
        assert!(o
            .no_effect
            .contains(&"--rpc_enable_tcp_no_delay=false".to_owned()));
        // Their values are still checked.
        let e = parse(&["--max_threads=many"]).unwrap_err();
        assert!(e.to_string().contains("--max_threads"), "{e}");
        let e = parse(&["--enable_disk_eviction=maybe"]).unwrap_err();
        assert!(e.to_string().contains("--enable_disk_eviction"), "{e}");
    }

    #[test]
    fn flags_asking_for_missing_features_are_refused_by_name() {
        for (args, flag) in [
            (
                &["--enable_ha=true", "--etcd_endpoints=a:1"][..],
                "--enable_ha",
            ),
            (&["--enable_ha"], "--enable_ha"),
            (&["--enable_offload"], "--enable_offload"),
            (&["--enable_cxl=1"], "--enable_cxl"),
            (&["--enable_gc=true"], "--enable_gc"),
            (&["--root_fs_dir=/mnt/3fs"], "--root_fs_dir"),
            (&["--allocation_strategy=cxl"], "--allocation_strategy"),
            (&["--memory_allocator=jemalloc"], "--memory_allocator"),
            (&["--enable_snapshot"], "--enable_snapshot"),
            (
                &["--enable_snapshot_restore=true"],
                "--enable_snapshot_restore",
            ),
            (&["--rpc_interface=eth0"], "--rpc_interface"),
        ] {
            let e = parse(args).unwrap_err();
            assert!(matches!(e, Error::NotSupported(_)), "{args:?}: {e:?}");
            assert!(e.to_string().contains(flag), "{args:?}: {e}");
        }
    }

    #[test]
    fn flagfile_and_config_path() {
        let dir = std::env::temp_dir().join(format!("mooncake-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("master.json");
        std::fs::write(
            &config,
            r#"{"rpc_port": 50200, "metrics_port": 9200, "client_live_ttl_sec": 6,
                "enable_http_metadata_server": true, "not_a_master_key": 1}"#,
        )
        .unwrap();
        let flags = dir.join("master.flags");
        std::fs::write(
            &flags,
            format!(
                "# deployment flags
--config_path={}
--metrics_port=9300
--cluster_id=from_file
",
                config.display()
            ),
        )
        .unwrap();
        let o = parse(&[
            &format!("--flagfile={}", flags.display()),
            "--cluster_id=last",
        ])
        .unwrap();
        // The config file's settings, under the flags given after it.
        assert_eq!(o.rpc_port, 50200);
        assert_eq!(o.master.client_ttl_ms, 6000);
        assert!(o.enable_http_metadata_server);
        assert_eq!(o.metrics_port, 9300);
        assert_eq!(o.master.cluster_id, "last");
        // A key upstream's master does not read is skipped, and said so.
        assert_eq!(o.no_effect, ["--not_a_master_key=1"]);
        // A refused setting in the config file names its flag too.
        std::fs::write(&config, r#"{"enable_offload": true}"#).unwrap();
        let e = parse(&[&format!("--config_path={}", config.display())]).unwrap_err();
        assert!(e.to_string().contains("--enable_offload"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_flags_come_as_three_and_are_read_at_parse_time() {
        let dir = std::env::temp_dir().join(format!("mooncake-cli-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = mooncake_tls::certs::new_ca("cli test CA").unwrap();
        let m = mooncake_tls::certs::issue_role_cert(
            &ca,
            "m1",
            &["127.0.0.1"],
            &[mooncake_tls::Role::Master],
        )
        .unwrap();
        let files = [
            ("ca.pem", &ca.cert_pem),
            ("m1.pem", &m.cert_pem),
            ("m1-key.pem", &m.key_pem),
        ];
        for (name, pem) in files {
            std::fs::write(dir.join(name), pem).unwrap();
        }
        let flag = |name: &str, file: &str| format!("--{name}={}", dir.join(file).display());
        let (ca_flag, cert_flag, key_flag) = (
            flag("tls_ca", "ca.pem"),
            flag("tls_cert", "m1.pem"),
            flag("tls_key", "m1-key.pem"),
        );
        let o = parse(&[&ca_flag, &cert_flag, &key_flag]).unwrap();
        let tls = o.tls.expect("an identity");
        assert_eq!(tls.own().unwrap().name(), "m1");
        let e = parse(&[&ca_flag, &cert_flag]).unwrap_err();
        assert!(e.to_string().contains("--tls_key missing"), "{e}");
        // A key that is not one is refused at parse time, not at the first connection.
        let bad_key = flag("tls_key", "ca.pem");
        let e = parse(&[&ca_flag, &cert_flag, &bad_key]).unwrap_err();
        assert!(e.to_string().contains("private key"), "{e}");
        assert!(parse(&[]).unwrap().tls.is_none());
        // A revocation list goes with a certificate, must exist and must parse.
        let crl_flag = flag("tls_crl", "crl.pem");
        let e = parse(&[&ca_flag, &cert_flag, &key_flag, &crl_flag]).unwrap_err();
        assert!(e.to_string().contains("crl.pem"), "{e}");
        let crl = mooncake_tls::certs::revocation_list(&ca, &[], 1).unwrap();
        std::fs::write(dir.join("crl.pem"), crl).unwrap();
        let o = parse(&[&ca_flag, &cert_flag, &key_flag, &crl_flag]).unwrap();
        assert_eq!(o.tls.unwrap().crl_file, Some(dir.join("crl.pem")));
        let e = parse(&[&crl_flag]).unwrap_err();
        assert!(e.to_string().contains("needs a certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_joining_member_lists_the_group_and_itself() {
        let o = parse(&[
            "--raft_id=4",
            "--raft_peers=1=a:1/b:1,4=a:4/b:4",
            "--raft_join",
        ])
        .unwrap();
        let raft = o.raft.unwrap();
        assert!(raft.join);
        assert_eq!(raft.peers.len(), 2);
        let e = parse(&["--raft_id=4", "--raft_peers=1=a:1/b:1"]).unwrap_err();
        assert!(e.to_string().contains("--raft_join"), "{e}");
        assert!(
            !parse(&["--raft_id=1", "--raft_peers=1=a:1/b:1"])
                .unwrap()
                .raft
                .unwrap()
                .join
        );
    }
}
