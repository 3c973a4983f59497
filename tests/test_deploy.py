"""The deployment files, checked offline against the code: docker-compose.yml and deploy/kubernetes/.

Neither Docker nor Kubernetes runs here, so each file is read into the processes it would start
(their argv, environment, the names they answer to and the ports they listen on) and checked:
every command parses with its own CLI's parser (PocketLoRA's, Ray's `ray start`), every variable
the code reads is set where it is needed, secrets are references and never values, and every
address a process dials is one another process listens on, over TLS where the front ends serve
it. The monitoring files are checked in test_deploy_monitoring.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg.conninfo
import pytest
import typer
import yaml

from adapters_store import check_store_url
from orchestrator.ray_layer import INGRESS_RESOURCE
from pocketlora.cli import app
from pocketlora.orchestrator_cli import ENROLLMENT_TOKEN_ENV, OPERATOR_TOKEN_ENV
from pocketlora.tls import is_loopback

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
KUBE = ROOT / "deploy" / "kubernetes"
# What compose needs set; `config` must refuse to run without them.
COMPOSE_SECRETS = (
    "MINIO_ROOT_USER",
    "MINIO_ROOT_PASSWORD",
    "ORCHESTRATOR_S3_ACCESS_KEY",
    "ORCHESTRATOR_S3_SECRET_KEY",
    "POSTGRES_PASSWORD",
    "POCKETLORA_OPERATOR_TOKEN",
    "POCKETLORA_ENROLLMENT_TOKEN",
    "POCKETLORA_URL_SECRET",
)
SECRET_ENV = ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", OPERATOR_TOKEN_ENV, ENROLLMENT_TOKEN_ENV, "POCKETLORA_URL_SECRET")
# Ports third-party images listen on by default (their documentation).
IMAGE_PORTS = {"postgres": {5432}, "minio/minio": {9000, 9001}, "prom/prometheus": {9090}, "grafana/grafana": {3000}}


@dataclass
class Proc:
    """One process a deployment file starts."""

    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # value, "${VAR...}" (compose) or "secret:NAME/KEY"
    names: set[str] = field(default_factory=set)  # DNS names that reach it
    checks: list[list[str]] = field(default_factory=list)  # health/readiness commands
    ports: set[int] = field(default_factory=set)  # ports it listens on, where known without parsing
    probe_ports: set[int] = field(default_factory=set)  # gRPC probes on its own ports
    image: str = ""
    mounts: dict[str, str] = field(default_factory=dict)  # container path -> compose volume or "secret:NAME/KEY"
    networks: set[str] = field(default_factory=set)  # compose networks it is on (empty: not modelled)
    # (subnet, TCP ports left open to it) when it starts behind deploy/edge-firewall.sh
    firewall: tuple[str, set[int]] | None = None
    user: str = ""
    cap_add: set[str] = field(default_factory=set)


FIREWALL = "pocketlora-edge-firewall"


def parse(argv: list[str]) -> Any:
    """The click context of a full argv, parsed by the program's own CLI (raises on any error)."""
    if argv[0] == "pocketlora":
        cmd: Any = typer.main.get_command(app)
    elif argv[0] == "ray":
        from ray.scripts.scripts import cli

        cmd = cli
    else:
        raise AssertionError(f"unknown program {argv[0]!r}")
    ctx = cmd.make_context(argv[0], list(argv[1:]))
    while hasattr(cmd, "resolve_command"):
        name, cmd, rest = cmd.resolve_command(ctx, [*ctx._protected_args, *ctx.args])
        ctx = cmd.make_context(name, rest, parent=ctx)
    return ctx


