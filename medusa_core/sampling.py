"""Per-request sampling settings and the one function that picks a token from logits.

A sample is keyed, not drawn from a running generator: the token at sequence position i is the Gumbel-max of the
tempered, top_p-filtered distribution with noise seeded by (the request's seed, i). The same seed and the same
logits then give the same token whatever the batch, the tree, or how many tokens earlier steps accepted, which is
what makes seeded Medusa sampling equal plain sampling token for token (docs/design.md, "Seeded sampling").
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Acceptance = Literal["greedy", "typical", "lossless"]
TINY = torch.finfo(torch.float32).tiny  # a float64 temperature below it is 0 in float32


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    acceptance: Acceptance | None = None  # None: greedy at temperature 0, else lossless

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.acceptance == "greedy" and self.temperature > 0:
            raise ValueError("acceptance 'greedy' needs temperature 0")

    @property
    def mode(self) -> Acceptance:
        """The acceptance rule in force: every rule reduces to greedy at temperature 0."""
        if self.temperature == 0:
            return "greedy"
        return self.acceptance or "lossless"

    def row_seed(self) -> int:
        """The seed this request's samples are keyed by: its own, or a fresh random one."""
        return random.getrandbits(63) if self.seed is None else self.seed


def gumbel_noise(seed: int, position: int, vocab: int) -> Tensor:
    """Standard Gumbel noise [V] keyed by (seed, position): the same key always gives the same noise."""
    key = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    rng = torch.Generator().manual_seed(int.from_bytes(key, "little"))
    return -torch.log(-torch.log(torch.rand(vocab, generator=rng)))


def probabilities(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """logits [..., V] -> probabilities after temperature and nucleus (top_p) filtering, [..., V]."""
    # Largest logit shifted to 0 first: below ~1e-37, logits / temperature overflows float32 and softmax(inf - inf)
    # is NaN (argmax then picks token 0); shifted, the rest go to -inf and the top token takes the mass (T -> 0).
    logits = logits.float()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / max(temperature, TINY), dim=-1)
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


def choose_token(logits: Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """logits [V] for sequence position `position` -> its token: argmax at temperature 0, else the sample keyed by
    (seed, position). Gumbel-max: argmax(log p + G) is distributed as p."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = probabilities(logits.cpu(), params.temperature, params.top_p)
    return int((probs.log() + gumbel_noise(seed, position, probs.shape[-1])).argmax())
