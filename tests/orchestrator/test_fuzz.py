"""Property-based: arbitrary requests at every RPC of every service never break the server.

Request messages are built by hypothesis from each request's proto descriptor (so a field added
to a .proto is fuzzed without editing this file): huge strings, NULs, odd unicode, out-of-range
enums and timestamps, uint64 values above 2**63, ids drawn from a pool of real ones so deep
paths (stale epochs, completion of a leased job whose upload is not an adapter) are reached too.
Each request goes out with valid and invalid credentials. The properties:

- no reply is INTERNAL or UNKNOWN (every failure is a typed, mapped error);
- with a wrong or missing credential the reply is UNAUTHENTICATED or PERMISSION_DENIED, whatever
  else is wrong with the request (nothing is checked, or leaked, before identity);
- INVALID_ARGUMENT details start with the offending field's name;
- the server stays up: health check and a valid call work after the run.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters_store import upload_to_url
from protos.pocketlora.v1 import admin_service_pb2 as adpb
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.orch import (
    ENROLL_TOKEN,
    OPERATOR_TOKEN,
    ServerThread,
    dev_md,
    fake_adapter_blob,
    op_md,
)

SPEC = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="captain")
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
IDENTITY = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# Requests above the server's 4 MiB receive limit are refused by gRPC itself.
TRANSPORT = {grpc.StatusCode.RESOURCE_EXHAUSTED}

_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

WEIRD_STRINGS = [
    "",
    "\x00",
    "job-\x00",
    "phone-a\n",
    "../../etc/passwd",
    "ﬁ\u202e\u200b🙂",
    "Ω" * 70,
    "a" * 129,
    "' OR 1=1; --",
    "%s%s%n",
]


@dataclass
class World:
    """A server with real ids in it: enrolled devices, leased, queued and finished jobs."""

    srv: ServerThread
    creds: dict[str, str] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    shas: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def _build_world(tmp: Path, srv: ServerThread) -> World:
    world = World(srv)
    for dev in ("phone-a", "phone-b"):
        caps = tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)
        reply = srv.agent.Enroll(apb.EnrollRequest(device_id=dev, capabilities=caps), metadata=op_md(ENROLL_TOKEN))
        world.creds[dev] = reply.device_credential
        world.ids.append(dev)
    for dev in ("phone-a", "phone-a", "phone-a", "phone-b"):
        job = srv.operator.SubmitJob(opb.SubmitJobRequest(device_id=dev, training=SPEC), metadata=op_md()).job
        world.ids.append(job.job_id)
    md = dev_md("phone-a", world.creds["phone-a"])
    # One finished job with a real adapter, one leased job whose upload is not an adapter at all.
    a = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id="phone-a"), metadata=md).assignment
    blob, info = fake_adapter_blob(tmp, device_id="phone-a", job_id=a.job_id, attempt=a.attempt)
    upload_to_url(a.upload_url, blob)
    done = srv.agent.CompleteJob(
        apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size),
        metadata=md,
    )
    world.ids.append(done.adapter.adapter_id)
    world.shas.append(info.sha256)
    world.sizes.append(info.size)
    b = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id="phone-a"), metadata=md).assignment
    junk = tmp / "junk.bin"
    junk.write_bytes(b"not a safetensors file" * 10)
    upload_to_url(b.upload_url, junk)
    world.shas.append(hashlib.sha256(junk.read_bytes()).hexdigest())
    world.sizes.append(junk.stat().st_size)
    world.epochs += [a.lease_epoch, b.lease_epoch]
    camp = srv.operator.SubmitCampaign(opb.SubmitCampaignRequest(name="c", training=SPEC), metadata=op_md()).campaign
    world.ids.append(camp.campaign_id)
    return world


def _strings(world: World) -> st.SearchStrategy[str]:
    ids = st.sampled_from(world.ids)
    weird = st.sampled_from(WEIRD_STRINGS)
    return st.one_of(
        ids,
        ids,
        st.sampled_from(world.shas),
        weird,
        weird,
        st.tuples(ids, weird).map("".join),
        st.text(max_size=40),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=8).map(lambda s: s * 20_000),
        st.integers(1, 3_000_000).map(lambda n: "x" * n),
    )


def _scalar(fd: FieldDescriptor, world: World) -> st.SearchStrategy[Any]:
    t = fd.type
    if t == FieldDescriptor.TYPE_STRING:
        return _strings(world)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=64 if t == FieldDescriptor.TYPE_DOUBLE else 32)
    if t == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        valid = [v.number for v in fd.enum_type.values]
        return st.one_of(st.sampled_from(valid), st.integers(-(2**31), 2**31 - 1))
    lo, hi = _INT_RANGES[t]
    edges = [lo, hi, 0, 1, 2**63 - 1, 2**63, 2**64 - 1, -1, -(2**63)]
    pool = [*world.epochs, *world.sizes]
    return st.one_of(
        st.sampled_from([e for e in edges if lo <= e <= hi]),
        st.sampled_from([p for p in pool if lo <= p <= hi] or [0]),
        st.integers(lo, hi),
    )


def message(desc: Descriptor, world: World, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of this type: each field unset or set to an arbitrary (often hostile) value."""
    cls = _message_class(desc)
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for fd in desc.fields:
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            fields[fd.name] = st.dictionaries(_scalar(key_fd, world), _value(value_fd, world, depth), max_size=3)
        elif fd.is_repeated:
            fields[fd.name] = st.lists(_value(fd, world, depth), max_size=3)
        else:
            fields[fd.name] = _value(fd, world, depth)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for name, strategy in fields.items():
            if not draw(st.booleans()):
                continue
            value = draw(strategy)
            fd = desc.fields_by_name[name]
            target = getattr(msg, name)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                for k, v in value.items():
                    if isinstance(v, Message):
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif fd.is_repeated:
                if fd.message_type is not None:
                    for v in value:
                        target.add().CopyFrom(v)
                else:
                    target.extend(value)
            elif fd.message_type is not None:
                target.CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return build()


