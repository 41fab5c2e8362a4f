#!/usr/bin/env bash
# What the load generator costs, per client driver: the same seeded world and ramp against a
# fresh nearby node twice, once with `nearby-loadsim run --clients sdk` (an SDK client per
# simulated phone) and once with `--clients batched` (every phone on one socket in one task),
# and a table of the generator's CPU per delivered push at each step, side by side, as a ratio.
#
#   NEARBY_BIN=target/release tests/bench/generator.sh    (default: builds release first)
#   NEARBY_GENERATOR_RATES=200,400,...                     the ramp (updates/s)
#   NEARBY_NEAR=0.2                                        the world with ~20 % of friends near
#
# The node runs on the first CPU, the generator on the second (taskset), uncapped: at the top
# steps the SDK clients' generator is the limit, which is what this measures. 127.0.0.1 only;
# every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

bin=${NEARBY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release -p nearby-node -p nearby-loadsim
  bin=target/release
fi
rates=${NEARBY_GENERATOR_RATES:-200,400,600,800,1000}
duration=${NEARBY_GENERATOR_DURATION:-15}
near=()
[ -n "${NEARBY_NEAR:-}" ] && near=(--near-share "$NEARBY_NEAR")

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

on_server=() on_load=()
if [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  on_server=(taskset -c 0) on_load=(taskset -c 1)
fi

echo "== world: 20000 users, 10 % online (seed 7)"
"$bin/nearby-loadsim" world --seed 7 --users 20000 --online 0.1 "${near[@]}" --out "$work/seed.bin"
for clients in sdk batched; do
  echo "== nearby, the generator on $clients clients"
  "${on_server[@]}" "$bin/nearby-node" dev --data "$work/$clients-data" --home "$work/$clients-home" \
    --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 --import "$work/seed.bin" --address-limit "$address_limit" \
    --no-shed 2>"$work/$clients.log" &
  node=$!; pids+=("$node")
  wait_file "$work/$clients-home/endpoint" 300 "$work/$clients.log"
  "${on_load[@]}" "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$work/$clients-home" \
    --rate "$rates" --duration "$duration" --server-pid "$node" --clients "$clients" \
    --pseudonym-key "$work/$clients-data/dev/pseudonym.key" --json-out "$work/$clients.json"
  kill -TERM "$node"; wait "$node" || true
done

echo "== the generator's CPU per delivered push"
python3 - "$work/sdk.json" "$work/batched.json" <<'PY'
import json, sys
sdk, batched = (json.load(open(p)) for p in sys.argv[1:3])
print("| updates/s | pushes/s (sdk / batched) | generator µs/push, sdk | batched | batched / sdk | generator cores, sdk / batched | p99 ms, sdk / batched | leaks |")
print("|---:|---:|---:|---:|---:|---:|---:|---:|")
ratios = []
for a, b in zip(sdk["steps"], batched["steps"]):
    ga, gb = a.get("loadsim") or {}, b.get("loadsim") or {}
    ua, ub = ga.get("cpu_us_per_push"), gb.get("cpu_us_per_push")
    ratio = ub / ua if ua and ub else None
    if ratio is not None:
        ratios.append(ratio)
    print("| %.0f | %.0f / %.0f | %s | %s | %s | %.2f / %.2f | %.1f / %.1f | %d / %d |" % (
        a["target_rate"], a["pushes_per_s"], b["pushes_per_s"],
        "%.1f" % ua if ua else "–", "%.1f" % ub if ub else "–",
        "%.2f×" % ratio if ratio is not None else "–",
        ga.get("cores", 0), gb.get("cores", 0),
        a["latency"]["p99_ms"], b["latency"]["p99_ms"],
        a["oracle"]["leaks"], b["oracle"]["leaks"]))
if ratios:
    ratios.sort()
    print("\nmedian batched / sdk: %.2f× over %d steps" % (ratios[len(ratios) // 2], len(ratios)))
PY
