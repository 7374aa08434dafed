//! `mooncake_master admin ...`: the command line that changes the members of a Raft master group
//! at run time, by sending [`AdminRequest`]s (answered with the resulting [`Members`](mooncake_rpc::admin::Members)).
//!
//! A request goes to any member: followers answer `NotLeader` like for every other request, and
//! [`RemoteMaster`](mooncake_rpc::RemoteMaster) follows the hint to the leader. Changes are applied one at a time through the
//! group's log and answered once the leader has applied them.
//!
//! Growing the group: start the new member with `--raft_join` (it bootstraps nothing and waits),
//! add it as a learner (it catches up from a snapshot without counting for the quorum), then
//! promote it. Shrinking it: remove a member; asked to remove itself, the leader first hands
//! leadership to the most caught-up voter and redirects the request there, and the new leader
//! removes it as a follower. A removed member stays up, answering `NotLeader`, until it is
//! stopped.

use mooncake_core::{Error, Result};

use mooncake_rpc::admin::AdminRequest;
use mooncake_tls::TlsIdentity;

use crate::cli::{parse_raft_peers, run_program, tls_identity};

/// Usage of `mooncake_master admin`.
pub const USAGE: &str = "\
mooncake_master admin: change the members of a Raft master group at run time

Usage: mooncake_master admin COMMAND [ARGUMENT] --master_server_addr=HOST:PORT[,HOST:PORT...]

Commands:
  members                           voters and learners as the leader sees them
  add-learner ID=RAFT_ADDR/RPC_ADDR add a non-voting member; start it first with
                                    mooncake_master --raft_join --raft_id=ID --raft_peers=...
                                    (the current members plus itself)
  promote ID                        make a learner that has caught up a voter
  remove ID                         remove a voter or learner (the leader first hands
                                    leadership to the most caught-up voter); then stop it

Flags:
  --master_server_addr=H:P,...      RPC addresses of the group's members (any of them will do;
                                    requests follow the leader)
  --tls_ca=FILE --tls_cert=FILE --tls_key=FILE
                                    connect over mutual TLS with this certificate (a group
                                    started with TLS changes its membership only for a
                                    certificate with the admin role); without these flags,
                                    MC_TLS_CA, MC_TLS_CERT and MC_TLS_KEY are used when set
  --tls_crl=FILE                    refuse a master whose certificate the CA revoked (or
                                    MC_TLS_CRL)

Each change is applied through the group's log, one at a time; the command prints the
membership that results. Exit status: 0 done, 1 refused or unreachable, 2 bad usage.
";

/// What `mooncake_master admin ...` asked for.
#[derive(Debug, PartialEq, Eq)]
pub enum AdminCommand {
    /// Print the usage.
    Help,
    /// Send `request` to the masters at `masters`.
    Send {
        /// Comma-separated RPC addresses.
        masters: String,
        /// The request.
        request: AdminRequest,
        /// This operator's certificate, when connecting over TLS.
        tls: Option<TlsIdentity>,
    },
}

fn parse_id(command: &str, value: &str) -> Result<u64> {
    value
        .trim()
        .parse::<u64>()
        .ok()
        .filter(|&id| id > 0)
        .ok_or_else(|| {
            Error::InvalidArgument(format!("{command}: {value:?} is not a non-zero member id"))
        })
}

/// Parses the arguments after `mooncake_master admin`.
pub fn parse_admin_args<I: IntoIterator<Item = String>>(args: I) -> Result<AdminCommand> {
    let mut masters: Option<String> = None;
    let (mut ca, mut cert, mut key, mut crl) = (None, None, None, None);
    let mut words: Vec<String> = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if matches!(arg.as_str(), "-h" | "--help" | "-help" | "help") {
            return Ok(AdminCommand::Help);
        }
        if let Some(flag) = arg.strip_prefix("--") {
            let (name, value) = match flag.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let value = args
                        .next()
                        .ok_or_else(|| Error::InvalidArgument(format!("--{flag} needs a value")))?;
                    (flag.to_owned(), value)
                }
            };
            match name.as_str() {
                "master_server_addr" | "master_server_address" => masters = Some(value),
                "tls_ca" => ca = Some(value),
                "tls_cert" => cert = Some(value),
                "tls_key" => key = Some(value),
                "tls_crl" => crl = Some(value),
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "unknown flag --{other} (see mooncake_master admin --help)"
                    )))
                }
            }
        } else {
            words.push(arg);
        }
    }
    let Some((command, rest)) = words.split_first() else {
        return Err(Error::InvalidArgument(
            "no command (members, add-learner, promote or remove; see --help)".into(),
        ));
    };
    let one_argument = |what: &str| -> Result<&String> {
        match rest {
            [a] => Ok(a),
            [] => Err(Error::InvalidArgument(format!("{command} needs {what}"))),
            _ => Err(Error::InvalidArgument(format!(
                "{command} takes only {what}, got {rest:?}"
            ))),
        }
    };
    let request = match command.as_str() {
        "members" => {
            if !rest.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "members takes no argument, got {rest:?}"
                )));
            }
            AdminRequest::Members
        }
        "add-learner" => {
            let spec = one_argument("ID=RAFT_ADDR/RPC_ADDR")?;
            let peers = parse_raft_peers(spec)?;
            let [(id, raft_addr, rpc_addr)] = &peers[..] else {
                return Err(Error::InvalidArgument(format!(
                    "add-learner adds one member at a time, got {spec:?}"
                )));
            };
            if raft_addr.is_empty() || rpc_addr.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "add-learner: {spec:?} needs both a raft and an rpc address"
                )));
            }
            AdminRequest::AddLearner {
                id: *id,
                raft_addr: raft_addr.clone(),
                rpc_addr: rpc_addr.clone(),
            }
        }
        "promote" => AdminRequest::Promote {
            id: parse_id(command, one_argument("a member id")?)?,
        },
        "remove" => AdminRequest::Remove {
            id: parse_id(command, one_argument("a member id")?)?,
        },
        other => {
            return Err(Error::InvalidArgument(format!(
                "unknown command {other:?} (members, add-learner, promote or remove)"
            )))
        }
    };
    let masters = masters
        .filter(|m| m.split(',').any(|a| !a.trim().is_empty()))
        .ok_or_else(|| {
            Error::InvalidArgument(
                "--master_server_addr is required (the group's RPC addresses, h1:p1,h2:p2)".into(),
            )
        })?;
    let tls = tls_identity(ca, cert, key, crl)?;
    Ok(AdminCommand::Send {
        masters,
        request,
        tls,
    })
}

