#!/usr/bin/env bash
# Runs the same seeded load against nearby and against the original design's Redis stack on
# this machine, one after the other, and compares them (see docs/loadsim.md, docs/baseline.md).
#
#   tests/bench/compare.sh            full run: release build, 20,000 users, load ramped in steps;
#                                     writes the table into docs/benchmarks.md and the reports and
#                                     plots (latency.svg, cpu.svg) into docs/compare/
#   tests/bench/compare.sh --smoke    a few seconds with a small world and the debug binaries
#                                     (CI runs this after the tests, which built them)
#
#   NEARBY_COMPARE_SERVER_SHARE=0.5 (the full run's default; 1 = off)
#                                     caps every server it measures (nearby, the baseline with its
#                                     Redis, the bare push) at this share of its CPUs with a CPU
#                                     quota, so that the load generator is never the limit of a
#                                     ramp (needs root for a cgroup; without one it runs uncapped
#                                     and says so)
#
#   NEARBY_COMPARE_EXTEND=2 (the full run's default; 0 = off)
#                                     a system that held every step of the ramp runs again on
#                                     the ramp extended by four steps of 1.25x past its top, at
#                                     most this many times, until a step breaks its bounds: the
#                                     knee is found whatever the machine's speed that day
#   NEARBY_COMPARE_RATES=100,200,...  the ramp's steps (updates/s)
#   NEARBY_COMPARE_CLIENTS=batched    how the load generator runs its phones (`nearby-loadsim run
#                                     --clients`): `batched`, all on one socket in one task (a
#                                     fraction of the SDK clients' CPU per push), or `sdk`
#
#   NEARBY_COMPARE_NEAR=0.2 tests/bench/compare.sh
#                                     the same with a world where ~20 % of friendships are
#                                     within 8 km (the default world's cities put ~70 % there);
#                                     its table, reports and plots go to their own section of
#                                     docs/benchmarks.md and to docs/compare/near-0.2/
#
# Everything listens on 127.0.0.1 only; every process started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."

mode=full
[ "${1:-}" = "--smoke" ] && mode=smoke
if [ "$mode" = smoke ]; then
  profile=debug users=300 online=0.2 rates=20,40 duration=3 seed=3
  sessions=60 push_rates=200,400 push_duration=2
else
  profile=release users=20000 online=0.1 duration=15 seed=7
  # The bare push ceiling: as many sessions as online users, pushes/s around nearby's range.
  sessions=2000 push_rates=${NEARBY_CEILING_RATES:-2500,5000,7500,10000,15000,20000} push_duration=10
  # Steps up to about twice the load both systems hold on half a core of the 2-core machine
  # (the default cap below: ~500-700 updates/s), so that the knee of each lies inside the ramp;
  # override with NEARBY_COMPARE_RATES for other machines or caps.
  rates=${NEARBY_COMPARE_RATES:-100,200,300,400,500,600,700,850,1000,1200}
  cargo build --release -p nearby-node -p nearby-baseline -p nearby-loadsim
fi
bin=target/$profile
for b in nearby-node nearby-baseline nearby-loadsim; do
  [ -x "$bin/$b" ] || { echo "missing $bin/$b: build it first (cargo build -p $b)" >&2; exit 1; }
done
command -v redis-server >/dev/null || { echo "redis-server is not installed (apt-get install redis-server)" >&2; exit 1; }

# The servers (nearby-node; nearby-baseline with its redis-server; the bare push server) run on
# the first half of the CPUs and the load generator on the other half, so that each one's CPU is
# its own and they do not take turns on the same core. NEARBY_COMPARE_PIN=0 turns this off.
ncpu=$(nproc)
on_server=() on_load=() server_cpus=""
if [ "${NEARBY_COMPARE_PIN:-1}" = 1 ] && [ "$ncpu" -ge 2 ] && command -v taskset >/dev/null; then
  half=$((ncpu / 2))
  server_cpus="0-$((half - 1))"
  on_server=(taskset -c "$server_cpus")
  on_load=(taskset -c "$half-$((ncpu - 1))")
  echo "== servers on CPUs $server_cpus, load generator on CPUs $half-$((ncpu - 1))"
fi

# shellcheck source=tests/bench/lib.sh
. tests/bench/lib.sh

