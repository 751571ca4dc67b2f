"""Oracle heads: a drafter that knows the true continuation of each prompt.

Its candidates are accepted exactly as deep as it is told to be right, so it gives the lossless tests a drafter
with known acceptance and gives the benchmarks the speed ceiling of a tree (every step accepts a whole path).
"""
from __future__ import annotations

import torch
from torch import Tensor


class OracleDrafter:
    """Heads that know the true continuation: head k's top-1 is right while k < correct_depth, and wrong after.

    Other ranks are filler tokens that are never the truth, so acceptance follows rank 0 exactly.
    """

    def __init__(self, references: dict[tuple[int, ...], list[int]], num_heads: int, vocab: int,
                 correct_depth: int | None = None):
        self.references, self.num_heads, self.vocab = references, num_heads, vocab
        self.correct_depth = num_heads if correct_depth is None else correct_depth

    def draft(self, hidden: Tensor, roots: Tensor, history: list[list[int]], depth: int, top_k: int,
              backend) -> Tensor:
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
