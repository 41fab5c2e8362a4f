#!/usr/bin/env bash
# Checks the Kubernetes recipe (deploy/kubernetes/nearby.yaml) without a Kubernetes cluster:
#   1. every object against Kubernetes' own schema, strictly (unknown fields refused), for the
#      oldest and the newest version the recipe is meant for (kubernetes-validate, pinned, from
#      PyPI, in target/k8s-venv);
#   2. the objects against each other and against the node (tests/deploy/kubernetes_check.py:
#      each pod's configuration accepted by `nearby-node check-config`, addresses, ports, files,
#      probes, preStop hook, disruption budget).
# What it cannot show is the recipe running on a real cluster (deploy/kubernetes/README.md says so).
#
#   tests/deploy/kubernetes.sh          uses target/debug/nearby-node (NEARBY_NODE_BIN to change)
set -euo pipefail
cd "$(dirname "$0")/../.."
version=1.37.0
oldest=1.27
newest=1.37
manifest=deploy/kubernetes/nearby.yaml
node=${NEARBY_NODE_BIN:-target/debug/nearby-node}
[ -x "$node" ] || cargo build -q -p nearby-node --bin nearby-node

venv=target/k8s-venv
# shellcheck source=tests/setup.sh
. tests/setup.sh
status=0
pinned_venv "$venv" kubernetes-validate "$version" tests/deploy/kubernetes.sh || status=$?
if [ "$status" -ne 0 ]; then
  echo "tests/deploy/kubernetes.sh: no venv with kubernetes-validate $version (python3 with venv, apt-get install python3-venv; and PyPI)" >&2
  exit 2
fi

for k in "$oldest" "$newest"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" "$manifest"
  echo "schema (Kubernetes $k, strict): every object of $manifest valid"
done
"$venv/bin/python" tests/deploy/kubernetes_check.py "$manifest" "$node"