# On SDK clients the load generator cost as much CPU per push as nearby's server (docs/benchmarks.md,
# "Was the load generator the limit?"): with a core each, the ramp's knee was partly the
# generator's. Its batched clients cost about 0.7x the server's; the servers still get a CPU quota
# of `share` of their CPUs (cgroup, 10 ms periods), the generator none, and the comparison prints
# the generator's share at each system's knee, so a run shows it held.
share=${NEARBY_COMPARE_SERVER_SHARE:-0.5}
[ "$mode" = smoke ] && share=1
cg="" on_cgroup=() ceiling_cgroup=()
if [ "$share" != 1 ]; then
  ncpu_server=$ncpu
  [ -n "$server_cpus" ] && ncpu_server=$(taskset -c "$server_cpus" nproc)
  if cg=$(make_cpu_cgroup "$share" "$ncpu_server"); then
    cgroups+=("$cg")
    on_cgroup=(bash -c 'echo $$ >"$0/cgroup.procs" && exec "$@"' "$cg")
    ceiling_cgroup=(--server-cgroup "$cg")
    echo "== servers capped at $share of their $ncpu_server CPU(s) ($cg)"
  else
    cg=""
    echo "== cannot make a cgroup for the servers' CPU quota (not root?): they run uncapped, and the" >&2
    echo "   load generator may be the limit of a ramp (the comparison says where it was)" >&2
  fi
fi
on_server=("${on_cgroup[@]}" "${on_server[@]}")

echo "== world: $users users, $online online (seed $seed)"
near=()
tag=""
if [ -n "${NEARBY_COMPARE_NEAR:-}" ]; then
  near=(--near-share "$NEARBY_COMPARE_NEAR")
  tag="near-$NEARBY_COMPARE_NEAR"
fi
"$bin/nearby-loadsim" world --seed "$seed" --users "$users" --online "$online" "${near[@]}" --out "$work/seed.bin" | tee "$work/world.log"
run_load() { # name home server-pid [extra-pid] [pseudonym-key]
  local extra=()
  [ -n "${4:-}" ] && extra=(--extra-pid "$4")
  # nearby's runs have strangers too (the world's discoverable users and listeners), judged by
  # the oracle; the baseline has no such feature, so its runs leave them out.
  [ -n "${5:-}" ] && extra+=(--pseudonym-key "$5")
  local rc=0
  "${on_load[@]}" "$bin/nearby-loadsim" run --world-file "$work/seed.bin.world.json" --home "$2" \
    --rate "$rates" --duration "$duration" --server-pid "$3" "${extra[@]}" \
    --clients "${NEARBY_COMPARE_CLIENTS:-batched}" --json-out "$work/$1.json" || rc=$?
  # Exit status 3 is "the oracle saw a leak": the report has it, and the table shows it. The
  # baseline's is recorded and the comparison goes on (the original design may leak past its
  # knee); nearby's fails the run.
  if [ "$rc" -eq 3 ] && [ "$1" = baseline ]; then
    echo "== the baseline leaked (see its report): recorded, going on" >&2
  elif [ "$rc" -ne 0 ]; then
    exit "$rc"
  fi
}

run_nearby() { # name [nearby-node dev flags...]
  local name=$1; shift
  echo "== $name"
  "${on_server[@]}" "$bin/nearby-node" dev --data "$work/$name-data" --home "$work/$name-home" \
    --listen 127.0.0.1:0 --raft-listen 127.0.0.1:0 --import "$work/seed.bin" --address-limit "$address_limit" "$@" \
    2>"$work/$name.log" &
  local node=$!; pids+=("$node")
  wait_file "$work/$name-home/endpoint" 300 "$work/$name.log"
  run_load "$name" "$work/$name-home" "$node" "" "$work/$name-data/dev/pseudonym.key"
  kill -TERM "$node"; wait "$node" || true
}

# A ramp that ended before a system's knee measured the steps, not the system (nearby held every
# step of one 2026-12-04 run): such a system runs again on the ramp extended past its top, at
# most NEARBY_COMPARE_EXTEND times in a run (default 2), so that each knee is found on any day.
# The runs after it take the extended ramp too, so that the systems share their steps.
extensions=${NEARBY_COMPARE_EXTEND:-2}
[ "$mode" = full ] || extensions=0
# extend_rates RATES: RATES and four more steps, each 1.25 times the last (rounded to 50/s).
extend_rates() {
  awk -v r="$1" 'BEGIN {
    n = split(r, a, ","); top = a[n]; out = r
    for (i = 0; i < 4; i++) { top = int(top * 1.25 / 50 + 0.5) * 50; out = out "," top }
    print out
  }'
}
# again_higher NAME: whether NAME's report held every step and an extension is left; if so, the
# ramp is extended and NAME's report renamed NAME.held-to-TOP.json in the work directory.
again_higher() {
  local verdict
  [ "$extensions" -gt 0 ] || return 1
  # `compare` judges the ramp (`knee_line` in tests/loadsim/src/compare.rs, whose test pins this
  # phrase); the report is given as both systems because it wants two.
  verdict=$("$bin/nearby-loadsim" compare --nearby "$work/$1.json" --baseline "$work/$1.json")
  [[ $verdict == *"the ramp ended before the knee"* ]] || return 1
  extensions=$((extensions - 1))
  mv "$work/$1.json" "$work/$1.held-to-${rates##*,}.json"
  rates=$(extend_rates "$rates")
  echo "== $1 held every step: again, on a ramp up to ${rates##*,} updates/s"
}

