"""A tiny random llama-architecture base model, for tests and examples that must be fast.

``build_tiny_base(dir)`` writes a complete Hugging Face folder (config, random weights, a byte-level
BPE tokenizer trained on the spot, a chat template) that :func:`loramix.base.load_base` loads like
any real model. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from loramix.lora import LoraWeights

if TYPE_CHECKING:
    from loramix.base import BaseModel

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TRAIN_TEXT = """the quick brown fox jumps over the lazy dog. a noun is a word that names a thing.
botany is the study of plants; zoology is the study of animals. the ship sailed to the harbour.
int main(void) { return 0; } the function returns a pointer to the string. in the beginning god created
the heaven and the earth. chemistry: an acid reacts with a base to form a salt and water."""


def build_tiny_base(path: str | Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: int = 128, vocab: int = 512, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE(unk_token=None))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tk.get_vocab_size(), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def random_lora(base: BaseModel, rank: int = 4, alpha: float = 8.0, seed: int = 0,
                targets: tuple[str, ...] = ("q_proj", "v_proj"), std: float = 0.05) -> LoraWeights:
    """A random adapter with non-zero A and B for the given base."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (n_in, n_out) in base.linear_shapes().items():
        if path.rsplit(".", 1)[-1] in targets:
            a = torch.randn(rank, n_in, generator=g) * std  # (r, n_in)
            b = torch.randn(n_out, rank, generator=g) * std  # (n_out, r)
            layers[path] = (a, b)
    return LoraWeights(rank=rank, alpha=alpha, layers=layers)


class HashEncoder:
    """A stand-in sentence encoder for tests where routing quality is not under test:
    a seeded random unit vector per text (same text, same vector, in every process)."""

    name = "hash"
    dim = 16

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:4], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim)
            out[i] = v / np.linalg.norm(v)
        return out
