//! `mooncake_client`: a store client that serves dummy clients on this host (upstream's "real
//! client"). See `mooncake_client --help`.

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(mooncake_store::real_client::main_with_args(
        std::env::args().skip(1),
    ));
}
