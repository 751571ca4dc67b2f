"""Shared fixtures: a tiny random Llama built here, the embedded SmolLM2 model, and test drafters (oracle heads)."""
from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(2)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "List three primary colors:",
    "The quick brown fox",
]


def tiny_llama(seed: int = 0, vocab: int = 256):
    """A 2-layer random Llama (H=64, V=256) in fp32. A wide init keeps logits well separated (few near-ties)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_backend():
    from medusa_core.backends.hf import HFBackend

    return HFBackend(tiny_llama(), tokenizer=None)


@pytest.fixture(scope="session")
def embedded_generator():
    from medusa_core.config import DEFAULT_CONFIG, load_config
    from medusa_core.generator import load_generator

    return load_generator(load_config(DEFAULT_CONFIG))


class OracleDrafter:
    """Heads that know the true continuation: head k's top-1 is right while k < correct_depth, and wrong after.

    Other ranks are filler tokens that are never the truth, so acceptance follows rank 0 exactly.
    """

    def __init__(self, references: dict[tuple[int, ...], list[int]], num_heads: int, vocab: int,
                 correct_depth: int | None = None):
        self.references, self.num_heads, self.vocab = references, num_heads, vocab
        self.correct_depth = num_heads if correct_depth is None else correct_depth

    def draft(self, hidden: Tensor, history: list[list[int]], top_k: int, shared_lm_head) -> Tensor:
        out = torch.empty(len(history), self.num_heads, top_k, dtype=torch.long)
        for b, h in enumerate(history):
            prompt = next(p for p in self.references if tuple(h[: len(p)]) == p)
            done = len(h) - len(prompt)  # tokens emitted so far; head k predicts emitted[done + k]
            truth = self.references[prompt]
            for k in range(self.num_heads):
                t = truth[done + k] if done + k < len(truth) else 0
                fillers = [(t + 1 + r) % self.vocab for r in range(top_k)]
                out[b, k] = torch.tensor(fillers if k >= self.correct_depth else [t] + fillers[:-1])
        return out
