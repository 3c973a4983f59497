"""What the deployment files let reach what, checked offline: in docker-compose.yml the agents
sit on a network of their own with only what devices must reach (the front ends' gRPC port and
the S3 API that presigned URLs name), while Ray, PostgreSQL and the serve process are on a
backend network the agents are not on; the orchestrator holds its own S3 user, limited by policy
to the adapters bucket, never MinIO's root credentials. The Ray nodes the agents can reach open
only the front ends' port to them (deploy/edge-firewall.sh, run here with recording stand-ins
for iptables and setpriv). The Kubernetes files say the same with NetworkPolicies."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_deploy import (
    COMPOSE,
    FIREWALL,
    KUBE,
    _hostport,
    _ingress_units,
    _ours,
    _reaches,
    _serve,
    compose_procs,
    kube_procs,
)

ROOT = Path(__file__).resolve().parents[1]
MINIO_ROOT = {"${MINIO_ROOT_USER", "${MINIO_ROOT_PASSWORD"}


def _services() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text())["services"])


def _store(serve: Any) -> tuple[str, str]:
    """(bucket, endpoint host) of the serve process's S3 store URL."""
    m = re.fullmatch(r"s3://([^?]+)\?(?:.*&)?endpoint=([^&:]+)[^&]*(?:&.*)?", serve.params["store"])
    assert m, serve.params["store"]
    return m.group(1), m.group(2)


def test_agents_are_on_a_network_with_only_the_front_ends_and_the_store() -> None:
    procs = compose_procs()
    serve_proc, serve = _serve(procs)
    agents = [p for p, _ in _ours(procs, "agent", "run")]
    assert agents
    edge = set.union(*(p.networks for p in agents))
    assert all(p.networks == edge for p in agents), "the agents share one network and no other"
    _, s3_host = _store(serve)
    # Who else is there: the ingress nodes (front ends) and the S3 endpoint; nothing else.
    allowed = {p.where for p in procs if _ingress_units(p) or s3_host in p.names} | {p.where for p in agents}
    on_edge = {p.where for p in procs if p.networks & edge}
    assert on_edge == allowed, f"on the agents' network beyond what devices need: {sorted(on_edge - allowed)}"
    for name in ("postgres", "ray-head"):
        assert not {p.where for p in procs if name in p.names and p.networks & edge}, (
            f"{name} is on the agents' network"
        )
    assert not serve_proc.networks & edge, "the serve process is on the agents' network"
    # Devices still reach every front end, by the name they dial, on their network.
    for p, ctx in _ours(procs, "agent", "run"):
        reached = _reaches(procs, ctx.params["orchestrator"], p.where, p)
        assert {r.where for r in reached} == {q.where for q in procs if _ingress_units(q)}
    # And the backend (Ray, PostgreSQL, S3) from the serve process and the Ray nodes.
    ray_head = next(p for p in procs if p.argv[:2] == ["ray", "start"] and "--head" in p.argv)
    assert ray_head.networks & serve_proc.networks
    assert not ray_head.networks & edge


def test_ray_nodes_on_the_agents_network_open_only_the_front_ends_port_to_it() -> None:
    # Ray binds its raylet, object manager and worker ports on every interface whatever
    # --node-ip-address says, so every Ray node the agents can reach starts behind the firewall,
    # with the edge subnet allowed only the front ends' gRPC port, and Ray itself unprivileged.
    procs = compose_procs()
    _, serve = _serve(procs)
    front = _hostport(serve.params["listen"])[1]
    agents = [p for p, _ in _ours(procs, "agent", "run")]
    edge = set.union(*(p.networks for p in agents))
    (edge_name,) = edge
    subnets = [c["subnet"] for c in yaml.safe_load(COMPOSE.read_text())["networks"][edge_name]["ipam"]["config"]]
    ray_on_edge = [p for p in procs if p.argv[:2] == ["ray", "start"] and p.networks & edge]
    assert ray_on_edge, "the front ends run on Ray nodes the agents reach"
    for p in ray_on_edge:
        assert p.firewall is not None, f"{p.where} is a Ray node on the agents' network without the firewall"
        subnet, open_ports = p.firewall
        assert subnets == [subnet], f"{p.where} filters {subnet}, the agents' network is {subnets}"
        assert open_ports == {front}, f"{p.where} opens {sorted(open_ports)} to the agents"
        assert p.user == "root" and p.cap_add == {"NET_ADMIN"}, p.where  # what iptables needs, nothing more
    # The image carries the script under the name the entrypoints use, and iptables.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"COPY deploy/edge-firewall.sh /usr/local/bin/{FIREWALL}" in dockerfile
    assert re.search(r"apt-get install [^\n]*\biptables\b", dockerfile)


