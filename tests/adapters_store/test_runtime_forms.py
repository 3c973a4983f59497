"""Runtime bundle format and .onnx_adapter conversion: what is accepted, what is refused and why."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from adapters_store.errors import AdapterFormatError, IncompatibleForm
from adapters_store.onnx_adapter import check_form, convert_adapter, form_tensors, read_tensors
from adapters_store.runtime_bundle import (
    BundleManifest,
    BundleRef,
    BundleSettings,
    adapter_form_key,
    adapter_form_manifest_key,
    bundle_key,
    bundle_link_key,
    pack_bundle,
    read_bundle_manifest,
    unpack_bundle,
)
from tests.support.onnx_models import TinyBundle, make_lora, pack_lora


def _params(path: Path) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    return {k: v.numpy() for k, v in ort.AdapterFormat.read_adapter(str(path)).get_parameters().items()}


def test_settings_validate_and_identify(tiny_bundle: TinyBundle) -> None:
    with pytest.raises(AdapterFormatError, match="'precision'"):
        BundleSettings(precision="int3")
    with pytest.raises(AdapterFormatError, match="'max_rank'"):
        BundleSettings(max_rank=0)
    a = BundleSettings(targets=("q_proj", "v_proj"))
    assert a.settings_id() == BundleSettings(targets=("v_proj", "q_proj")).settings_id()
    assert a.settings_id() != BundleSettings(precision="fp32", targets=("q_proj", "v_proj")).settings_id()
    fingerprint = read_bundle_manifest(tiny_bundle.bundle).base_fingerprint
    assert bundle_link_key(fingerprint, a).startswith("runtimes/onnx/bases/")
    assert bundle_key("ab" * 32) == f"runtimes/onnx/sha256/{'ab' * 32}.tar"
    assert (
        adapter_form_manifest_key("cd" * 32, "ab" * 32)
        == adapter_form_key("cd" * 32, "ab" * 32)[: -len(".onnx_adapter")] + ".json"
    )


def test_manifest_round_trips_and_names_bad_fields(tiny_bundle: TinyBundle) -> None:
    manifest = read_bundle_manifest(tiny_bundle.bundle)
    assert BundleManifest.from_json(manifest.to_json()) == manifest
    assert manifest.settings.targets == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert len(manifest.modules()) == 2 * 4  # two layers, four projections
    bad = json.loads(manifest.to_json())
    bad["lora_inputs"][0]["part"] = "C"
    with pytest.raises(AdapterFormatError, match="'lora_inputs'"):
        BundleManifest.from_dict(bad)
    del bad["settings"]
    with pytest.raises(AdapterFormatError, match="incomplete"):
        BundleManifest.from_dict(bad)
    ref = BundleRef(sha256="ab" * 32, size=10, key=bundle_key("ab" * 32), manifest=manifest)
    assert BundleRef.from_json(ref.to_json()) == ref


def test_pack_is_deterministic_and_unpack_round_trips(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    first = pack_bundle(tiny_bundle.bundle, tmp_path / "a.tar")
    second = pack_bundle(tiny_bundle.bundle, tmp_path / "b.tar")
    assert first == second  # same files, same content address
    manifest = unpack_bundle(tmp_path / "a.tar", tmp_path / "out")
    assert manifest == read_bundle_manifest(tiny_bundle.bundle)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in tiny_bundle.bundle.iterdir())
    assert not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.parametrize("name", ["../evil", "sub/file", ".hidden"])
def test_unpack_refuses_entries_that_escape_or_hide(tmp_path: Path, name: str) -> None:
    tar = tmp_path / "bad.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo(name)
        info.size = 2
        t.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(AdapterFormatError, match="refusing bundle entry"):
        unpack_bundle(tar, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "evil").exists()


def test_unpack_refuses_links_and_non_bundles(tmp_path: Path) -> None:
    tar = tmp_path / "link.tar"
    with tarfile.open(tar, "w") as t:
        info = tarfile.TarInfo("genai_config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(info)
    with pytest.raises(AdapterFormatError, match="refusing"):
        unpack_bundle(tar, tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    with pytest.raises(AdapterFormatError):
        unpack_bundle(tmp_path / "junk.tar", tmp_path / "out")


def test_conversion_transposes_and_folds_the_scaling(tiny_bundle: TinyBundle) -> None:
    manifest = read_bundle_manifest(tiny_bundle.bundle)
    peft = load_file(tiny_bundle.peft["alpha"] / "adapter_model.safetensors")
    params = _params(tiny_bundle.forms["alpha"] / "adapter.onnx_adapter")
    assert set(params) == {inp.name for inp in manifest.lora_inputs}
    scaling = 16 / 8
    for module, parts in manifest.modules().items():
        a, b = peft[f"base_model.model.{module}.lora_A.weight"], peft[f"base_model.model.{module}.lora_B.weight"]
        np.testing.assert_array_equal(params[parts["A"].name], a.T)
        np.testing.assert_allclose(params[parts["B"].name], (b * scaling).T, rtol=1e-6)
    # Same input, same output: the form can always be rebuilt from the safetensors blob.
    assert check_form({k: v.shape for k, v in params.items()}, manifest) == 8


def test_rslora_scaling_and_half_precision_tensors(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    manifest = read_bundle_manifest(tiny_bundle.bundle)
    peft = read_tensors(tiny_bundle.peft["beta"] / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": True}
    _, rank, scaling, filled = form_tensors(config, peft, manifest)
    assert (rank, filled) == (8, 0) and scaling == pytest.approx(16 / np.sqrt(8))
    # bfloat16 and float16 weights are read without torch, to the same values torch holds.
    values = torch.tensor([[1.5, -2.25, 3.0e-3], [65504.0, -0.0, 1e-8]])
    save_file({"bf": values.to(torch.bfloat16), "hf": values.to(torch.float16)}, str(tmp_path / "t.safetensors"))
    got = read_tensors(tmp_path / "t.safetensors")
    np.testing.assert_array_equal(got["bf"], values.to(torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(got["hf"], values.to(torch.float16).float().numpy())


def test_an_adapter_on_fewer_modules_gets_zeros_of_its_rank(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    manifest = read_bundle_manifest(tiny_bundle.bundle)
    qv = make_lora(tiny_bundle.base, tmp_path / "qv", seed=9, rank=4, alpha=8, targets=("q_proj", "v_proj"))
    blob = tmp_path / "qv.safetensors"
    pack_lora(qv, tiny_bundle.base, blob, rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
    info = convert_adapter(blob, manifest, tmp_path / "qv.onnx_adapter")
    assert (info.rank, info.modules, info.zero_filled) == (4, 4, 4)
    params = _params(tmp_path / "qv.onnx_adapter")
    k_inputs = [i for i in manifest.lora_inputs if ".k_proj" in i.module]
    assert all(params[i.name].shape == i.shape(4) and not params[i.name].any() for i in k_inputs)


def test_refusals_say_why(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    manifest = read_bundle_manifest(tiny_bundle.bundle)
    # Another base.
    other = tmp_path / "other.safetensors"
    pack_lora(tiny_bundle.peft["alpha"], tiny_bundle.base, other, base_fingerprint="sha256:" + "ef" * 32)
    with pytest.raises(IncompatibleForm, match="trained on base sha256:efef"):
        convert_adapter(other, manifest, tmp_path / "x")
    # A module the bundle has no input for.
    mlp = make_lora(tiny_bundle.base, tmp_path / "mlp", seed=4, targets=("q_proj", "gate_proj"))
    peft = read_tensors(mlp / "adapter_model.safetensors")
    with pytest.raises(IncompatibleForm, match=r"no LoRA input for \['model.layers.0.mlp.gate_proj'"):
        form_tensors({"r": 8, "lora_alpha": 16}, peft, manifest)
    ok = read_tensors(tiny_bundle.peft["alpha"] / "adapter_model.safetensors")
    cases = [
        ({"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}, "one rank"),
        ({"r": 128, "lora_alpha": 16}, "above the bundle's max_rank 64"),
        ({"r": 8, "lora_alpha": 16, "use_dora": True}, "use_dora"),
        ({"r": 8, "lora_alpha": 16, "modules_to_save": ["lm_head"]}, "whole modules"),
        ({"r": 8, "lora_alpha": 16, "peft_type": "IA3"}, "only LORA"),
        ({"r": 4, "lora_alpha": 16}, "do not fit rank 4"),
    ]
    for config, why in cases:
        with pytest.raises(IncompatibleForm, match=why):
            form_tensors(config, ok, manifest)
    half = {k: v for k, v in ok.items() if "layers.0.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(IncompatibleForm, match="without its pair"):
        form_tensors({"r": 8, "lora_alpha": 16}, half, manifest)


def test_check_form_refuses_what_a_device_must_not_load(tiny_bundle: TinyBundle) -> None:
    manifest = read_bundle_manifest(tiny_bundle.bundle)
    shapes = {k: v.shape for k, v in _params(tiny_bundle.forms["alpha"] / "adapter.onnx_adapter").items()}
    first = manifest.lora_inputs[0]
    with pytest.raises(IncompatibleForm, match="lacks 1 LoRA inputs"):
        check_form({k: v for k, v in shapes.items() if k != first.name}, manifest)
    with pytest.raises(IncompatibleForm, match="not LoRA inputs"):
        check_form({**shapes, "model.embed_tokens.weight": (512, 64)}, manifest)
    mixed = dict(shapes)
    mixed[first.name] = first.shape(4)
    with pytest.raises(IncompatibleForm, match="disagree on the rank"):
        check_form(mixed, manifest)
