"""The orchestrator over TLS and mutual TLS, with a CA made for the test: the typed clients work
over it, a client that does not trust the CA (or brings no certificate) is refused before any
RPC runs, and a device certificate binds its device id on every path, the PostgreSQL poll
functions included."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agent.client import DeviceClient, Gone, Transient
from orchestrator.server import start_server
from pocketlora.client import ClientError, OperatorClient
from pocketlora.tls import TlsConfig, TlsConfigError, load_server_tls, load_tls
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import agent_service_pb2_grpc
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.api import SPEC, code_of
from tests.support.certs import Issued, TestCA
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, FakeClock, ServerThread, dev_md, op_md


class Pki:
    """The test's CA, the orchestrator's certificate, two device certificates and an
    operator's, and a second CA nobody here trusts."""

    def __init__(self, folder: Path) -> None:
        self.ca = TestCA(folder / "ca")
        self.server = self.ca.issue("server", cn="orchestrator", server=True)
        self.phone_a = self.ca.issue("phone-a", cn="phone-a", device_uri="phone-a")
        self.phone_b = self.ca.issue("phone-b", cn="phone-b")  # bound by its CN alone
        self.operator = self.ca.issue("ops", cn="alice")
        self.stranger_ca = TestCA(folder / "stranger", "another CA")

    def client(self, who: Issued | None, ca: Path | None = None) -> TlsConfig:
        tls = load_tls(ca=ca or self.ca.cert_path, cert=who.cert if who else None, key=who.key if who else None)
        assert tls is not None
        return tls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_srv(tmp_path: Path, pki: Pki) -> Iterator[ServerThread]:
    """TLS without client certificates."""
    tls = load_server_tls(pki.server.cert, pki.server.key, None)
    with ServerThread(tmp_path, tls=tls, client_tls=pki.client(None)) as s:
        yield s


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def mtls_srv(request: pytest.FixtureRequest, tmp_path: Path, pki: Pki) -> Iterator[ServerThread]:
    """Mutual TLS; on PostgreSQL the polls run as server-side functions."""
    db_url = "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))
    tls = load_server_tls(pki.server.cert, pki.server.key, pki.ca.cert_path)
    with ServerThread(
        tmp_path, db_url=db_url, clock=FakeClock(), tls=tls, client_tls=pki.client(pki.operator), lease_s=30.0
    ) as s:
        yield s


def _caps() -> tpb.Capabilities:
    return tpb.Capabilities(base_model_id="tiny", supports_4bit=True, ram_bytes=8 * 2**30)


def test_typed_clients_work_over_tls(tls_srv: ServerThread, pki: Pki, tmp_path: Path) -> None:
    device = DeviceClient(tls_srv.address, "phone-a", tmp_path, tls=pki.client(None))
    operator = OperatorClient(tls_srv.address, OPERATOR_TOKEN, tls=pki.client(None))
    try:
        device.enroll(ENROLL_TOKEN, _caps())
        job = operator.call("SubmitJob", opb.SubmitJobRequest(device_id="phone-a", training=SPEC)).job
        assert device.lease_job().assignment.job_id == job.job_id
        assert operator.call("GetJob", opb.GetJobRequest(job_id=job.job_id)).job.state == tpb.JOB_STATE_LEASED
    finally:
        device.close()
        operator.close()


def test_a_client_that_does_not_trust_the_ca_is_refused_with_a_clear_error(
    tls_srv: ServerThread, pki: Pki, tmp_path: Path
) -> None:
    untrusting = pki.client(None, ca=pki.stranger_ca.cert_path)
    with (
        OperatorClient(tls_srv.address, OPERATOR_TOKEN, tls=untrusting, timeout_s=5) as operator,
        pytest.raises(ClientError) as info,
    ):
        operator.call("ListDevices", opb.ListDevicesRequest())
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert "certificate is not trusted" in str(info.value) and "--tls-ca" in str(info.value)
    device = DeviceClient(tls_srv.address, "phone-a", tmp_path, tls=untrusting, timeout_s=5)
    with pytest.raises(Transient, match="certificate is not trusted"):
        device.enroll(ENROLL_TOKEN, _caps())
    device.close()
    # A plaintext client gets nowhere either, and is told why.
    with OperatorClient(tls_srv.address, OPERATOR_TOKEN, timeout_s=5) as plain, pytest.raises(ClientError) as info:
        plain.call("ListDevices", opb.ListDevicesRequest())
    assert "may serve TLS only" in str(info.value)
    assert tls_srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices == []


