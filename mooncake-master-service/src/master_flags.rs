//! Upstream's `mooncake_master` flags beyond the ones this master acts on, `--flagfile`,
//! `--config_path`, and glog's logging flags.
//!
//! Every flag upstream's master defines is accepted. How each is treated:
//!
//! - **With effect**: the flags in [`master_cli::USAGE`](crate::master_cli::USAGE), plus
//!   `--port` (the RPC port when `--rpc_port` is not given), `--put_start_discard_timeout_sec`,
//!   `--put_start_release_timeout_sec`, `--max_total_pending_tasks` (the limit of unfinished
//!   tasks), `--processing_task_timeout_sec` (0: no timeout), `--allow_evict_soft_pinned_objects`,
//!   `--max_retry_attempts` (retries of a failed task), `--config_path`, `--flagfile`, and glog's `--log_dir`, `--minloglevel`, `--v`,
//!   `--logtostderr`, `--alsologtostderr`; and this master's own `--tls_ca`, `--tls_cert`,
//!   `--tls_key` (mutual TLS on the RPC and metrics ports; all three or none, and without them
//!   `MC_TLS_CA`, `MC_TLS_CERT`, `MC_TLS_KEY` when set), which upstream does not have.
//! - **Accepted without effect** ([`NO_EFFECT`]): flags that tune upstream's internals (thread
//!   counts, connection options, its allocator, glog's buffering), flags of features that are
//!   off at upstream's default and stay off here (`--enable_ha=false`, `--enable_offload=false`,
//!   `--enable_cxl=false`, an empty `--root_fs_dir`), and settings that only matter to those
//!   features. Their values are still checked for their type.
//! - **Refused** ([`refusal`]): a flag that turns on a feature this master does not have
//!   (`--enable_ha=true`, which is etcd-based HA, `--enable_offload=true`, `--enable_cxl=true`,
//!   `--enable_gc=true`, `--enable_snapshot=true`, `--enable_snapshot_restore=true`, a
//!   non-empty `--root_fs_dir` or `--rpc_interface`, `--allocation_strategy=cxl`): the start
//!   fails with a message naming the flag.
//!
//! `--flagfile=FILE` reads flags from FILE as gflags does: one flag a line, `#` starts a comment
//! line, blank lines are skipped, and the flags take effect where the `--flagfile` stands among
//! the others (later flags win); files may name further flag files. `--config_path=FILE` reads
//! upstream's master config file (`.json`, or `.yaml`/`.yml` holding top-level `key: value`
//! lines); flags given on the command line win over it, as upstream's do.

use std::path::{Path, PathBuf};

use mooncake_core::{Error, Result};

/// Flags accepted for compatibility with no effect here, with the kind of value each takes.
pub const NO_EFFECT: &[(&str, Kind)] = &[
    ("max_threads", Kind::Int),
    ("rpc_thread_num", Kind::Int),
    ("rpc_conn_timeout_seconds", Kind::Int),
    ("rpc_enable_tcp_no_delay", Kind::Bool),
    ("etcd_endpoints", Kind::Text),
    ("global_file_segment_size", Kind::Int),
    ("memory_allocator", Kind::Text),
    ("enable_disk_eviction", Kind::Bool),
    ("quota_bytes", Kind::Int),
    ("max_total_finished_tasks", Kind::Int),
    ("max_total_processing_tasks", Kind::Int),
    ("pending_task_timeout_sec", Kind::Int),
    ("cxl_path", Kind::Text),
    ("cxl_size", Kind::Int),
    // Settings of features that stay off here (etcd/redis/k8s HA, snapshots).
    ("ha_backend_type", Kind::Text),
    ("ha_backend_connstring", Kind::Text),
    ("snapshot_backup_dir", Kind::Text),
    ("snapshot_interval_seconds", Kind::Int),
    ("snapshot_child_timeout_seconds", Kind::Int),
    ("snapshot_retention_count", Kind::Int),
    ("snapshot_object_store_type", Kind::Text),
    ("snapshot_payload_store_type", Kind::Text),
    ("snapshot_payload_backend_type", Kind::Text),
    ("snapshot_catalog_store_type", Kind::Text),
    ("snapshot_catalog_backend_type", Kind::Text),
    ("snapshot_catalog_store_connstring", Kind::Text),
    ("snapshot_catalog_backend_connstring", Kind::Text),
    // Features off at upstream's default; turning them on is refused.
    ("enable_ha", Kind::Bool),
    ("enable_offload", Kind::Bool),
    ("enable_cxl", Kind::Bool),
    ("enable_gc", Kind::Bool),
    ("enable_snapshot", Kind::Bool),
    ("enable_snapshot_restore", Kind::Bool),
    ("root_fs_dir", Kind::Text),
    ("rpc_interface", Kind::Text),
    // glog's tuning.
    ("stderrthreshold", Kind::Int),
    ("colorlogtostderr", Kind::Bool),
    ("max_log_size", Kind::Int),
    ("stop_logging_if_full_disk", Kind::Bool),
    ("logbuflevel", Kind::Int),
    ("logbufsecs", Kind::Int),
    ("log_prefix", Kind::Bool),
    ("log_link", Kind::Text),
    ("logfile_mode", Kind::Int),
    ("vmodule", Kind::Text),
    ("timestamp_in_logfile_name", Kind::Bool),
    ("log_utc_time", Kind::Bool),
];

