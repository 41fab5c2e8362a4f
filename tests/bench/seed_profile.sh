#!/usr/bin/env bash
# The figure an operator plans with: server cores and GiB per million online users at the seed's
# profile — every online user sends a location every 30 s (real time, not the comparison's
# accelerated steps), 10 % of users online, ~20 % of friendships within 8 km — for nearby and
# for the original design on Redis, idle costs (keep-alives, timers, Raft ticks) included.
#
#   tests/bench/seed_profile.sh [SECONDS]     how long to hold the load (default 60)
#   NEARBY_SEED_USERS=60000 tests/bench/seed_profile.sh
#                                             a bigger world (default 20,000 users): more online
#                                             users per core, as a production node holds
#
# The clients keep the SDK's liveness (a QUIC keep-alive every 25 s, 60 s idle timeout), which is
# what phones run; the comparison's 5 s keep-alive would charge each idle session five times over.
#
# One world of 20,000 users (2,000 online) drives each system in turn, pinned to CPU 0 (the load
# generator on CPU 1), at online / 30 s = 67 updates/s. Cores and peak RSS are the server's
# processes (the baseline's Redis included), scaled by 1,000,000 / 2,000 online users: at the
# seed's ratio of users to online users, the friend graph scales with them too.
set -euo pipefail
cd "$(dirname "$0")/../.."

secs=${1:-60}
users=${NEARBY_SEED_USERS:-20000} online=0.1 seed=7 near=0.2
cargo build --release -p nearby-node -p nearby-baseline -p nearby-loadsim
bin=target/release
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }
on_server=() on_load=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  on_server=(taskset -c 0)
  on_load=(taskset -c 1)
fi
# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

"$bin/nearby-loadsim" world --seed "$seed" --users "$users" --online "$online" --near-share "$near" \
  --out "$work/seed.bin"
rate=$(python3 -c "print(round($users * $online / 30.0, 1))")

load() { # name home server-pid [extra-pid]
  echo "== $1: $rate updates/s for $secs s"
  "${on_load[@]}" "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$2" \
    --rate "$rate" --duration "$secs" --server-pid "$3" --keep-alive 25 --idle-timeout 60 ${4:+--extra-pid "$4"} \
    --json-out "$work/$1.json" >"$work/$1.load.log" 2>&1 || { tail -20 "$work/$1.load.log" >&2; exit 1; }
}

"${on_server[@]}" "$bin/nearby-node" dev --data "$work/n-data" --home "$work/n-home" --no-shed \
  --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 --import "$work/seed.bin" --address-limit "$address_limit" \
  2>"$work/nearby.log" &
node=$!; pids+=("$node")
wait_file "$work/n-home/endpoint" 300 "$work/nearby.log"
load nearby "$work/n-home" "$node"
kill -TERM "$node"; wait "$node" || true

start_baseline "$bin" "$work/b-home"
load baseline "$work/b-home" "$base" "$redis"

python3 - "$work/nearby.json" "$work/baseline.json" "$users" "$online" <<'PY'
import json, sys
online = int(float(sys.argv[3]) * float(sys.argv[4]))
rows = []
for name, path in (("nearby", sys.argv[1]), ("baseline (Redis)", sys.argv[2])):
    r = json.load(open(path))
    s = r["steps"][0]
    cores = s["server"]["cores"] + (s["extra"]["cores"] if s.get("extra") else 0.0)
    rss_kb = s["server"]["peak_rss_kb"] + (s["extra"]["peak_rss_kb"] if s.get("extra") else 0)
    rows.append((name, s["updates_per_s"], s["pushes_per_s"], s["latency"]["p99_ms"],
                 r["total"]["leaks"], cores, rss_kb))
print(f"| system | updates/s | pushes/s | p99 ms | leaks | server cores | peak RSS MiB "
      f"| cores per M online | GiB per M online |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, u, p, p99, leaks, cores, rss in rows:
    per_m = 1e6 / online
    print(f"| {name} | {u:.1f} | {p:.0f} | {p99:.1f} | {leaks} | {cores:.3f} | {rss / 1024:.0f} "
          f"| {cores * per_m:.0f} | {rss * per_m / 1024 / 1024:.0f} |")
(n, b) = rows
print(f"\nnearby / baseline: cores {n[5] / b[5]:.2f}x, memory {n[6] / b[6]:.2f}x "
      f"({online} online users of {sys.argv[3]}, an update each per 30 s)")
PY
