"""Model loading: the bitsandbytes repack trap, default targets, NF4 fallback, and learning."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from agent.training import model as model_mod  # noqa: E402
from agent.training.errors import Unsupported4Bit  # noqa: E402
from agent.training.job import run_job  # noqa: E402
from agent.training.runner import write_spec  # noqa: E402
from agent.training.spec import TrainingSpec  # noqa: E402


def _spec(base: Path, tmp_path: Path, **kw: Any) -> TrainingSpec:
    return TrainingSpec(
        base_model_dir=str(base),
        dataset_path=str(tmp_path / "d.jsonl"),
        output_dir=str(tmp_path / "out"),
        **kw,
    )


def _eval_then_backward(model: Any) -> list[Any]:
    """Run a no-grad eval forward (what generate() does), then a training backward."""
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    # lora_B starts at zero, so only B's gradients are non-zero on the first backward.
    return [p.grad for n, p in model.named_parameters() if "lora_B" in n]


def test_lora_gets_gradients_after_an_eval_pass_of_the_nf4_model(tiny_llama: Path, tmp_path: Path) -> None:
    import bitsandbytes as bnb

    loaded = model_mod.load_for_training(_spec(tiny_llama, tmp_path), checkpointing=False)
    linears = [m for m in loaded.model.modules() if isinstance(m, bnb.nn.Linear4bit)]

    grads = _eval_then_backward(loaded.model)

    assert loaded.quantized and linears
    assert all(m.support_avx512bf16_for_cpu is False for m in linears)
    assert grads and all(g is not None and float(g.abs().sum()) > 0 for g in grads)


def test_the_trap_reproduces_without_the_guard(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bitsandbytes.functional import has_avx512bf16

    # bitsandbytes takes the repacking fast path only where its native library reports
    # AVX512-BF16; elsewhere (e.g. CPUs without AVX-512) there is no trap to reproduce.
    if not has_avx512bf16():
        pytest.skip("this CPU has no AVX512-BF16 repack path: the trap does not reproduce here")
    monkeypatch.setattr(model_mod, "disable_bnb_cpu_repack", lambda model: 0)
    loaded = model_mod.load_for_training(_spec(tiny_llama, tmp_path), checkpointing=False)

    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        grads = _eval_then_backward(loaded.model)

    # What the guard prevents: gradients silently missing or zero, so the loss stays flat.
    assert any(g is None or float(g.abs().sum()) == 0 for g in grads)


def test_fallback_to_fp32_when_bitsandbytes_is_missing(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes.functional", None)

    loaded = model_mod.load_for_training(_spec(tiny_llama, tmp_path), checkpointing=True)

    assert not loaded.quantized
    assert any("NF4 unavailable" in n for n in loaded.notes)
    with pytest.raises(Unsupported4Bit, match="bitsandbytes unavailable"):
        model_mod.decide_quantization(_spec(tiny_llama, tmp_path, on_4bit_unsupported="fail"))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "targets"), [("llama", ["q_proj", "k_proj", "v_proj", "o_proj"]), ("gpt2", ["c_attn"])]
)
@pytest.mark.parametrize("quantization", ["nf4", "none"])
def test_tiny_models_learn_a_memorisable_dataset(
    arch: str,
    targets: list[str],
    quantization: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    memorise_data: Path,
) -> None:
    import json

    base = request.getfixturevalue(f"sharp_{arch}")
    spec = TrainingSpec(
        base_model_dir=str(base),
        dataset_path=str(memorise_data),
        output_dir=str(tmp_path / "adapter"),
        quantization=quantization,
        learning_rate=1e-2,
        effective_batch=4,
        epochs=15,
        dropout=0.0,
        checkpoint_every_steps=0,
        checkpoint_every_s=0,
    )
    write_spec(tmp_path / "job", spec)
    events: list[dict[str, Any]] = []

    assert run_job(tmp_path / "job", emit=events.append, should_pause=lambda: False) == "done"

    losses = [e["loss"] for e in events if e["event"] == "progress"]
    manifest = json.loads((tmp_path / "adapter" / "training_manifest.json").read_text())
    assert manifest["target_modules"] == targets
    assert manifest["quantization"] == quantization
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 < 0.3 * sum(losses[:3]) / 3