/// The kind of value a flag takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `true`/`false` (also `1`/`0`, `yes`/`no`); `--flag` and `--noflag` stand alone.
    Bool,
    /// A whole number.
    Int,
    /// Any text.
    Text,
}

/// The kind of a no-effect flag, if `name` is one.
pub fn no_effect_kind(name: &str) -> Option<Kind> {
    NO_EFFECT.iter().find(|(n, _)| *n == name).map(|(_, k)| *k)
}

/// Why the start is refused when flag `name` has `value` (a feature this master lacks), if it
/// is.
pub fn refusal(name: &str, value: &str) -> Option<String> {
    let on = matches!(value, "true" | "1" | "yes");
    let why = match name {
        "enable_ha" if on => {
            "etcd-based high availability is not supported; run a Raft master group instead \
             (--raft_id, --raft_peers)"
        }
        "enable_offload" if on => "offloading objects to storage is not supported",
        "enable_cxl" if on => "CXL memory segments are not supported",
        "enable_gc" if on => "garbage collection of read objects is not supported",
        "enable_snapshot" if on => {
            "periodic snapshots of the master are not supported; a Raft master group keeps its \
             state on disk instead (--raft_data_dir)"
        }
        "enable_snapshot_restore" if on => "restoring the master from a snapshot is not supported",
        "rpc_interface" if !value.is_empty() => {
            "resolving the RPC address from a network interface is not supported; give \
             --rpc_address"
        }
        "root_fs_dir" if !value.is_empty() => {
            "a shared file system storage backend (root_fs_dir) is not supported"
        }
        "allocation_strategy" if value == "cxl" => "the cxl allocation strategy is not supported",
        "memory_allocator" if !matches!(value, "offset" | "cachelib") => {
            "the memory allocator must be offset or cachelib"
        }
        _ => return None,
    };
    Some(format!("--{name}={value}: {why}"))
}

/// Checks that `value` is of `kind` for flag `name`.
pub fn check_kind(name: &str, kind: Kind, value: &str) -> Result<()> {
    let ok = match kind {
        Kind::Bool => matches!(value, "true" | "false" | "1" | "0" | "yes" | "no"),
        Kind::Int => value.parse::<i64>().is_ok() || value.parse::<u64>().is_ok(),
        Kind::Text => true,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "--{name}: {value:?} is not a valid {}",
            match kind {
                Kind::Bool => "boolean",
                _ => "number",
            }
        )))
    }
}

/// How deep flag files may name further flag files.
const MAX_FLAGFILE_DEPTH: usize = 8;

/// Replaces every `--flagfile=FILE` (or `--flagfile FILE`) in `args` with the flags in FILE.
pub fn expand_flagfiles(args: Vec<String>) -> Result<Vec<String>> {
    expand(args, 0)
}

fn expand(args: Vec<String>, depth: usize) -> Result<Vec<String>> {
    let mut out = Vec::with_capacity(args.len());
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let bare = arg.trim_start_matches('-');
        let file = if let Some(file) = bare.strip_prefix("flagfile=") {
            file.to_owned()
        } else if bare == "flagfile" && arg.starts_with('-') {
            args.next()
                .ok_or_else(|| Error::InvalidArgument("--flagfile needs a value".into()))?
        } else {
            out.push(arg);
            continue;
        };
        if depth >= MAX_FLAGFILE_DEPTH {
            return Err(Error::InvalidArgument(format!(
                "--flagfile={file}: flag files nested more than {MAX_FLAGFILE_DEPTH} deep"
            )));
        }
        out.extend(expand(read_flagfile(Path::new(&file))?, depth + 1)?);
    }
    Ok(out)
}

/// The flags in a flag file, one a line.
fn read_flagfile(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::InvalidArgument(format!("--flagfile={}: {e}", path.display())))?;
    let mut flags = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !line.starts_with('-') {
            return Err(Error::InvalidArgument(format!(
                "--flagfile={} line {}: {line:?} is not a flag (flags start with --)",
                path.display(),
                i + 1
            )));
        }
        flags.push(line.to_owned());
    }
    Ok(flags)
}

