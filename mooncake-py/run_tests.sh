#!/usr/bin/env bash
# Builds the mooncake-py wheel (maturin, release), installs it with pip into a virtualenv under
# target/, and runs the Python test suite (pytest mooncake-py/tests) against it.
# MOONCAKE_TEST_TORCH=1 (set in CI) also installs torch for the tensor tests; without torch they
# are skipped. Usage: bash mooncake-py/run_tests.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${MOONCAKE_PY_VENV:-target/py-venv}"
WHEELS=target/py-wheels

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
VENV="$(cd "$VENV" && pwd)"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "maturin>=1.16,<2" numpy pytest
if [ "${MOONCAKE_TEST_TORCH:-0}" = 1 ]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch
fi

start=$(date +%s)
rm -rf "$WHEELS"
"$VENV/bin/maturin" build --release -m mooncake-py/Cargo.toml -o "$WHEELS"
echo "mooncake-py: wheel built in $(( $(date +%s) - start ))s"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps "$WHEELS"/mooncake_rs-*.whl

set +e
(cd mooncake-py && timeout 1800 "$VENV/bin/python" -m pytest tests -q -rs "$@")
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "mooncake-py: pytest collected no tests: failing" >&2
    exit 1
fi
exit "$rc"
