#!/usr/bin/env bash
# Checks the Kubernetes recipe (deploy/kubernetes/nearby.yaml) without a Kubernetes cluster:
#   1. every object against Kubernetes' own schema, strictly (unknown fields refused), for the
#      oldest and the newest version the recipe is meant for (kubernetes-validate, pinned, from
#      PyPI, in target/k8s-venv);
#   2. the objects against each other and against the node (tests/deploy/kubernetes_check.py:
#      each pod's configuration accepted by `nearby-node check-config`, addresses, ports, files,
#      probes, preStop hook, disruption budget).
# What it cannot show is the recipe running on a real cluster (docs/operations.md says so).
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
if ! "$venv/bin/python" -c "import kubernetes_validate.version as v, sys; sys.exit(v.__version__ != '$version')" 2>/dev/null; then
  echo "tests/deploy/kubernetes.sh: installing kubernetes-validate $version in $venv" >&2
  rm -rf "$venv"
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    # Debian's python3 has no `venv` (ensurepip) without the python3-venv package.
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
      apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"
      python3 -m venv "$venv"
    else
      echo "tests/deploy/kubernetes.sh: needs python3 with venv (apt-get install python3-venv)" >&2
      exit 2
    fi
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$version"
fi

for k in "$oldest" "$newest"; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$k" "$manifest"
  echo "schema (Kubernetes $k, strict): every object of $manifest valid"
done
"$venv/bin/python" tests/deploy/kubernetes_check.py "$manifest" "$node"
