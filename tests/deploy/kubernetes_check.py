"""Checks that deploy/kubernetes/nearby.yaml holds together, without a Kubernetes cluster.

The schema check (kubernetes-validate, run by tests/deploy/kubernetes.sh) says every object is
well-formed. This says they fit each other and the node: every pod of the StatefulSet finds its
configuration in the ConfigMap, the node accepts that configuration (`nearby-node check-config`),
it advertises its own Service's address, the Services, container ports and configured listen
ports agree, joining nodes point at the first node's node-to-node port, every file the
configuration names lies in the Secret's mount, the probes and the preStop hook reach the admin
port with the configured token, and the PodDisruptionBudget covers the pods.

    python3 kubernetes_check.py MANIFEST NEARBY_NODE_BIN

Prints one line per pod checked; exits 1 with every problem found.
"""

import os
import subprocess
import sys
import tempfile
import tomllib

import yaml


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


def main(manifest, node_bin):
    with open(manifest) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)
        return ok

    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    services = {s["metadata"]["name"]: s for s in by_kind.get("Service", [])}
    config_maps = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    secret_mounts = set()

    (sts,) = by_kind["StatefulSet"]
    name = sts["metadata"]["name"]
    spec = sts["spec"]
    pod = spec["template"]
    pod_labels = pod["metadata"]["labels"]
    check(
        spec["selector"]["matchLabels"].items() <= pod_labels.items(),
        "the StatefulSet's selector does not match its pods' labels",
    )
    headless = services.get(spec["serviceName"])
    check(
        headless is not None and headless["spec"].get("clusterIP") == "None",
        f"serviceName {spec['serviceName']!r} is not a headless Service of the manifest",
    )
    (container,) = pod["spec"]["containers"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: volumes.get(m["name"]) for m in container["volumeMounts"]}
    for path, volume in mounts.items():
        if volume and "secret" in volume:
            secret_mounts.add(path)
    claims = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}

    env = {e["name"]: e for e in container.get("env", [])}
    args = container["args"]
    subcommand = args[0]
    check(
        subprocess.run([node_bin, subcommand, "--help"], capture_output=True).returncode == 0,
        f"`nearby-node {subcommand}` is not a command of this build",
    )
    config_arg = args[args.index("--config") + 1]
    if "$(POD_NAME)" in config_arg:
        field = env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        check(field == "metadata.name", "POD_NAME is not the pod's name (fieldRef metadata.name)")

    ports = {p["name"]: p for p in container["ports"]}
    probe = container["readinessProbe"]["httpGet"]
    check(probe["path"] == "/readyz", "the readiness probe does not ask /readyz")
    check(probe["port"] == "admin", "the readiness probe does not ask the admin port")
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]

    # The PodDisruptionBudget covers these pods and lets at most one go at a time.
    for pdb in by_kind.get("PodDisruptionBudget", []):
        check(
            pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items(),
            "the PodDisruptionBudget's selector does not match the pods",
        )
        check(pdb["spec"].get("maxUnavailable") == 1, "the PodDisruptionBudget allows more than one pod down")

    first_raft = None
    node_ids = set()
    for ordinal in range(spec["replicas"]):
        pod_name = f"{name}-{ordinal}"
        path = config_arg.replace("$(POD_NAME)", pod_name)
        directory, file = os.path.split(path)
        volume = mounts.get(directory)
        if not check(volume is not None and "configMap" in volume, f"{pod_name}: {directory} is not a ConfigMap mount"):
            continue
        data = config_maps[volume["configMap"]["name"]]["data"]
        if not check(file in data, f"{pod_name}: the ConfigMap has no {file}"):
            continue
        text = data[file]

        # The node itself reads it, as `join` would.
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as tmp:
            tmp.write(text)
            tmp.flush()
            run = subprocess.run(
                [node_bin, "check-config", "--config", tmp.name], capture_output=True, text=True
            )
        if not check(run.returncode == 0, f"{pod_name}: nearby-node refuses {file}: {run.stderr.strip()}"):
            continue
        config = tomllib.loads(text)
        check(config["node_id"] not in node_ids, f"{pod_name}: node_id {config['node_id']} is used twice")
        node_ids.add(config["node_id"])
        data_mount = [m for m in container["volumeMounts"] if m["mountPath"] == config["data"]]
        check(bool(data_mount) and data_mount[0]["name"] in claims,
              f"{pod_name}: data {config['data']} is not on the pod's persistent volume claim")

        # Its own Service: the address it advertises, with the ports it listens on.
        service = services.get(pod_name)
        if not check(service is not None, f"{pod_name}: no Service {pod_name}"):
            continue
        check(
            service["spec"]["selector"] == {"statefulset.kubernetes.io/pod-name": pod_name},
            f"{pod_name}: its Service does not select this pod alone",
        )
        check(
            config.get("advertise") == service["spec"].get("clusterIP"),
            f"{pod_name}: advertises {config.get('advertise')}, its Service's address is "
            f"{service['spec'].get('clusterIP')}",
        )
        listening = {
            "client": (port_of(config["listen"]), "UDP"),
            "raft": (port_of(config["raft_listen"]), "UDP"),
            "admin": (port_of(config["admin"]["listen"]), "TCP"),
        }
        service_ports = {p["name"]: p for p in service["spec"]["ports"]}
        for role, (number, protocol) in listening.items():
            sp = service_ports.get(role)
            check(
                sp is not None and sp["port"] == number and sp.get("protocol", "TCP") == protocol
                and sp.get("targetPort", number) in (number, role),
                f"{pod_name}: its Service's {role} port is not {number}/{protocol}",
            )
            cp = ports.get(role)
            check(
                cp is not None and cp["containerPort"] == number and cp.get("protocol", "TCP") == protocol,
                f"{pod_name}: the container's {role} port is not {number}/{protocol}",
            )
        if ordinal == 0:
            first_raft = f"{config['advertise']}:{port_of(config['raft_listen'])}"
            check(not config.get("cluster", {}).get("join"), f"{pod_name}: the first node joins another")
        else:
            joins = config.get("cluster", {}).get("join", [])
            check(joins == [first_raft], f"{pod_name}: joins {joins}, not the first node's {first_raft}")

        # Every file it names comes from the Secret.
        named = [
            config["cluster"].get(k) for k in ("ca", "cert", "key", "pseudonym_key")
        ] + [config["tls"]["cert"], config["tls"]["key"], config["auth"]["token_public_key"],
             config["admin"]["token_file"]]
        for f in filter(None, named):
            check(os.path.dirname(f) in secret_mounts, f"{pod_name}: {f} is not in the Secret's mount")

        # The preStop hook reaches this node's admin API with its token.
        admin_port = port_of(config["admin"]["listen"])
        check(
            pre_stop[pre_stop.index("--admin") + 1] == f"127.0.0.1:{admin_port}",
            f"{pod_name}: preStop asks {pre_stop[pre_stop.index('--admin') + 1]}, the admin API is on {admin_port}",
        )
        check(
            pre_stop[pre_stop.index("--token-file") + 1] == config["admin"]["token_file"],
            f"{pod_name}: preStop's token file is not admin.token_file",
        )
        print(f"{pod_name}: {file} accepted; advertises {config['advertise']}, ports agree")

    check(len(node_ids) == spec["replicas"], "not every pod has a configuration")
    for p in problems:
        print(f"kubernetes_check: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
