"""open_store URL parsing, and the S3 backend's handling of credentials."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import (
    FileBlobStore,
    S3BlobStore,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    open_store,
)
from tests.adapters_store.conftest import new_bucket
from tests.support.seaweed import SeaweedServer


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host/x", "unknown scheme 'ftp'"),
        ("/just/a/path", "unknown scheme '(none)'"),
        ("file://relative/path", "absolute path"),
        ("file:///abs?port=1", "no query parameters"),
        ("s3://", "needs a bucket"),
        ("s3://Bad_Bucket?endpoint=h:1", "bad S3 bucket name"),
        ("s3://bucket", "needs an endpoint"),
        ("s3://bucket?endpoint=", "needs an endpoint"),
        ("s3://bucket?endpoint=h:1&colour=blue", "unknown S3 parameter(s) colour"),
        ("s3://bucket?endpoint=h:1&secure=maybe", "secure must be true or false"),
        ("s3://bucket/some/path?endpoint=h:1", "takes no path"),
        ("s3://bucket?endpoint=h:1&ca=ca.pem", "ca must be an absolute path"),
        ("s3://bucket?endpoint=h:1&ca=/etc/ca.pem&secure=false", "ca applies to https only"),
        ("s3://bucket?endpoint=h:1&ca=/nonexistent/ca.pem", "S3 CA file /nonexistent/ca.pem: no such file"),
        ("s3://bucket?endpoint=h:1&ca=/dev/null", "S3 CA file /dev/null: not a usable PEM CA certificate"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    env = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}

    with pytest.raises(StoreConfigError) as err:
        open_store(url, env=env)

    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_credentials_named() -> None:
    with pytest.raises(StoreConfigError, match="AWS_SECRET_ACCESS_KEY") as err:
        open_store("s3://bucket?endpoint=127.0.0.1:9", env={"AWS_ACCESS_KEY_ID": "a"})
    assert "AWS_ACCESS_KEY_ID," not in str(err.value)


def test_file_url(tmp_path: Path) -> None:
    env = {"POCKETLORA_URL_SECRET": "ab" * 32}

    store = open_store(f"file://{tmp_path}/store", env=env)

    assert isinstance(store, FileBlobStore)
    assert store.root == (tmp_path / "store").resolve()
    with pytest.raises(StoreConfigError, match="POCKETLORA_URL_SECRET must be hex"):
        open_store(f"file://{tmp_path}", env={"POCKETLORA_URL_SECRET": "zz"})


def test_file_stores_of_one_process_share_the_default_secret(tmp_path: Path) -> None:
    # Without POCKETLORA_URL_SECRET, a URL issued by one store object verifies in another.
    first = open_store(f"file://{tmp_path}", env={})
    second = open_store(f"file://{tmp_path}", env={})
    url = first.presign_get("k/1", 60)
    assert isinstance(second, FileBlobStore)
    try:
        query = url.split("?", 1)[1]
        assert second.authorise("GET", "k/1", query)
    finally:
        first.close()


@pytest.mark.s3
def test_s3_url_with_fallback_credentials(seaweed: SeaweedServer, tmp_path: Path) -> None:
    env = {
        "POCKETLORA_S3_ACCESS_KEY": seaweed.access_key,
        "POCKETLORA_S3_SECRET_KEY": seaweed.secret_key,
    }
    (tmp_path / "f").write_bytes(b"x")

    store = open_store(f"s3://{new_bucket()}?endpoint={seaweed.endpoint}&region=us-east-1", env=env)

    assert isinstance(store, S3BlobStore)
    store.put_file("k/1", tmp_path / "f")
    assert store.stat("k/1") == 1
    assert seaweed.secret_key not in repr(store)
    assert seaweed.access_key not in repr(store)
    store.close()


@pytest.mark.s3
def test_s3_wrong_credentials_refused(seaweed: SeaweedServer) -> None:
    wrong_secret = "not-the-secret-" + seaweed.secret_key[:5]

    with pytest.raises(StoreError) as bad_secret:
        S3BlobStore(new_bucket(), seaweed.endpoint, seaweed.access_key, wrong_secret)
    with pytest.raises(StoreError) as bad_key:
        S3BlobStore(new_bucket(), seaweed.endpoint, "NOSUCHKEY", seaweed.secret_key)

    # A HEAD error has no body, so the SDK may only know "AccessDenied" for a missing bucket.
    for err in (bad_secret, bad_key):
        assert any(c in str(err.value) for c in ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId"))
        assert "refused" in str(err.value)
        assert wrong_secret not in str(err.value) and seaweed.secret_key not in str(err.value)


@pytest.mark.s3
def test_s3_wrong_credentials_on_existing_bucket(seaweed: SeaweedServer, tmp_path: Path) -> None:
    bucket = new_bucket()
    good = S3BlobStore(bucket, seaweed.endpoint, seaweed.access_key, seaweed.secret_key)
    (tmp_path / "f").write_bytes(b"x")
    good.put_file("k/1", tmp_path / "f")
    good.close()

    with pytest.raises(StoreError, match=r"refused opening bucket.*(AccessDenied|SignatureDoesNotMatch)"):
        S3BlobStore(bucket, seaweed.endpoint, seaweed.access_key, "wrong-secret-value")


def test_s3_unreachable_endpoint_fails_fast() -> None:
    with pytest.raises(StoreError, match="unreachable"):
        # Port 9 (discard) on loopback: nothing listens, the connection is refused at once.
        S3BlobStore("bucket", "127.0.0.1:9", "ak", "sk")


def test_a_store_that_must_exist_but_is_not_there_is_an_outage(tmp_path: Path) -> None:
    """A verification task opens the store with create=False: an unmounted file store root must
    not be replaced by an empty one that answers "missing" for every upload."""
    with pytest.raises(StoreUnavailable, match="not there"):
        open_store(f"file://{tmp_path}/unmounted", env={}, create=False)
    assert not (tmp_path / "unmounted").exists()
    open_store(f"file://{tmp_path}/store", env={}).close()
    open_store(f"file://{tmp_path}/store", env={}, create=False).close()
    with pytest.raises(StoreUnavailable):
        S3BlobStore("bucket", "127.0.0.1:9", "ak", "sk")  # nobody answers: an outage too


@pytest.mark.s3
def test_a_bucket_that_must_exist_but_is_not_there_is_an_outage(seaweed: SeaweedServer) -> None:
    bucket = new_bucket()
    with pytest.raises(StoreUnavailable, match="not there"):
        S3BlobStore(bucket, seaweed.endpoint, seaweed.access_key, seaweed.secret_key, create=False)
    S3BlobStore(bucket, seaweed.endpoint, seaweed.access_key, seaweed.secret_key).close()
    S3BlobStore(bucket, seaweed.endpoint, seaweed.access_key, seaweed.secret_key, create=False).close()
