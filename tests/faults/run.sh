#!/usr/bin/env bash
# The fault harness (docs/reliability.md): a cluster of real `nearby-node` processes, each in its
# own network namespace on a bridge in a switch namespace, under load from the load simulator
# (in a namespace of its own), with faults drawn from a seed — kill -9, SIGSTOP, a link down, a
# minority partition, a one-way cut, packet loss, node-to-node delay, a full disk — and the
# whole history judged:
# `nearby-loadsim faults` does the run; this script makes the namespaces and always removes them.
#
#   tests/faults/run.sh [--short] [any `nearby-loadsim faults` option]
#
# --short is the run `.ci/run` makes (3 nodes, 24 faults: each kind three times, a few minutes). Needs root (namespaces,
# nftables, a tmpfs) and nftables (installed with apt-get if missing). No namespace gets a default
# route: no packet of the run can leave the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/faults/run.sh: needs root (network namespaces, nftables, a tmpfs)" >&2
  exit 2
fi
if ! command -v nft >/dev/null; then
  echo "tests/faults/run.sh: installing nftables" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables >/dev/null
fi

nodes=3
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --short) args+=(--faults 24 --hold-min 1 --hold-max 3 --between 1 --users 2000 --mean-degree 40 --rate 100 --churn 2) ;;
    --nodes) nodes="$2"; args+=(--nodes "$2"); shift ;;
    --nodes=*) nodes="${1#--nodes=}"; args+=("$1") ;;
    *) args+=("$1") ;;
  esac
  shift
done

profile_dir=target/debug
if [ -n "${NEARBY_FAULTS_RELEASE:-}" ]; then
  cargo build -q --release -p nearby-node -p nearby-loadsim
  profile_dir=target/release
else
  cargo build -q -p nearby-node -p nearby-loadsim
fi
loadsim="$PWD/$profile_dir/nearby-loadsim"

# Namespace names carry this script's pid: runs side by side never meet.
p="nbf$$"
sw="${p}sw"
cli="${p}c"
net=10.77.0
made=()

cleanup() {
  for ns in "${made[@]}"; do
    # Processes left in a namespace (a killed run's nodes) go with it.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

addns() {
  ip netns add "$1"
  made+=("$1")
  ip -n "$1" link set lo up
}

# The switch: a bridge every namespace's link plugs into.
addns "$sw"
ip -n "$sw" link add br0 type bridge
ip -n "$sw" link set br0 up

# A namespace on the bridge with address $net.$2.
plug() {
  local ns="$1" host="$2"
  addns "$ns"
  ip -n "$sw" link add "p$host" type veth peer name eth0 netns "$ns"
  ip -n "$sw" link set "p$host" master br0 up
  ip -n "$ns" addr add "$net.$host/24" dev eth0
  ip -n "$ns" link set eth0 up
}

for i in $(seq 1 "$nodes"); do
  plug "${p}n$i" "$i"
done
plug "$cli" 100

for ns in "${made[@]}"; do
  if [ -n "$(ip -n "$ns" route show default)" ]; then
    echo "tests/faults/run.sh: namespace $ns has a default route; refusing to run" >&2
    exit 2
  fi
done

echo "tests/faults/run.sh: $nodes nodes in ${p}n1..${p}n$nodes on $net.0/24, the load in $cli" >&2
RUST_LOG="${RUST_LOG:-error}" ip netns exec "$cli" "$loadsim" faults --netns "${p}n" --hosts "$net" \
  --dir "${TMPDIR:-/tmp}/nearby-faults" "${args[@]}"