# ------------------------------------------------------------------------------ readers
def compose_procs() -> list[Proc]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    procs = []
    for name, svc in services.items():
        image = svc.get("image", "")
        ours = "build" in svc
        entry = svc.get("entrypoint", ["pocketlora"] if ours else [])
        command = svc.get("command", "")
        argv = [*entry, *(shlex.split(command) if isinstance(command, str) else command)]
        firewall = None
        if argv and argv[0] == FIREWALL:  # FIREWALL SUBNET PORTS -- COMMAND...: the command it runs
            assert argv[3] == "--", argv
            firewall = (argv[1], {int(port) for port in argv[2].split(",")})
            argv = argv[4:]
        networks = svc.get("networks", ["default"])
        aliases = (
            {a for n in networks for a in (networks[n] or {}).get("aliases", [])}
            if isinstance(networks, dict)
            else set()
        )
        test = svc.get("healthcheck", {}).get("test", [])
        proc = Proc(f"compose service {name}", argv, dict(svc.get("environment", {})), {name, *aliases}, image=image)
        proc.mounts = {v.split(":")[1]: v for v in svc.get("volumes", [])}
        proc.networks = set(networks)
        proc.firewall, proc.user, proc.cap_add = firewall, str(svc.get("user", "")), set(svc.get("cap_add", []))
        if test and test[0] == "CMD" and test[1] in ("pocketlora", "ray"):
            proc.checks.append(test[1:])
        if not ours:
            proc.ports = IMAGE_PORTS.get(image.split(":")[0], set())
        procs.append(proc)
    return procs


def _ray_start(params: dict[str, str], head: bool) -> list[str]:
    """The `ray start` KubeRay runs for rayStartParams ("true" becomes a bare flag)."""
    words = ["ray", "start", "--block"] + (["--head"] if head else ["--address=pocketlora-head-svc:6379"])
    for key, value in params.items():
        words += shlex.split(f"--{key}" if value.lower() == "true" else f"--{key}={value}")
    return words


