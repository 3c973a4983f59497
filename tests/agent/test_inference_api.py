"""DeviceInferenceService over a real gRPC server on a unix socket: streaming, bad input named by
field, unknown adapters, listing, swaps landing mid-generation, and loopback-only listening."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.inference_server import check_listen, serve_inference
from agent.ort_runtime import OrtRuntime
from protos.pocketlora.v1 import device_inference_service_pb2 as pb
from protos.pocketlora.v1 import device_inference_service_pb2_grpc as pb_grpc
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.onnx_models import TinyBundle

PROMPT = "hello world"


@pytest.fixture(scope="module")
def api(tiny_bundle: TinyBundle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OrtRuntime, str]]:
    runtime = OrtRuntime(tiny_bundle.bundle, max_concurrent=2)
    for name in ("alpha", "beta", "gamma"):
        runtime.load(name, tiny_bundle.forms[name])
    sock = tmp_path_factory.mktemp("api") / "inference.sock"
    server, address = serve_inference(runtime, f"unix:{sock}", "onnx")
    yield runtime, address
    server.stop(0)
    runtime.close()


@pytest.fixture
def stub(api: tuple[OrtRuntime, str]) -> Iterator[pb_grpc.DeviceInferenceServiceStub]:
    with grpc.insecure_channel(api[1]) as channel:
        yield pb_grpc.DeviceInferenceServiceStub(channel)


def _ids(replies: list[pb.GenerateResponse]) -> tuple[int, ...]:
    return tuple(replies[-1].stats.token_ids)


def test_socket_is_private_to_this_user(api: tuple[OrtRuntime, str]) -> None:
    path = Path(api[1].removeprefix("unix:"))
    assert path.is_socket() and path.stat().st_mode & 0o077 == 0


def test_generate_streams_the_same_reply_as_the_runtime(
    api: tuple[OrtRuntime, str], stub: pb_grpc.DeviceInferenceServiceStub
) -> None:
    runtime, _ = api
    want = runtime.generate(PROMPT, max_new_tokens=12, adapter="beta")
    replies = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter="beta", max_new_tokens=12)))
    assert "".join(r.text for r in replies) == want.text and _ids(replies) == want.token_ids
    assert all(r.adapter == "beta" for r in replies)
    assert [r.finish_reason for r in replies[:-1]] == [0] * (len(replies) - 1)
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH and last.stats.completion_tokens == 12
    assert last.stats.prompt_tokens > 0 and last.stats.time_to_first_token.ToNanoseconds() > 0
    base = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, base_model=True, max_new_tokens=12)))
    assert base[-1].adapter == "" and _ids(base) == runtime.generate(PROMPT, max_new_tokens=12, adapter=None).token_ids
    chat = pb.ChatMessages(
        messages=[
            pb.ChatMessage(role=pb.CHAT_ROLE_SYSTEM, content="You are terse."),
            pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=PROMPT),
        ]
    )
    assert list(stub.Generate(pb.GenerateRequest(chat=chat, max_new_tokens=4)))[-1].stats.completion_tokens == 4


@pytest.mark.parametrize(
    ("request_kw", "field"),
    [
        ({}, "input"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_new_tokens": 5000}, "max_new_tokens"),
        ({"prompt": "x", "temperature": 3.0}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "adapter": "no/such"}, "adapter"),
        ({"prompt": "x", "base_model": False}, "base_model"),
        ({"chat": pb.ChatMessages()}, "chat.messages"),
        ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(content="hi")])}, "chat.messages[0].role"),
        ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER)])}, "messages[0].content"),
        ({"chat": pb.ChatMessages(messages=[pb.ChatMessage(role=2, content="hi")]), "raw": True}, "raw"),
    ],
)
def test_bad_input_is_invalid_argument_naming_the_field(
    stub: pb_grpc.DeviceInferenceServiceStub, request_kw: dict[str, object], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(**request_kw)))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    # The server is still up and answering.
    assert list(stub.Generate(pb.GenerateRequest(prompt="x", max_new_tokens=1)))[-1].stats.completion_tokens == 1


def test_unknown_adapter_is_not_found(stub: pb_grpc.DeviceInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(pb.GenerateRequest(prompt="x", adapter="delta")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "delta" in info.value.details()


def test_list_resident_adapters(api: tuple[OrtRuntime, str], stub: pb_grpc.DeviceInferenceServiceStub) -> None:
    runtime, _ = api
    runtime.activate("gamma")
    try:
        reply = stub.ListResidentAdapters(pb.ListResidentAdaptersRequest())
    finally:
        runtime.activate(None)
    assert [a.name for a in reply.adapters] == list(runtime.resident())
    assert {a.name for a in reply.adapters if a.active} == {"gamma"} and reply.active_adapter == "gamma"
    assert reply.runtime == tpb.INFERENCE_RUNTIME_ONNX and reply.base_fingerprint == runtime.base_fingerprint
    assert all(a.size_bytes > 0 for a in reply.adapters)


def test_a_swap_mid_generation_never_mixes_adapters(
    api: tuple[OrtRuntime, str], stub: pb_grpc.DeviceInferenceServiceStub
) -> None:
    runtime, _ = api
    choices: list[str | None] = [None, "alpha", "beta", "gamma"]
    refs = {c: runtime.generate(PROMPT, max_new_tokens=10, adapter=c).token_ids for c in choices}
    results: list[tuple[str, tuple[int, ...]]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            runtime.activate(choices[i % 4])
            i += 1
            time.sleep(0.0005)

    def client() -> None:
        try:
            for _ in range(10):
                replies = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=10)))
                results.append((replies[-1].adapter, _ids(replies)))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=swapper)] + [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(timeout=120)
    stop.set()
    threads[0].join(timeout=10)
    runtime.activate(None)
    assert not errors, errors
    assert len(results) == 30
    for adapter, ids in results:
        assert ids == refs[adapter or None], adapter
    assert len({a for a, _ in results}) >= 2


def test_a_client_that_leaves_releases_its_adapter(
    api: tuple[OrtRuntime, str], stub: pb_grpc.DeviceInferenceServiceStub, tiny_bundle: TinyBundle
) -> None:
    runtime, _ = api
    runtime.load("delta", tiny_bundle.forms["alpha"])
    call = stub.Generate(pb.GenerateRequest(prompt=PROMPT, adapter="delta", max_new_tokens=1000))
    next(call)
    call.cancel()
    runtime.unload("delta")
    # The cancelled request let go of its pin; the adapter is freed and the name can be reused.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            runtime.load("delta", tiny_bundle.forms["alpha"])
            break
        except Exception:
            time.sleep(0.1)
    assert "delta" in runtime.resident()
    runtime.unload("delta")


@pytest.mark.parametrize("listen", ["0.0.0.0:5000", "10.0.0.2:80", "example.com:443", "unix:relative.sock"])
def test_only_local_addresses_are_accepted(listen: str) -> None:
    with pytest.raises(ValueError, match="inference"):
        check_listen(listen)
    assert check_listen("127.0.0.1:0") == "127.0.0.1:0"


def test_torch_backend_serves_the_same_api(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    from agent.runtime import AdapterRuntime

    with AdapterRuntime(tiny_bundle.base, torch_threads=1) as runtime:
        runtime.load("alpha", tiny_bundle.peft["alpha"])
        runtime.activate("alpha")
        server, address = serve_inference(runtime, "127.0.0.1:0", "torch")
        try:
            with grpc.insecure_channel(address) as channel:
                stub = pb_grpc.DeviceInferenceServiceStub(channel)
                replies = list(stub.Generate(pb.GenerateRequest(prompt=PROMPT, max_new_tokens=8)))
                listed = stub.ListResidentAdapters(pb.ListResidentAdaptersRequest())
        finally:
            server.stop(0)
        want = runtime.generate(PROMPT, max_new_tokens=8)
    assert _ids(replies) == want.token_ids and replies[-1].adapter == "alpha"
    assert listed.runtime == tpb.INFERENCE_RUNTIME_TORCH and listed.active_adapter == "alpha"
