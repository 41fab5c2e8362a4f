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
# Output: the grouped table (nearby's client driver and TLS session apart from its logic), the 25
# hottest symbols, the datagrams per push over the recording (out: the node's counter; in: every
# other UDP datagram sent on the machine, the generator's), and `perf.data` kept in target/profile/ for
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
# What crosses the wire per push over the recording: the node's datagrams out (its own counter)
# and in (every other UDP datagram sent on this machine: the load generator's, all to the node).
counters() {
  node_metrics "$work/home" |
    awk '$1 == "nearby_updates_total" || $1 == "nearby_pushes_total" || $1 == "nearby_client_send_messages_total" { print $1, $2 }'
  awk '$1 == "Udp:" && $2 ~ /^[0-9]+$/ { print "udp_out", $5 }' /proc/net/snmp
}
counters >"$work/counters.before"
echo "== recording $secs s of the node at $rate updates/s"
perf record -F 999 -g -p "$node" -o "$out/perf.data" -- sleep "$secs" 2>"$work/perf.log" || {
  cat "$work/perf.log" >&2; exit 1; }
counters >"$work/counters.after"
wait "$load" || true

perf report -i "$out/perf.data" --no-children --sort sym --stdio -g none --percent-limit 0.01 2>/dev/null \
  | python3 tests/bench/profile_groups.py

echo "== datagrams per push over the recording (the node's out; in: every other UDP datagram sent here)"
awk 'NR == FNR { before[$1] = $2; next } { d[$1] = $2 - before[$1] }
  END {
    p = d["nearby_pushes_total"]; u = d["nearby_updates_total"]; o = d["nearby_client_send_messages_total"]
    i = d["udp_out"] - o
    if (p > 0 && u > 0)
      printf "updates %d, pushes %d (%.1f a update); datagrams out %.3f a push, in %.3f a push, both %.3f\n", u, p, p / u, o / p, i / p, (o + i) / p
  }' "$work/counters.before" "$work/counters.after"

echo "== the load's report (server CPU per push and peak RSS, measured over the whole run)"
sed -n '/^step /,/^total:/p' "$work/load.log"