def _value(fd: FieldDescriptor, world: World, depth: int) -> st.SearchStrategy[Any]:
    if fd.message_type is None:
        return _scalar(fd, world)
    if depth >= 3:
        return st.just(_message_class(fd.message_type)())
    return message(fd.message_type, world, depth + 1)


def _message_class(desc: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(desc)


CREDENTIALS = ["valid", "valid-other-device", "wrong-token", "none", "header-only", "enrollment-as-operator"]
# Most examples carry a valid credential, so they get past identity into validation and the domain.
CREDENTIAL_CHOICE = st.one_of(st.just("valid"), st.just("valid"), st.sampled_from(CREDENTIALS))


def _metadata(world: World, service: str, method: str, cred: str) -> tuple[tuple[str, str], ...]:
    if service in ("OperatorService", "AdminService"):
        return {
            "valid": op_md(OPERATOR_TOKEN),
            "valid-other-device": dev_md("phone-a", world.creds["phone-a"]),
            "wrong-token": op_md("nope"),
            "none": (),
            "header-only": (("authorization", OPERATOR_TOKEN),),  # no "Bearer "
            "enrollment-as-operator": op_md(ENROLL_TOKEN),
        }[cred]
    if method == "Enroll":
        return {
            "valid": op_md(ENROLL_TOKEN),
            "valid-other-device": dev_md("phone-a", world.creds["phone-a"]),
            "wrong-token": op_md("nope"),
            "none": (),
            "header-only": (("authorization", ENROLL_TOKEN),),
            "enrollment-as-operator": op_md(OPERATOR_TOKEN),
        }[cred]
    return {
        "valid": dev_md("phone-a", world.creds["phone-a"]),
        "valid-other-device": dev_md("phone-b", world.creds["phone-b"]),
        "wrong-token": dev_md("phone-a", "forged"),
        "none": (),
        "header-only": (("x-pocketlora-device", "phone-a"),),
        "enrollment-as-operator": dev_md("phone-a", ENROLL_TOKEN),
    }[cred]


# AdminService last: it may revoke or delete the world's devices, which the others rely on.
MODULES: dict[str, Any] = {"AgentService": apb, "OperatorService": opb, "AdminService": adpb}


def _rpcs() -> list[tuple[str, str, Descriptor, bool]]:
    out = []
    for name, module in MODULES.items():
        service = module.DESCRIPTOR.services_by_name[name]
        for m in service.methods:
            out.append((name, m.name, m.input_type, m.server_streaming))
    return out


RPCS = _rpcs()


def _field_names(desc: Descriptor, prefix: str = "", depth: int = 0) -> set[str]:
    names = set()
    for fd in desc.fields:
        names.add(prefix + fd.name)
        if fd.message_type is not None and depth < 3:
            names |= _field_names(fd.message_type, f"{prefix}{fd.name}.", depth + 1)
    return names


def _call(world: World, service: str, method: str, streaming: bool, request: Message, md: Any) -> grpc.RpcError | None:
    channel = world.srv.channel
    path = f"/pocketlora.v1.{service}/{method}"
    response_cls = _message_class(
        MODULES[service].DESCRIPTOR.services_by_name[service].methods_by_name[method].output_type
    )
    try:
        if streaming:
            call = channel.unary_stream(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_cls.FromString
            )
            stream = call(request, metadata=md, timeout=0.5)
            for _ in stream:
                pass
        else:
            call = channel.unary_unary(
                path, request_serializer=lambda m: m.SerializeToString(), response_deserializer=response_cls.FromString
            )
            reply = call(request, metadata=md, timeout=1.0 if method == "LeaseJob" else 20.0)
            if method == "Enroll" and request.device_id in world.creds:  # type: ignore[attr-defined]
                world.creds[request.device_id] = reply.device_credential  # type: ignore[attr-defined]
    except grpc.RpcError as exc:
        return exc
    return None


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    db_url = "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_server").create_database())
    with ServerThread(tmp, db_url=db_url, lease_s=600.0, retry_base_s=1.0) as srv:
        w = _build_world(tmp, srv)
        w.srv.orch.config  # noqa: B018 - the server is up
        yield w
        # The server survived: health and a valid call still work.
        health = health_pb2_grpc.HealthStub(srv.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        # (AdminService runs last and may have revoked or deleted the world's devices: fine.)
        srv.operator.GetFleetSummary(opb.GetFleetSummaryRequest(), metadata=op_md(), timeout=10)
        srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md(), timeout=10)


