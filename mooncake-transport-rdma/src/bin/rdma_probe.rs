//! Lists the RDMA devices this host offers and what the transport would use of each, or says
//! why there are none. Exits with status 1 when there is no usable device.

use mooncake_transport_rdma::verbs::Provider;

fn main() {
    let provider = mooncake_transport_rdma::sideway_verbs::SidewayProvider::new();
    let names = match provider.devices() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut usable = 0;
    for name in names {
        match provider.open(&name) {
            Ok(d) => {
                let a = d.attrs();
                usable += 1;
                println!(
                    "{}: mtu {} lid {} gid {} max_mr {} max_qp_wr {} numa {:?}",
                    a.name,
                    a.active_mtu,
                    a.lid,
                    std::net::Ipv6Addr::from(a.gid),
                    a.max_mr_size,
                    a.max_qp_wr,
                    a.numa_node
                );
            }
            Err(e) => println!("{name}: cannot open: {e}"),
        }
    }
    if usable == 0 {
        std::process::exit(1);
    }
}
