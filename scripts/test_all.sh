#!/usr/bin/env bash
# The whole test suite: unit, conformance, multi-process and property tests of every crate, the
# chaos and leak soaks, then the Python package (wheel built with maturin, tested with pytest), then the fuzz targets
# replaying their committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
# Peers of one host use shared memory by default; the store tests again with TCP alone.
MC_SAME_HOST_SHM=0 cargo test -p mooncake-store --test store --test read_ahead
# The chaos soak, 60 s: a master group whose leader is killed or frozen every 10 s, a storage node
# killed, clients' histories checked for lost writes and wrong reads (about 2 minutes with its
# release build; `scripts/chaos_soak.sh --seconds 300` for the 5-minute run).
bash scripts/chaos_soak.sh --seconds 60
# The leak soak, 2 minutes: clients and storage nodes coming and going; fails if descriptors or
# resident memory of the master, the storage nodes or the clients grow by more than 5%.
bash scripts/leak_soak.sh --minutes 2
# The Python package: build the wheel, pip-install it into target/py-venv, run pytest.
bash mooncake-py/run_tests.sh
# The P2P swarm on a shaped network of namespaces (64 MiB to 4 receivers, swarm and upstream's
# mode, about 20 s): fails if a copy is missing or differs from the origin; prints the targets it
# misses without failing on them; skips itself where network namespaces are not permitted.
cargo build --release -p mooncake-bench --bin p2p_bench
"${CARGO_TARGET_DIR:-target}/release/p2p_bench" --quick
bash fuzz/replay.sh
