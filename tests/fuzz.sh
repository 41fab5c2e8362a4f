#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ (cargo-fuzz, libFuzzer): briefly for CI, or for a number of
# executions each for the figures in docs/bad-input.md.
#
#   tests/fuzz.sh                             each target for 20 s (the CI smoke)
#   tests/fuzz.sh 300                         each target for 300 s
#   NEARBY_FUZZ_RUNS=10000000 tests/fuzz.sh   each target for 10 M executions
#   tests/fuzz.sh 60 token config             only these targets
#
# Needs the nightly toolchain (sanitizer coverage) and cargo-fuzz, which it installs from
# crates.io when missing. New inputs that reach new code are added to fuzz/corpus/<target>; a
# crash, hang (10 s) or out-of-memory (2 GiB) stops the run with the input in fuzz/artifacts/.
# The last line per target is libFuzzer's own count: "Done N runs in S second(s)".
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${1:-20}
[ $# -gt 0 ] && shift
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "tests/fuzz.sh: installing cargo-fuzz" >&2
  cargo install --locked cargo-fuzz >&2
fi
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +nightly fuzz list)
fi
echo "== building ${#targets[@]} fuzz targets" >&2
cargo +nightly fuzz build -O >&2
# The binaries run directly: `cargo fuzz run` would build again before each target.
bin=target/x86_64-unknown-linux-gnu/release
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "artifacts/$t"
  if [ -n "${NEARBY_FUZZ_RUNS:-}" ]; then
    limit=(-runs="$NEARBY_FUZZ_RUNS")
    echo "== $t: $NEARBY_FUZZ_RUNS executions" >&2
  else
    limit=(-max_total_time="$secs")
    echo "== $t: $secs s" >&2
  fi
  log=$(mktemp)
  if ! "$bin/$t" "corpus/$t" "${limit[@]}" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "tests/fuzz.sh: $t failed; the input is in fuzz/artifacts/$t/" >&2
    rm -f "$log"
    exit 1
  fi
  grep -E "^Done [0-9]+ runs|stat::number_of_executed_units|stat::peak_rss_mb" "$log" | sed "s/^/$t: /"
  rm -f "$log"
done
