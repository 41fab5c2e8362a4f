#!/usr/bin/env bash
# Where the server's CPU goes on the push path (issue 12): a perf profile of one `nearby-node dev`
# (release, load shedding off) under a fixed load from `nearby-loadsim run` on the comparison's
# world, its self time grouped by component — nearby's own code, quinn-proto, quinn, rustls, the
# crypto (ring), tokio, the allocator, libc and the kernel (sendmsg/recvmsg, the UDP stack, the
# scheduler).
#
#   tests/bench/profile.sh [RATE] [SECONDS]     updates/s (default 600, near the 2-core knee)
#                                               and how long to record (default 20)
#   NEARBY_DRIVER=tasks tests/bench/profile.sh  the client service on quinn's tasks (default: batched)
#   NEARBY_BIN=DIR tests/bench/profile.sh       profile the binaries in DIR (e.g. a copy of an
#                                               earlier build, for a before/after pair)
#   NEARBY_KEEP_ALIVE=25 tests/bench/profile.sh 67 30
#                                               the clients' QUIC keep-alive in seconds (default
#                                               5; 25 is the SDK's, with its 60 s idle timeout):
#                                               with the seed's cadence, the idle session's cost
#   NEARBY_NEAR=0.2 tests/bench/profile.sh      the world with ~20 % of friendships within 8 km
#                                               (the seed's; default: the dense comparison world)
#   NEARBY_CLIENTS=batched tests/bench/profile.sh
#                                               the load generator's client driver (default sdk:
#                                               a quinn task per phone; batched: every phone on
#                                               one socket, as compare.sh drives the systems)
#
# Output: the grouped table, the 25 hottest symbols, and `perf.data` kept in target/profile/ for
# `perf report -i target/profile/perf.data`. Needs `perf` (Debian: linux-perf) and, unless run as
# root, kernel.perf_event_paranoid <= 1. The server runs on CPU 0, the load generator on CPU 1.
set -euo pipefail
cd "$(dirname "$0")/../.."

rate=${1:-600} secs=${2:-20}
users=20000 online=0.1 seed=7
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)" >&2; exit 1; }
if [ -n "${NEARBY_BIN:-}" ]; then
  bin=$NEARBY_BIN
else
  cargo build --release -p nearby-node -p nearby-loadsim
  bin=target/release
fi
out=${NEARBY_PROFILE_OUT:-target/profile}
mkdir -p "$out"

on_server=() on_load=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  on_server=(taskset -c 0)
  on_load=(taskset -c 1)
fi

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

echo "== world: $users users, $online online (seed $seed)"
"$bin/nearby-loadsim" world --seed "$seed" --users "$users" --online "$online" \
  ${NEARBY_NEAR:+--near-share "$NEARBY_NEAR"} --out "$work/seed.bin" >/dev/null
echo "== nearby-node dev (shedding off)"
"${on_server[@]}" "$bin/nearby-node" dev --data "$work/data" --home "$work/home" --no-shed --driver "${NEARBY_DRIVER:-batched}" --address-limit "$address_limit" \
  --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 --import "$work/seed.bin" 2>"$work/node.log" &
node=$!; pids+=("$node")
wait_file "$work/home/endpoint" 300 "$work/node.log"

# The load runs a little longer than the recording, which starts once every session is up.
"${on_load[@]}" "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$work/home" \
  --rate "$rate" --duration $((secs + 10)) --server-pid "$node" --clients "${NEARBY_CLIENTS:-sdk}" \
  --keep-alive "${NEARBY_KEEP_ALIVE:-5}" --idle-timeout "$(( ${NEARBY_KEEP_ALIVE:-5} > 10 ? 60 : 20 ))" \
  --json-out "$out/load.json" >"$work/load.log" 2>&1 &
load=$!; pids+=("$load")
echo "== waiting for the load's step to start"
until grep -q "step 1/1" "$work/load.log" 2>/dev/null || ! kill -0 "$load" 2>/dev/null; do sleep 0.5; done
sleep 3
echo "== recording $secs s of the node at $rate updates/s"
perf record -F 999 -g -p "$node" -o "$out/perf.data" -- sleep "$secs" 2>"$work/perf.log" || {
  cat "$work/perf.log" >&2; exit 1; }
wait "$load" || true

perf report -i "$out/perf.data" --no-children --sort sym --stdio -g none --percent-limit 0.01 2>/dev/null \
  | python3 tests/bench/profile_groups.py

echo "== the load's report (server CPU per push and peak RSS, measured over the whole run)"
sed -n '/^step /,/^total:/p' "$work/load.log"
