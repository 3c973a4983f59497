"""The onnxruntime-genai backend on a tiny Llama's fp32 bundle: same tokens as torch + peft,
swaps, pins, eviction, refusals, streaming, and no torch in its process."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.ort_runtime import OrtRuntime
from agent.runtime_base import (
    AdapterBusy,
    AdapterLoadError,
    AdapterNotLoaded,
    BadRequest,
    GenerateRequest,
    IncompatibleAdapter,
    RuntimeClosed,
)
from tests.support.onnx_models import TinyBundle

PROMPTS = ["hello world", "The quick brown fox", "what is the capital of France?", "adapter battery", "0123"]
TOKENS = 8
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def rt(tiny_bundle: TinyBundle):
    runtime = OrtRuntime(tiny_bundle.bundle, threads=1)
    yield runtime
    runtime.close()


@pytest.fixture(scope="module")
def references(tiny_bundle: TinyBundle) -> dict[str | None, tuple[int, ...]]:
    """Greedy token ids per adapter, from the ORT runtime one request at a time."""
    with OrtRuntime(tiny_bundle.bundle, threads=1) as rt:
        refs = {None: rt.generate(PROMPTS[0], max_new_tokens=TOKENS).token_ids}
        for name in ("alpha", "beta", "gamma"):
            rt.load(name, tiny_bundle.forms[name])
            refs[name] = rt.generate(PROMPTS[0], max_new_tokens=TOKENS, adapter=name).token_ids
    assert len(set(refs.values())) == 4, refs  # every adapter changes the output
    return refs


def test_greedy_tokens_equal_torch_and_peft_on_five_prompts(tiny_bundle: TinyBundle) -> None:
    from agent.runtime import AdapterRuntime

    with AdapterRuntime(tiny_bundle.base, torch_threads=1) as torch_rt, OrtRuntime(tiny_bundle.bundle) as ort_rt:
        for name in ("alpha", "beta"):
            torch_rt.load(name, tiny_bundle.peft[name])
            ort_rt.load(name, tiny_bundle.forms[name])
        for adapter in (None, "alpha", "beta"):
            for chat in (True, False):
                for prompt in PROMPTS:
                    want = torch_rt.generate(prompt, max_new_tokens=TOKENS, adapter=adapter, chat=chat)
                    got = ort_rt.generate(prompt, max_new_tokens=TOKENS, adapter=adapter, chat=chat)
                    assert got.token_ids == want.token_ids, (adapter, chat, prompt)
                    assert len(got.token_ids) > 0


def test_load_does_not_activate_and_swaps_are_per_request(
    rt: OrtRuntime, tiny_bundle: TinyBundle, references: dict[str | None, tuple[int, ...]]
) -> None:
    nbytes = rt.load("alpha", tiny_bundle.forms["alpha"])
    assert nbytes == (tiny_bundle.forms["alpha"] / "adapter.onnx_adapter").stat().st_size
    assert rt.active is None
    assert rt.generate(PROMPTS[0], max_new_tokens=TOKENS).token_ids == references[None]
    rt.load("beta", tiny_bundle.forms["beta"])
    rt.activate("alpha")
    result = rt.generate(PROMPTS[0], max_new_tokens=TOKENS)
    assert (result.token_ids, result.adapter) == (references["alpha"], "alpha")
    rt.activate("beta")
    assert rt.generate(PROMPTS[0], max_new_tokens=TOKENS).token_ids == references["beta"]
    assert rt.generate(PROMPTS[0], max_new_tokens=TOKENS, adapter=None).token_ids == references[None]
    assert rt.generate(PROMPTS[0], max_new_tokens=TOKENS, adapter="alpha").token_ids == references["alpha"]
    assert rt.active == "beta"


def test_unload_and_reload(
    rt: OrtRuntime, tiny_bundle: TinyBundle, references: dict[str | None, tuple[int, ...]]
) -> None:
    rt.load("alpha", tiny_bundle.forms["alpha"])
    rt.activate("alpha")
    with pytest.raises(AdapterBusy, match="active"):
        rt.unload("alpha")
    rt.activate(None)
    rt.unload("alpha")
    assert rt.resident() == {}
    with pytest.raises(AdapterNotLoaded):
        rt.activate("alpha")
    with pytest.raises(AdapterNotLoaded):
        rt.generate(PROMPTS[0], adapter="alpha")
    rt.load("alpha", tiny_bundle.forms["alpha"])  # a name can be loaded again after unloading
    assert rt.generate(PROMPTS[0], max_new_tokens=TOKENS, adapter="alpha").token_ids == references["alpha"]
    with pytest.raises(AdapterLoadError, match="already loaded"):
        rt.load("alpha", tiny_bundle.forms["beta"])
    with pytest.raises(AdapterLoadError, match="adapter name"):
        rt.load("bad.name", tiny_bundle.forms["beta"])


def test_lru_eviction_spares_active_and_pinned(tiny_bundle: TinyBundle) -> None:
    size = (tiny_bundle.forms["alpha"] / "adapter.onnx_adapter").stat().st_size
    with OrtRuntime(tiny_bundle.bundle, max_resident_bytes=int(size * 2.5)) as rt:
        rt.load("alpha", tiny_bundle.forms["alpha"])
        rt.load("beta", tiny_bundle.forms["beta"])
        rt.generate(PROMPTS[0], max_new_tokens=1, adapter="alpha")  # alpha is now the most recent
        rt.load("gamma", tiny_bundle.forms["gamma"])
        assert list(rt.resident()) == ["alpha", "gamma"]
        rt.activate("alpha")
        rt.generate(PROMPTS[0], max_new_tokens=1, adapter="gamma")
        rt.load("beta", tiny_bundle.forms["beta"])
        assert set(rt.resident()) == {"alpha", "beta"}  # the active one stays, though least recent
        rt.activate(None)
        stream = rt.stream(GenerateRequest(prompt=PROMPTS[0], adapter="alpha", max_new_tokens=4))
        next(stream)  # admitted: alpha is pinned while the stream is open
        rt.load("gamma", tiny_bundle.forms["gamma"])
        assert set(rt.resident()) == {"alpha", "gamma"}
        stream.close()


def test_unload_while_streaming_finishes_the_request(
    rt: OrtRuntime, tiny_bundle: TinyBundle, references: dict[str | None, tuple[int, ...]]
) -> None:
    rt.load("alpha", tiny_bundle.forms["alpha"])
    stream = rt.stream(GenerateRequest(prompt=PROMPTS[0], adapter="alpha", max_new_tokens=TOKENS))
    first = next(stream)  # admitted (the first piece of text, or the final chunk)
    rt.unload("alpha")  # returns at once; the running request keeps its adapter
    assert rt.resident() == {}
    chunks = [first, *stream]
    assert chunks[-1].token_ids == references["alpha"] and first.adapter == "alpha"
    rt.load("alpha", tiny_bundle.forms["alpha"])  # the drained adapter is gone for good: a fresh load works
    assert rt.generate(PROMPTS[0], max_new_tokens=TOKENS, adapter="alpha").token_ids == references["alpha"]


def test_refusals(rt: OrtRuntime, tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_bundle.forms["alpha"], other)
    (other / "manifest.json").write_text(json.dumps({"base_fingerprint": "sha256:" + "ab" * 32}))
    with pytest.raises(IncompatibleAdapter, match="abab"):
        rt.load("other", other)
    (tmp_path / "junk.onnx_adapter").write_bytes(b"\x00" * 100)
    with pytest.raises(AdapterLoadError, match="not an ONNX Runtime adapter"):
        rt.load("junk", tmp_path / "junk.onnx_adapter")
    with pytest.raises(AdapterLoadError, match=r"no adapter\.onnx_adapter"):
        rt.load("empty", tmp_path)
    with pytest.raises(AdapterLoadError, match="not LoRA inputs"):
        _write_adapter(tmp_path / "wrong.onnx_adapter", {"model.embed_tokens.weight": (4, 4)})
        rt.load("wrong", tmp_path / "wrong.onnx_adapter")
    assert rt.resident() == {}


def _write_adapter(path: Path, shapes: dict[str, tuple[int, int]]) -> None:
    import numpy as np
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.zeros(s, np.float32)) for k, s in shapes.items()})
    fmt.export_adapter(str(path))


def test_stream_stop_strings_and_sampling(rt: OrtRuntime, tiny_bundle: TinyBundle) -> None:
    rt.load("alpha", tiny_bundle.forms["alpha"])
    full = rt.generate(PROMPTS[1], max_new_tokens=16, adapter=None)
    chunks = list(rt.stream(GenerateRequest(prompt=PROMPTS[1], adapter=None, max_new_tokens=16)))
    assert "".join(c.text for c in chunks) == full.text and chunks[-1].finish_reason == "length"
    assert chunks[-1].prompt_tokens > 0 and 0 < chunks[-1].first_token_s <= chunks[-1].seconds
    stop = next((full.text[i : i + 2] for i in range(1, len(full.text) - 1) if full.text[i : i + 2].strip()), None)
    if stop is not None:
        cut = list(rt.stream(GenerateRequest(prompt=PROMPTS[1], adapter=None, max_new_tokens=16, stop=(stop,))))
        assert "".join(c.text for c in cut) == full.text[: full.text.index(stop)]
        assert cut[-1].finish_reason == "stop"
    sampled = [
        rt.stream(GenerateRequest(prompt=PROMPTS[1], temperature=1.0, seed=s, max_new_tokens=12)) for s in (1, 1, 2)
    ]
    ids = [list(s)[-1].token_ids for s in sampled]
    assert ids[0] == ids[1]  # a seed repeats a sampled reply
    with pytest.raises(BadRequest, match="max_new_tokens"):
        GenerateRequest(prompt="x", max_new_tokens=0)
    with pytest.raises(BadRequest, match="input"):
        GenerateRequest()


def test_concurrent_generation_while_swapping(
    tiny_bundle: TinyBundle, references: dict[str | None, tuple[int, ...]]
) -> None:
    with OrtRuntime(tiny_bundle.bundle, max_concurrent=2) as rt:
        for name in ("alpha", "beta", "gamma"):
            rt.load(name, tiny_bundle.forms[name])
        choices: list[str | None] = [None, "alpha", "beta", "gamma"]
        results, errors = [], []
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
                    adapter = choices[j % 4] if (j + k) % 3 == 0 else ...
                    results.append(rt.generate(PROMPTS[0], max_new_tokens=TOKENS, adapter=adapter))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=swapper)] + [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads[1:]:
            t.join(timeout=120)
        stop.set()
        threads[0].join(timeout=10)
    assert not errors, errors
    assert len(results) == 48
    for result in results:
        assert result.token_ids == references[result.adapter], result
    assert len({r.adapter for r in results}) >= 3


def test_closed_runtime_refuses(rt: OrtRuntime) -> None:
    rt.close()
    with pytest.raises(RuntimeClosed):
        rt.generate(PROMPTS[0])


def test_ort_backend_runs_without_torch_or_transformers(tiny_bundle: TinyBundle) -> None:
    code = f"""
import sys
from agent.ort_runtime import OrtRuntime
with OrtRuntime({str(tiny_bundle.bundle)!r}) as rt:
    rt.load("alpha", {str(tiny_bundle.forms["alpha"])!r})
    assert rt.generate("hello world", max_new_tokens=4, adapter="alpha").tokens == 4
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_idle_agent_modules_import_no_torch() -> None:
    code = """
import sys
import agent.agent, agent.serving, agent.inference_server, agent.runtime_host, agent.ort_runtime, pocketlora.infer
heavy = sorted(m for m in ("torch", "transformers", "peft", "onnx") if m in sys.modules)
assert not heavy, heavy
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
