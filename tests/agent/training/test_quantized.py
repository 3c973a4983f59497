"""The streamed NF4 copy: bit-identical to quantizing on the fly, cached, refreshed, fallbacks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from safetensors import safe_open  # noqa: E402

from agent.training import quantized as q  # noqa: E402
from agent.training.model import disable_bnb_cpu_repack, load_for_training  # noqa: E402
from agent.training.spec import TrainingSpec  # noqa: E402


def _on_the_fly(base: Path) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, quantization_config=q.bnb_config(True, torch.float32)
    )
    disable_bnb_cpu_repack(model)
    return model


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_copy_loads_bit_identical_to_quantizing_on_the_fly(
    arch: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    base = request.getfixturevalue(f"tiny_{arch}")
    q.write_nf4_copy(base, tmp_path / "copy", double_quant=True, compute_dtype=torch.float32)
    copy, info = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32, output_loading_info=True)
    disable_bnb_cpu_repack(copy)
    reference = _on_the_fly(base)

    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    a, b = copy.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(copy(input_ids=ids).logits, reference(input_ids=ids).logits)
    # The file has the layout transformers' own save_pretrained gives the quantized model.
    reference.save_pretrained(tmp_path / "saved")
    with (
        safe_open(tmp_path / "copy" / "model.safetensors", "pt") as mine,
        safe_open(tmp_path / "saved" / "model.safetensors", "pt") as theirs,
    ):
        assert set(mine.keys()) == set(theirs.keys())
    # Safetensors and JSON only: nothing that would need unpickling.
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def _base_copy(tiny_llama: Path, tmp_path: Path) -> Path:
    base = tmp_path / "base"
    shutil.copytree(tiny_llama, base, ignore=shutil.ignore_patterns(".pocketlora"))
    return base


def test_copy_is_cached_and_rewritten_when_the_source_changes(tiny_llama: Path, tmp_path: Path) -> None:
    base = _base_copy(tiny_llama, tmp_path)
    kw: dict[str, Any] = {"double_quant": True, "compute_dtype": torch.float32}

    first = q.ensure_nf4_copy(base, **kw)
    written = (first / "model.safetensors").stat().st_mtime_ns
    again = q.ensure_nf4_copy(base, **kw)
    assert again == first == base / ".pocketlora" / "nf4-dq-float32"
    assert (again / "model.safetensors").stat().st_mtime_ns == written
    assert (first / q.MARKER).is_file()

    # Other variants live side by side.
    assert q.ensure_nf4_copy(base, double_quant=False, compute_dtype=torch.float32).name == ("nf4-float32")

    st = (base / "model.safetensors").stat()
    os.utime(base / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    refreshed = q.ensure_nf4_copy(base, **kw)
    assert (refreshed / "model.safetensors").stat().st_mtime_ns != written
    assert not list(refreshed.parent.glob(".*.tmp-*"))


def test_read_only_base_uses_the_fallback_folder_or_quantizes_while_loading(tiny_llama: Path, tmp_path: Path) -> None:
    base = _base_copy(tiny_llama, tmp_path)
    (base / ".pocketlora").write_text("not a folder")  # the base folder cannot take the copy
    kw: dict[str, Any] = {"double_quant": True, "compute_dtype": torch.float32}

    with pytest.raises(q.QuantizedCopyUnsupported, match="cannot write an NF4 copy"):
        q.ensure_nf4_copy(base, **kw)
    assert q.ensure_nf4_copy(base, fallback_dir=tmp_path / "cache", **kw) == (tmp_path / "cache" / "nf4-dq-float32")

    spec = TrainingSpec(base_model_dir=str(base), dataset_path=str(tmp_path / "d.jsonl"), output_dir="out")
    loaded = load_for_training(spec, checkpointing=False)
    assert loaded.quantized
    assert any("quantized while loading" in n for n in loaded.notes)


def test_checkpoint_with_renamed_keys_is_left_to_transformers(tiny_llama: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    base = _base_copy(tiny_llama, tmp_path)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})

    with pytest.raises(q.QuantizedCopyUnsupported, match="unexpected tensor"):
        q.write_nf4_copy(base, tmp_path / "copy", double_quant=True, compute_dtype=torch.float32)
