"""The CLI's TLS options: operator commands (options of the root command, or the environment)
and `agent run` over mutual TLS, and every TLS mistake (a file, a flag, an untrusted server,
plaintext beyond loopback) as one line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pocketlora.tls import load_server_tls, load_tls, open_channel
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1.agent_service_pb2_grpc import AgentServiceStub
from tests.support.certs import Issued, TestCA
from tests.support.orch import ENROLL_TOKEN, OPERATOR_TOKEN, ServerThread, op_md
from tests.test_cli import assert_one_line_error, cli


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("cli-ca"))


@pytest.fixture(scope="module")
def ops(ca: TestCA) -> Issued:
    return ca.issue("ops", cn="ops")


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, ca: TestCA, ops: Issued) -> Iterator[ServerThread]:
    server = ca.issue("server", cn="orchestrator", server=True)
    tls = load_server_tls(server.cert, server.key, ca.cert_path)
    client_tls = load_tls(ca=ca.cert_path, cert=ops.cert, key=ops.key)
    phone = ca.issue("phone-1", cn="phone-1")
    with ServerThread(tmp_path_factory.mktemp("cli-tls"), tls=tls, client_tls=client_tls) as srv:
        channel = open_channel(srv.address, load_tls(ca=ca.cert_path, cert=phone.cert, key=phone.key))
        AgentServiceStub(channel).Enroll(apb.EnrollRequest(device_id="phone-1"), metadata=op_md(ENROLL_TOKEN))
        channel.close()
        yield srv


def test_operator_commands_over_mutual_tls(mtls_server: ServerThread, ca: TestCA, ops: Issued) -> None:
    flags = ["--tls-ca", str(ca.cert_path), "--tls-cert", str(ops.cert), "--tls-key", str(ops.key)]
    env = {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN, "POCKETLORA_ORCHESTRATOR": mtls_server.address}
    listed = cli(*flags, "device", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["devices"][0]["device_id"] == "phone-1"
    # The same settings from the environment, as an operator's shell would hold them.
    tls_env = {"POCKETLORA_TLS_CA": str(ca.cert_path), "POCKETLORA_TLS_CERT": str(ops.cert)}
    submitted = cli(
        "job", "submit", "--device-id", "phone-1", "--dataset", "notes", "--json",
        env={**env, **tls_env, "POCKETLORA_TLS_KEY": str(ops.key)},
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr


def test_tls_mistakes_are_one_line(mtls_server: ServerThread, ca: TestCA, ops: Issued, tmp_path: Path) -> None:
    env = {"POCKETLORA_OPERATOR_TOKEN": OPERATOR_TOKEN, "POCKETLORA_ORCHESTRATOR": mtls_server.address}
    assert_one_line_error(cli("job", "list", env=env), "may serve TLS only", "--tls-ca")
    no_cert = cli("--tls-ca", str(ca.cert_path), "job", "list", env=env)
    assert_one_line_error(no_cert, "may require a client certificate", "--tls-cert")
    stranger = TestCA(tmp_path / "stranger", "another CA")
    untrusted = cli(
        "--tls-ca", str(stranger.cert_path), "--tls-cert", str(ops.cert), "--tls-key", str(ops.key), "job", "list",
        env=env,
    )  # fmt: skip
    assert_one_line_error(untrusted, "certificate is not trusted")
    missing = cli("--tls-ca", str(tmp_path / "nope.pem"), "job", "list", env=env)
    assert_one_line_error(missing, "--tls-ca", "nope.pem", "no such file")
    half = cli("--tls-ca", str(ca.cert_path), "--tls-cert", str(ops.cert), "job", "list", env=env)
    assert_one_line_error(half, "--tls-cert needs --tls-key")


def test_serve_refuses_plaintext_beyond_loopback_and_bad_tls_files(ca: TestCA, tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path), "--db", f"sqlite:///{tmp_path}/s.db"]
    refused = cli("orchestrator", "serve", "--listen", "0.0.0.0:50051", *state, env={})
    assert_one_line_error(refused, "--listen 0.0.0.0:50051", "--tls-cert", "--insecure")
    server = ca.issue("serve", cn="orchestrator", server=True)
    other = ca.issue("other", cn="other")
    mismatched = cli(
        "orchestrator", "serve", "--tls-cert", str(server.cert), "--tls-key", str(other.key), *state, env={}
    )
    assert_one_line_error(mismatched, "--tls-key", "other.key", "is not the private key of --tls-cert")
    client_ca_only = cli("orchestrator", "serve", "--tls-client-ca", str(ca.cert_path), *state, env={})
    assert_one_line_error(client_ca_only, "--tls-client-ca needs --tls-cert and --tls-key")


@pytest.mark.slow
def test_agent_run_over_mtls_is_bound_to_its_certificate(mtls_server: ServerThread, ca: TestCA, tmp_path: Path) -> None:
    from tests.support.tiny_models import make_tiny_llama

    base = make_tiny_llama(tmp_path / "base")
    phone = ca.issue("phone-7", cn="phone-7", device_uri="phone-7")
    args = [
        "agent", "run", "--base-model", str(base), "--work-dir", str(tmp_path / "w"),
        "--orchestrator", mtls_server.address, "--sensors", "psutil", "--enrollment-token", ENROLL_TOKEN,
        "--tls-ca", str(ca.cert_path), "--tls-cert", str(phone.cert), "--tls-key", str(phone.key),
    ]  # fmt: skip
    impostor = cli(*args, "--device-id", "phone-1", env={})
    assert_one_line_error(impostor, "enrollment refused", "PERMISSION_DENIED", "'phone-7', not device 'phone-1'")
    bad_store_ca = cli(*args, "--device-id", "phone-7", "--store-ca", str(tmp_path / "nope.pem"), env={})
    assert_one_line_error(bad_store_ca, "--store-ca", "nope.pem", "no such file")