/// Upstream's config file keys whose flag has another name.
fn flag_for_key(key: &str) -> &str {
    match key {
        "client_live_ttl_sec" => "client_ttl",
        other => other,
    }
}

/// The settings of upstream's master config file at `path` as `--name=value` flags, in file
/// order: JSON for `.json`, top-level `key: value` lines for `.yaml`/`.yml`; other extensions
/// are refused, as upstream refuses them.
pub fn load_config_file(path: &Path) -> Result<Vec<String>> {
    let bad =
        |why: String| Error::InvalidArgument(format!("--config_path={}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let name = path.to_string_lossy();
    let pairs = if name.ends_with(".json") {
        json_pairs(&text).map_err(bad)?
    } else if name.ends_with(".yaml") || name.ends_with(".yml") {
        yaml_pairs(&text).map_err(bad)?
    } else {
        return Err(bad(
            "unsupported config file format (use .json, .yaml or .yml)".into(),
        ));
    };
    Ok(pairs
        .into_iter()
        .map(|(k, v)| format!("--{}={v}", flag_for_key(&k)))
        .collect())
}

fn json_pairs(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let serde_json::Value::Object(map) = value else {
        return Err("the file must hold a JSON object".into());
    };
    map.into_iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Bool(b) => b.to_string(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => {
                    return Err(format!(
                        "{k}: only strings, numbers and booleans are settings"
                    ))
                }
            };
            Ok((k, v))
        })
        .collect()
}

/// The top-level `key: value` lines of a YAML file: `#` comments, blank lines and quoted
/// values are understood; nesting and lists are refused.
fn yaml_pairs(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut pairs = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = strip_yaml_comment(raw);
        if line.trim().is_empty() || line.trim() == "---" {
            continue;
        }
        let at = |why: &str| format!("line {}: {why}", i + 1);
        if line.starts_with([' ', '\t']) || line.trim_start().starts_with('-') {
            return Err(at("only top-level key: value settings are supported"));
        }
        let (key, value) = line
            .split_once(':')
            .ok_or_else(|| at("expected key: value"))?;
        let value = value.trim();
        if value.is_empty() {
            return Err(at("only top-level key: value settings are supported"));
        }
        let unquoted = ['"', '\'']
            .iter()
            .find_map(|q| value.strip_prefix(*q).and_then(|v| v.strip_suffix(*q)))
            .unwrap_or(value);
        pairs.push((key.trim().to_owned(), unquoted.to_owned()));
    }
    Ok(pairs)
}

/// `line` up to a `#` that starts a comment (at the start or after a space, outside quotes).
fn strip_yaml_comment(line: &str) -> &str {
    let mut quote = None;
    let mut prev = ' ';
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '#') if prev.is_whitespace() => return &line[..i],
            _ => {}
        }
        prev = c;
    }
    line
}

/// Where and how much the master logs: glog's flags mapped onto the `tracing` output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogOptions {
    /// `--log_dir`: also write the log to `DIR/mooncake_master.INFO` (appended), instead of
    /// stderr unless `--alsologtostderr`.
    pub dir: Option<PathBuf>,
    /// `--minloglevel`: 0 info (default), 1 warning, 2 error, 3 fatal (errors only here).
    pub min_level: u8,
    /// `--v`: above 0 adds debug messages, 3 and above trace messages.
    pub verbosity: i32,
    /// `--logtostderr`: log to stderr only, even with `--log_dir`.
    pub to_stderr: bool,
    /// `--alsologtostderr`: with `--log_dir`, log to stderr as well.
    pub also_to_stderr: bool,
}

impl LogOptions {
    /// The `tracing` filter directive these options ask for.
    pub fn filter(&self) -> &'static str {
        match (self.min_level, self.verbosity) {
            (0, v) if v >= 3 => "trace",
            (0, v) if v >= 1 => "debug",
            (0, _) => "info",
            (1, _) => "warn",
            _ => "error",
        }
    }

    /// The file the log goes to, if any.
    pub fn file(&self) -> Option<PathBuf> {
        match (&self.dir, self.to_stderr) {
            (Some(dir), false) => Some(dir.join("mooncake_master.INFO")),
            _ => None,
        }
    }
}

