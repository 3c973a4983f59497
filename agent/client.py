"""The device's gRPC client: enrollment, a persisted credential, and authenticated calls."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import grpc
import psutil

from protos.pocketlora.v1 import agent_service_pb2 as pb
from protos.pocketlora.v1 import agent_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb

DEVICE_HEADER = "x-pocketlora-device"


def detect_capabilities(
    work_dir: Path, base_model_id: str, base_fingerprint: str, labels: dict[str, str], memory_budget_bytes: int = 0
) -> tpb.Capabilities:
    """What this machine can do, read without importing torch."""
    import importlib.util

    # bitsandbytes' NF4 kernels exist for CPU and CUDA builds alike; its presence is the test.
    supports_4bit = importlib.util.find_spec("bitsandbytes") is not None
    return tpb.Capabilities(
        ram_bytes=psutil.virtual_memory().total,
        free_storage_bytes=psutil.disk_usage(str(work_dir)).free,
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count() or 1,
        accelerator="",
        supports_4bit=supports_4bit,
        platform=f"{platform.system().lower()}-{platform.machine()}",
        base_model_id=base_model_id,
        base_fingerprint=base_fingerprint,
        labels=labels,
        memory_budget_bytes=memory_budget_bytes,
    )


class DeviceClient:
    """AgentService calls carrying this device's credential."""

    def __init__(self, address: str, device_id: str, work_dir: Path, *, timeout_s: float = 20.0) -> None:
        self.address = address
        self.device_id = device_id
        self.timeout_s = timeout_s
        self._cred_path = work_dir / "credential.json"
        self.channel = grpc.insecure_channel(address)
        self.stub = pb_grpc.AgentServiceStub(self.channel)
        self._credential = self._load_credential()

    def _load_credential(self) -> str:
        try:
            data = json.loads(self._cred_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return ""
        return str(data.get("credential", "")) if data.get("device_id") == self.device_id else ""

    @property
    def enrolled(self) -> bool:
        """True once a credential is held."""
        return bool(self._credential)

    def enroll(self, enrollment_token: str, capabilities: tpb.Capabilities) -> None:
        """Enroll (or re-enroll) and persist the credential, readable by this user only."""
        reply = self.stub.Enroll(
            pb.EnrollRequest(device_id=self.device_id, capabilities=capabilities),
            metadata=(("authorization", f"Bearer {enrollment_token}"),),
            timeout=self.timeout_s,
        )
        self._credential = reply.device_credential
        tmp = self._cred_path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"device_id": self.device_id, "credential": self._credential}, f)
        os.replace(tmp, self._cred_path)

    def call(self, method: str, request: Any) -> Any:
        """One authenticated unary call."""
        metadata = (("authorization", f"Bearer {self._credential}"), (DEVICE_HEADER, self.device_id))
        return getattr(self.stub, method)(request, metadata=metadata, timeout=self.timeout_s)

    def close(self) -> None:
        """Close the channel."""
        self.channel.close()
