#!/usr/bin/env bash
# For a machine with RDMA hardware (or soft-RoCE): prints the devices found, runs the transport
# conformance suite against them, then the transfer benchmark. One command:
#   bash scripts/rdma_hw_test.sh            # every device
#   MC_RDMA_DEVICES=mlx5_0,mlx5_1 bash scripts/rdma_hw_test.sh
# Needs cmake and libclang (sideway's build) and rdma-core's libibverbs at run time; on Debian:
#   apt-get install -y cmake libclang-dev libibverbs1 ibverbs-providers
# Soft-RoCE, where the kernel has it: rdma link add rxe0 type rxe netdev eth0
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== devices"
cargo run -q --release -p mooncake-transport-rdma --features rdma --bin rdma_probe
echo "== conformance suite on the devices above"
cargo test --release -p mooncake-transport-rdma --features rdma-hw --test hardware
echo "== transfer benchmark (two engines in one process, through the NICs)"
cargo run -q --release -p mooncake-transport-rdma --features rdma --bin rdma_sched_bench -- --real 5
