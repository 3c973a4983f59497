"""What the deployment files let reach what, checked offline: in docker-compose.yml the agents
sit on a network of their own with only what devices must reach (the front ends' gRPC port and
the S3 API that presigned URLs name), while Ray, PostgreSQL and the serve process are on a
backend network the agents are not on; the orchestrator holds its own S3 user, limited by policy
to the adapters bucket, never MinIO's root credentials. The Kubernetes files say the same with
NetworkPolicies."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.test_deploy import (
    COMPOSE,
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
