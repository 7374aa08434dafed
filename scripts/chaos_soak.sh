#!/usr/bin/env bash
# The chaos soak: a 3-member master group (Raft), two storage nodes and three clients writing
# with replica_num=2 while the leader is killed (SIGKILL) or frozen (SIGSTOP, 5 s) every 10 s and
# one storage node is killed; the history of every operation is checked afterwards (no
# acknowledged write lost, no stale or wrong read, no term with two leaders) and the write
# unavailability of each failover is reported. Exits non-zero on a violation.
#
#   bash scripts/chaos_soak.sh                 # 60 s (what CI runs)
#   bash scripts/chaos_soak.sh --seconds 300   # 5 minutes
#
# Any other flag goes to the binary (`--seed N` to replay a workload, `--history FILE`,
# `--strict`, `--keys N`; see `chaos_soak --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p mooncake-master-service --bin mooncake_master \
    -p mooncake-store --bin mooncake_client -p mooncake-bench --bin chaos_soak
bin="${CARGO_TARGET_DIR:-target}/release"
exec "$bin/chaos_soak" --master-bin "$bin/mooncake_master" --client-bin "$bin/mooncake_client" "$@"
