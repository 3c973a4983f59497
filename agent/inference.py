"""The agent's handle on the inference runtime, which runs in a child process.

The polling agent must stay light (no torch, no model in its memory), so the model lives in
`python -m agent.runtime_host`; this class speaks to it with one JSON object per line. The
child holds the torch runtime (a base model folder) or the ORT one (a runtime bundle), and
serves DeviceInferenceService to apps when given an address. Loading an adapter never
reloads the base: the child keeps it resident.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from agent.procinfo import thread_env


class RuntimeHostError(Exception):
    """The runtime refused a command (e.g. an incompatible or non-safetensors adapter)."""


class RuntimeHost:
    """A child process holding the base model and its resident adapters."""

    def __init__(
        self,
        model_dir: Path,
        *,
        backend: str = "torch",
        threads: int = 0,
        max_resident_bytes: int = 256 * 2**20,
        serve: str = "",
        wait: bool = True,
    ) -> None:
        threads = threads or 1  # a background service: one thread unless told otherwise
        cmd = [
            sys.executable,
            "-m",
            "agent.runtime_host",
            "--backend",
            backend,
            "--model",
            str(model_dir),
            "--max-resident-bytes",
            str(max_resident_bytes),
            "--threads",
            str(threads),
        ]
        if serve:
            cmd += ["--serve", serve]
        self.backend = backend
        env = {**os.environ, **thread_env(threads)}
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, env=env)
        self._lock = threading.Lock()
        self.base_fingerprint = ""
        self.address = ""  # where DeviceInferenceService listens ("" if not served)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until the child has loaded its model (RuntimeHostError when it could not)."""
        try:
            hello = self.call("ping")
        except RuntimeHostError:
            self.kill()  # a child that answered with an error may still be running
            raise
        self.base_fingerprint = str(hello["base_fingerprint"])
        self.address = str(hello["address"])

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one command and wait for its reply."""
        with self._lock:
            if self.proc.poll() is not None or self.proc.stdin is None or self.proc.stdout is None:
                raise RuntimeHostError(f"runtime process exited with {self.proc.returncode}")
            self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeHostError(f"runtime process exited with {self.proc.wait()}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeHostError(str(reply.get("error", "unknown error")))
        return reply

    def has(self, name: str) -> bool:
        """True when the adapter is resident (it may have been evicted since; the child says)."""
        return bool(self.call("has", name=name)["resident"])

    def load(self, name: str, adapter_dir: Path) -> int:
        """Load an adapter (not activated); returns its bytes."""
        return int(self.call("load", name=name, dir=str(adapter_dir))["bytes"])

    def unload(self, name: str) -> None:
        """Free a resident adapter that is not active."""
        self.call("unload", name=name)

    def activate(self, name: str | None) -> None:
        """Make an adapter (or the base, with None) active for new requests."""
        self.call("activate", name=name)

    def generate(
        self, prompt: str, max_new_tokens: int = 48, adapter: str | None = None, use_active: bool = True
    ) -> dict[str, Any]:
        """Generate with the active adapter (or the named one / the base)."""
        args: dict[str, Any] = {"prompt": prompt, "max_new_tokens": max_new_tokens}
        if not use_active:
            args["adapter"] = adapter
        return self.call("generate", **args)

    def close(self) -> None:
        """Stop the child."""
        if self.proc.poll() is None:
            try:
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()

    def kill(self) -> None:
        """Stop the child at once (one still loading its model holds nothing to save)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
