//! `mooncake_master`: the store's metadata and allocation service, with upstream's flags.
//! See `mooncake_master --help`.

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    std::process::exit(mooncake_master_service::master_cli::main_with_args(
        std::env::args().skip(1),
    ));
}
