#!/usr/bin/env bash
# The whole test suite: unit, conformance, multi-process and property tests of every crate, then
# the Python package (wheel built with maturin, tested with pytest), then the fuzz targets
# replaying their committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
# Peers of one host use shared memory by default; the store tests again with TCP alone.
MC_SAME_HOST_SHM=0 cargo test -p mooncake-store --test store --test read_ahead
# The Python package: build the wheel, pip-install it into target/py-venv, run pytest.
bash mooncake-py/run_tests.sh
bash fuzz/replay.sh