/// `mooncake_master admin ...`: parses `args` (after `admin`), sends the request, prints the
/// resulting membership; returns the exit code.
pub fn main_with_args<I: IntoIterator<Item = String>>(args: I) -> i32 {
    let (masters, request, tls) = match parse_admin_args(args) {
        Ok(AdminCommand::Help) => {
            print!("{USAGE}");
            return 0;
        }
        Ok(AdminCommand::Send {
            masters,
            request,
            tls,
        }) => (masters, request, tls),
        Err(e) => {
            eprintln!("mooncake_master admin: {e}");
            return 2;
        }
    };
    run_program("mooncake_master admin", async move {
        let tls = tls.as_ref().map(mooncake_rpc::tls_connector).transpose()?;
        let members = mooncake_rpc::call_admin_with(&masters, request, tls).await?;
        print!("{}", members.render());
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<AdminCommand> {
        parse_admin_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn commands_parse() {
        let m = "--master_server_addr=127.0.0.1:1,127.0.0.1:2";
        assert_eq!(
            parse(&["members", m]).unwrap(),
            AdminCommand::Send {
                masters: "127.0.0.1:1,127.0.0.1:2".into(),
                request: AdminRequest::Members,
                tls: None,
            }
        );
        assert_eq!(
            parse(&[
                "add-learner",
                "4=127.0.0.1:7004/127.0.0.1:50054",
                "--master_server_addr",
                "h:1"
            ])
            .unwrap(),
            AdminCommand::Send {
                masters: "h:1".into(),
                request: AdminRequest::AddLearner {
                    id: 4,
                    raft_addr: "127.0.0.1:7004".into(),
                    rpc_addr: "127.0.0.1:50054".into()
                },
                tls: None,
            }
        );
        assert!(matches!(
            parse(&[m, "promote", "4"]).unwrap(),
            AdminCommand::Send {
                request: AdminRequest::Promote { id: 4 },
                ..
            }
        ));
        assert!(matches!(
            parse(&["remove", "2", m]).unwrap(),
            AdminCommand::Send {
                request: AdminRequest::Remove { id: 2 },
                ..
            }
        ));
        assert_eq!(parse(&["--help"]).unwrap(), AdminCommand::Help);
    }

    #[test]
    fn bad_usage_is_refused_with_a_reason() {
        let m = "--master_server_addr=h:1";
        for (args, why) in [
            (&["members"][..], "--master_server_addr is required"),
            (&["members", "--master_server_addr="], "is required"),
            (&[m][..], "no command"),
            (&["grow", m], "unknown command"),
            (&["members", "3", m], "takes no argument"),
            (&["promote", m], "promote needs a member id"),
            (&["promote", "0", m], "not a non-zero member id"),
            (&["remove", "two", m], "not a non-zero member id"),
            (&["remove", "1", "2", m], "takes only"),
            (&["add-learner", "4=a:1", m], "lacks the /rpc_addr"),
            (
                &["add-learner", "4=a:1/b:2,5=c:3/d:4", m],
                "one member at a time",
            ),
            (&["add-learner", "4=/b:2", m], "needs both"),
            (&["members", "--raft_id=1", m], "unknown flag --raft_id"),
            (&["members", "--master_server_addr"], "needs a value"),
            (
                &["members", m, "--tls_ca=ca.pem"],
                "--tls_cert, --tls_key missing",
            ),
            (
                &[
                    "members",
                    m,
                    "--tls_ca=/nonexistent/ca.pem",
                    "--tls_cert=c",
                    "--tls_key=k",
                ],
                "/nonexistent/ca.pem",
            ),
        ] {
            let e = parse(args).unwrap_err().to_string();
            assert!(e.contains(why), "{args:?}: {e}");
        }
    }
}
