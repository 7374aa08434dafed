//! `mooncake_certs`: makes a cluster's CA and its nodes' certificates (see
//! `mooncake_tls::cli`).

fn main() -> std::process::ExitCode {
    let code = mooncake_tls::cli::main_with_args(std::env::args_os());
    std::process::ExitCode::from(u8::try_from(code).unwrap_or(1))
}