@pytest.mark.parametrize(("service", "method", "desc", "streaming"), RPCS, ids=[f"{s}.{m}" for s, m, _, _ in RPCS])
def test_arbitrary_requests_get_typed_errors(
    world: World, service: str, method: str, desc: Descriptor, streaming: bool
) -> None:
    fields = _field_names(desc)
    examples = 60 if world.srv.orch.state.url.startswith("sqlite") else 40

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(request=message(desc, world), cred=CREDENTIAL_CHOICE)
    def check(request: Message, cred: str) -> None:
        err = _call(world, service, method, streaming, request, _metadata(world, service, method, cred))
        # Both enrolled devices hold valid device credentials.
        valid = cred == "valid" or (cred == "valid-other-device" and service == "AgentService" and method != "Enroll")
        if err is None:
            assert valid, f"{method} succeeded with credential {cred!r}"
            return
        code = err.code()
        assert code not in FORBIDDEN, f"{method} answered {code.name}: {err.details()}"
        if not valid:
            assert code in IDENTITY | TRANSPORT, (
                f"{method} with credential {cred!r} answered {code.name}: {err.details()}"
            )
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            named = (err.details() or "").split(":", 1)[0]
            named = re.sub(r"\[[^\]]*\]", "", named)  # labels[gpu] names the field labels
            assert named in fields, f"{method}: INVALID_ARGUMENT does not name a request field: {err.details()}"

    check()


