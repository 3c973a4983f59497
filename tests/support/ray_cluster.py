"""A real multi-node Ray cluster on 127.0.0.1, for tests and benchmarks.

Ray's own multi-node test tool (`ray.cluster_utils.Cluster`) runs in a helper process: a head and
worker nodes, each with its own raylet, object store and workers. (`ray start --address` refuses
to join a node unless Ray is allowed to use the machine's network address, and every server here
must stay on loopback.)

The helper runs on a "bare" interpreter: a venv without site-packages whose PYTHONPATH is this
venv's site-packages. Ray and the project's dependencies import there, but PocketLoRA does not:
the editable install is a `.pth` finder, and `.pth` files are read only in site directories, never
from PYTHONPATH. So the cluster's workers can import PocketLoRA only if the driver ships it.

Driven over stdin/stdout with one JSON object per line:
    {"op": "add_node", "num_cpus": 1, "resources": {...}}  -> {"node_id": HEX}
    {"op": "kill_node", "node_id": HEX}                    -> {"killed": [pids]}   (SIGKILL, no goodbye)
    {"op": "shutdown"}                                     -> {"ok": true}
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

# Node loss is noticed after period x threshold; Ray's defaults make that ~15 s.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback_ray_env(tmp: Path) -> dict[str, str]:
    """Settings that keep Ray on 127.0.0.1, quiet, with its files under `tmp`."""
    return {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TMPDIR": str(tmp),
    }


def bare_python(where: Path) -> Path:
    """An interpreter that sees this venv's packages but not the editable PocketLoRA install."""
    if not (where / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    return where / "bin" / "python"


def session_pids(sid: int) -> list[int]:
    """Live processes of a session (Ray puts workers in process groups of their own, same session)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            out.append(int(entry.name))
    return out


def kill_session(sid: int, timeout_s: float = 30.0) -> None:
    """SIGKILL every process of a session until none is left."""
    deadline = time.monotonic() + timeout_s
    while pids := session_pids(sid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {pids} of session {sid} outlived SIGKILL")
        time.sleep(0.1)


class LoopbackCluster:
    """Start a head (no CPUs: it runs nothing of ours, like a production head) in a helper process;
    add and kill worker nodes; everything is SIGKILLed by session on exit."""

    def __init__(self, tmp: Path, *, client_server: bool = True, head_resources: dict[str, float] | None = None):
        # Ray's unix socket paths must fit in 107 bytes: keep the temp dir short.
        self.tmp = Path(tempfile.mkdtemp(prefix="plc-", dir="/tmp"))
        self.work = tmp
        self.client_port = free_port() if client_server else 0
        self.head_resources = head_resources or {}
        self.proc: subprocess.Popen[str] | None = None
        self.address = ""
        self.log = tmp / "ray-cluster-helper.log"

    @property
    def client_address(self) -> str:
        """ray://127.0.0.1:PORT of the head's Ray Client server."""
        return f"ray://127.0.0.1:{self.client_port}"

    def env(self) -> dict[str, str]:
        """Environment for a driver that attaches to this cluster."""
        return loopback_ray_env(self.tmp)

    def __enter__(self) -> LoopbackCluster:
        python = bare_python(self.work / "bare-venv")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RAY_"))},
            **self.env(),
            "PYTHONPATH": sysconfig.get_paths()["purelib"],
            "PYTHONNOUSERSITE": "1",
        }
        args = {"client_port": self.client_port, "head_resources": self.head_resources}
        cwd = self.work / "cluster-cwd"
        cwd.mkdir(exist_ok=True)
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).resolve()), json.dumps(args)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
        self.address = self._reply(timeout_s=180)["address"]
        return self

    def _reply(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        import selectors

        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout_s):
                raise TimeoutError(f"the cluster helper did not answer in {timeout_s:.0f} s; see {self.log}")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the cluster helper exited ({self.proc.poll()}); see {self.log}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"cluster helper: {reply['error']}")
        return reply

    def _call(self, timeout_s: float = 180, **request: Any) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout_s)

    def add_node(self, num_cpus: float = 1, resources: dict[str, float] | None = None) -> str:
        """Start a worker node; returns its node id (hex)."""
        return str(self._call(op="add_node", num_cpus=num_cpus, resources=resources or {})["node_id"])

    def kill_node(self, node_id: str) -> None:
        """SIGKILL every process of a worker node at once: its raylet, agents and workers."""
        self._call(op="kill_node", node_id=node_id)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is None:
            return
        # Graceful shutdown of a Ray node takes long; the cluster is disposable, so kill it.
        kill_session(self.proc.pid)
        self.proc.wait(30)
        self._keep_logs()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def _keep_logs(self) -> None:
        """Copy Ray's logs (files under 5 MB) next to the helper's log, for a failure's story."""
        import shutil

        for path in (self.tmp / "ray" / "session_latest" / "logs").glob("*"):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_size < 5 * 2**20:
                    (self.work / "ray-logs").mkdir(exist_ok=True)
                    shutil.copy(path, self.work / "ray-logs" / path.name)


# ------------------------------------------------------------------------------ helper process
# Ray gives a starting node 30 s (fixed) to register; a loaded 2-core machine can miss that.
START_ATTEMPTS = 3


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _with_descendants(pids: list[int]) -> list[int]:
    """The processes and everything they started (the raylet starts the node's agents and workers)."""
    tree, out, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += tree.get(pid, [])
    return sorted(set(out))


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _node_pids(node: Any) -> list[int]:
    """A node's own processes and what they started (agents, workers: the actors on it)."""
    return _with_descendants([p.process.pid for infos in node.all_processes.values() for p in infos if p.process])


def _start(cluster: Any, nodes: dict[str, Any], **args: Any) -> Any:
    """cluster.add_node, retried after killing what a start that timed out left behind."""
    for attempt in range(START_ATTEMPTS):
        known = {pid for node in nodes.values() for pid in _node_pids(node)}
        try:
            return cluster.add_node(**args)
        except Exception as exc:
            if "timed out during startup" not in str(exc) or attempt == START_ATTEMPTS - 1:
                raise
            strays = [pid for pid in _children().get(os.getpid(), []) if pid not in known]
            _kill(_with_descendants(strays))
            time.sleep(2)
    raise AssertionError("unreachable")


def _helper(args: dict[str, Any]) -> None:
    from ray.cluster_utils import Cluster

    head: dict[str, Any] = {
        "num_cpus": 0,
        "resources": args["head_resources"],
        "include_dashboard": False,
        "dashboard_port": free_port(),
        "_system_config": SYSTEM_CONFIG,
    }
    if args["client_port"]:
        head["ray_client_server_port"] = args["client_port"]
    cluster = Cluster(initialize_head=False, shutdown_at_exit=False)
    nodes: dict[str, Any] = {}
    nodes["head"] = _start(cluster, nodes, **head)

    def answer(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({"address": cluster.address})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "add_node":
                node = _start(cluster, nodes, num_cpus=request["num_cpus"], resources=request["resources"])
                nodes[node.node_id] = node
                answer({"node_id": node.node_id})
            elif request["op"] == "kill_node":
                node = nodes.pop(request["node_id"])
                pids = _node_pids(node)
                _kill(pids)
                for infos in node.all_processes.values():
                    for info in infos:
                        with contextlib.suppress(Exception):
                            info.process.wait(10)
                cluster.worker_nodes.discard(node)
                answer({"killed": pids})
            elif request["op"] == "shutdown":
                answer({"ok": True})
                return
        except Exception as exc:
            answer({"error": repr(exc)})


if __name__ == "__main__":
    _helper(json.loads(sys.argv[1]))
