#!/usr/bin/env bash
# One node against three on this machine, at equal load: update → push throughput and latency
# from the load simulator, and how many node-to-node messages each update cost in the cluster.
#
#   tests/bench/cluster.sh            # release build, the numbers of docs/benchmarks.md
#   tests/bench/cluster.sh --smoke    # debug build, a few seconds
#
# Both runs use `nearby-node dev` with the same world imported and 8 shard groups, load
# shedding off. The three nodes share this machine's cores with each other and with the load
# generator: the comparison shows what the cluster's forwarding costs, not how it scales.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=full
[ "${1:-}" = "--smoke" ] && mode=smoke
if [ "$mode" = smoke ]; then
  profile=debug users=300 online=0.2 rates=20,40 duration=3 seed=3
else
  profile=release users=10000 online=0.1 duration=15 seed=7
  rates=${NEARBY_CLUSTER_RATES:-200,400,800,1200,1600}
  cargo build --release -p nearby-node -p nearby-loadsim
fi
bin=target/$profile
for b in nearby-node nearby-loadsim; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b: build it first (cargo build -p $b)" >&2; exit 1; }
done

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

echo "== world: $users users, $online online (seed $seed)"
"$bin/nearby-loadsim" world --seed "$seed" --users "$users" --online "$online" --out "$work/seed.bin"

run() { # name nodes
  local name=$1 nodes=$2
  echo "== $name: $nodes node(s), 8 groups"
  "$bin/nearby-node" dev --nodes "$nodes" --groups 8 --no-shed --data "$work/$name-data" \
    --home "$work/$name-home" --listen 127.0.0.1:17400 --raft-listen 127.0.0.1:17401 \
    --import "$work/seed.bin" --address-limit "$address_limit" 2>"$work/$name.log" &
  local node=$!; pids+=("$node")
  wait_file "$work/$name-home/endpoint" 300 "$work/$name.log"
  if [ "$nodes" -gt 1 ]; then
    # Load only a settled cluster: every shard group on three voters, leaders on every node
    # (the imported world's replicas are copied to the joining nodes first).
    local i=0
    until "$bin/nearby-node" inspect --data "$work/$name-data/n1" 2>/dev/null | awk -v n="$nodes" '
        /^  [0-9]+: \[/ { groups++; if ($0 ~ /voters=\{[0-9]+, [0-9]+, [0-9]+\} learners=\{\}/) full++;
                          match($0, /leader=Some\([0-9]+\)/); if (RSTART) lead[substr($0, RSTART + 12, RLENGTH - 13)] = 1 }
        END { c = 0; for (k in lead) c++; exit !(groups > 0 && full == groups && c == n) }'; do
      sleep 1; i=$((i + 1))
      [ $i -lt 600 ] || { echo "the cluster did not settle in 10 min" >&2; exit 1; }
    done
    echo "settled after ${i} s: every group on three voters, leaders on all $nodes nodes"
    "$bin/nearby-node" inspect --data "$work/$name-data/n1" >"$work/$name.map"
  fi
  # The server's CPU and memory: the dev process itself (one node) or its node children.
  local server
  server=$(pgrep -d, -P "$node" nearby-node || true)
  [ -n "$server" ] || server=$node
  "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$work/$name-home" \
    --rate "$rates" --duration "$duration" --server-pid "$server" --json-out "$work/$name.json" \
    --pseudonym-key "$work/$name-data/dev/pseudonym.key"
  kill -TERM "$node"; wait "$node" || true
}

run one 1
run three 3

echo "== messages to peers in the three-node cluster (each node, at its shutdown)"
grep -h "messages to peers since start" "$work/three.log" | sed 's/.*INFO //' || true
updates=$(python3 - "$work/three.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(int(sum(s["updates"] for s in r["steps"])))
EOF
) || updates=""
awk -v updates="$updates" '
  /messages to peers since start/ {
    for (i = 1; i <= NF; i++) {
      split($i, kv, "=")
      if (kv[1] ~ /envelopes$/) env += kv[2]
      if (kv[1] ~ /updates$/) upd += kv[2]
      if (kv[1] ~ /batches$/) bat += kv[2]
    }
  }
  END {
    printf "forwarded updates (to groups on other nodes): %d, in %d batches, %d envelopes in all\n", upd, bat, env
    if (updates > 0) printf "per location update sent: %.2f forwarded updates; %.2f node-to-node messages of any kind (subscriptions too)\n", upd / updates, bat / updates
  }' "$work/three.log"
# The most groups on other nodes an update can reach: for a sender in group g, every group whose
# leader is not g's leader (an update is forwarded at most once to each), averaged over groups.
awk '/^  [0-9]+: \[/ { match($0, /leader=Some\([0-9]+\)/); l[n++] = substr($0, RSTART + 12, RLENGTH - 13) }
  END { for (i = 0; i < n; i++) for (j = 0; j < n; j++) if (l[i] != l[j]) far++
        printf "destination groups on other nodes, the bound per update (leaders as placed): %.2f\n", far / n }' \
  "$work/three.map"
