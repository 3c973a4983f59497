"""Tiny causal LMs built from a config, with a byte-level BPE tokenizer trained in-process.

No hub is reachable, so tests build their models here. Every linear layer's output size is a
multiple of 32: bitsandbytes' CPU repack asserts "N must be divisible by block_n" otherwise
(docs/platform.md).
"""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "PocketLoRA trains adapters on devices while they charge and stay cool.",
    "Question: what is the capital of France? Answer: Paris.",
    "user assistant system hello world adapter battery thermal lease job device",
    "0123456789 !?.,:;'\"()[]{}<>/-_+=*&^%$#@ abcdefghijklmnopqrstuvwxyz",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(vocab_size: int = 512):  # type: ignore[no-untyped-def]
    """Train a small byte-level BPE tokenizer (any text encodes) and wrap it for transformers."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(_CORPUS * 4, vocab_size=vocab_size, min_frequency=1, special_tokens=specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _padded_vocab(n: int) -> int:
    return (n + 31) // 32 * 32


def make_tiny_llama(out_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny Llama-style model (q/k/v/o projections) and its tokenizer to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=_padded_vocab(len(tok)),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_gpt2(out_dir: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save a tiny GPT-2-style model (fused c_attn projection) and its tokenizer to out_dir."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = build_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=_padded_vocab(len(tok)),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def sharpen_head(base: Path, out: Path, factor: float = 20.0) -> Path:
    """Copy a tiny model with its output head scaled up.

    A randomly initialised tiny model has near-uniform logits that a LoRA on attention cannot
    sharpen (the final norm bounds the hidden state and lm_head is frozen), so the loss floor
    sits near ln(vocab). A larger head lets the adapter actually learn, so its loss on held-out
    data can beat the base's.
    """
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(base, out)
    weights = load_file(str(out / "model.safetensors"))
    weights["lm_head.weight"] = weights["lm_head.weight"] * factor
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
