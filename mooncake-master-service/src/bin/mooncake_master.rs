//! `mooncake_master`: the store's metadata and allocation service, with upstream's flags.
//! See `mooncake_master --help`. Logging follows glog's flags (`--log_dir`, `--minloglevel`,
//! `--v`, ...) and `RUST_LOG`.

fn main() {
    std::process::exit(mooncake_master_service::master_cli::main_with_args(
        std::env::args().skip(1),
    ));
}
