"""Prompt lookup: candidates from the request's own text, merged into the heads' candidates.

A reply often repeats what came before it: names and code from the prompt, the pattern of a list, and in a small
model's greedy output whole looping phrases. Where the last n tokens of the history (prompt + output, root
included) occurred before, the tokens that followed them are a guess for the next ones (prompt lookup decoding;
vLLM's n-gram proposer). `LookupDrafter` puts that guess at rank 0 of each depth and moves the heads' candidates
down one rank, so a tree's chain of rank-0 nodes follows the lookup where there is one and the heads where there
is none; depths beyond the heads are proposed by the lookup alone. Verification does not change, so the output
is still exactly the base model's; only the candidates, and so the accepted length, do.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torch import Tensor

if TYPE_CHECKING:
    from medusa_core.decode import Drafter

NO_GUESS = -1
FILLER = 0  # where neither heads nor lookup propose (beyond the heads): safe, accepted only if it is the argmax


def continuation(history: Sequence[int], depth: int, min_ngram: int, max_ngram: int) -> list[int]:
    """The `depth` tokens that followed the latest earlier occurrence of the history's last n tokens, longest n
    first (max_ngram down to min_ngram); [] when none occurred. A match near the end is continued as a copy of
    itself (the history so far, then the guess), so a loop of period p < depth still gives `depth` tokens."""
    h = np.asarray(history, dtype=np.int64)
    for n in range(min(max_ngram, len(h) - 1), min_ngram - 1, -1):
        windows = sliding_window_view(h[:-1], n)  # [S-n, n]; the last token is left out so a match has a successor
        hits = np.flatnonzero((windows == h[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            out, period = h[start : start + depth].tolist(), len(h) - start
            for i in range(len(out), depth):
                out.append(out[i - period])
            return out
    return []


def merge(candidates: Tensor, guess: Tensor) -> Tensor:
    """Heads' candidates [B, D, k] and lookup guesses [B, D] (NO_GUESS where none) -> [B, D, k]: the guess at
    rank 0, then the heads' candidates in their order without it (siblings stay distinct)."""
    duplicate = candidates == guess[..., None]  # [B, D, k]
    order = torch.sort(duplicate.to(torch.int8), dim=-1, stable=True).indices  # the guess's copy, if any, last
    shifted = torch.cat([guess[..., None], candidates.gather(-1, order)[..., :-1]], dim=-1)
    return torch.where(guess[..., None] != NO_GUESS, shifted, candidates)


@dataclass(frozen=True)
class LookupDrafter:
    """A drafter (the Medusa heads) with prompt lookup merged in at rank 0; proposes any depth a tree asks for."""

    heads: Drafter | None  # with `num_heads`, e.g. MedusaHeads; None: prompt lookup alone
    min_ngram: int = 1
    max_ngram: int = 4

    @property
    def num_heads(self) -> int:
        return 0 if self.heads is None else self.heads.num_heads

    def draft(self, hidden: Tensor, roots: Tensor, history: list[list[int]], depth: int, top_k: int,
              backend) -> Tensor:
        """Candidates [B, depth, top_k] (CPU) for the tokens after the roots; `history` ends with each root."""
        B, from_heads = len(history), min(depth, self.num_heads)
        candidates = torch.full((B, depth, top_k), FILLER, dtype=torch.long)
        if from_heads:
            drafted = self.heads.draft(hidden, roots, history, from_heads, top_k, backend)
            candidates[:, :from_heads] = drafted[:, :from_heads].cpu()
        guess = torch.full((B, depth), NO_GUESS, dtype=torch.long)
        for b, h in enumerate(history):
            if cont := continuation(h, depth, self.min_ngram, self.max_ngram):
                guess[b] = torch.tensor(cont)
        return merge(candidates, guess)