def kube_procs() -> list[Proc]:
    docs = [d for f in sorted(KUBE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    procs = []
    services = [d for d in docs if d["kind"] == "Service"]
    for doc in docs:
        if doc["kind"] == "RayCluster":
            name = doc["metadata"]["name"]
            head = doc["spec"]["headGroupSpec"]
            procs.append(
                Proc(f"RayCluster {name} head", _ray_start(head["rayStartParams"], True), names={f"{name}-head-svc"})
            )
            for group in doc["spec"]["workerGroupSpecs"]:
                labels = {"ray.io/cluster": name, "ray.io/group": group["groupName"]}
                container = group["template"]["spec"]["containers"][0]
                proc = Proc(f"RayCluster {name} group {group['groupName']}", _ray_start(group["rayStartParams"], False))
                proc.names = {
                    s["metadata"]["name"] for s in services if s["spec"]["selector"].items() <= labels.items()
                }
                probe = container.get("readinessProbe", {})
                proc.probe_ports = {probe["grpc"]["port"]} if "grpc" in probe else set()
                proc.checks = [probe["exec"]["command"]] if "exec" in probe else []
                proc.mounts = _kube_mounts(group["template"]["spec"], container)
                procs.append(proc)
        elif doc["kind"] == "Deployment":
            container = doc["spec"]["template"]["spec"]["containers"][0]
            env = {
                e["name"]: e.get("value") or "secret:{name}/{key}".format(**e["valueFrom"]["secretKeyRef"])
                for e in container.get("env", [])
            }
            proc = Proc(f"Deployment {doc['metadata']['name']}", ["pocketlora", *container["args"]], env)
            proc.checks = [container["livenessProbe"]["exec"]["command"]]
            proc.mounts = _kube_mounts(doc["spec"]["template"]["spec"], container)
            procs.append(proc)
    return procs


def _kube_mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """Container path -> "secret:NAME/KEY" for each file of a mounted Secret, else the volume name."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    out = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "secret" in volume:
            for item in volume["secret"]["items"]:
                out[f"{mount['mountPath']}/{item['path']}"] = f"secret:{volume['secret']['secretName']}/{item['key']}"
        else:
            out[mount["mountPath"]] = mount["name"]
    return out


FILES = {"compose": compose_procs, "kubernetes": kube_procs}


@pytest.fixture(params=sorted(FILES))
def procs(request: pytest.FixtureRequest) -> list[Proc]:
    """The processes one deployment file starts."""
    return FILES[request.param]()


def _ours(procs: list[Proc], *path: str) -> list[tuple[Proc, Any]]:
    out = []
    for p in procs:
        if p.argv and p.argv[0] in ("pocketlora", "ray"):
            ctx = parse(p.argv)
            if ctx.command_path.split()[1:] == list(path):
                out.append((p, ctx))
    return out


def _health_checks(p: Proc) -> list[Any]:
    """The parsed `pocketlora ... orchestrator health` checks of a process."""
    parsed = [parse(c) for c in p.checks if c[0] == "pocketlora"]
    return [ctx for ctx in parsed if ctx.command_path.split()[1:] == ["orchestrator", "health"]]


def _serve(procs: list[Proc]) -> tuple[Proc, Any]:
    found = _ours(procs, "orchestrator", "serve")
    assert len(found) == 1, "exactly one orchestrator serve process"
    return found[0]


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.removeprefix("ray://").rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------------------ checks
def test_every_command_and_health_check_parses_with_its_own_cli(procs: list[Proc]) -> None:
    ours = [p for p in procs if p.argv and p.argv[0] in ("pocketlora", "ray")]
    assert len(ours) >= 3
    for p in ours:
        for argv in (p.argv, *p.checks):
            try:
                parse(argv)
            except Exception as exc:  # click's UsageError, BadParameter...
                raise AssertionError(f"{p.where}: {shlex.join(argv)}: {exc}") from None


def test_the_serve_process_has_every_variable_it_reads_and_secrets_are_references(procs: list[Proc]) -> None:
    proc, ctx = _serve(procs)
    env = proc.env
    # Tokens shared with devices and operators, never random per container.
    assert OPERATOR_TOKEN_ENV in env and ENROLLMENT_TOKEN_ENV in env, proc.where
    # The store's own check, with the variables as they will be set (placeholder values).
    check_store_url(ctx.params["store"], env={k: "placeholder" for k in env})
    if not psycopg.conninfo.conninfo_to_dict(ctx.params["db"]).get("password"):
        assert "PGPASSWORD" in env, f"{proc.where}: libpq needs PGPASSWORD for {ctx.params['db']}"
    if not is_loopback(_hostport(ctx.params["listen"])[0]):
        assert ctx.params["tls_cert"] and ctx.params["tls_client_ca"], f"{proc.where}: beyond loopback, mutual TLS"
    assert ctx.params["ray_address"], "the serve process attaches to the Ray cluster"
    for p in procs:
        for name, value in p.env.items():
            if name in SECRET_ENV or "PASSWORD" in name or "SECRET" in name:
                assert str(value).startswith(("${", "secret:")), f"{p.where}: {name} holds a literal value"


def test_options_left_to_the_environment_are_set(procs: list[Proc]) -> None:
    for p, ctx in [*_ours(procs, "agent", "run"), _serve(procs)]:
        for param in ctx.command.params:
            envvar = getattr(param, "envvar", None)
            if envvar and ctx.get_parameter_source(param.name).name == "DEFAULT" and not ctx.params[param.name]:
                assert envvar in p.env, f"{p.where}: --{param.name} must come from {envvar}"
    serve, _ = _serve(procs)
    for p, _ctx in _ours(procs, "agent", "run"):
        # Devices enroll with the serve process's token (the same variable behind both).
        assert p.env[ENROLLMENT_TOKEN_ENV] == serve.env[ENROLLMENT_TOKEN_ENV], p.where


def _ingress_units(p: Proc) -> float:
    """Units of the ingress resource a `ray start` offers (0 for anything else)."""
    if p.argv[:2] != ["ray", "start"]:
        return 0.0
    return float(json.loads(parse(p.argv).params["resources"] or "{}").get(INGRESS_RESOURCE, 0))


def _ports(procs: list[Proc]) -> dict[str, set[int]]:
    """Where each process listens: images' defaults, Ray's head ports, front ends on ingress nodes
    (gRPC, and replica i's HTTP on PORT+i wherever Ray places it)."""
    serve = _serve(procs)[1]
    front = {_hostport(serve.params["listen"])[1]}
    if serve.params["http_listen"]:
        http = _hostport(serve.params["http_listen"])[1]
        front |= set(range(http, http + serve.params["replicas"]))
    out = {}
    for p in procs:
        ports = set(p.ports)
        if p.argv[:2] == ["ray", "start"] and parse(p.argv).params["head"]:
            params = parse(p.argv).params
            ports |= {params["port"] or 6379, params["ray_client_server_port"]}
        if _ingress_units(p):
            ports |= front
        out[p.where] = ports
    return out


def _reaches(procs: list[Proc], address: str, who: str, client: Proc | None = None) -> list[Proc]:
    """The processes `address` reaches (from `client`'s networks when given); each must listen there."""
    host, port = _hostport(address)
    ports = _ports(procs)
    shared = (lambda p: bool(p.networks & client.networks)) if client and client.networks else (lambda p: True)
    reached = [p for p in procs if host in p.names and shared(p)]
    assert reached, f"{who} dials {address}: nothing on its networks answers to {host!r}"
    for p in reached:
        assert port in ports[p.where], f"{who} dials {address}: {p.where} does not listen on {port}"
    return reached


def test_every_address_dialled_is_listened_on(procs: list[Proc]) -> None:
    serve_proc, serve = _serve(procs)
    _reaches(procs, serve.params["ray_address"], serve_proc.where, serve_proc)
    assert sum(_ingress_units(p) for p in procs) >= serve.params["replicas"], "ingress nodes fit every front end"
    ports = _ports(procs)
    for p in procs:
        if p.argv[:2] == ["ray", "start"] and not parse(p.argv).params["head"]:
            _reaches(procs, parse(p.argv).params["address"], p.where, p)
        assert p.probe_ports <= ports[p.where], f"{p.where}: a probe dials a port nothing there listens on"
        for check in _health_checks(p):
            address = check.params["address"]
            if is_loopback(_hostport(address)[0]):  # its own front end
                assert _hostport(address)[1] in ports[p.where], f"{p.where}: health check on {address}"
            else:
                _reaches(procs, address, f"{p.where} health check", p)
    # Clients (devices; the serve process's own health check) reach every front end by one name.
    clients = [(p, ctx.params["orchestrator"]) for p, ctx in _ours(procs, "agent", "run")]
    clients += [(serve_proc, c.params["address"]) for c in _health_checks(serve_proc)]
    for client, address in clients:
        reached = _reaches(procs, address, client.where, client)
        missed = [p.where for p in procs if _ingress_units(p) and p not in reached]
        assert not missed, f"{client.where} dials {address}, which does not reach {missed}"
    # The stores, where the file deploys them too (the Kubernetes files leave PostgreSQL and S3 to you).
    db = psycopg.conninfo.conninfo_to_dict(serve.params["db"])
    endpoint = re.search(r"endpoint=([^&]+)", serve.params["store"])
    for address in (f"{db['host']}:{db.get('port', 5432)}", endpoint.group(1) if endpoint else ""):
        if any(address.split(":")[0] in p.names for p in procs):
            _reaches(procs, address, serve_proc.where, serve_proc)


def _tls_files(ctx: Any) -> list[str]:
    """The TLS files a parsed command reads, its own options and its root command's."""
    files = []
    while ctx is not None:
        files += [str(ctx.params[k]) for k in ("tls_ca", "tls_cert", "tls_key", "tls_client_ca") if ctx.params.get(k)]
        ctx = ctx.parent
    return files


def test_front_ends_serve_mutual_tls_and_every_client_brings_its_material(procs: list[Proc]) -> None:
    serve_proc, serve = _serve(procs)
    assert serve.params["tls_cert"] and serve.params["tls_key"] and serve.params["tls_client_ca"]
    assert not serve.params["insecure"]
    clients = [*_ours(procs, "agent", "run"), *[(p, c) for p in procs for c in _health_checks(p)]]
    assert len(clients) >= 2
    for p, ctx in clients:
        files = _tls_files(ctx)
        assert len(files) == 3, f"{p.where}: {ctx.command_path} needs a CA, a client certificate and its key"
    for p, ctx in [*clients, (serve_proc, serve)]:
        for path in _tls_files(ctx):
            assert path in p.mounts, f"{p.where}: {path} is not mounted"
            assert p.mounts[path].startswith("secret:") or p.mounts[path].endswith(":ro"), f"{p.where}: {path}"
    for p in procs:
        read = {
            f for c in [*_ours([p], "agent", "run"), *_ours([p], "orchestrator", "serve")] for f in _tls_files(c[1])
        }
        read |= {f for c in _health_checks(p) for f in _tls_files(c)}
        keys = {path for path in p.mounts if path.endswith(".key")}
        assert keys <= read, f"{p.where} mounts keys it does not use: {sorted(keys - read)}"


def test_the_orchestrator_service_and_published_port_reach_the_front_ends() -> None:
    docs = [d for f in sorted(KUBE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    serve = _serve(kube_procs())[1]
    front = _hostport(serve.params["listen"])[1]
    service = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "orchestrator")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == [front]
    secret = next(d for d in docs if d["kind"] == "Secret")
    refs = {v.split("/", 1)[1] for v in _serve(kube_procs())[0].env.values() if str(v).startswith("secret:")}
    assert refs <= set(secret["stringData"]), "every secret key the Deployment reads is in the example Secret"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    published = [(n, p) for n, s in services.items() for p in s.get("ports", [])]
    ports = _ports(compose_procs())
    for name, mapping in published:
        first, _, last = mapping.split(":")[-1].split("/")[0].partition("-")
        where = f"compose service {name}"
        for container in range(int(first), int(last or first) + 1):
            assert container in ports[where], f"{where} publishes {container}, which nothing there listens on"


def _dockerfile() -> tuple[str, set[str], dict[str, str]]:
    """(runtime user, folders created for it, COPY destinations -> sources)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    user = re.findall(r"^USER (\S+)", text, re.M)[-1]
    owned = {
        path for m in re.finditer(rf"install -d -o {user} -g {user} ([^&\n]+)", text) for path in m.group(1).split()
    }
    copies = {m.group(2): m.group(1) for m in re.finditer(r"^COPY (\S+) (\S+)$", text, re.M)}
    return user, owned, copies


def test_compose_volumes_are_writable_and_agents_have_datasets() -> None:
    user, owned, copies = _dockerfile()
    assert user != "root"
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    for name, svc in services.items():
        if "build" not in svc:
            continue
        for volume in svc.get("volumes", []):
            target, mode = [*volume.split(":"), "rw"][1:3]
            if mode == "ro":  # files it only reads (TLS material)
                continue
            assert target in owned, f"compose service {name}: {target} is not created for {user} in the Dockerfile"
        assert "healthcheck" in svc
    for p, ctx in _ours(compose_procs(), "agent", "run"):
        folder = str(ctx.params["datasets_dir"])
        shipped = [src for dst, src in copies.items() if dst.startswith(folder + "/") and dst.endswith(".jsonl")]
        assert shipped and all((ROOT / src).is_file() for src in shipped), f"{p.where}: no datasets in {folder}"
    long_running = [svc for svc in services.values() if svc.get("restart") != "no"]  # not one-shot init jobs
    assert all("healthcheck" in svc for svc in long_running), "every long-running compose service has a health check"


def test_docker_compose_config_passes_with_the_secrets_and_refuses_without() -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is required in CI (scripts/test.sh installs it)")
        pytest.skip("docker-compose not installed")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS}
    cmd = [exe, "-f", str(COMPOSE), "config", "-q"]
    ok = subprocess.run(
        cmd, cwd=ROOT, env={**env, **dict.fromkeys(COMPOSE_SECRETS, "x")}, capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert refused.returncode != 0 and "set " in refused.stderr, refused.stderr
