//! The shaped network: one namespace per node on a bridge in a switch namespace, `tbf` on both
//! ends of each veth (upload cap inside the node, download cap on the switch side), addresses in
//! 198.18.0.0/15. [`Net`] deletes every namespace it created when dropped.

use std::process::{Command, Stdio};

/// Outcome of trying to create the switch namespace.
pub(crate) enum Setup {
    Ready(Net),
    /// `ip netns add` is not permitted here (or `ip` is missing): the reason.
    NotPermitted(String),
}

/// One node of the network.
#[derive(Clone, Debug)]
pub(crate) struct Node {
    pub(crate) ns: String,
    /// The node's end of its veth, inside `ns`.
    pub(crate) dev: String,
    pub(crate) addr: String,
    /// Shaping in bit/s both ways, or `None` (unshaped: the metadata server's node).
    pub(crate) rate: Option<u64>,
}

/// The namespaces of one benchmark invocation (unique prefix), deleted on drop.
pub(crate) struct Net {
    prefix: String,
    created: Vec<String>,
    pub(crate) nodes: Vec<Node>,
}

/// Runs `ip ARGS`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Net {
    /// Creates the switch namespace and its bridge; `NotPermitted` when `ip netns add` fails.
    pub(crate) fn create(prefix: &str) -> Setup {
        let sw = format!("{prefix}_sw");
        if let Err(e) = ip(&["netns", "add", &sw]) {
            return Setup::NotPermitted(e);
        }
        let mut net = Net {
            prefix: prefix.to_owned(),
            created: vec![sw],
            nodes: Vec::new(),
        };
        let br = format!("{prefix}_br");
        let sw = net.created[0].clone();
        let made = ip(&["-n", &sw, "link", "add", &br, "type", "bridge"])
            .and_then(|_| ip(&["-n", &sw, "link", "set", &br, "up"]));
        match made {
            Ok(()) => Setup::Ready(net),
            Err(e) => {
                net.cleanup();
                Setup::NotPermitted(e)
            }
        }
    }

    /// Adds node `i` with address 198.18.0.`host`, shaped to `rate` bit/s each way (`tbf` with
    /// a 256 KiB burst and 100 ms of queue on both ends of its veth) or unshaped.
    pub(crate) fn add_node(&mut self, i: usize, host: u8, rate: Option<u64>) -> Result<(), String> {
        let p = &self.prefix;
        let (ns, sw) = (format!("{p}_n{i}"), format!("{p}_sw"));
        let (dev, swdev) = (format!("{p}_p{i}"), format!("{p}_s{i}"));
        ip(&["netns", "add", &ns])?;
        self.created.push(ns.clone());
        // Both ends are created directly in their namespaces: nothing is left in the root one.
        ip(&[
            "link", "add", &dev, "netns", &ns, "type", "veth", "peer", "name", &swdev, "netns", &sw,
        ])?;
        ip(&[
            "-n",
            &sw,
            "link",
            "set",
            &swdev,
            "master",
            &format!("{p}_br"),
        ])?;
        ip(&["-n", &sw, "link", "set", &swdev, "up"])?;
        let addr = format!("198.18.0.{host}");
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &dev])?;
        ip(&["-n", &ns, "link", "set", &dev, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        if let Some(rate) = rate {
            let rate_s = format!("{rate}bit");
            for (n, d) in [(&ns, &dev), (&sw, &swdev)] {
                let out = Command::new("ip")
                    .args([
                        "netns", "exec", n, "tc", "qdisc", "add", "dev", d, "root", "tbf",
                    ])
                    .args(["rate", &rate_s, "burst", "256kb", "latency", "100ms"])
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("tc: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "tc qdisc add dev {d} root tbf rate {rate_s}: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    ));
                }
            }
        }
        self.nodes.push(Node {
            ns,
            dev,
            addr,
            rate,
        });
        Ok(())
    }

    /// (rx_bytes, tx_bytes) of a node's veth, read inside its namespace.
    pub(crate) fn counters(node: &Node) -> Result<(u64, u64), String> {
        let stats = format!("/sys/class/net/{}/statistics", node.dev);
        let out = Command::new("ip")
            .args(["netns", "exec", &node.ns, "cat"])
            .arg(format!("{stats}/rx_bytes"))
            .arg(format!("{stats}/tx_bytes"))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("reading counters of {}: {e}", node.ns))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Vec<u64> = text
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        match v[..] {
            [rx, tx] if out.status.success() => Ok((rx, tx)),
            _ => Err(format!(
                "reading counters of {}: {}",
                node.ns,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Deletes every namespace this invocation created (their veths go with them). Idempotent.
    pub(crate) fn cleanup(&mut self) {
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("p2p_bench: cleanup: {e}");
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.cleanup();
    }
}
