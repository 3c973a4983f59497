"""The chunked output-layer loss equals the plain loss, and so do its LoRA gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

from adapters_store import memory_plan  # noqa: E402
from agent.training import arch as arch_mod  # noqa: E402
from agent.training import loss as loss_mod  # noqa: E402
from agent.training.datasets import IGNORE_INDEX  # noqa: E402
from agent.training.model import load_for_training  # noqa: E402
from agent.training.spec import TrainingSpec  # noqa: E402


def _load(base: Path, tmp_path: Path, quantization: str, checkpointing: bool) -> Any:
    spec = TrainingSpec(
        base_model_dir=str(base),
        dataset_path=str(tmp_path / "d.jsonl"),
        output_dir=str(tmp_path / "out"),
        quantization=quantization,
        dropout=0.1,  # both paths must draw the same dropout masks
    )
    model = load_for_training(spec, checkpointing=checkpointing).model
    # lora_B starts at zero; random values give lora_A gradients too.
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.5)
    return model


def _batch() -> tuple[Any, Any, Any]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (3, 29), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0  # right padding
    shifted = torch.full_like(ids, IGNORE_INDEX)
    shifted[:, :-1] = ids[:, 1:]
    shifted[1, 19:] = IGNORE_INDEX
    shifted[0, :12] = IGNORE_INDEX  # a prompt: whole chunks without a label token
    return ids, mask, shifted


def _loss_and_grads(model: Any, chunked: bool, bf16: bool = False) -> tuple[Any, dict[str, Any]]:
    ids, mask, shifted = _batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    loss = loss_mod.causal_lm_loss_sum(model, ids, mask, shifted, bf16_autocast=bf16, chunked=chunked)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize(("quantization", "checkpointing"), [("none", False), ("nf4", True)])
def test_chunked_loss_and_gradients_equal_the_plain_ones(
    arch: str,
    quantization: str,
    checkpointing: bool,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 5 tokens per chunk over 87 tokens: many chunks, a short last one, and skipped ones.
    monkeypatch.setattr(memory_plan, "CHUNK_LOGIT_BYTES", 5 * 4 * 512)
    model = _load(request.getfixturevalue(f"tiny_{arch}"), tmp_path, quantization, checkpointing)
    assert loss_mod._split(model) is not None and arch_mod.chunk_tokens(512) == 5

    plain_loss, plain_grads = _loss_and_grads(model, chunked=False)
    chunked_loss, chunked_grads = _loss_and_grads(model, chunked=True)

    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-6, atol=0)
    assert plain_grads.keys() == chunked_grads.keys() and plain_grads
    assert all(float(g.abs().sum()) > 0 for g in plain_grads.values())
    for name, g in plain_grads.items():
        # Only the float rounding of the per-chunk matmuls differs (~1e-6 of the largest value).
        scale = float(g.abs().max())
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-5, atol=1e-5 * scale, msg=name)


def test_one_chunk_is_bitwise_the_plain_computation(tiny_llama: Path, tmp_path: Path) -> None:
    model = _load(tiny_llama, tmp_path, "none", False)
    assert arch_mod.chunk_tokens(512) >= 87  # the whole batch in one chunk

    plain_loss, plain_grads = _loss_and_grads(model, chunked=False)
    chunked_loss, chunked_grads = _loss_and_grads(model, chunked=True)

    assert torch.equal(chunked_loss, plain_loss)
    assert all(torch.equal(chunked_grads[n], g) for n, g in plain_grads.items())


def test_chunked_loss_under_bf16_autocast_matches_the_plain_one(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory_plan, "CHUNK_LOGIT_BYTES", 7 * 4 * 512)
    model = _load(tiny_llama, tmp_path, "none", False)

    plain_loss, plain_grads = _loss_and_grads(model, chunked=False, bf16=True)
    chunked_loss, chunked_grads = _loss_and_grads(model, chunked=True, bf16=True)

    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-5, atol=0)
    for name, g in plain_grads.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(chunked_grads[name], g, rtol=1e-2, atol=1e-2 * scale, msg=name)


def test_plain_path_for_unknown_heads_and_trained_heads(tiny_llama: Path, tmp_path: Path) -> None:
    assert not arch_mod.supports_chunked_loss({"model_type": "gemma2"})
    assert not arch_mod.supports_chunked_loss({"model_type": "llama", "final_logit_softcapping": 30.0})
    assert arch_mod.supports_chunked_loss({"model_type": "llama", "logit_scale": None})
    model = _load(tiny_llama, tmp_path, "none", False)
    head = model.get_base_model().get_output_embeddings()
    head.weight.requires_grad_(True)

    assert loss_mod._split(model) is None
