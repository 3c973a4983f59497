"""The adapter blob format: byte-level packing, manifests inside, pickles refused."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from adapters_store import (
    AdapterFormatError,
    ensure_safetensors,
    pack_adapter,
    read_blob_manifest,
    read_safetensors_header,
    sha256_file,
    unpack_adapter,
)
from tests.adapters_store.conftest import make_manifest, write_fake_adapter

PICKLE_MESSAGE = "custom_adapter.bin is a pickled PyTorch file; PocketLoRA loads only safetensors adapters"


def _sections(path: Path) -> tuple[int, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8 + n :]


def test_pack_keeps_tensor_bytes_and_adds_metadata(tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "adapter")
    manifest = make_manifest()

    info = pack_adapter(adapter, manifest, tmp_path / "blob")

    header_len, data = _sections(tmp_path / "blob")
    assert header_len % 8 == 0
    assert data == _sections(adapter / "adapter_model.safetensors")[1]
    assert info.sha256 == sha256_file(tmp_path / "blob")
    assert info.size == (tmp_path / "blob").stat().st_size
    meta = read_safetensors_header(tmp_path / "blob")["__metadata__"]
    assert meta["format"] == "pt"
    assert json.loads(meta["pocketlora.adapter_config"])["r"] == 4
    assert read_blob_manifest(tmp_path / "blob") == manifest


def test_unpack_writes_peft_folder(tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "adapter")
    pack_adapter(adapter, make_manifest(), tmp_path / "blob")

    manifest = unpack_adapter(tmp_path / "blob", tmp_path / "out")

    assert manifest == make_manifest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert (tmp_path / "out/adapter_config.json").read_text() == (adapter / "adapter_config.json").read_text()
    assert json.loads((tmp_path / "out/manifest.json").read_text()) == manifest.to_dict()
    ensure_safetensors(tmp_path / "out/adapter_model.safetensors")


def test_manifest_must_agree_with_adapter_config(tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "adapter", rank=4)

    with pytest.raises(AdapterFormatError, match="'rank'"):
        pack_adapter(adapter, make_manifest(rank=8), tmp_path / "blob")
    with pytest.raises(AdapterFormatError, match="'alpha'"):
        pack_adapter(adapter, make_manifest(alpha=32.0), tmp_path / "blob")
    assert not (tmp_path / "blob").exists()


def test_plain_safetensors_is_not_a_blob(tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "adapter")

    with pytest.raises(AdapterFormatError, match="not a PocketLoRA blob"):
        read_blob_manifest(adapter / "adapter_model.safetensors")


def test_truncated_and_garbage_files_refused(tmp_path: Path) -> None:
    adapter = write_fake_adapter(tmp_path / "adapter")
    raw = (adapter / "adapter_model.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(raw[:-5])
    (tmp_path / "garbage.safetensors").write_bytes(b"not a model at all, just text")

    with pytest.raises(AdapterFormatError, match=r"short\.safetensors: tensor data is"):
        ensure_safetensors(tmp_path / "short.safetensors")
    with pytest.raises(AdapterFormatError, match=r"garbage\.safetensors is not a safetensors"):
        ensure_safetensors(tmp_path / "garbage.safetensors")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy-pickle"])
def test_pickled_adapter_refused(tmp_path: Path, zip_format: bool) -> None:
    torch = pytest.importorskip("torch")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    torch.save(
        {"lora_A": torch.zeros(4, 2)},
        adapter / "custom_adapter.bin",
        _use_new_zipfile_serialization=zip_format,
    )
    (adapter / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')

    with pytest.raises(AdapterFormatError) as direct:
        ensure_safetensors(adapter / "custom_adapter.bin")
    with pytest.raises(AdapterFormatError) as packing:
        pack_adapter(adapter, make_manifest(), tmp_path / "blob")
    with pytest.raises(AdapterFormatError) as unpacking:
        unpack_adapter(adapter / "custom_adapter.bin", tmp_path / "out")

    for err in (direct, packing, unpacking):
        assert str(err.value) == PICKLE_MESSAGE
    assert not (tmp_path / "out").exists()
