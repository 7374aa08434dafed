#!/usr/bin/env bash
# The leak soak: clients (set up, write, read, remove, then closed or dropped) and storage nodes
# (mounted, then stopped or killed) come and go against one mooncake_master and two long-lived
# storage nodes; the open descriptors of all of them, the resident memory of the master and the
# storage nodes and the live heap of the clients' process are sampled, and growth after the
# warm-up above 5% fails the run.
#
#   bash scripts/leak_soak.sh                 # 2 minutes (what CI runs)
#   bash scripts/leak_soak.sh --minutes 30
#
# Any other flag goes to the binary (`--max-growth`, `--end close|drop|both`; see
# `leak_soak --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p mooncake-master-service --bin mooncake_master \
    -p mooncake-store --bin mooncake_client -p mooncake-bench --bin leak_soak
bin="${CARGO_TARGET_DIR:-target}/release"
exec "$bin/leak_soak" --master-bin "$bin/mooncake_master" --client-bin "$bin/mooncake_client" "$@"
