"""Header-only memory estimates and the planner's choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.training.errors import DoesNotFit, IncompatibleBase, Unsupported
from agent.training.memory import MB, estimate_peak_bytes, plan_memory, weight_stats
from agent.training.spec import TrainingSpec
from tests.support.tiny_models import header_only_llama


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return header_only_llama(tmp_path_factory.mktemp("smol"))


def spec_for(model: Path, **kw: object) -> TrainingSpec:
    return TrainingSpec(base_model_dir=str(model), dataset_path="d.jsonl", output_dir="o", **kw)  # type: ignore[arg-type]


def test_weight_stats_count_linears_embeddings_and_lora(smol: Path) -> None:
    stats = weight_stats(smol, ["q_proj", "v_proj"], rank=8)

    assert stats.linear_params == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    assert stats.other_params == 49152 * 576 + 576 + 30 * 576
    assert stats.lora_params == 30 * 8 * ((576 + 576) + (576 + 192))


def test_estimate_grows_with_micro_batch_and_sequence(smol: Path) -> None:
    spec = spec_for(smol, quantization="none")
    by_batch = [estimate_peak_bytes(smol, spec, mb, False) for mb in (1, 2, 4, 8)]
    by_seq = [estimate_peak_bytes(smol, spec, 2, False, seq_len=s) for s in (32, 64, 128, 256)]

    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == 4


def test_checkpointing_nf4_and_offload_each_save_memory(smol: Path) -> None:
    fp32 = spec_for(smol, quantization="none")
    nf4 = spec_for(smol)

    plain = estimate_peak_bytes(smol, fp32, 4, False)
    assert estimate_peak_bytes(smol, fp32, 4, True) < plain
    assert estimate_peak_bytes(smol, nf4, 4, False) < plain
    assert estimate_peak_bytes(smol, fp32, 4, True, offload_optimizer=True) < estimate_peak_bytes(smol, fp32, 4, True)


def test_planner_prefers_full_micro_batch_when_it_fits(smol: Path) -> None:
    plan = plan_memory(smol, spec_for(smol, quantization="none"), 64 * 2**30)

    assert (plan.micro_batch, plan.grad_accum, plan.checkpointing, plan.offload_optimizer) == (
        8,
        1,
        False,
        False,
    )
    assert plan.estimate_bytes <= plan.budget_bytes


def test_planner_shrinks_micro_batch_then_checkpoints_then_offloads(smol: Path) -> None:
    spec = spec_for(smol, quantization="none", effective_batch=8)
    est = lambda mb, ck, off=False: estimate_peak_bytes(smol, spec, mb, ck, offload_optimizer=off)  # noqa: E731

    shrunk = plan_memory(smol, spec, est(2, False))
    assert (shrunk.micro_batch, shrunk.grad_accum, shrunk.checkpointing) == (2, 4, False)
    assert any("accumulation" in n for n in shrunk.notes)

    ckpt = plan_memory(smol, spec, est(1, False) - 1)
    assert ckpt.checkpointing and not ckpt.offload_optimizer
    assert ckpt.micro_batch * ckpt.grad_accum >= 8

    offload = plan_memory(smol, spec, est(1, True, True))
    assert (offload.micro_batch, offload.checkpointing, offload.offload_optimizer) == (
        1,
        True,
        True,
    )


def test_planner_refuses_with_estimate_and_budget(smol: Path) -> None:
    with pytest.raises(DoesNotFit) as info:
        plan_memory(smol, spec_for(smol), 300 * MB)

    message = str(info.value)
    assert "300 MiB" in message and "needs an estimated" in message
    assert info.value.retryable is False


def test_planner_honours_forced_settings(smol: Path) -> None:
    spec = spec_for(smol, quantization="none", micro_batch=4, gradient_checkpointing="on")

    plan = plan_memory(smol, spec, 64 * 2**30)

    assert (plan.micro_batch, plan.grad_accum, plan.checkpointing) == (4, 2, True)


def test_unknown_architecture_and_missing_model(tmp_path: Path) -> None:
    odd = header_only_llama(tmp_path / "odd", layers=1)
    cfg = json.loads((odd / "config.json").read_text()) | {
        "model_type": "mamba",
        "architectures": ["MambaForCausalLM"],
    }
    (odd / "config.json").write_text(json.dumps(cfg))

    with pytest.raises(Unsupported, match="MambaForCausalLM"):
        estimate_peak_bytes(odd, spec_for(odd), 1, False)
    assert estimate_peak_bytes(odd, spec_for(odd, target_modules=["q_proj"]), 1, False) > 0
    with pytest.raises(IncompatibleBase, match=r"no config\.json"):
        estimate_peak_bytes(tmp_path / "nothing", spec_for(tmp_path), 1, False)


def test_the_device_plans_for_the_allocator_its_training_child_gets(
    smol: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # glibc keeps NF4's freed dequantization buffers and the recompute's scratch (measured:
    # benchmarks/training_memory.py); jemalloc, the training child's allocator where installed, does not.
    from agent.training import heap
    from agent.training import memory as plan

    nf4 = spec_for(smol, max_seq_len=128)
    by_allocator = {}
    for allocator, env in (("jemalloc", {}), ("system", {heap.ALLOCATOR_ENV: "system"})):
        monkeypatch.setattr(heap, "active_allocator", lambda pid="self": "system")
        monkeypatch.setattr(heap, "jemalloc_path", lambda: "/lib/libjemalloc.so.2")
        monkeypatch.setattr(plan, "training_allocator", lambda env=env: heap.training_allocator(env))
        assert plan.plan_inputs(nf4).allocator == allocator
        by_allocator[allocator] = estimate_peak_bytes(smol, nf4, 4, True)
    assert by_allocator["system"] - by_allocator["jemalloc"] > 100 * MB, by_allocator
    monkeypatch.setattr(heap, "jemalloc_path", lambda: None)
    assert heap.training_allocator({}) == "system"  # not installed: glibc, and planned as such
