//! The `mooncake_client` command line: upstream's real-client flags, and a runner that serves
//! dummy clients until SIGINT or SIGTERM.

use std::net::SocketAddr;

use mooncake_core::{Error, Result};

use super::server::{RealClient, RealClientConfig};
use crate::store::StoreConfig;

/// Everything `mooncake_client` is told on its command line.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// The store client's settings (`--master_server_address`, `--global_segment_size`, ...).
    pub store: StoreConfig,
    /// Address the dummy-facing RPC server binds (`--host`, default `127.0.0.1`).
    pub host: String,
    /// Its port (`--port`, default 50052).
    pub port: u16,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            store: StoreConfig {
                local_hostname: "127.0.0.1".into(),
                global_segment_size: 4 << 30,
                local_buffer_size: 16 << 20,
                ..StoreConfig::default()
            },
            host: "127.0.0.1".into(),
            port: 50052,
        }
    }
}

/// What the arguments ask for.
#[derive(Debug)]
pub enum Parsed {
    /// Run with these options.
    Run(Box<ClientOptions>),
    /// Print the usage.
    Help,
}

/// Usage text for `--help`.
pub const USAGE: &str = "\
mooncake_client: a Mooncake store client serving dummy clients on this host
(MooncakeDistributedStore.setup_dummy(mem_pool_size, local_buffer_size, \"host:port\"))

Flags (--flag=value or --flag value):
  --master_server_address=localhost:50051  the master (host:port, or h1:p1,h2:p2,h3:p3)
  --host=127.0.0.1                         address the dummy-facing RPC server binds; also the
                                           store's local hostname unless --local_hostname is given
  --port=50052                             dummy-facing RPC port
  --local_hostname=HOST                    the store's hostname (transfer engine address)
  --global_segment_size=4GB                bytes this client contributes (4GB, 512MB, 1048576)
  --local_buffer_size=16MB                 staging buffer of byte-oriented calls
  --metadata_server=P2PHANDSHAKE           or http://host:port/metadata
  --protocol=tcp
  --device_name=                           RDMA devices (ignored for tcp)
";

/// Flags upstream's client accepts that this one has no use for.
const IGNORED: &[&str] = &["threads", "enable_offload", "logtostderr", "v"];

/// Sizes of `--global_segment_size` and `--local_buffer_size` (`4096`, `16MB`, `4GB`, `1.5GiB`;
/// units are binary, as upstream's): the crate-wide rules of [`mooncake_core::size`].
pub use mooncake_core::parse_size;

fn size_flag(name: &str, value: &str) -> Result<u64> {
    parse_size(value).map_err(|e| Error::InvalidArgument(format!("--{name}: {e}")))
}

/// Parses the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed> {
    let mut o = ClientOptions::default();
    let mut local_hostname = None;
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" || arg == "-help" {
            return Ok(Parsed::Help);
        }
        let Some(flag) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            return Err(Error::InvalidArgument(format!(
                "unexpected argument {arg:?} (flags start with --)"
            )));
        };
        let (name, value) = match flag.split_once('=') {
            Some((n, v)) => (n.to_owned(), v.to_owned()),
            None => match args.next() {
                Some(v) => (flag.to_owned(), v),
                None => return Err(Error::InvalidArgument(format!("--{flag} needs a value"))),
            },
        };
        let s = &mut o.store;
        match name.as_str() {
            "master_server_address" | "master_server_addr" => s.master_server_addr = value,
            "host" => o.host = value,
            "port" => {
                o.port = value
                    .parse()
                    .map_err(|_| Error::InvalidArgument(format!("--port={value:?}")))?
            }
            "local_hostname" => local_hostname = Some(value),
            "global_segment_size" => s.global_segment_size = size_flag(&name, &value)?,
            "local_buffer_size" => s.local_buffer_size = size_flag(&name, &value)?,
            "metadata_server" => s.metadata_server = value,
            "protocol" => s.protocol = value,
            "device_name" | "device_names" | "rdma_devices" => s.device_name = value,
            other if IGNORED.contains(&other) => {
                tracing::info!("--{other} is accepted for compatibility and has no effect");
            }
            other => {
                return Err(Error::InvalidArgument(format!(
                    "unknown flag --{other} (see --help)"
                )))
            }
        }
    }
    o.store.local_hostname = local_hostname.unwrap_or_else(|| match o.host.as_str() {
        "0.0.0.0" | "::" | "[::]" => "127.0.0.1".to_owned(),
        h => h.to_owned(),
    });
    o.store.validate()?;
    Ok(Parsed::Run(Box::new(o)))
}

impl ClientOptions {
    /// The dummy-facing RPC address.
    pub fn bind(&self) -> Result<SocketAddr> {
        mooncake_rpc::bind_address(&format!("{}:{}", self.host, self.port))
            .or_else(|_| mooncake_rpc::bind_address(&format!("[{}]:{}", self.host, self.port)))
    }
}

/// Runs a real client until `stop` resolves.
pub async fn run(
    options: ClientOptions,
    stop: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let bind = options.bind()?;
    let client = RealClient::start(RealClientConfig {
        store: options.store,
        bind,
    })
    .await?;
    println!(
        "mooncake_client listening: rpc={} segment={}",
        client.rpc_address(),
        client.store().hostname()
    );
    stop.await;
    let r = client.shutdown().await;
    println!("mooncake_client stopped");
    r
}

/// The whole program: parses `args` (after the program name), runs until SIGINT or SIGTERM, and
/// returns the process exit code.
pub fn main_with_args<I: IntoIterator<Item = String>>(args: I) -> i32 {
    let options = match parse_args(args) {
        Ok(Parsed::Run(o)) => *o,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return 0;
        }
        Err(e) => {
            eprintln!("mooncake_client: {e}");
            return 2;
        }
    };
    mooncake_master_service::cli::run_program(
        "mooncake_client",
        run(options, mooncake_master_service::cli::shutdown_signal()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ClientOptions> {
        match parse_args(args.iter().map(|s| s.to_string()))? {
            Parsed::Run(o) => Ok(*o),
            Parsed::Help => panic!("help"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4GB").unwrap(), 4 << 30);
        assert_eq!(parse_size("512mb").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("GB").is_err());
        assert!(parse_size("12 parsecs").is_err());
        assert!(parse_size("99999999999TB").is_err());
    }

    #[test]
    fn upstream_flags() {
        let o = parse(&[
            "--master_server_address=127.0.0.1:50051",
            "--port",
            "50060",
            "--global_segment_size=1GB",
            "--local_buffer_size=64MB",
            "--metadata_server=http://127.0.0.1:8080/metadata",
            "--protocol=tcp",
            "--device_name=",
        ])
        .unwrap();
        assert_eq!(o.store.master_server_addr, "127.0.0.1:50051");
        assert_eq!(o.port, 50060);
        assert_eq!(o.store.global_segment_size, 1 << 30);
        assert_eq!(o.store.local_buffer_size, 64 << 20);
        assert_eq!(o.bind().unwrap().to_string(), "127.0.0.1:50060");
        assert_eq!(o.store.local_hostname, "127.0.0.1");
        let d = parse(&[]).unwrap();
        assert_eq!((d.host.as_str(), d.port), ("127.0.0.1", 50052));
        assert_eq!(d.store.metadata_server, "P2PHANDSHAKE");
        assert!(parse(&["--protocol=rdma"]).is_err());
        assert!(parse(&["--nonsense=1"]).is_err());
        assert!(parse(&["--port"]).is_err());
        assert!(matches!(
            parse_args(["--help".to_string()]).unwrap(),
            Parsed::Help
        ));
    }
}
