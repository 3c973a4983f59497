"""One contract suite, run against every BlobStore backend (fs and s3)."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from adapters_store import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    InvalidKey,
    TransferError,
    blob_key,
    collect_garbage,
    download_from_url,
    upload_key,
    upload_to_url,
)
from adapters_store.errors import IntegrityError


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _signature(url: str) -> str:
    query = parse_qs(urlsplit(url).query)
    (sig,) = query.get("sig") or query["X-Amz-Signature"]
    return sig


def _info(data: bytes) -> BlobInfo:
    return BlobInfo(sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_put_get_stat_hash(store: BlobStore, tmp_path: Path) -> None:
    data = b"adapter bytes " * 1000
    key = upload_key("job-1", 0)

    assert store.put_file(key, _file(tmp_path, "in", data)) == _info(data)

    assert store.stat(key) == len(data)
    assert store.hash_object(key) == _info(data)
    assert store.get_file(key, tmp_path / "out") == _info(data)
    assert (tmp_path / "out").read_bytes() == data
    modified = store.last_modified(key)
    assert modified is not None and abs(modified - time.time()) < 120


def test_put_replaces_whole_object(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("a/b", _file(tmp_path, "1", b"first version, longer"))

    store.put_file("a/b", _file(tmp_path, "2", b"second"))

    assert store.hash_object("a/b") == _info(b"second")


def test_missing_key(store: BlobStore, tmp_path: Path) -> None:
    assert store.stat("nope/x") is None
    assert store.last_modified("nope/x") is None
    with pytest.raises(BlobNotFound, match="nope/x"):
        store.hash_object("nope/x")
    with pytest.raises(BlobNotFound):
        store.get_file("nope/x", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.part-*"))
    with pytest.raises(BlobNotFound, match="nope/x"):
        store.copy("nope/x", "other/y")
    store.delete("nope/x")  # idempotent


def test_copy_delete_list(store: BlobStore, tmp_path: Path) -> None:
    src = _file(tmp_path, "in", b"payload")
    store.put_file("uploads/j/0/adapter.safetensors", src)
    store.put_file("uploads/j/1/adapter.safetensors", src)

    store.copy("uploads/j/0/adapter.safetensors", "blobs/sha256/" + "0" * 64)
    store.delete("uploads/j/1/adapter.safetensors")
    store.delete("uploads/j/1/adapter.safetensors")

    assert store.list_keys("") == [
        "blobs/sha256/" + "0" * 64,
        "uploads/j/0/adapter.safetensors",
    ]
    assert store.list_keys("uploads/") == ["uploads/j/0/adapter.safetensors"]
    assert store.list_keys("blobs/sha256/00") == ["blobs/sha256/" + "0" * 64]
    assert store.list_keys("nothing/") == []
    assert store.hash_object("blobs/sha256/" + "0" * 64) == _info(b"payload")


@pytest.mark.parametrize("bad", ["", "/abs", "a/../b", "a//b", "a/./b", "sp ace", "q?x", "%2e%2e"])
def test_invalid_keys_refused(store: BlobStore, tmp_path: Path, bad: str) -> None:
    with pytest.raises(InvalidKey):
        store.put_file(bad, _file(tmp_path, "in", b"x"))
    with pytest.raises(InvalidKey):
        store.presign_get(bad, 60)


def test_presigned_round_trip(store: BlobStore, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096  # 1 MiB
    key = upload_key("job-7", 2)

    upload_to_url(store.presign_put(key, 60), _file(tmp_path, "in", data))
    got = download_from_url(store.presign_get(key, 60), tmp_path / "out", _info(data).sha256, len(data))

    assert got == _info(data)
    assert (tmp_path / "out").read_bytes() == data
    assert store.hash_object(key) == _info(data)


def test_download_integrity_mismatch_leaves_nothing(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("k/1", _file(tmp_path, "in", b"real bytes"))
    url = store.presign_get("k/1", 60)

    with pytest.raises(IntegrityError) as size_err:
        download_from_url(url, tmp_path / "out", expected_size=3)
    with pytest.raises(IntegrityError) as sha_err:
        download_from_url(url, tmp_path / "out", expected_sha256="sha256:" + "0" * 64)

    assert size_err.value.reason == "size_mismatch"
    assert sha_err.value.reason == "sha256_mismatch"
    assert [p.name for p in tmp_path.iterdir() if p.name != "store"] == ["in"]


def test_url_is_scoped_to_one_key_and_method(store: BlobStore, tmp_path: Path) -> None:
    key, other = upload_key("job-1", 0), upload_key("job-2", 0)
    original = _file(tmp_path, "in", b"original")
    evil = _file(tmp_path, "evil", b"evil")
    put_url = store.presign_put(key, 60)
    upload_to_url(put_url, original)
    get_url = store.presign_get(key, 60)

    with pytest.raises(TransferError) as tampered:
        upload_to_url(put_url.replace(key, other, 1), evil)
    with pytest.raises(TransferError) as put_as_get:
        download_from_url(put_url, tmp_path / "out")
    with pytest.raises(TransferError) as get_as_put:
        upload_to_url(get_url, evil)
    with pytest.raises(TransferError) as read_other:
        download_from_url(get_url.replace(key, other, 1), tmp_path / "out")

    signatures = {_signature(put_url), _signature(get_url)}
    for err in (tampered, put_as_get, get_as_put, read_other):
        assert err.value.status == 403
        # Neither the signature nor any other part of the query may reach an error message.
        assert not any(sig in str(err.value) for sig in signatures)
        assert "?" not in str(err.value)
    assert store.stat(other) is None
    assert store.hash_object(key) == _info(b"original")


def test_expired_urls_refused(store: BlobStore, tmp_path: Path) -> None:
    # SeaweedFS enforces X-Amz-Expires: it answers 403 AccessDenied "Request has expired".
    store.put_file("k/existing", _file(tmp_path, "in", b"data"))
    put_url = store.presign_put("k/new", 1)
    get_url = store.presign_get("k/existing", 1)

    time.sleep(2.2)

    with pytest.raises(TransferError) as put_err:
        upload_to_url(put_url, tmp_path / "in")
    with pytest.raises(TransferError) as get_err:
        download_from_url(get_url, tmp_path / "out")
    assert put_err.value.status == get_err.value.status == 403
    assert store.stat("k/new") is None


def _gc_fixture(store: BlobStore, tmp_path: Path) -> tuple[str, str, str]:
    kept, orphan = blob_key("a" * 64), blob_key("b" * 64)
    upload = upload_key("job-9", 0)
    for key in (kept, orphan, upload):
        store.put_file(key, _file(tmp_path, "in", key.encode()))
    return kept, orphan, upload


def test_gc_dry_run_lists_but_keeps(store: BlobStore, tmp_path: Path) -> None:
    kept, orphan, upload = _gc_fixture(store, tmp_path)

    fresh = collect_garbage(store, {kept})
    later = collect_garbage(store, {kept}, now=time.time() + 7200)

    assert fresh == [orphan]  # the upload is inside its grace period
    assert sorted(later) == sorted([orphan, upload])
    assert store.list_keys("") == sorted([kept, orphan, upload])


def test_gc_deletes(store: BlobStore, tmp_path: Path) -> None:
    kept, orphan, upload = _gc_fixture(store, tmp_path)

    deleted = collect_garbage(store, {kept}, dry_run=False, now=time.time() + 7200)

    assert sorted(deleted) == sorted([orphan, upload])
    assert store.list_keys("") == [kept]


def test_gc_blob_grace_spares_fresh_blobs(store: BlobStore, tmp_path: Path) -> None:
    kept, orphan, _ = _gc_fixture(store, tmp_path)

    assert collect_garbage(store, {kept}, blob_grace_s=600) == []
    assert collect_garbage(store, {kept}, blob_grace_s=600, now=time.time() + 700) == [orphan]