/// Sets up the process's log output from `options` (`RUST_LOG`, when set, overrides the level).
/// Does nothing when a subscriber is already installed (an embedding program set its own).
pub fn init_logging(options: &LogOptions) -> Result<()> {
    use tracing_subscriber::fmt::writer::MakeWriterExt;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(options.filter()));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match options.file() {
        None => builder.with_writer(std::io::stderr).try_init(),
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    Error::InvalidArgument(format!("--log_dir: opening {}: {e}", path.display()))
                })?;
            let file = std::sync::Mutex::new(file);
            let builder = builder.with_ansi(false);
            if options.also_to_stderr {
                builder.with_writer(file.and(std::io::stderr)).try_init()
            } else {
                builder.with_writer(file).try_init()
            }
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch directory of one test, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(test: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("mooncake-flags-{}-{test}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn flagfiles_expand_in_place_and_nest() {
        let scratch = Scratch::new("flagfiles");
        let temp = |name: &str, text: &str| scratch.file(name, text);
        let inner = temp("inner.flags", "--rpc_port=7000\n");
        let outer = temp(
            "outer.flags",
            &format!(
                "# a comment\n\n  --metrics_port=9100\n--flagfile={}\n--client_ttl=4\n",
                inner.display()
            ),
        );
        let args = vec![
            "--cluster_id=a".to_owned(),
            format!("--flagfile={}", outer.display()),
            "--client_ttl=5".to_owned(),
        ];
        assert_eq!(
            expand_flagfiles(args).unwrap(),
            [
                "--cluster_id=a",
                "--metrics_port=9100",
                "--rpc_port=7000",
                "--client_ttl=4",
                "--client_ttl=5"
            ]
        );
        let separate = vec!["--flagfile".to_owned(), inner.display().to_string()];
        assert_eq!(expand_flagfiles(separate).unwrap(), ["--rpc_port=7000"]);
        let stray = temp("stray.flags", "rpc_port=1\n");
        let e = expand_flagfiles(vec![format!("--flagfile={}", stray.display())]).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = expand_flagfiles(vec!["--flagfile=/no/such/file".into()]).unwrap_err();
        assert!(e.to_string().contains("--flagfile=/no/such/file"), "{e}");
        let looping = temp("loop.flags", "");
        std::fs::write(&looping, format!("--flagfile={}\n", looping.display())).unwrap();
        let e = expand_flagfiles(vec![format!("--flagfile={}", looping.display())]).unwrap_err();
        assert!(e.to_string().contains("nested"), "{e}");
    }

    #[test]
    fn config_files_in_json_and_yaml() {
        let scratch = Scratch::new("config");
        let temp = |name: &str, text: &str| scratch.file(name, text);
        let json = temp(
            "master.json",
            r#"{"rpc_port": 50100, "enable_http_metadata_server": true,
                "client_live_ttl_sec": 7, "cluster_id": "c1", "eviction_ratio": 0.1}"#,
        );
        let mut flags = load_config_file(&json).unwrap();
        flags.sort();
        assert_eq!(
            flags,
            [
                "--client_ttl=7",
                "--cluster_id=c1",
                "--enable_http_metadata_server=true",
                "--eviction_ratio=0.1",
                "--rpc_port=50100"
            ]
        );
        let yaml = temp(
            "master.yaml",
            "# master\nrpc_port: 50101\ncluster_id: \"c # 2\"  # the id\nenable_ha: false\n",
        );
        assert_eq!(
            load_config_file(&yaml).unwrap(),
            [
                "--rpc_port=50101",
                "--cluster_id=c # 2",
                "--enable_ha=false"
            ]
        );
        let nested = temp("nested.yaml", "rpc:\n  port: 1\n");
        assert!(load_config_file(&nested).is_err());
        let other = temp("master.toml", "rpc_port = 1\n");
        let e = load_config_file(&other).unwrap_err();
        assert!(e.to_string().contains("--config_path"), "{e}");
        let broken = temp("broken.json", "{");
        assert!(load_config_file(&broken).is_err());
    }

    #[test]
    fn glog_levels_map_onto_filters() {
        let o = |min_level, verbosity| LogOptions {
            min_level,
            verbosity,
            ..LogOptions::default()
        };
        assert_eq!(o(0, 0).filter(), "info");
        assert_eq!(o(0, 1).filter(), "debug");
        assert_eq!(o(0, 3).filter(), "trace");
        assert_eq!(o(1, 2).filter(), "warn");
        assert_eq!(o(3, 0).filter(), "error");
        let dir = LogOptions {
            dir: Some("/tmp/x".into()),
            ..LogOptions::default()
        };
        assert_eq!(
            dir.file(),
            Some(PathBuf::from("/tmp/x/mooncake_master.INFO"))
        );
        let stderr_only = LogOptions {
            to_stderr: true,
            ..dir
        };
        assert_eq!(stderr_only.file(), None);
    }
}
