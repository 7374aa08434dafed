#!/usr/bin/env bash
# The whole test suite: unit, conformance, multi-process and property tests of every crate, then
# the fuzz targets replaying their committed corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
bash fuzz/replay.sh