def test_mtls_refuses_a_client_without_a_certificate(mtls_srv: ServerThread, pki: Pki, tmp_path: Path) -> None:
    bare = DeviceClient(mtls_srv.address, "phone-a", tmp_path, tls=pki.client(None), timeout_s=5)
    with pytest.raises(Transient, match="may require a client certificate"):
        bare.enroll(ENROLL_TOKEN, _caps())
    bare.close()
    # A certificate from a CA the server does not accept is refused the same way.
    stranger = pki.stranger_ca.issue("phone-a", cn="phone-a", device_uri="phone-a")
    forged = DeviceClient(mtls_srv.address, "phone-a", tmp_path, tls=pki.client(stranger), timeout_s=5)
    with pytest.raises(Transient):
        forged.enroll(ENROLL_TOKEN, _caps())
    forged.close()
    assert mtls_srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices == []
    # With its own certificate the device enrolls and polls.
    good = DeviceClient(mtls_srv.address, "phone-a", tmp_path, tls=pki.client(pki.phone_a))
    good.enroll(ENROLL_TOKEN, _caps())
    good.heartbeat(apb.HeartbeatRequest(device_id="phone-a", eligible=True))
    good.close()


def test_a_device_certificate_for_a_cannot_act_as_b(mtls_srv: ServerThread, pki: Pki, tmp_path: Path) -> None:
    a = DeviceClient(mtls_srv.address, "phone-a", tmp_path / "a", tls=pki.client(pki.phone_a))
    b = DeviceClient(mtls_srv.address, "phone-b", tmp_path / "b", tls=pki.client(pki.phone_b))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a_as_b = grpc.secure_channel(mtls_srv.address, pki.client(pki.phone_a).channel_credentials())
    stub = agent_service_pb2_grpc.AgentServiceStub(a_as_b)
    try:
        # Enrolling as B with A's certificate is refused; B does not exist afterwards.
        code = code_of(stub.Enroll, apb.EnrollRequest(device_id="phone-b"), metadata=op_md(ENROLL_TOKEN))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert mtls_srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices == []
        a.enroll(ENROLL_TOKEN, _caps())
        b.enroll(ENROLL_TOKEN, _caps())  # B's certificate names B by its CN
        job = mtls_srv.operator.SubmitJob(
            opb.SubmitJobRequest(device_id="phone-b", training=SPEC), metadata=op_md()
        ).job
        # A holding B's credential (stolen) still cannot act as B: every device call is refused,
        # the polls included (on PostgreSQL those are server-side functions).
        md_b = dev_md("phone-b", b._credential)
        calls = [
            (stub.LeaseJob, apb.LeaseJobRequest(device_id="phone-b")),
            (stub.LeaseJob, apb.LeaseJobRequest()),
            (stub.Heartbeat, apb.HeartbeatRequest(device_id="phone-b", eligible=True)),
            (stub.Heartbeat, apb.HeartbeatRequest(eligible=True)),
            (
                stub.ReportProgress,
                apb.ReportProgressRequest(job_id=job.job_id, lease_epoch=1, state=tpb.JOB_STATE_RUNNING),
            ),
            (stub.GetAdapterDownloadUrl, apb.GetAdapterDownloadUrlRequest(adapter_id="a-1")),
        ]
        for method, request in calls:
            assert code_of(method, request, metadata=md_b) == grpc.StatusCode.PERMISSION_DENIED, request
        got = mtls_srv.operator.GetJob(opb.GetJobRequest(job_id=job.job_id), metadata=op_md()).job
        assert got.state == tpb.JOB_STATE_QUEUED  # nothing leased it
        # Nor can A's own credential name B in the request; B itself leases its job.
        md_a = dev_md("phone-a", a._credential)
        assert code_of(stub.LeaseJob, apb.LeaseJobRequest(device_id="phone-b"), metadata=md_a) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        assert b.lease_job().assignment.job_id == job.job_id
        with pytest.raises(Gone, match="certificate is for 'phone-a', not device 'phone-b'"):
            DeviceClient(mtls_srv.address, "phone-b", tmp_path / "b", tls=pki.client(pki.phone_a)).heartbeat(
                apb.HeartbeatRequest(eligible=True)
            )
    finally:
        a_as_b.close()
        a.close()
        b.close()


def test_an_operator_certificate_is_not_a_device_identity(mtls_srv: ServerThread, pki: Pki, tmp_path: Path) -> None:
    ops = DeviceClient(mtls_srv.address, "alice-phone", tmp_path, tls=pki.client(pki.operator))
    with pytest.raises(Gone, match="PERMISSION_DENIED: the client certificate is for 'alice'"):
        ops.enroll(ENROLL_TOKEN, _caps())
    ops.close()


def test_plaintext_beyond_loopback_is_refused_before_binding(tmp_path: Path) -> None:
    with ServerThread(tmp_path) as srv:
        with pytest.raises(TlsConfigError, match="--insecure"):
            asyncio.run_coroutine_threadsafe(start_server(srv.orch, "0.0.0.0:0"), srv.loop).result(30)
        # The server that was running is untouched.
        assert srv.operator.ListDevices(opb.ListDevicesRequest(), metadata=op_md()).devices == []
