"""The shared TLS settings: files loaded once with errors that name the flag and the file, the
listen rule (no plaintext beyond loopback without --insecure), peer names, failure sentences."""

from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from pocketlora.tls import (
    TlsConfig,
    TlsConfigError,
    certified_names,
    check_listen,
    describe_failure,
    is_loopback,
    load_server_tls,
    load_tls,
)
from protos.pocketlora.v1 import agent_service_pb2 as apb
from tests.support.certs import Issued, TestCA
from tests.support.orch import ENROLL_TOKEN, ServerThread, dev_md, op_md


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def server_cert(ca: TestCA) -> Issued:
    return ca.issue("server", cn="orchestrator", server=True)


def test_loading_reads_the_files_once_into_a_picklable_config(ca: TestCA, server_cert: Issued, tmp_path: Path) -> None:
    tls = load_server_tls(server_cert.cert, server_cert.key, ca.cert_path)
    assert tls is not None and tls.cert == server_cert.cert.read_bytes() and tls.ca == ca.cert_path.read_bytes()
    # Ray ships the config to front-end actors: the bytes travel, not the paths.
    assert pickle.loads(pickle.dumps(tls)) == tls
    tls.server_credentials()
    assert load_tls() is None and load_server_tls(None, None, None) is None


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        ({"cert": "server.crt"}, ["--tls-cert needs --tls-key"]),
        ({"key": "server.key"}, ["--tls-key needs --tls-cert"]),
        ({"ca": "missing.pem"}, ["--tls-ca", "missing.pem", "no such file"]),
        ({"ca": "server.key"}, ["--tls-ca", "server.key", "no PEM certificate"]),
        ({"ca": "."}, ["--tls-ca", "is a directory"]),
        ({"cert": "server.crt", "key": "server.crt"}, ["--tls-key", "no PEM private key"]),
        (
            {"cert": "server.crt", "key": "other.key"},
            ["--tls-key", "other.key", "is not the private key of --tls-cert"],
        ),
        ({"ca": "garbage.pem"}, ["--tls-ca", "garbage.pem", "not a usable CA certificate"]),
    ],
)
def test_bad_files_name_the_flag_and_the_file(
    ca: TestCA, server_cert: Issued, kwargs: dict[str, str], needles: list[str]
) -> None:
    other = ca.issue("other", cn="other")
    garbage = ca.folder / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    paths = {k: ca.folder / v for k, v in kwargs.items()}
    with pytest.raises(TlsConfigError) as info:
        load_tls(**paths)
    for needle in needles:
        assert needle in str(info.value)
    assert other.key.exists()


def test_a_client_ca_without_a_server_certificate_is_refused(ca: TestCA, server_cert: Issued) -> None:
    with pytest.raises(TlsConfigError, match="--tls-client-ca needs --tls-cert and --tls-key"):
        load_server_tls(None, None, ca.cert_path)
    with pytest.raises(TlsConfigError, match=r"--tls-client-ca .*nope\.pem: no such file"):
        load_server_tls(ca.folder / "server.crt", ca.folder / "server.key", ca.folder / "nope.pem")


def test_a_world_readable_key_is_warned_about(ca: TestCA, caplog: pytest.LogCaptureFixture) -> None:
    loose = ca.issue("loose", cn="loose")
    loose.key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="pocketlora.tls"):
        load_tls(cert=loose.cert, key=loose.key)
    assert "readable by other users" in caplog.text


def test_a_certificate_needs_its_key_in_the_dataclass_too() -> None:
    with pytest.raises(TlsConfigError):
        TlsConfig(cert=b"x")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("localhost", True),
        ("[::1]", True),
        ("0.0.0.0", False),
        ("[::]", False),
        ("", False),
        ("10.0.0.5", False),
        ("orchestrator.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_plaintext_beyond_loopback_needs_insecure_and_says_so_loudly(
    server_cert: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    check_listen("127.0.0.1:50051", None, False)
    with pytest.raises(TlsConfigError) as info:
        check_listen("0.0.0.0:50051", None, False)
    assert "--listen 0.0.0.0:50051" in str(info.value) and "--insecure" in str(info.value)
    with pytest.raises(TlsConfigError):
        check_listen(":50051", None, False)
    tls = load_tls(cert=server_cert.cert, key=server_cert.key)
    with caplog.at_level(logging.WARNING, logger="pocketlora.tls"):
        check_listen("0.0.0.0:50051", tls, False)
        assert caplog.text == ""
        check_listen("0.0.0.0:50051", None, True)
    assert "INSECURE" in caplog.text and "0.0.0.0:50051" in caplog.text


def test_certified_names_read_the_cn_and_device_uris_of_a_verified_peer() -> None:
    peer = {
        "transport_security_type": [b"ssl"],
        "x509_pem_cert": [b"-----BEGIN CERTIFICATE-----..."],
        "x509_common_name": [b"phone-a"],
        "peer_uri": [b"pocketlora-device:phone-a", b"pocketlora-device:phone-a2", b"spiffe://x/y"],
        "peer_dns": [b"pocketlora-device.example.com"],
    }
    assert certified_names(peer) == ("phone-a", "phone-a2")
    assert certified_names({"transport_security_type": [b"ssl"]}) is None  # TLS without a client certificate
    assert certified_names({"transport_security_type": [b"insecure"]}) is None
    assert certified_names({}) is None
    no_names = {"transport_security_type": [b"ssl"], "x509_pem_cert": [b"pem"]}
    assert certified_names(no_names) == ()


def test_failure_sentences_point_at_the_flag_to_fix() -> None:
    with_ca = TlsConfig(ca=b"pem")
    verify = "failed to connect to all addresses; last error: UNKNOWN: Tls handshake failed: CERTIFICATE_VERIFY_FAILED"
    assert "--tls-ca" in (describe_failure(verify, with_ca) or "")
    assert "does not speak TLS" in (describe_failure("SSL_ERROR_SSL: WRONG_VERSION_NUMBER", with_ca) or "")
    closed = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Socket closed"
    assert "may serve TLS only" in (describe_failure(closed, None) or "")
    assert "--tls-cert" in (describe_failure(closed, with_ca) or "")
    assert describe_failure("failed to connect to all addresses; Connection refused", None) is None


def test_the_make_tls_script_makes_what_a_mutual_tls_deployment_needs(tmp_path: Path) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", root / "scripts/make_tls.sh", tmp_path, "orchestrator", "edge-box-1"], check=True)
    assert (tmp_path / "edge-box-1.key").stat().st_mode & 0o077 == 0
    tls = load_server_tls(tmp_path / "server.crt", tmp_path / "server.key", tmp_path / "ca.crt")
    device_tls = load_tls(ca=tmp_path / "ca.crt", cert=tmp_path / "edge-box-1.crt", key=tmp_path / "edge-box-1.key")
    with ServerThread(tmp_path / "orch", tls=tls, client_tls=device_tls) as srv:
        reply = srv.agent.Enroll(apb.EnrollRequest(device_id="edge-box-1"), metadata=op_md(ENROLL_TOKEN))
        srv.agent.Heartbeat(apb.HeartbeatRequest(eligible=True), metadata=dev_md("edge-box-1", reply.device_credential))
        with pytest.raises(grpc.RpcError) as info:
            srv.agent.Enroll(apb.EnrollRequest(device_id="edge-box-2"), metadata=op_md(ENROLL_TOKEN))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
