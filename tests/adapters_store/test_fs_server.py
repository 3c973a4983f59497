"""The file store's embedded presigned-URL server: limits, refusals, quiet logs."""

from __future__ import annotations

import logging
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters_store import FileBlobStore, TransferError, upload_to_url


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[FileBlobStore]:
    store = FileBlobStore(tmp_path / "root", url_secret=secrets.token_bytes(32), max_upload_bytes=1024)
    try:
        yield store
    finally:
        store.close()


def _status(method: str, url: str, data: bytes | None = None) -> int:
    request = urllib.request.Request(url, data=data, method=method)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_server_is_loopback_only(fs: FileBlobStore) -> None:
    assert fs.url_base.startswith("http://127.0.0.1:")


def test_upload_over_limit_is_413(fs: FileBlobStore, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 4096)
    key = "uploads/j/0/adapter.safetensors"

    with pytest.raises(TransferError) as err:
        upload_to_url(fs.presign_put(key, 60), tmp_path / "big")

    assert err.value.status == 413
    assert fs.stat(key) is None
    assert list((fs.root / "tmp").iterdir()) == []


def test_other_refusals(fs: FileBlobStore) -> None:
    put = fs.presign_put("k/1", 60)
    base, query = put.split("?", 1)
    forged = put[:-4] + ("0000" if not put.endswith("0000") else "1111")

    assert _status("PUT", forged, b"x") == 403
    assert _status("PUT", f"{fs.url_base}/k/../k/1?{query}", b"x") == 403
    assert _status("PUT", f"{fs.url_base}/k%2F1?{query}", b"x") == 403
    assert _status("PUT", base, b"x") == 403  # no query at all
    assert _status("PUT", f"{put}&method=PUT", b"x") == 403  # duplicated parameter
    assert _status("DELETE", put) == 403
    assert _status("HEAD", fs.presign_get("k/1", 60)) == 403
    assert _status("GET", fs.presign_get("k/absent", 60)) == 404
    assert _status("PUT", put, b"ok") == 200
    assert fs.hash_object("k/1").size == 2


def test_query_strings_never_logged(
    fs: FileBlobStore, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    url = fs.presign_get("k/1", 60)
    sig = url.rsplit("sig=", 1)[1]

    _status("GET", url)
    _status("GET", url[:-2] + "00")

    out, err = capfd.readouterr()
    assert sig not in caplog.text + out + err
    assert sig[:-2] not in caplog.text + out + err


def test_close_stops_server(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path, url_secret=secrets.token_bytes(32))
    url = store.presign_get("k/1", 60)

    store.close()

    with pytest.raises(urllib.error.URLError):
        urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=2)


def test_store_package_stays_torch_free() -> None:
    code = (
        "import sys, adapters_store; "
        "heavy = {'torch', 'transformers', 'peft', 'safetensors', 'numpy'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
