"""DeviceInferenceService: apps on the device ask the runtime through gRPC on a local socket.

A thin servicer over an inference backend (agent.runtime_base.InferenceBackend: the ORT or the
torch runtime): parse the request into a GenerateRequest, stream the backend's chunks, map the
runtime's errors to status codes in one place. It listens on a unix socket (mode 0600: this
user only) or on a loopback TCP address; anything else is refused, since the API carries no
credentials. The server is sync gRPC with a thread per call; generations themselves are
bounded by the backend.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from agent.runtime_base import (
    AdapterNotLoaded,
    AdapterRuntimeError,
    BadRequest,
    GenerateRequest,
    InferenceBackend,
    RuntimeClosed,
    StreamChunk,
)
from protos.pocketlora.v1 import device_inference_service_pb2 as pb
from protos.pocketlora.v1 import device_inference_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb

log = logging.getLogger("pocketlora.inference")

DEFAULT_MAX_NEW_TOKENS = 64
_LOOPBACK = ("127.0.0.1", "localhost", "[::1]")
_ROLES = {pb.CHAT_ROLE_SYSTEM: "system", pb.CHAT_ROLE_USER: "user", pb.CHAT_ROLE_ASSISTANT: "assistant"}
_FINISH = {"eos": pb.FINISH_REASON_EOS, "length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP}
RUNTIME_KINDS = {"onnx": tpb.INFERENCE_RUNTIME_ONNX, "torch": tpb.INFERENCE_RUNTIME_TORCH}


def to_request(msg: pb.GenerateRequest) -> GenerateRequest:
    """The domain request for a proto one; BadRequest names the field at fault."""
    which = msg.WhichOneof("input")
    if which is None:
        raise BadRequest("input", "set prompt or chat")
    messages: tuple[tuple[str, str], ...] = ()
    if which == "chat":
        if not msg.chat.messages:
            raise BadRequest("chat.messages", "must not be empty")
        for i, m in enumerate(msg.chat.messages):
            if m.role not in _ROLES:
                raise BadRequest(f"chat.messages[{i}].role", "must be SYSTEM, USER or ASSISTANT")
        messages = tuple((_ROLES[m.role], m.content) for m in msg.chat.messages)
        if msg.raw:
            raise BadRequest("raw", "applies to a prompt, not to chat messages")
    elif not msg.prompt:
        raise BadRequest("prompt", "must not be empty")
    adapter: Any = ...
    choice = msg.WhichOneof("adapter_choice")
    if choice == "adapter":
        adapter = msg.adapter
    elif choice == "base_model":
        if not msg.base_model:
            raise BadRequest("base_model", "set it to true, or leave it unset for the active adapter")
        adapter = None
    return GenerateRequest(
        prompt=msg.prompt if which == "prompt" else "",
        messages=messages,
        adapter=adapter,
        max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=msg.temperature,
        top_p=msg.top_p or 1.0,
        stop=tuple(msg.stop),
        seed=msg.seed,
        chat=not msg.raw,
    )


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def to_response(chunk: StreamChunk) -> pb.GenerateResponse:
    """One streamed piece as the API sends it (totals on the last one)."""
    reply = pb.GenerateResponse(text=chunk.text, tokens=chunk.tokens, adapter=chunk.adapter or "")
    if chunk.finish_reason:
        reply.finish_reason = _FINISH[chunk.finish_reason]
        reply.stats.CopyFrom(
            pb.GenerationStats(
                prompt_tokens=chunk.prompt_tokens,
                completion_tokens=chunk.tokens,
                time_to_first_token=_duration(chunk.first_token_s),
                duration=_duration(chunk.seconds),
                token_ids=list(chunk.token_ids),
            )
        )
    return reply


def _status(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, BadRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(exc, AdapterNotLoaded):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(exc, RuntimeClosed):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.FAILED_PRECONDITION


class InferenceServicer(pb_grpc.DeviceInferenceServiceServicer):
    """DeviceInferenceService over one backend."""

    def __init__(self, backend: InferenceBackend, runtime: str) -> None:
        self.backend = backend
        self.runtime = runtime

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        stream: Iterator[StreamChunk] | None = None
        try:
            stream = self.backend.stream(to_request(request))
            for chunk in stream:
                if not context.is_active():  # the app went away: stop generating for it
                    return
                yield to_response(chunk)
        except AdapterRuntimeError as exc:
            context.abort(_status(exc), str(exc))
        except Exception:
            log.exception("generation failed")
            context.abort(grpc.StatusCode.INTERNAL, "internal error; see the agent log")
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # ends the backend's generation and releases its pin

    def ListResidentAdapters(
        self, request: pb.ListResidentAdaptersRequest, context: grpc.ServicerContext
    ) -> pb.ListResidentAdaptersResponse:
        active = self.backend.active
        return pb.ListResidentAdaptersResponse(
            adapters=[
                pb.ResidentAdapter(name=name, size_bytes=size, active=name == active)
                for name, size in self.backend.resident().items()
            ],
            active_adapter=active or "",
            runtime=RUNTIME_KINDS[self.runtime],
            base_fingerprint=self.backend.base_fingerprint,
        )


def check_listen(listen: str) -> str:
    """Accept `unix:/abs/path` or a loopback host:port; refuse what other machines could reach."""
    if listen.startswith("unix:"):
        if not os.path.isabs(listen.removeprefix("unix:")):
            raise ValueError(f"inference socket {listen!r}: give an absolute path (unix:/path/to/sock)")
        return listen
    host = listen.rsplit(":", 1)[0] if ":" in listen else ""
    if host not in _LOOPBACK:
        raise ValueError(f"inference API address {listen!r}: use unix:/path or a loopback address (127.0.0.1:PORT)")
    return listen


def serve_inference(
    backend: InferenceBackend, listen: str, runtime: str, *, threads: int = 8
) -> tuple[grpc.Server, str]:
    """Start DeviceInferenceService on `listen`; returns the server and the address it bound."""
    listen = check_listen(listen)
    if listen.startswith("unix:"):
        Path(listen.removeprefix("unix:")).unlink(missing_ok=True)  # a stale socket from a killed agent
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="inference"))
    pb_grpc.add_DeviceInferenceServiceServicer_to_server(InferenceServicer(backend, runtime), server)
    old_umask = os.umask(0o077)  # the socket file is born this user's only
    try:
        port = server.add_insecure_port(listen)
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        server.start()
    finally:
        os.umask(old_umask)
    if listen.startswith("unix:"):
        return server, listen
    return server, f"{listen.rsplit(':', 1)[0]}:{port}"