def _run_firewall(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], list[list[str]]]:
    """Run deploy/edge-firewall.sh with iptables and setpriv replaced by recorders."""
    log = tmp_path / "calls.jsonl"
    for tool in ("iptables", "setpriv"):
        fake = tmp_path / tool
        fake.write_text(
            "#!/usr/bin/env python3\n"
            "import json, os, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + '\\n')\n"
        )
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    out = subprocess.run(
        ["sh", str(ROOT / "deploy" / "edge-firewall.sh"), *args], env=env, capture_output=True, text=True
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return out, calls


def test_the_edge_firewall_accepts_replies_and_the_open_ports_drops_the_rest_then_drops_privileges(
    tmp_path: Path,
) -> None:
    out, calls = _run_firewall(tmp_path, "172.30.50.0/24", "50051", "--", "ray", "start", "--block")
    assert out.returncode == 0, out.stderr
    rules = [c[1:] for c in calls if c[0] == "iptables"]
    assert rules == [
        [
            "-w",
            "-A",
            "INPUT",
            "-s",
            "172.30.50.0/24",
            "-m",
            "conntrack",
            "--ctstate",
            "ESTABLISHED,RELATED",
            "-j",
            "ACCEPT",
        ],
        [
            "-w",
            "-A",
            "INPUT",
            "-s",
            "172.30.50.0/24",
            "-p",
            "tcp",
            "-m",
            "multiport",
            "--dports",
            "50051",
            "-j",
            "ACCEPT",
        ],
        ["-w", "-A", "INPUT", "-s", "172.30.50.0/24", "-j", "DROP"],
    ]
    (setpriv,) = [c[1:] for c in calls if c[0] == "setpriv"]
    command = setpriv[setpriv.index("--") + 1 :]
    assert command == ["ray", "start", "--block"]
    assert {"--reuid=pocketlora", "--inh-caps=-all", "--bounding-set=-all"} <= set(setpriv)


@pytest.mark.parametrize(
    "args",
    [
        ("172.30.50.0/24", "50051", "ray", "start"),  # no --
        ("172.30.50.0/24", "50051;reboot", "--", "ray"),  # not a port list
        ("172.30.50.0/24", "", "--", "ray"),
        ("172.30.50.0/24", "50051"),
    ],
)
def test_the_edge_firewall_refuses_bad_arguments_before_touching_any_rule(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    out, calls = _run_firewall(tmp_path, *args)
    assert out.returncode == 2 and "pocketlora-edge-firewall" in out.stderr
    assert calls == []  # nothing ran: no rule added, no command started


def test_the_orchestrator_holds_its_own_s3_user_limited_to_the_adapters_bucket() -> None:
    procs = compose_procs()
    serve_proc, serve = _serve(procs)
    bucket, _ = _store(serve)
    access, secret = serve_proc.env["AWS_ACCESS_KEY_ID"], serve_proc.env["AWS_SECRET_ACCESS_KEY"]
    for value in (access, secret):
        assert value.startswith("${") and value.split(":")[0] not in MINIO_ROOT, f"the orchestrator uses {value}"
    # The one-shot init container creates that user (same variables) and attaches the policy.
    services = _services()
    init = next(s for s in services.values() if "mc admin user add" in " ".join(s.get("command", [])))
    script = " ".join(init["command"])
    user_var, secret_var = (access.split(":")[0][2:], secret.split(":")[0][2:])
    assert f'mc admin user add local "$${user_var}" "$${secret_var}"' in script
    assert init["environment"][user_var] == access and init["environment"][secret_var] == secret
    attach = re.search(r"mc admin policy attach local (\S+) --user \"\$\$" + user_var, script)
    created = re.search(r"mc admin policy create local (\S+) (\S+);", script)
    assert attach and created and attach.group(1) == created.group(1)
    mounts = {v.split(":")[1]: v.split(":")[0] for v in init["volumes"]}
    policy = json.loads((ROOT / mounts[created.group(2)]).read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources <= {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}, resources
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert all(a.startswith("s3:") and "*" not in a for a in actions), actions
    assert all(st["Effect"] == "Allow" for st in policy["Statement"])
    # The serve process starts only after the user exists.
    serve_name = serve_proc.where.removeprefix("compose service ")
    init_name = next(n for n, s in services.items() if s is init)
    assert services[serve_name]["depends_on"][init_name]["condition"] == "service_completed_successfully"


def _policies() -> list[dict[str, Any]]:
    docs = [d for f in sorted(KUBE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


def _selects(policy: dict[str, Any], labels: dict[str, str]) -> bool:
    return bool(policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items())


def test_kubernetes_network_policies_open_only_the_front_ends_port_to_everyone() -> None:
    policies = _policies()
    serve_labels = {"app.kubernetes.io/name": "pocketlora", "app.kubernetes.io/component": "serve"}
    ingress_labels = {"ray.io/cluster": "pocketlora", "ray.io/group": "ingress", "ray.io/node-type": "worker"}
    head_labels = {"ray.io/cluster": "pocketlora", "ray.io/node-type": "head", "ray.io/group": "headgroup"}
    front = _hostport(_serve(kube_procs())[1].params["listen"])[1]
    ray_pods = {"ray.io/cluster": "pocketlora"}
    for labels in (serve_labels, ingress_labels, head_labels):
        mine = [p for p in policies if _selects(p, labels)]
        assert mine, f"no NetworkPolicy selects {labels}"
        for policy in mine:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            for rule in policy["spec"].get("ingress", []):
                if "from" not in rule:  # from anywhere: only the front ends' port, only on ingress pods
                    assert labels is ingress_labels, f"{policy['metadata']['name']} admits anyone to {labels}"
                    assert [p["port"] for p in rule["ports"]] == [front]
                    continue
                for peer in rule["from"]:  # only the Ray cluster's pods and the serve process
                    assert set(peer) == {"podSelector"}, f"{policy['metadata']['name']}: {peer}"
                    assert peer["podSelector"]["matchLabels"] in (ray_pods, serve_labels), peer