def _string_paths(desc: Descriptor, prefix: tuple[str, ...] = (), depth: int = 0) -> list[tuple[str, ...]]:
    """Every singular string field, and every string-keyed map, reachable from a message."""
    out: list[tuple[str, ...]] = []
    for fd in desc.fields:
        path = (*prefix, fd.name)
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            if fd.message_type.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING:
                out.append(path)
        elif fd.is_repeated:
            if fd.type == FieldDescriptor.TYPE_STRING:
                out.append(path)
        elif fd.type == FieldDescriptor.TYPE_STRING:
            out.append(path)
        elif fd.message_type is not None and depth < 2:
            out += _string_paths(fd.message_type, path, depth + 1)
    return out


def _with_string(desc: Descriptor, path: tuple[str, ...], value: str) -> Message:
    msg = _message_class(desc)()
    target: Any = msg
    for name in path[:-1]:
        target = getattr(target, name)
    fd = target.DESCRIPTOR.fields_by_name[path[-1]]
    if fd.message_type is not None:  # a map: hostile key and value
        mapped = getattr(target, path[-1])
        value_fd = fd.message_type.fields_by_name["value"]
        if value_fd.type == FieldDescriptor.TYPE_STRING:
            mapped[value] = value
        elif value_fd.message_type is None:
            mapped[value] = 1
    elif fd.is_repeated:
        getattr(target, path[-1]).append(value)
    else:
        setattr(target, path[-1], value)
    return msg


HOSTILE = ["\x00", "a\x00b", "phone-a\n", "\u202e\U0001f642", "x" * 100_000, "' OR 1=1; --"]


@pytest.mark.parametrize(("service", "method", "desc", "streaming"), RPCS, ids=[f"{s}.{m}" for s, m, _, _ in RPCS])
def test_every_string_field_survives_hostile_values(
    world: World, service: str, method: str, desc: Descriptor, streaming: bool
) -> None:
    """Deterministic sweep: each string field (nested too) alone set to each hostile value."""
    fields = _field_names(desc)
    for path in _string_paths(desc):
        for value in HOSTILE:
            request = _with_string(desc, path, value)
            err = _call(world, service, method, streaming, request, _metadata(world, service, method, "valid"))
            if err is None:
                continue
            code = err.code()
            assert code not in FORBIDDEN, f"{method} {'.'.join(path)}={value[:20]!r}: {code.name}: {err.details()}"
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert err.details().split(":", 1)[0] in fields, err.details()


def test_an_upload_that_is_not_an_adapter_fails_the_attempt(tmp_path: Path) -> None:
    """Right digest and size, wrong bytes: FAILED_PRECONDITION and a retry, never INTERNAL."""
    with ServerThread(tmp_path, lease_s=600.0, retry_base_s=1.0) as srv:
        reply = srv.agent.Enroll(
            apb.EnrollRequest(device_id="phone-a", capabilities=tpb.Capabilities(base_model_id="tiny")),
            metadata=op_md(ENROLL_TOKEN),
        )
        md = dev_md("phone-a", reply.device_credential)
        srv.operator.SubmitJob(opb.SubmitJobRequest(device_id="phone-a", training=SPEC), metadata=op_md())
        a = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id="phone-a"), metadata=md).assignment
        junk = tmp_path / "junk.bin"
        junk.write_bytes(b"\x00" * 64)
        upload_to_url(a.upload_url, junk)
        req = apb.CompleteJobRequest(
            job_id=a.job_id,
            lease_epoch=a.lease_epoch,
            sha256=hashlib.sha256(junk.read_bytes()).hexdigest(),
            size_bytes=64,
        )
        with pytest.raises(grpc.RpcError) as info:
            srv.agent.CompleteJob(req, metadata=md)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The reason names the problem, never a server-side path.
        assert "not a safetensors file" in info.value.details()
        assert str(tempfile.gettempdir()) + "/" not in info.value.details()
        job = srv.operator.GetJob(opb.GetJobRequest(job_id=a.job_id), metadata=op_md()).job
        assert job.state == tpb.JOB_STATE_QUEUED and job.last_error_class == tpb.ERROR_CLASS_INTEGRITY
        assert str(tempfile.gettempdir()) + "/" not in job.last_error
