#!/usr/bin/env bash
# Builds the fuzz targets on stable Rust, replays the committed seed corpus of each, then fuzzes
# each target for a short bounded time into a throw-away corpus. Exits non-zero on any crash,
# assertion failure or build failure.
#
# Usage (from anywhere, usually the repo root):  bash fuzz/replay.sh
# Environment:
#   FUZZ_SECONDS   seconds of fuzzing per target after the replay (default 20; 0 skips it)
#   FUZZ_TARGETS   space-separated targets to run (default: all, from `cargo fuzz list`)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FUZZ_SECONDS="${FUZZ_SECONDS:-20}"

# (a) cargo-fuzz, installed only when missing.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version '^0.13'
fi
echo "== $(cargo fuzz --version), $(rustc -V)"

# (b) Build. `--sanitizer none` is what makes this work on stable: the sanitizers need nightly's
# -Zsanitizer. Builds are release (-O) with debug assertions and overflow checks by default.
start=$SECONDS
echo "== building fuzz targets"
cargo fuzz build --sanitizer none
echo "== build took $((SECONDS - start))s"

if [[ -n "${FUZZ_TARGETS:-}" ]]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi
[[ ${#targets[@]} -gt 0 ]] || { echo "no fuzz targets found" >&2; exit 1; }

tmp="$(mktemp -d "${TMPDIR:-/tmp}/mooncake-fuzz.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
failed=()

# (c) Replay every committed seed once (-runs=0: run the inputs given, generate nothing).
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    if [[ ! -d "$corpus" ]]; then
        echo "== $t: no committed corpus at $corpus" >&2
        failed+=("$t (no corpus)")
        continue
    fi
    start=$SECONDS
    echo "== replaying $corpus ($(find "$corpus" -type f | wc -l) files)"
    if cargo fuzz run "$t" --sanitizer none "$corpus" -- -runs=0; then
        echo "== $t: replay passed in $((SECONDS - start))s"
    else
        failed+=("$t (replay)")
    fi
done

# (d) A short fuzzing burst per target. New inputs go to the first corpus directory, a temporary
# one; the committed corpus is only read. Crashes land in fuzz/artifacts/<target>/ (gitignored).
if [[ "$FUZZ_SECONDS" -gt 0 ]]; then
    for t in "${targets[@]}"; do
        mkdir -p "$tmp/$t"
        seeds=()
        [[ -d "fuzz/corpus/$t" ]] && seeds=("fuzz/corpus/$t")
        echo "== fuzzing $t for ${FUZZ_SECONDS}s"
        if cargo fuzz run "$t" --sanitizer none "$tmp/$t" "${seeds[@]}" -- \
            -max_total_time="$FUZZ_SECONDS" -timeout=25 -print_final_stats=1; then
            echo "== $t: no crash in ${FUZZ_SECONDS}s ($(find "$tmp/$t" -type f | wc -l) new corpus entries, discarded)"
        else
            failed+=("$t (fuzzing)")
        fi
    done
fi

if [[ ${#failed[@]} -gt 0 ]]; then
    # The fuzzers' own output is long; repeat each crash's cause and input here, at the end,
    # where a truncated log still shows them.
    for dir in fuzz/artifacts/*/; do
        t="$(basename "$dir")"
        for f in "$dir"*; do
            [[ -f "$f" ]] || continue
            echo "== crashing input for $t: $f ($(wc -c <"$f") bytes), base64:" >&2
            base64 -w 0 "$f" >&2
            echo >&2
            echo "== its failure, replayed:" >&2
            cargo fuzz run "$t" --sanitizer none "$f" 2>&1 |
                grep -E "panicked|invariant|overflow|out-of-memory|timeout|deadly|SUMMARY|allocation" |
                head -n 12 >&2 || true
        done
    done
    echo "== FAILED: ${failed[*]}" >&2
    echo "   crashing inputs are in fuzz/artifacts/<target>/; reproduce with" >&2
    echo "   cargo fuzz run <target> --sanitizer none fuzz/artifacts/<target>/<file>" >&2
    exit 1
fi
echo "== fuzz: ${#targets[@]} targets replayed$([[ "$FUZZ_SECONDS" -gt 0 ]] && echo " and fuzzed ${FUZZ_SECONDS}s each"), no crash"
