# Shared by the benchmark scripts (sourced): a scratch directory removed at exit, the processes
# started into `pids` stopped at exit, and waiting for a file with a deadline.

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
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

# wait_redis PORT LOG: waits up to 10 s for a redis-server on PORT to answer; else prints LOG, exits.
wait_redis() {
  local i=0
  until redis-cli -p "$1" ping >/dev/null 2>&1; do
    sleep 0.1; i=$((i + 1))
    [ $i -lt 100 ] || { echo "redis-server did not start:" >&2; cat "$2" >&2; exit 1; }
  done
}
