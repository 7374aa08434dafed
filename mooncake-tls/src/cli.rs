//! The `mooncake_certs` command: makes a cluster's CA and its nodes' certificates, as PEM files, for the
//! master group (`--tls_ca/--tls_cert/--tls_key`), storage nodes and clients (`MC_TLS_CA`,
//! `MC_TLS_CERT`, `MC_TLS_KEY`) and operators.
//!
//! ```text
//! mooncake_certs init --dir certs                       # certs/ca.pem, certs/ca-key.pem
//! mooncake_certs issue node-a --dir certs --name 10.0.0.5 --name node-a.example
//!                                                       # certs/node-a.pem, certs/node-a-key.pem
//! mooncake_certs issue master-1 --dir certs --name 10.0.0.1 --role master
//! mooncake_certs issue ops --dir certs --name 127.0.0.1 --role admin
//! mooncake_certs revoke node-a --dir certs              # certs/crl.pem, checked by nodes
//!                                                       # given MC_TLS_CRL / --tls_crl
//! ```
//!
//! Members of the master group: member N's certificate is named `master-N` and has the `master`
//! role, with the address of its raft port among its names; the other members refuse its
//! connection otherwise, and drop any message on it that claims to come from another member.

use std::path::{Path, PathBuf};

use crate::certs::{
    issue_role_cert, new_ca, read_revocation_list, revocation_list, serial_of, CertifiedPem,
    RevokedEntry,
};
use crate::Role;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "mooncake_certs",
    about = "Make a cluster CA and node certificates (PEM)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the cluster's CA: DIR/ca.pem (give it to every node) and DIR/ca-key.pem (keep it
    /// on the machine that issues certificates only).
    Init {
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "mooncake cluster CA")]
        common_name: String,
    },
    /// Issue a node's certificate (client and server use) signed by DIR's CA:
    /// DIR/NODE.pem and DIR/NODE-key.pem.
    ///
    /// A member of the master group with raft id N must be named master-N and have the master
    /// role (e.g. `mooncake_certs issue master-1 --role master --name 10.0.0.1`): its peers
    /// admit its raft connection only then, and only believe messages from member N on it.
    Issue {
        /// The node's name (the certificate's common name and the files' name); master-N for
        /// the member of the master group whose raft id is N.
        node: String,
        /// Where the CA is and the files go.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// An address peers reach the node by: an IP address or a DNS name (repeat for each).
        #[arg(long = "name", required = true)]
        names: Vec<String>,
        /// What the certificate allows: master (a member of the master group), client (or
        /// storage: a storage node or client of the store), admin (membership changes and admin
        /// endpoints). Repeat or separate with commas for several.
        #[arg(long = "role", default_value = "client", value_delimiter = ',')]
        roles: Vec<String>,
    },
    /// Revoke nodes' certificates: adds them to DIR/crl.pem, the CA's revocation list (made if
    /// missing, replaced atomically). Nodes that check it (MC_TLS_CRL or --tls_crl naming a copy
    /// of the file) refuse those certificates from their next connection on, without a restart.
    Revoke {
        /// The nodes whose certificates (DIR/NODE.pem) are revoked.
        #[arg(required = true)]
        nodes: Vec<String>,
        /// Where the CA, the nodes' certificates and the revocation list are.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
}

/// Writes `pem` to `path` through a temporary file renamed over it, so a node re-reading the
/// file never sees half of it.
fn replace(path: &Path, pem: &str) -> Result<(), String> {
    let tmp = path.with_extension("pem.tmp");
    let _ = std::fs::remove_file(&tmp);
    write(&tmp, pem, false)?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn write(path: &Path, pem: &str, private: bool) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    if private {
        options.mode(0o600);
    }
    let mut f = options.open(path).map_err(|e| {
        format!(
            "{}: {e} (existing files are never overwritten)",
            path.display()
        )
    })?;
    f.write_all(pem.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Init { dir, common_name } => {
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let ca = new_ca(&common_name).map_err(|e| e.to_string())?;
            write(&dir.join("ca.pem"), &ca.cert_pem, false)?;
            write(&dir.join("ca-key.pem"), &ca.key_pem, true)?;
            println!(
                "wrote {0}/ca.pem and {0}/ca-key.pem (keep the key off the nodes)",
                dir.display()
            );
        }
        Command::Issue {
            node,
            dir,
            names,
            roles,
        } => {
            let roles = roles
                .iter()
                .map(|r| r.parse::<Role>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| e.to_string())?;
            if node.is_empty() || node.contains('/') {
                return Err(format!("{node:?} is not a usable node name"));
            }
            let ca = CertifiedPem {
                cert_pem: read(&dir.join("ca.pem"))?,
                key_pem: read(&dir.join("ca-key.pem"))?,
            };
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            let cert = issue_role_cert(&ca, &node, &names, &roles).map_err(|e| e.to_string())?;
            let (cert_path, key_path) = (
                dir.join(format!("{node}.pem")),
                dir.join(format!("{node}-key.pem")),
            );
            write(&cert_path, &cert.cert_pem, false)?;
            write(&key_path, &cert.key_pem, true)?;
            println!(
                "wrote {} and {} for {} (roles: {}); on the node set MC_TLS_CA={}, \
                 MC_TLS_CERT={}, MC_TLS_KEY={}",
                cert_path.display(),
                key_path.display(),
                names.join(", "),
                roles
                    .iter()
                    .map(|r| r.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                dir.join("ca.pem").display(),
                cert_path.display(),
                key_path.display()
            );
        }
        Command::Revoke { nodes, dir } => {
            let ca = CertifiedPem {
                cert_pem: read(&dir.join("ca.pem"))?,
                key_pem: read(&dir.join("ca-key.pem"))?,
            };
            let crl_path = dir.join("crl.pem");
            let (mut entries, number) = match std::fs::read_to_string(&crl_path) {
                Ok(text) => read_revocation_list(&text)
                    .map_err(|e| format!("{}: {e}", crl_path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
                Err(e) => return Err(format!("{}: {e}", crl_path.display())),
            };
            for node in &nodes {
                let cert_path = dir.join(format!("{node}.pem"));
                let serial = serial_of(&read(&cert_path)?)
                    .map_err(|e| format!("{}: {e}", cert_path.display()))?;
                if entries.iter().any(|e| e.serial == serial) {
                    println!("{} was already revoked", cert_path.display());
                    continue;
                }
                entries.push(RevokedEntry {
                    serial,
                    revoked_at: std::time::SystemTime::now(),
                });
            }
            let pem = revocation_list(&ca, &entries, number + 1).map_err(|e| e.to_string())?;
            replace(&crl_path, &pem)?;
            println!(
                "wrote {} ({} certificate(s) revoked); copy it to every node that checks it \
                 (MC_TLS_CRL or --tls_crl): they refuse those certificates from their next \
                 connection",
                crl_path.display(),
                entries.len()
            );
        }
    }
    Ok(())
}

/// Runs `mooncake_certs` with `args` (the program name first, as in `std::env::args`): prints
/// what it wrote, or the error on stderr. Returns the process exit code.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mooncake_certs: {e}");
            1
        }
    }
}
