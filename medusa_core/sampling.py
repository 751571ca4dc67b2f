"""The one function that picks a token from logits, with a request's sampling settings (`request.SamplingParams`).

A sample is keyed, not drawn from a running generator: the token at sequence position i is the Gumbel-max of the
tempered, top_p-filtered distribution with noise seeded by (the request's seed, i). The same seed and the same
logits then give the same token whatever the batch, the tree, or how many tokens earlier steps accepted, which is
what makes seeded Medusa sampling equal plain sampling token for token (docs/design.md, "Seeded sampling").
"""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from medusa_core.request import SamplingParams

TINY = torch.finfo(torch.float32).tiny  # a float64 temperature below it is 0 in float32


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
    sorted_p, order = _nucleus_candidates(probs, top_p)
    # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
    drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    filtered = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return filtered / filtered.sum(-1, keepdim=True)


def _nucleus_candidates(probs: Tensor, top_p: float, k: int = 256) -> tuple[Tensor, Tensor]:
    """The largest probabilities [..., k'] in descending order and their tokens, for k' = k or 8k if that mass
    reaches top_p in every row (the nucleus lies inside them: a top-k is far cheaper than sorting the whole
    vocabulary), else all of them."""
    for size in (k, 8 * k):
        if size >= probs.shape[-1]:
            break
        top, order = probs.topk(size, dim=-1)
        if bool((top.sum(-1) >= top_p).all()):
            return top, order
    return probs.sort(dim=-1, descending=True)


def choose_token(logits: Tensor, params: SamplingParams, seed: int, position: int) -> int:
    """logits [V] for sequence position `position` -> its token: argmax at temperature 0, else the sample keyed by
    (seed, position). Gumbel-max: argmax(log p + G) is distributed as p."""
    if params.temperature == 0:
        return int(logits.argmax())
    probs = probabilities(logits.cpu(), params.temperature, params.top_p)
    return int((probs.log() + gumbel_noise(seed, position, probs.shape[-1])).argmax())
