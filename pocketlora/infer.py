"""`pocketlora infer`: ask the device agent's DeviceInferenceService, or run a runtime in-process.

Remote (the default): a gRPC stream to the agent's socket; tokens print as they arrive. Local
(`--local`): the ORT runtime on a bundle folder (`--bundle`), or the torch runtime on a base
folder (`--base-model`), with an adapter file or folder loaded under the name "adapter".
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from agent.runtime_base import GenerateRequest, StreamChunk
from protos.pocketlora.v1 import device_inference_service_pb2 as pb
from protos.pocketlora.v1 import device_inference_service_pb2_grpc as pb_grpc

_FINISH = {pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_STOP: "stop"}


@dataclass(frozen=True)
class Ask:
    """What the user asked for, independent of where it runs."""

    prompt: str
    adapter: str | None  # None: the active adapter (remote) / the loaded one (local)
    base: bool
    max_new_tokens: int
    temperature: float
    stop: tuple[str, ...]
    raw: bool


def remote(address: str, ask: Ask, *, timeout_s: float = 300.0) -> Iterator[StreamChunk]:
    """Stream a reply from DeviceInferenceService at `address` (unix:/path or host:port)."""
    request = pb.GenerateRequest(
        prompt=ask.prompt,
        max_new_tokens=ask.max_new_tokens,
        temperature=ask.temperature,
        stop=list(ask.stop),
        raw=ask.raw,
    )
    if ask.base:
        request.base_model = True
    elif ask.adapter:
        request.adapter = ask.adapter
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.DeviceInferenceServiceStub(channel)
        for reply in stub.Generate(request, timeout=timeout_s):
            stats = reply.stats
            yield StreamChunk(
                reply.text,
                reply.tokens,
                reply.adapter or None,
                finish_reason=_FINISH.get(reply.finish_reason, ""),
                prompt_tokens=stats.prompt_tokens,
                first_token_s=stats.time_to_first_token.ToNanoseconds() / 1e9,
                seconds=stats.duration.ToNanoseconds() / 1e9,
                token_ids=tuple(stats.token_ids),
            )


def resident(address: str) -> pb.ListResidentAdaptersResponse:
    """The agent runtime's resident adapters."""
    with grpc.insecure_channel(address) as channel:
        reply: pb.ListResidentAdaptersResponse = pb_grpc.DeviceInferenceServiceStub(channel).ListResidentAdapters(
            pb.ListResidentAdaptersRequest(), timeout=30
        )
        return reply


def local(model: Path, backend: str, adapter: Path | None, ask: Ask) -> Iterator[StreamChunk]:
    """Load a runtime in this process (onnx: a bundle; torch: a base folder) and stream a reply."""
    runtime: Any
    if backend == "onnx":
        from agent.ort_runtime import OrtRuntime

        runtime = OrtRuntime(model)
    else:
        from agent.runtime import AdapterRuntime

        runtime = AdapterRuntime(model)
    with runtime:
        if adapter is not None:
            runtime.load("adapter", _adapter_path(adapter, backend))
            runtime.activate("adapter")
        request = GenerateRequest(
            prompt=ask.prompt,
            adapter=None if ask.base else ...,
            max_new_tokens=ask.max_new_tokens,
            temperature=ask.temperature,
            stop=ask.stop,
            chat=not ask.raw,
        )
        yield from runtime.stream(request)


def _adapter_path(adapter: Path, backend: str) -> Path:
    """A torch runtime loads a peft folder: a packed blob is unpacked into a temporary one."""
    if backend == "torch" and adapter.is_file():
        from adapters_store import unpack_adapter

        folder = Path(tempfile.mkdtemp(prefix="pocketlora-infer-"))
        unpack_adapter(adapter, folder)
        return folder
    return adapter
