"""The Medusa decode loop for a batch of requests: prefill, then propose -> verify -> accept until every row ends.

One step verifies a whole tree for every row in one forward pass; rows accept different numbers of tokens and keep
their own KV length; finished rows leave the batch. Plain decoding is the same loop with the root-only tree, so
the baseline shares the backend, cache and stopping rules. The loop yields what each step emitted and keeps no
statistics: callers derive them from the events (see `generator.py`).

Differences from FasterDecoding/Medusa: batched from the start (the reference decodes one sequence); the step is
three plain functions with the state passed in and out, nothing is stashed on the model.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from medusa_core.backends import Backend
from medusa_core.sampling import SamplingParams, choose_token
from medusa_core.tree import TreeBuffers, plain_tree
from medusa_core.verify import Accepted, accept


class Drafter(Protocol):
    def draft(self, hidden: Tensor, history: list[list[int]], top_k: int, shared_lm_head) -> Tensor:
        """hidden [B, H] at the last accepted node -> candidates [B, K, top_k] for the next K tokens after it."""


@dataclass(frozen=True)
class DecodeRequest:
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    speculate: bool = True  # False: plain decoding
    ignore_eos: bool = False


@dataclass(frozen=True)
class StepEvent:
    request: int  # index into the requests list
    tokens: tuple[int, ...]  # tokens emitted for this request in this step
    accept_len: int | None  # speculated tokens accepted; None for the prefill
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled"


@dataclass
class _Row:
    request: DecodeRequest
    generator: torch.Generator
    history: list[int]
    emitted: int = 0
    finish_reason: str | None = None


def propose(root: Tensor, candidates: Tensor | None, tree: TreeBuffers) -> Tensor:
    """root [B], head candidates [B, K, top_k] -> tree tokens [B, T]."""
    if candidates is None:
        return root[:, None]
    depth = tree.max_depth
    assert candidates.shape[1] >= depth, f"tree depth {depth} needs {depth} heads, drafter gave {candidates.shape[1]}"
    flat = torch.cat([root[:, None], candidates[:, :depth].reshape(len(root), -1)], dim=1)  # [B, 1 + D*top_k]
    return flat[:, tree.candidate_index]


def decode(backend: Backend, drafter: Drafter | None, tree: TreeBuffers, requests: list[DecodeRequest],
           epsilon: float = 0.09, alpha: float = 0.3, is_cancelled: Callable[[int], bool] = lambda i: False
           ) -> Iterator[list[StepEvent]]:
    """Yield, per step, one event for each request still in the batch; `is_cancelled(i)` drops request i."""
    rows = [_Row(r, r.sampling.generator(), list(r.prompt_ids)) for r in requests]
    if not any(r.speculate for r in requests) or drafter is None:
        tree = plain_tree()
    fwd, cache = backend.prefill([r.prompt_ids for r in requests])
    roots = torch.tensor([choose_token(fwd.logits[b, 0], r.request.sampling, r.generator)
                          for b, r in enumerate(rows)])
    hidden = fwd.hidden[:, 0]  # [B, H]
    active = list(range(len(rows)))
    yield [_emit(rows[i], [int(roots[b])], None, backend.eos_token_ids, i) for b, i in enumerate(active)]
    while True:
        yield from _cancelled_events(rows, active, is_cancelled)
        keep = [b for b, i in enumerate(active) if rows[i].finish_reason is None]
        if not keep:
            return
        if len(keep) < len(active):
            cache = backend.select(cache, torch.tensor(keep))
            active, roots, hidden = [active[b] for b in keep], roots[keep], hidden[keep]
        acc, tokens, hidden = step(backend, drafter, tree, cache, roots, hidden, [rows[i] for i in active],
                                   epsilon, alpha)
        roots = acc.bonus
        yield [_emit(rows[i], _step_tokens(tokens[b], acc, b), int(acc.accept_len[b]), backend.eos_token_ids, i)
               for b, i in enumerate(active)]


def step(backend: Backend, drafter: Drafter | None, tree: TreeBuffers, cache, roots: Tensor, hidden: Tensor,
         rows: list[_Row], epsilon: float, alpha: float) -> tuple[Accepted, Tensor, Tensor]:
    """One decode step for the batch: propose -> verify -> accept, then keep the accepted nodes in the cache."""
    speculate = torch.tensor([r.request.speculate for r in rows])
    candidates = None
    if tree.num_nodes > 1:
        candidates = drafter.draft(hidden, [r.history for r in rows], tree.top_k, backend.lm_head).cpu()
    tokens = propose(roots, candidates, tree)  # [B, T]
    out = backend.verify(cache, tokens, tree)
    acc = accept(tokens, out.logits.cpu(), tree, [r.request.sampling for r in rows],
                 [r.generator for r in rows], speculate, epsilon, alpha)
    backend.keep(cache, acc.nodes, acc.accept_len + 1)
    last = acc.nodes[torch.arange(len(rows)), acc.accept_len]  # [B]
    return acc, tokens, out.hidden[torch.arange(len(rows)), last.to(out.hidden.device)]


def _step_tokens(tokens: Tensor, acc: Accepted, b: int) -> list[int]:
    accepted = tokens[acc.nodes[b, 1 : int(acc.accept_len[b]) + 1]]
    return [int(t) for t in accepted] + [int(acc.bonus[b])]


def _emit(row: _Row, new: list[int], accept_len: int | None, eos: tuple[int, ...], index: int) -> StepEvent:
    """Apply the stopping rules to a step's tokens and record them on the row."""
    out: list[int] = []
    for t in new:
        if t in eos and not row.request.ignore_eos:
            row.finish_reason = "stop"
            break
        out.append(t)
        if row.emitted + len(out) >= row.request.max_new_tokens:
            row.finish_reason = "length"
            break
    row.emitted += len(out)
    row.history.extend(new)
    return StepEvent(index, tuple(out), accept_len, row.finish_reason)


def _cancelled_events(rows: list[_Row], active: list[int], is_cancelled: Callable[[int], bool]
                      ) -> Iterator[list[StepEvent]]:
    gone = [i for i in active if rows[i].finish_reason is None and is_cancelled(i)]
    for i in gone:
        rows[i].finish_reason = "cancelled"
    if gone:
        yield [StepEvent(i, (), None, "cancelled") for i in gone]
