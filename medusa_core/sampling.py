"""Per-request sampling settings and the one function that picks a token from logits.

Sampling is per row: each request carries its own temperature, top_p and seeded torch.Generator, so a request's
tokens do not depend on which other requests share its batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Acceptance = Literal["greedy", "typical", "lossless"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    acceptance: Acceptance | None = None  # None: greedy at temperature 0, else typical (the reference default)

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
        return self.acceptance or "typical"

    def generator(self) -> torch.Generator:
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def probabilities(logits: Tensor, temperature: float, top_p: float) -> Tensor:
    """logits [..., V] -> probabilities after temperature and nucleus (top_p) filtering, [..., V]."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


def choose_token(logits: Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """logits [V] -> the next token: argmax at temperature 0, else a sample."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = probabilities(logits, params.temperature, params.top_p)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))
