"""Run a command against a multi-node Ray cluster on 127.0.0.1, then take the cluster down.

    python benchmarks/loopback_cluster.py [--nodes 2] [--cpus 2] [--client] -- \\
        python benchmarks/fleet_sim.py --ray-address {address} --replicas 2

The cluster is the tests' (tests/support/ray_cluster.py): a head with no CPUs and `--nodes`
worker nodes offering the ingress resource, on an interpreter that cannot import PocketLoRA, so
the orchestrator runs there only because the driver ships it. `{address}` in the command becomes
the cluster's address (its Ray Client address, ray://..., with --client).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.ray_layer import INGRESS_RESOURCE  # noqa: E402
from tests.support.ray_cluster import LoopbackCluster  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=2, help="worker nodes (each offers 2 ingress units)")
    parser.add_argument("--cpus", type=float, default=2, help="logical CPUs per worker node")
    parser.add_argument("--client", action="store_true", help="pass the Ray Client address (ray://)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... ({address} is replaced)")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    with tempfile.TemporaryDirectory(prefix="pocketlora-loopback-") as tmp, LoopbackCluster(Path(tmp)) as cluster:
        for _ in range(args.nodes):
            cluster.add_node(num_cpus=args.cpus, resources={INGRESS_RESOURCE: 2})
        address = cluster.client_address if args.client else cluster.address
        print(f"loopback Ray cluster at {address}: a head and {args.nodes} worker node(s)", file=sys.stderr)
        env = {**os.environ, **cluster.env(), "PYTHONPATH": str(ROOT)}
        return subprocess.run([part.replace("{address}", address) for part in command], env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
