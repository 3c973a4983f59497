"""A real peft adapter survives pack -> unpack and loads with plain PeftModel.from_pretrained."""

from __future__ import annotations

from pathlib import Path

import pytest

from adapters_store import model_fingerprint, pack_adapter, unpack_adapter
from tests.adapters_store.conftest import make_manifest
from tests.support.tiny_models import make_tiny_llama

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


# transformers 5.24 warns about its own deprecated name while peft saves; not ours to fix.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_unpacked_adapter_loads_in_peft(tmp_path: Path) -> None:
    base_dir = make_tiny_llama(tmp_path / "base", hidden=64, layers=2)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft zero-inits B: make the adapter actually change outputs
                param.normal_(std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    manifest = make_manifest(base_fingerprint=model_fingerprint(base_dir))

    pack_adapter(tmp_path / "adapter", manifest, tmp_path / "blob.safetensors")
    assert unpack_adapter(tmp_path / "blob.safetensors", tmp_path / "unpacked") == manifest
    loaded = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "unpacked"
    )

    loaded.eval()
    with torch.no_grad():
        got = loaded(ids).logits
        base_only = transformers.AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got, base_only)  # the adapter is really applied
