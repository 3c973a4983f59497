"""Child process serving an inference runtime: JSON commands on stdin/stdout from the agent,
and (with --serve) DeviceInferenceService for apps on the device.

Backends: `torch` (agent.runtime: transformers + peft on a Hugging Face base folder) or `onnx`
(agent.ort_runtime: onnxruntime-genai on a runtime bundle; this process then imports neither
torch nor transformers).

It runs below normal priority (nice 10, the lowest best-effort I/O level) so the device's own
foreground work comes first, yet above the training child (nice 19, idle I/O): an answer is
waited for, a training step is not. Its thread pools are capped by the parent's environment
(agent.inference) and the backend's by --threads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from agent.procinfo import IOPRIO_CLASS_BE, lower_priority
from agent.runtime_base import InferenceBackend

INFERENCE_NICE = 10
INFERENCE_IO_LEVEL = 7  # the lowest of the best-effort class's levels 0-7


def _runtime(args: argparse.Namespace) -> InferenceBackend:
    if args.backend == "onnx":
        from agent.ort_runtime import OrtRuntime

        return OrtRuntime(args.model, max_resident_bytes=args.max_resident_bytes, threads=args.threads or None)
    from agent.runtime import AdapterRuntime

    return AdapterRuntime(args.model, max_resident_bytes=args.max_resident_bytes, torch_threads=args.threads or None)


def main() -> int:
    """Load the model once, then answer commands until stdin closes."""
    parser = argparse.ArgumentParser(description="PocketLoRA inference runtime host")
    parser.add_argument("--backend", choices=("torch", "onnx"), default="torch")
    parser.add_argument("--model", required=True, type=Path, help="base model folder (torch) or runtime bundle (onnx)")
    parser.add_argument("--max-resident-bytes", type=int, default=256 * 2**20)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--serve", default="", help="DeviceInferenceService address: unix:/path or 127.0.0.1:PORT")
    args = parser.parse_args()
    for problem in lower_priority(INFERENCE_NICE, IOPRIO_CLASS_BE, INFERENCE_IO_LEVEL):
        print(f"runtime host: could not lower its priority: {problem}", file=sys.stderr)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Replies go on the real stdout; anything libraries print goes to stderr.
    out = sys.stdout
    sys.stdout = sys.stderr
    runtime = _runtime(args)
    server, address = None, ""
    if args.serve:
        from agent.inference_server import serve_inference

        server, address = serve_inference(runtime, args.serve, args.backend)

    def handle(cmd: dict[str, Any]) -> dict[str, Any]:
        op = cmd.get("op")
        if op == "ping":
            return {"base_fingerprint": runtime.base_fingerprint, "address": address, "backend": args.backend}
        if op == "has":
            return {"resident": cmd["name"] in runtime.resident()}
        if op == "load":
            return {"bytes": runtime.load(cmd["name"], Path(cmd["dir"]))}
        if op == "activate":
            runtime.activate(cmd.get("name"))
            return {"active": runtime.active}
        if op == "unload":
            runtime.unload(cmd["name"])
            return {}
        if op == "generate":
            kw: dict[str, Any] = {"max_new_tokens": int(cmd.get("max_new_tokens", 48))}
            if "adapter" in cmd:
                kw["adapter"] = cmd["adapter"]
            res = runtime.generate(cmd["prompt"], **kw)
            return {"text": res.text, "adapter": res.adapter, "seconds": res.seconds}
        raise ValueError(f"unknown op {op!r}")

    for line in sys.stdin:
        try:
            reply = {"ok": True, **handle(json.loads(line))}
        except Exception as exc:  # every failure is a reply; the host stays up
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    if server is not None:
        server.stop(grace=2).wait()
    runtime.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
