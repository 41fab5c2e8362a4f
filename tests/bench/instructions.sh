#!/usr/bin/env bash
# Instructions per delivered push, counted by callgrind: a measure of the push path that this
# shared machine's noise does not move (CPU time per push moves ±15 % between runs of one binary,
# more than most levers). Each build's `nearby-node dev` runs under valgrind while
# `nearby-loadsim run` drives a small world at a low rate (the node runs ~50× slower); the
# instructions of a fixed window are divided by the pushes the node counted in it
# (`nearby_pushes_total`). User space only: the kernel's work per push is not in the count, and
# neither are cache misses — this finds where instructions were added or saved, `/proc` and perf
# still judge time.
#
#   tests/bench/instructions.sh DIR [DIR...]   the builds' binaries (nearby-node, nearby-loadsim)
#                                              in each DIR (e.g. copies of target/release),
#                                              compared with the first
#   NEARBY_RATE=4 NEARBY_SECONDS=40 ...        updates/s over the 300 sessions, and the window
#
# Output per build: instructions per push and per UDP message sent; then, against the first
# build, the functions whose instructions per push moved most. Kept in target/instructions/.
# Needs valgrind (Debian: apt-get install valgrind).
set -euo pipefail
cd "$(dirname "$0")/../.."

[ $# -ge 1 ] || { sed -n '2,20p' "$0" >&2; exit 2; }
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
rate=${NEARBY_RATE:-4} secs=${NEARBY_SECONDS:-40}
out=${NEARBY_INSTRUCTIONS_OUT:-target/instructions}
mkdir -p "$out"

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

# metric NAME FILE: the value of a Prometheus sample in FILE.
metric() { awk -v n="$1" '$1 == n { print $2 }' "$2"; }

n=0
for bin in "$@"; do
  n=$((n + 1))
  run="$out/$n"
  rm -rf "$run" && mkdir -p "$run"
  echo "== build $n: $bin (300 sessions, $rate updates/s, $secs s counted)" >&2
  # A fixed world (seed 7): the same users, friendships and moves for every build.
  "$bin/nearby-loadsim" world --seed 7 --users 3000 --online 0.1 --out "$work/seed$n.bin" >/dev/null
  valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$run/callgrind.out" \
    "$bin/nearby-node" dev --data "$work/data$n" --home "$work/home$n" --no-shed \
    --address-limit "$address_limit" --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 \
    --import "$work/seed$n.bin" >/dev/null 2>"$run/node.log" &
  node=$!; pids+=("$node")
  wait_file "$work/home$n/endpoint" 600 "$run/node.log"
  "$bin/nearby-loadsim" run --world-file "$work/seed$n.bin.world.json" --home "$work/home$n" \
    --rate "$rate" --duration $((secs + 30)) --keep-alive 25 --idle-timeout 60 \
    --connect-concurrency 8 >"$run/load.log" 2>&1 &
  load=$!; pids+=("$load")
  until grep -q "step 1/1" "$run/load.log" 2>/dev/null; do
    kill -0 "$load" 2>/dev/null || { echo "the load ended before its step:" >&2; tail -5 "$run/load.log" >&2; exit 1; }
    sleep 0.5
  done
  sleep 8
  node_metrics "$work/home$n" >"$run/before.prom"
  callgrind_control -i on "$node" >/dev/null 2>&1
  echo "   counting $secs s" >&2
  sleep "$secs"
  callgrind_control -i off "$node" >/dev/null 2>&1
  node_metrics "$work/home$n" >"$run/after.prom"
  callgrind_control -d "$node" >/dev/null 2>&1
  wait "$load" || true
  kill "$node" 2>/dev/null || true
  wait "$node" 2>/dev/null || true
  pushes=$(( $(metric nearby_pushes_total "$run/after.prom") - $(metric nearby_pushes_total "$run/before.prom") ))
  sent=$(( $(metric nearby_client_send_messages_total "$run/after.prom") - $(metric nearby_client_send_messages_total "$run/before.prom") ))
  echo "$pushes $sent" >"$run/window"
  # The dump made by `-d` (the first part holds nothing: counting starts with `-i on`).
  dump=$(ls "$run"/callgrind.out.* | sort -t. -k3 -n | head -1)
  callgrind_annotate --auto=no --inclusive=no --threshold=100 "$dump" >"$run/functions.txt" 2>/dev/null
done

python3 tests/bench/instructions_diff.py "$out" "$n" "$@"
