"""The adapter runtime on a tiny Llama: swaps, eviction, refusals and concurrent swapping."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

torch = pytest.importorskip("torch")

from agent.runtime import (  # noqa: E402
    AdapterBusy,
    AdapterLoadError,
    AdapterNotLoaded,
    AdapterRuntime,
    IncompatibleAdapter,
    RuntimeClosed,
)
from tests.support.tiny_models import make_tiny_llama  # noqa: E402

PROMPT = "hello world"
TOKENS = 8


def _make_adapter(base: Path, out: Path, seed: int) -> Path:
    """Save a LoRA whose B matrices are random (not zero), so outputs move away from the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(
        r=4,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runtime")
    base = make_tiny_llama(root / "base")
    paths = {"base": base}
    for seed, name in enumerate(["alpha", "beta", "gamma"], start=1):
        paths[name] = _make_adapter(base, root / name, seed)
    return paths


@pytest.fixture(scope="module")
def references(models: dict[str, Path]) -> dict[str | None, str]:
    """Each adapter's greedy output, computed one at a time before any concurrency."""
    with AdapterRuntime(models["base"]) as rt:
        refs: dict[str | None, str] = {None: rt.generate(PROMPT, max_new_tokens=TOKENS).text}
        for name in ("alpha", "beta", "gamma"):
            rt.load(name, models[name])
            refs[name] = rt.generate(PROMPT, max_new_tokens=TOKENS, adapter=name).text
    return refs


@pytest.fixture
def rt(models: dict[str, Path]):
    runtime = AdapterRuntime(models["base"], torch_threads=1)
    yield runtime
    runtime.close()


def test_references_all_differ(references: dict[str | None, str]) -> None:
    assert len(set(references.values())) == 4, references


def test_load_does_not_activate_and_switching_works(
    rt: AdapterRuntime, models: dict[str, Path], references: dict[str | None, str]
) -> None:
    nbytes = rt.load("alpha", models["alpha"])
    assert nbytes == (models["alpha"] / "adapter_model.safetensors").stat().st_size
    assert rt.active is None
    assert rt.generate(PROMPT, max_new_tokens=TOKENS).text == references[None]

    rt.load("beta", models["beta"])
    rt.activate("alpha")
    result = rt.generate(PROMPT, max_new_tokens=TOKENS)
    assert (result.text, result.adapter, result.tokens) == (references["alpha"], "alpha", TOKENS)
    rt.activate("beta")
    assert rt.generate(PROMPT, max_new_tokens=TOKENS).text == references["beta"]
    assert rt.generate(PROMPT, max_new_tokens=TOKENS, adapter=None).text == references[None]
    assert rt.generate(PROMPT, max_new_tokens=TOKENS, adapter="alpha").text == references["alpha"]
    assert rt.active == "beta"


def test_unload_back_to_base(rt: AdapterRuntime, models: dict[str, Path], references: dict[str | None, str]) -> None:
    rt.load("alpha", models["alpha"])
    rt.activate("alpha")
    with pytest.raises(AdapterBusy, match="active"):
        rt.unload("alpha")
    rt.activate(None)
    rt.unload("alpha")
    assert rt.resident() == {}
    assert rt.generate(PROMPT, max_new_tokens=TOKENS).text == references[None]
    with pytest.raises(AdapterNotLoaded):
        rt.activate("alpha")
    with pytest.raises(AdapterNotLoaded):
        rt.generate(PROMPT, adapter="alpha")
    # Loading the same name again after unloading works and gives the same output.
    rt.load("alpha", models["alpha"])
    assert rt.generate(PROMPT, max_new_tokens=TOKENS, adapter="alpha").text == references["alpha"]


def test_free_slot_reused_in_place(
    rt: AdapterRuntime, models: dict[str, Path], references: dict[str | None, str]
) -> None:
    rt.load("alpha", models["alpha"])
    slot = rt._reg.get("alpha").handle
    rt.unload("alpha")
    rt.load("beta", models["beta"])  # same LoRA config: copied into alpha's old slot
    assert rt._reg.get("beta").handle == slot
    assert len(rt._peft.peft_config) == 1
    assert rt.generate(PROMPT, max_new_tokens=TOKENS, adapter="beta").text == references["beta"]
    rt.load("alpha", models["alpha"])  # no free slot: a new one
    assert rt.generate(PROMPT, max_new_tokens=TOKENS, adapter="alpha").text == references["alpha"]
    rt.activate("beta")
    rt.unload("alpha")
    rt.load("gamma", models["gamma"])
    assert rt.generate(PROMPT, max_new_tokens=TOKENS, adapter="gamma").text == references["gamma"]
    assert rt.generate(PROMPT, max_new_tokens=TOKENS).text == references["beta"]


def test_mismatched_weights_refused_for_free_slot(rt: AdapterRuntime, models: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    rt.load("alpha", models["alpha"])
    rt.unload("alpha")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text((models["beta"] / "adapter_config.json").read_text())
    state = load_file(models["beta"] / "adapter_model.safetensors")
    state.pop(sorted(state)[0])
    save_file(state, partial / "adapter_model.safetensors")
    with pytest.raises(AdapterLoadError, match="do not match"):
        rt.load("partial", partial)
    assert rt.resident() == {} and len(rt._free) == 1
    rt.load("beta", models["beta"])
    rt.unload("beta")
    # With no free slot, a partial file is caught after peft's non-strict load.
    rt.load("beta", models["beta"])
    with pytest.raises(AdapterLoadError, match="do not match"):
        rt.load("partial", partial)
    assert set(rt._slots) == {rt._reg.get("beta").handle}


def test_double_load_and_bad_names_refused(rt: AdapterRuntime, models: dict[str, Path]) -> None:
    rt.load("alpha", models["alpha"])
    with pytest.raises(AdapterLoadError, match="already loaded"):
        rt.load("alpha", models["alpha"])
    with pytest.raises(AdapterLoadError, match="adapter name"):
        rt.load("bad.name", models["beta"])


def test_lru_eviction_by_bytes(models: dict[str, Path]) -> None:
    size = (models["alpha"] / "adapter_model.safetensors").stat().st_size
    with AdapterRuntime(models["base"], max_resident_bytes=int(size * 2.5)) as rt:
        rt.load("alpha", models["alpha"])
        rt.load("beta", models["beta"])
        rt.generate(PROMPT, max_new_tokens=1, adapter="alpha")  # alpha is now the most recent
        rt.load("gamma", models["gamma"])
        assert list(rt.resident()) == ["alpha", "gamma"]
        assert sum(rt.resident().values()) <= rt.max_resident_bytes
        # beta's slot is kept for reuse, but never more free slots than the budget allows.
        assert len(rt._peft.peft_config) <= len(rt.resident()) + 2

        # The active adapter is never evicted, even when least recently used.
        rt.activate("alpha")
        rt.generate(PROMPT, max_new_tokens=1, adapter="gamma")
        rt.load("beta", models["beta"])
        assert set(rt.resident()) == {"alpha", "beta"}

        # Nor one pinned by an in-flight request.
        rt.activate(None)
        _, pinned = rt._reg.pin("alpha")
        rt.load("gamma", models["gamma"])
        assert set(rt.resident()) == {"alpha", "gamma"}
        rt._unpin(pinned)


def test_pickled_bin_refused_without_unpickling(
    rt: AdapterRuntime, models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safetensors.torch import load_file

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never run on an adapter")

    monkeypatch.setattr(torch, "load", no_unpickling)
    state = load_file(models["alpha"] / "adapter_model.safetensors")
    only_bin = tmp_path / "only_bin"
    only_bin.mkdir()
    (only_bin / "adapter_config.json").write_text((models["alpha"] / "adapter_config.json").read_text())
    torch.save(state, only_bin / "adapter_model.bin")
    with pytest.raises(AdapterLoadError, match=r"pickled.*adapter_model\.bin"):
        rt.load("evil", only_bin)

    disguised = tmp_path / "disguised"
    disguised.mkdir()
    (disguised / "adapter_config.json").write_text("{}")
    (disguised / "adapter_model.safetensors").write_bytes((only_bin / "adapter_model.bin").read_bytes())
    with pytest.raises(AdapterLoadError, match=r"pickled|safetensors"):
        rt.load("evil", disguised)
    assert rt.resident() == {}


def test_missing_weights_and_bad_config_refused(rt: AdapterRuntime, models: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError, match=r"no adapter_model\.safetensors"):
        rt.load("empty", tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_model.safetensors").write_bytes((models["alpha"] / "adapter_model.safetensors").read_bytes())
    (broken / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterLoadError, match=r"adapter_config\.json"):
        rt.load("broken", broken)


def _with_manifest(src: Path, dst: Path, fingerprint: str) -> Path:
    dst.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    (dst / "manifest.json").write_text(json.dumps({"base_fingerprint": fingerprint}))
    return dst


def test_incompatible_fingerprint_refused(rt: AdapterRuntime, models: dict[str, Path], tmp_path: Path) -> None:
    other = "sha256:" + "ab" * 32
    adapter = _with_manifest(models["alpha"], tmp_path / "other", other)
    with pytest.raises(IncompatibleAdapter) as info:
        rt.load("alpha", adapter)
    assert other in str(info.value) and rt.base_fingerprint in str(info.value)
    assert rt.resident() == {}
    # The check can be skipped on purpose; a matching manifest (prefixed or not) loads.
    assert rt.load("alpha", adapter, expected_fingerprint_check=False) > 0
    bare = rt.base_fingerprint.removeprefix("sha256:")
    assert rt.load("beta", _with_manifest(models["beta"], tmp_path / "same", bare)) > 0


def test_unload_while_pinned_finishes_the_request(
    rt: AdapterRuntime, models: dict[str, Path], references: dict[str | None, str]
) -> None:
    rt.load("alpha", models["alpha"])
    slot = rt._reg.get("alpha").handle
    results = []
    with rt._model_lock:  # hold the model so the request is admitted but cannot run yet
        worker = threading.Thread(
            target=lambda: results.append(rt.generate(PROMPT, max_new_tokens=TOKENS, adapter="alpha"))
        )
        worker.start()
        deadline = time.monotonic() + 10
        while rt._reg.get("alpha").pins == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        rt.unload("alpha")  # returns at once, even though the model is busy
        rt.activate(None)  # nor does activate wait for the model
        assert rt.resident() == {}
        assert slot not in rt._free  # still pinned by the request
    worker.join(timeout=30)
    assert results[0].text == references["alpha"]
    assert list(rt._free) == [slot]  # freed only after the request finished


def test_chat_false_and_close(rt: AdapterRuntime) -> None:
    result = rt.generate(PROMPT, max_new_tokens=3, chat=False)
    assert result.tokens <= 3 and result.seconds > 0
    rt.close()
    with pytest.raises(RuntimeClosed):
        rt.generate(PROMPT)


def test_concurrent_generation_while_swapping(
    rt: AdapterRuntime, models: dict[str, Path], references: dict[str | None, str]
) -> None:
    for name in ("alpha", "beta", "gamma"):
        rt.load(name, models[name])
    choices: list[str | None] = [None, "alpha", "beta", "gamma"]
    results = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def swapper() -> None:
        i = 0
        while not stop.is_set():
            rt.activate(choices[i % 4])
            i += 1
            time.sleep(0.0005)

    def client(k: int) -> None:
        try:
            for j in range(12):
                if (j + k) % 3 == 0:  # some requests name their adapter explicitly
                    results.append(rt.generate(PROMPT, max_new_tokens=TOKENS, adapter=choices[j % 4]))
                else:
                    results.append(rt.generate(PROMPT, max_new_tokens=TOKENS))
        except BaseException as exc:
            errors.append(exc)

    swap_thread = threading.Thread(target=swapper)
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    swap_thread.start()
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=120)
    stop.set()
    swap_thread.join(timeout=10)

    assert not errors, errors
    assert len(results) == 48
    for result in results:
        assert result.text == references[result.adapter], result
    assert len({r.adapter for r in results}) >= 3


def test_importing_runtime_does_not_import_torch() -> None:
    code = "import sys, agent.runtime; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