# Capacity is compared with load shedding off in both systems (shedding refuses load; the
# comparison's bounds count refused updates against a step). The full run then measures nearby
# with shedding on, its default, to show what shedding does past the knee
# (NEARBY_COMPARE_SHED=0 skips it).
run_nearby nearby --no-shed
while again_higher nearby; do
  rm -rf "$work/nearby-data" "$work/nearby-home"
  run_nearby nearby --no-shed
done
# The same nearby on quinn's task per connection (the client driver the baseline runs on), in
# the same run: what the batched driver changes (NEARBY_COMPARE_TASKS=0 skips it).
tasks=()
if [ "$mode" = full ] && [ "${NEARBY_COMPARE_TASKS:-1}" = 1 ]; then
  run_nearby nearby-tasks --no-shed --driver tasks
  tasks=(--report "nearby on quinn's tasks=$work/nearby-tasks.json")
fi
shed=()
if [ "$mode" = full ] && [ "${NEARBY_COMPARE_SHED:-1}" = 1 ]; then
  run_nearby nearby-shed
  shed=(--report "nearby, shedding on=$work/nearby-shed.json")
fi

while :; do
  echo "== baseline (Redis)"
  rm -rf "$work/base-home"
  start_baseline "$bin" "$work/base-home"
  run_load baseline "$work/base-home" "$base" "$redis"
  kill -TERM "$base" "$redis"; wait "$base" "$redis" || true
  again_higher baseline || break
done

echo "== bare quinn push ceiling: $sessions sessions, $push_rates pushes/s"
"${on_load[@]}" "$bin/nearby-loadsim" ceiling --sessions "$sessions" --rate "$push_rates" \
  --duration "$push_duration" ${server_cpus:+--server-cpus "$server_cpus"} "${ceiling_cgroup[@]}" \
  --json-out "$work/ceiling.json"

echo "== comparison"
table=$("$bin/nearby-loadsim" compare --nearby "$work/nearby.json" --baseline "$work/baseline.json" \
  --ceiling "$work/ceiling.json")
echo "$table"
# The plots (latency and CPU per push against load) go next to the reports in a full run; the
# smoke run draws them in its work directory so CI exercises the plot command.
plots="$work/plots"
[ "$mode" = full ] && plots=docs/compare${tag:+/$tag}
"$bin/nearby-loadsim" plot --report "nearby=$work/nearby.json" "${shed[@]}" \
  "${tasks[@]}" --report "baseline (Redis)=$work/baseline.json" --ceiling "$work/ceiling.json" --out-dir "$plots"
if [ "$mode" = full ]; then
  mkdir -p "$plots"
  cp "$work/nearby.json" "$work/baseline.json" "$work/ceiling.json" "$plots/"
  for extra in nearby-shed nearby-tasks; do
    [ -f "$work/$extra.json" ] && cp "$work/$extra.json" "$plots/"
  done
  marker=compare${tag:+-$tag}
  {
    echo "<!-- $marker:begin -->"
    echo "Run: \`tests/bench/compare.sh\` on $(date -u +%Y-%m-%d), $users users (share online: $online),"
    echo "steps of $duration s at $rates updates/s; servers on CPUs ${server_cpus:-any}${cg:+, capped at $share of them}, the load"
    echo "generator on the others; load shedding off in both; world: $(sed -n 's/.*\(, [0-9]* % of friends within 8 km\)/\1/p' "$work/world.log" | sed 's/^, //'). Raw reports: \`$plots/*.json\`."
    echo
    echo "$table"
    echo "<!-- $marker:end -->"
  } >"$work/section.md"
  python3 - "$work/section.md" "$marker" <<'PY'
import re, sys
section, marker = open(sys.argv[1]).read(), sys.argv[2]
doc = open("docs/benchmarks.md").read()
pat = re.compile(r"<!-- %s:begin -->.*?<!-- %s:end -->\n?" % (marker, marker), re.S)
doc = pat.sub(lambda _: section, doc) if pat.search(doc) else doc.rstrip() + "\n\n## nearby against the original design (%s)\n\n" % marker + section
open("docs/benchmarks.md", "w").write(doc)
PY
  echo "(written to docs/benchmarks.md)"
fi
