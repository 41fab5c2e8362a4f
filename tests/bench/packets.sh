#!/usr/bin/env bash
# Datagrams per delivered push, nearby against the original design, at one fixed load: the
# packets each server sends and receives over a load step, counted by nftables on the server's
# UDP port (loopback), divided by the pushes the load generator received in the step. Both
# systems push through the same QUIC front end (nearby's batched driver, the baseline on quinn's
# tasks); this says whether one of them pays for more packets per push than the other.
#
#   tests/bench/packets.sh [RATE] [SECONDS]    updates/s (default 500) and the step's length
#                                              (default 20), the comparison's world (20,000
#                                              users, 10 % online, seed 7)
#   NEARBY_NEAR=0.2 tests/bench/packets.sh     the world with ~20 % of friendships within 8 km
#
# The count runs over the step (from its start until the generator reports it is draining). Its
# first seconds carry more datagrams than the steady state (2.56 out a push over a 5 s step,
# 1.26 over 20 s, on 2026-12-05, for both systems alike), so it reads higher than `profile.sh`,
# which records from 3 s into the step; compare systems with one step length.
# Needs root (nftables), redis-server, and release builds of nearby-node, nearby-baseline and
# nearby-loadsim (`cargo build --release -p nearby-node -p nearby-baseline -p nearby-loadsim`).
set -euo pipefail
cd "$(dirname "$0")/../.."

rate=${1:-500} secs=${2:-20}
bin=target/release
command -v nft >/dev/null || { echo "nft is not installed (apt-get install nftables)" >&2; exit 1; }
for b in nearby-node nearby-baseline nearby-loadsim; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b: build the release binaries first" >&2; exit 1; }
done

on_server=() on_load=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  on_server=(taskset -c 0)
  on_load=(taskset -c 1)
fi

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

table=nearby_packets_$$
nft add table inet "$table"
nft add chain inet "$table" out '{ type filter hook output priority 0; }'
trap 'nft delete table inet "$table" 2>/dev/null || true; cleanup' EXIT

"$bin/nearby-loadsim" world --seed 7 --users 20000 --online 0.1 \
  ${NEARBY_NEAR:+--near-share "$NEARBY_NEAR"} --out "$work/seed.bin" >/dev/null

# packets RULE: the packets the rule commented RULE counted.
packets() {
  nft list chain inet "$table" out |
    awk -v r="\"$1\"" '$0 ~ r { for (i = 1; i <= NF; i++) if ($i == "packets") print $(i + 1) }'
}

# measure NAME HOME PID: one step against the server whose client endpoint is in HOME.
measure() {
  local port load
  port=$(sed 's/.*://' "$2/endpoint" | head -1)
  nft flush chain inet "$table" out
  nft add rule inet "$table" out udp sport "$port" counter comment '"server_out"'
  nft add rule inet "$table" out udp dport "$port" counter comment '"server_in"'
  "${on_load[@]}" "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$2" \
    --rate "$rate" --duration "$secs" --server-pid "$3" --clients batched --keep-alive 5 \
    --idle-timeout 20 --json-out "$work/$1.json" >"$work/$1.log" 2>&1 &
  load=$!; pids+=("$load")
  until grep -q "step 1/1" "$work/$1.log" 2>/dev/null; do
    kill -0 "$load" 2>/dev/null || { echo "$1: the load ended before its step:" >&2; tail -5 "$work/$1.log" >&2; exit 1; }
    sleep 0.2
  done
  # Connecting and the first pages are not pushes, nor is the drain after the step: count the
  # step alone.
  nft reset counters table inet "$table" >/dev/null
  until grep -q "draining" "$work/$1.log" 2>/dev/null || ! kill -0 "$load" 2>/dev/null; do sleep 0.2; done
  local out in
  out=$(packets server_out) in=$(packets server_in)
  wait "$load" || true
  python3 - "$1" "$work/$1.json" "$out" "$in" <<'PY'
import json, sys
name, report, out, into = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
steps = json.load(open(report))["steps"]
pushes = sum(s["pushes"] for s in steps)
us = steps[0]["server"]["cpu_us_per_push"]  # the run watched the server (--server-pid)
print(f"{name}: {pushes} pushes in the step; datagrams out {out / pushes:.3f} a push, in "
      f"{into / pushes:.3f} a push; server CPU {us:.1f} µs a push (Redis not counted)")
PY
}

echo "== nearby ($rate updates/s, $secs s)"
"${on_server[@]}" "$bin/nearby-node" dev --data "$work/data" --home "$work/nearby-home" --no-shed \
  --address-limit "$address_limit" --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 \
  --import "$work/seed.bin" 2>"$work/node.log" >/dev/null &
node=$!; pids+=("$node")
wait_file "$work/nearby-home/endpoint" 300 "$work/node.log"
measure nearby "$work/nearby-home" "$node"
kill "$node"; wait "$node" 2>/dev/null || true

echo "== baseline (Redis)"
start_baseline "$bin" "$work/baseline-home"
measure baseline "$work/baseline-home" "$base"
