#!/usr/bin/env bash
# Side-by-side benchmark of mooncake.store through the Python API: our wheel (venv A) against
# upstream's wheel (venv B, mooncake-transfer-engine-non-cuda 0.3.13.post1), and our Python
# figures against the Rust store_bench client, all in one run on loopback.
#
# Usage: bash mooncake-py/bench/run_bench.sh [--setup-upstream] [--build-wheel] [--no-rust]
#                                            [compare flags...]
#   --setup-upstream  create venv B if missing: apt-get install libibverbs1 librdmacm1 libnuma1
#                     (when missing) and pip install the upstream wheel + numpy into it
#   --build-wheel     rebuild our wheel (maturin, release) and reinstall it into venv A first
#   --no-rust         skip the Rust store_bench (no "Python overhead" table)
#   compare flags     passed to `store_bench.py compare` (see --help there): --rounds N (3),
#                     --sizes 4K,64K,1M,16M, --seconds 0.6, --batch 32, --run-timeout 600, ports...
# Environment: MOONCAKE_PY_VENV (venv A; default target/py-venv, as run_tests.sh),
#   UPSTREAM_VENV (venv B; default target/upstream-venv), BENCH_TIMEOUT (whole run, s; 3600),
#   RUST_BENCH (a prebuilt store_bench binary: skips the cargo build).
# Logs and summary.json go to /tmp/mooncake-py-bench-<time>/ (never into the repo).
#
# Each implementation runs with its own mooncake_master (from its venv) on 127.0.0.1, on
# different ports (ours 50151/8180/9103, upstream 50251/8280/9203), started and stopped per run by
# the compare driver. Upstream is run with MC_TCP_BIND_ADDRESS=127.0.0.1, HTTP metadata served by
# its master, local_hostname 127.0.0.1. Rounds interleave the implementations (A,rust,B then
# B,rust,A, ...) and the tables show medians over rounds.
set -euo pipefail
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/../.."
ROOT="$(pwd)"
VENV_A="${MOONCAKE_PY_VENV:-target/py-venv}"
VENV_B="${UPSTREAM_VENV:-target/upstream-venv}"
UPSTREAM_PKG="mooncake-transfer-engine-non-cuda==0.3.13.post1"
SETUP_UPSTREAM=0
BUILD_WHEEL=0
RUST=1
ARGS=()
for a in "$@"; do
    case "$a" in
        --setup-upstream) SETUP_UPSTREAM=1 ;;
        --build-wheel) BUILD_WHEEL=1 ;;
        --no-rust) RUST=0 ;;
        -h|--help) sed -n '2,23p' "$SELF"; exit 0 ;;
        *) ARGS+=("$a") ;;
    esac
done

if [ ! -x "$VENV_A/bin/python" ] || [ "$BUILD_WHEEL" = 1 ]; then
    echo "run_bench: building our wheel into $VENV_A" >&2
    [ -x "$VENV_A/bin/python" ] || python3 -m venv "$VENV_A"
    "$VENV_A/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.16,<2" numpy
    rm -rf target/py-wheels
    timeout 1800 "$VENV_A/bin/maturin" build --release -m mooncake-py/Cargo.toml -o target/py-wheels
    "$VENV_A/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps \
        target/py-wheels/mooncake_rs-*.whl
fi
"$VENV_A/bin/python" -c 'import numpy, mooncake.store' \
    || { echo "run_bench: $VENV_A lacks numpy or our wheel (use --build-wheel)" >&2; exit 2; }

UP_ARGS=()
if [ "$SETUP_UPSTREAM" = 1 ] && [ ! -x "$VENV_B/bin/mooncake_master" ]; then
    missing=()
    for lib in libibverbs1 librdmacm1 libnuma1; do
        dpkg -s "$lib" >/dev/null 2>&1 || missing+=("$lib")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        echo "run_bench: apt-get install ${missing[*]}" >&2
        timeout 600 apt-get update -qq
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${missing[@]}"
    fi
    python3 -m venv "$VENV_B"
    timeout 900 "$VENV_B/bin/python" -m pip install -q --disable-pip-version-check "$UPSTREAM_PKG" numpy
fi
if [ -x "$VENV_B/bin/mooncake_master" ] && "$VENV_B/bin/python" -c 'import numpy, mooncake.store' 2>/dev/null; then
    UP_ARGS=(--upstream "$VENV_B/bin/python")
else
    echo "run_bench: no usable upstream venv at $VENV_B (use --setup-upstream or UPSTREAM_VENV=...):" \
         "running ours only" >&2
fi

RUST_ARGS=()
if [ "$RUST" = 1 ] && [ -n "${RUST_BENCH:-}" ]; then
    [ -x "$RUST_BENCH" ] || { echo "run_bench: RUST_BENCH=$RUST_BENCH is not executable" >&2; exit 2; }
    echo "run_bench: using the prebuilt Rust store_bench $RUST_BENCH" >&2
    RUST_ARGS=(--rust-bench "$RUST_BENCH")
elif [ "$RUST" = 1 ]; then
    echo "run_bench: cargo build --release -p mooncake-bench --bin store_bench" >&2
    if timeout 1800 cargo build --release -p mooncake-bench --bin store_bench >&2; then
        RUST_ARGS=(--rust-bench "$ROOT/target/release/store_bench")
    else
        echo "run_bench: building store_bench failed (a stale binary is not used): no Python-overhead" \
             "comparison; RUST_BENCH=path uses a binary built elsewhere" >&2
    fi
fi

exec timeout --kill-after=30 "${BENCH_TIMEOUT:-3600}" "$VENV_A/bin/python" mooncake-py/bench/store_bench.py compare \
    --ours "$VENV_A/bin/python" "${UP_ARGS[@]}" "${RUST_ARGS[@]}" "${ARGS[@]}"
