# Shared by the benchmark scripts (sourced): a scratch directory removed at exit, the processes
# started into `pids` stopped at exit, and waiting for a file with a deadline.

# Every simulated user connects from 127.0.0.1, as from behind one carrier-grade NAT: a node's
# default per-address limits (1,024 connections, 64 handshakes) would refuse most of them.
address_limit=1000000

work=$(mktemp -d)
pids=()
cgroups=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for c in "${cgroups[@]}"; do rmdir "$c" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# wait_file PATH SECONDS LOG: waits until PATH is non-empty; after SECONDS prints LOG's tail, exits.
wait_file() {
  local i=0
  until [ -s "$1" ]; do
    sleep 0.2; i=$((i + 1))
    if [ $i -ge $(( $2 * 5 )) ]; then
      echo "timed out waiting for $1; its log:" >&2
      tail -20 "$3" >&2
      exit 1
    fi
  done
}

# node_metrics HOME: the Prometheus text of the node whose home directory is HOME (its admin
# endpoint and token are there).
node_metrics() {
  curl -sk -m 30 -H "Authorization: Bearer $(cat "$1/admin-token")" "$(head -1 "$1/admin")/metrics"
}

# start_baseline BIN HOME: starts a redis-server and the original design's server on it (both on
# `on_server` CPUs, if set), importing $work/seed.bin, and waits until it serves; sets `redis` and
# `base` to their pids (stopped at exit). Logs: $work/redis.log, $work/baseline.log.
start_baseline() {
  local port=$(( 20000 + RANDOM % 20000 ))
  "${on_server[@]}" redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/redis.log" &
  redis=$!; pids+=("$redis")
  wait_redis "$port" "$work/redis.log"
  "${on_server[@]}" "$1/nearby-baseline" --redis "127.0.0.1:$port" --listen 127.0.0.1:0 --home "$2" \
    --import "$work/seed.bin" --no-shed 2>"$work/baseline.log" &
  base=$!; pids+=("$base")
  wait_file "$2/endpoint" 300 "$work/baseline.log"
}

# wait_redis PORT LOG: waits up to 10 s for a redis-server on PORT to answer; else prints LOG, exits.
wait_redis() {
  local i=0
  until redis-cli -p "$1" ping >/dev/null 2>&1; do
    sleep 0.1; i=$((i + 1))
    [ $i -lt 100 ] || { echo "redis-server did not start:" >&2; cat "$2" >&2; exit 1; }
  done
}

# make_cpu_cgroup SHARE CPUS: makes a cgroup whose processes together get at most SHARE of CPUS
# CPUs (a CFS quota over 10 ms periods: once the quota is spent, throttled for the rest of the
# period) and prints its directory (removed at exit); fails without a writable cgroup CPU
# controller (v2 or v1).
make_cpu_cgroup() {
  local period=10000 quota dir
  quota=$(awk -v s="$1" -v n="$2" -v p="$period" 'BEGIN { q = int(s * n * p); print (q < 1000 ? 1000 : q) }')
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null ||
      echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || return 1
    dir=/sys/fs/cgroup/nearby-bench-$$
    mkdir "$dir" 2>/dev/null && echo "$quota $period" >"$dir/cpu.max" 2>/dev/null || return 1
  elif [ -d /sys/fs/cgroup/cpu ]; then
    dir=/sys/fs/cgroup/cpu/nearby-bench-$$
    mkdir "$dir" 2>/dev/null && echo "$period" >"$dir/cpu.cfs_period_us" 2>/dev/null &&
      echo "$quota" >"$dir/cpu.cfs_quota_us" 2>/dev/null || return 1
  else
    return 1
  fi
  echo "$dir"
}
