"""Bytes from someone else: malformed, oversized or deeply nested headers and manifests are
format errors (a verdict on the data), never a crash; uploads and downloads are capped."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from adapters_store import (
    AdapterFormatError,
    BlobStore,
    FileBlobStore,
    IntegrityError,
    TransferError,
    download_from_url,
    ensure_safetensors,
    pack_adapter,
    read_blob_manifest,
    upload_key,
    upload_to_url,
    verify_and_promote,
)
from adapters_store.blob import META_MANIFEST
from adapters_store.limits import JsonLimitError, json_depth, load_json
from tests.adapters_store.conftest import make_manifest, write_fake_adapter


def _safetensors(path: Path, header: bytes, data: bytes = b"") -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def _blob_with_metadata(tmp_path: Path, **meta: str) -> Path:
    """A packed blob whose __metadata__ entries are replaced (tensors left intact)."""
    blob = tmp_path / "blob.safetensors"
    pack_adapter(write_fake_adapter(tmp_path / "adapter"), make_manifest(), blob)
    raw = blob.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"].update(meta)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return _safetensors(blob, encoded, raw[8 + n :])


NESTED = b"[" * 50_000 + b"]" * 50_000


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(NESTED, id="nested-array"),
        pytest.param(b'{"a":' * 20_000 + b"1" + b"}" * 20_000, id="nested-object"),
        pytest.param(b'{"x": ' + b"[" * 40 + b"]" * 40 + b"}", id="deeper-than-allowed"),
        pytest.param(b'{"x": ' + b"9" * 5000 + b"}", id="integer-too-long"),
        pytest.param(b'{"x": "\xff\xfe"}', id="not-utf8"),
        pytest.param(b"[1, 2]", id="not-an-object"),
    ],
)
def test_malformed_safetensors_headers_are_format_errors(tmp_path: Path, header: bytes) -> None:
    path = _safetensors(tmp_path / "adapter.safetensors", header)

    with pytest.raises(AdapterFormatError) as err:
        ensure_safetensors(path)

    assert str(tmp_path) not in str(err.value)  # the message names the file, not where it lives


def test_an_oversized_adapter_header_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(struct.pack("<Q", 64 * 2**20) + b"{}")

    with pytest.raises(AdapterFormatError, match="header length"):
        read_blob_manifest(path)


@pytest.mark.parametrize(
    "manifest",
    [
        pytest.param("[" * 50_000 + "]" * 50_000, id="nested"),
        pytest.param(json.dumps({"junk": "x" * (5 * 2**20)}), id="oversized"),
        pytest.param("{not json", id="malformed"),
        pytest.param(json.dumps({**make_manifest().to_dict(), "alpha": 10**400}), id="alpha-overflows-float"),
    ],
)
def test_malformed_manifests_are_format_errors(tmp_path: Path, manifest: str) -> None:
    blob = _blob_with_metadata(tmp_path, **{META_MANIFEST: manifest})

    with pytest.raises(AdapterFormatError):
        read_blob_manifest(blob)


def test_modest_nesting_in_a_manifest_is_fine(tmp_path: Path) -> None:
    metrics = {"a": [[[[[[[[1]]]]]]]]}
    blob = _blob_with_metadata(
        tmp_path, **{META_MANIFEST: json.dumps({**make_manifest().to_dict(), "metrics": metrics})}
    )

    assert read_blob_manifest(blob).metrics == metrics


def test_a_nested_header_upload_is_a_format_error_in_verification(store: BlobStore, tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "nested", NESTED + b" " * (-len(NESTED) % 8))
    key = upload_key("job-1", 0)
    store.put_file(key, path)
    size = path.stat().st_size

    with pytest.raises(AdapterFormatError):
        verify_and_promote(store, key, _sha(path), size)

    assert store.list_keys("blobs/") == []


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_load_json_bounds() -> None:
    assert load_json(b'{"a": [1, {"b": 2}]}', "x", max_bytes=100) == {"a": [1, {"b": 2}]}
    assert json_depth({"a": [1, {"b": 2}]}) == 3 and json_depth(5) == 0 and json_depth([]) == 1
    for raw, why in ((b"x" * 101, "above the limit"), (b"[[[1]]]", "more than 2 levels"), (b"{", "not valid JSON")):
        with pytest.raises(JsonLimitError, match=why):
            load_json(raw, "x", max_bytes=100, max_depth=2)


# ---------------------------------------------------------------------------------- size caps


def _file(tmp_path: Path, name: str, size: int) -> Path:
    path = tmp_path / name
    path.write_bytes(b"a" * size)
    return path


def test_upload_targets_cap_the_size_and_pin_the_key(store: BlobStore, tmp_path: Path) -> None:
    key, other = upload_key("job-1", 1), upload_key("job-2", 1)
    target = store.presign_upload(key, 60, 1000)

    upload_to_url(target.url, _file(tmp_path, "ok", 1000), fields=target.fields)
    with pytest.raises(TransferError) as too_big:
        upload_to_url(target.url, _file(tmp_path, "big", 1001), fields=target.fields)
    with pytest.raises(TransferError) as elsewhere:
        _upload_elsewhere(store, target.url, dict(target.fields), key, other, _file(tmp_path, "x", 10))

    assert store.stat(key) == 1000
    assert store.stat(other) is None
    assert too_big.value.status in (400, 413)  # S3: EntityTooLarge; the file store: 413
    assert elsewhere.value.status == 403


def _upload_elsewhere(store: BlobStore, url: str, fields: dict[str, Any], key: str, other: str, path: Path) -> None:
    if fields:  # a POST policy: claim another key in the form
        upload_to_url(url, path, fields={**fields, "key": other})
    else:  # a PUT URL: point it at another key
        upload_to_url(url.replace(key, other, 1), path)


def test_the_file_store_limit_is_signed(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path / "fs", url_secret=b"k" * 32)
    try:
        target = store.presign_upload("k/1", 60, 10)
        raised = target.url.replace("max=10", "max=99999")
        with pytest.raises(TransferError) as err:
            upload_to_url(raised, _file(tmp_path, "big", 100))
        assert err.value.status == 403
    finally:
        store.close()


def test_downloads_are_capped_whatever_is_announced(store: BlobStore, tmp_path: Path) -> None:
    store.put_file("k/1", _file(tmp_path, "in", 5000))
    url = store.presign_get("k/1", 60)

    with pytest.raises(IntegrityError) as announced:
        download_from_url(url, tmp_path / "a", expected_size=5000, max_bytes=4999)
    with pytest.raises(IntegrityError) as unannounced:
        download_from_url(url, tmp_path / "b", max_bytes=4999)
    got = download_from_url(url, tmp_path / "c", max_bytes=5000)

    assert announced.value.reason == unannounced.value.reason == "too_large"
    assert got.size == 5000
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
