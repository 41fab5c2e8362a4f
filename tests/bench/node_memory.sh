#!/usr/bin/env bash
# What one node holds in memory (issue 12): a release `nearby-node dev` imports the comparison's
# world (20,000 users, ~367 friends each: 7.3 M directed friendship edges, seed 7), then serves its
# 2,000 online users for 15 s at 100 updates/s. Prints the node's resident memory (VmRSS; anonymous
# and file-backed apart, and the peak, VmHWM) after the import and again with the sessions, the
# size of its data directory, and the load's verdict (leaks, misses).
#
#   tests/bench/node_memory.sh
#   NEARBY_BIN=DIR tests/bench/node_memory.sh     the binaries in DIR (e.g. an earlier build's copy)
#
# A node before any import holds ~15.5 MiB (the idle bench's "node RSS before"); what is above it
# after the import is the friend graph and everything kept with it. Pinned to CPU 0 (node) and
# CPU 1 (load) where there are two.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ -n "${NEARBY_BIN:-}" ]; then
  bin=$NEARBY_BIN
else
  cargo build --release -p nearby-node -p nearby-loadsim
  bin=target/release
fi
on_server=() on_load=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  on_server=(taskset -c 0)
  on_load=(taskset -c 1)
fi

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

memory() {
  grep -E 'VmHWM|VmRSS|RssAnon|RssFile' "/proc/$1/status" | tr -s ' \t' ' ' | tr '\n' ' '
}

echo "== world: 20000 users, 0.1 online (seed 7)"
"$bin/nearby-loadsim" world --seed 7 --users 20000 --online 0.1 --out "$work/seed.bin"
echo "== nearby-node dev, importing it"
"${on_server[@]}" "$bin/nearby-node" dev --data "$work/data" --home "$work/home" --no-shed \
  --address-limit "$address_limit" --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 \
  --import "$work/seed.bin" >"$work/node.out" 2>"$work/node.log" &
node=$!; pids+=("$node")
wait_file "$work/home/endpoint" 900 "$work/node.log"
sleep 3
echo "after the import: $(memory "$node")"
echo "data directory: $(du -sh "$work/data"/* | awk '{printf "%s %s  ", $2, $1}' | sed "s|$work/data/||g")"
echo "== 2000 sessions, 100 updates/s for 15 s"
"${on_load[@]}" "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$work/home" \
  --rate 100 --duration 15 --server-pid "$node" >"$work/load.log" 2>&1 || { tail -20 "$work/load.log" >&2; exit 1; }
echo "with the sessions: $(memory "$node")"
grep -E '^(connect|total):' "$work/load.log"
