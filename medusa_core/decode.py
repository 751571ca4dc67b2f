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
from typing import Any, Protocol

import torch
from torch import Tensor

from medusa_core.backends import Backend, Forward, RowExtending
from medusa_core.request import Request
from medusa_core.sampling import choose_token
from medusa_core.tree import TreeBuffers, plain_tree
from medusa_core.verify import Accepted, accept


class Drafter(Protocol):
    def draft(self, hidden: Tensor, roots: Tensor, history: list[list[int]], depth: int, top_k: int,
              backend: Backend) -> Tensor:
        """hidden [B, H] at the last accepted node, the roots [B] it chose -> candidates [B, D >= depth, top_k] for
        the tokens after the root (only the first `depth` are read); `backend` gives the shared lm_head."""


@dataclass(frozen=True)
class StepEvent:
    key: int  # the caller's key for the request (its index, for `decode`)
    tokens: tuple[int, ...]  # tokens emitted for this request in this step
    accept_len: int | None  # speculated tokens accepted; None for the prefill
    finish_reason: str | None = None  # "stop" (EOS), "length", "cancelled"
    accepted_path: tuple[int, ...] = ()  # path of the deepest accepted node (head ranks), () if none


@dataclass
class _Row:
    request: Request  # prepared: prompt_ids and max_tokens set
    seed: int  # keys the row's samples (sampling.choose_token)
    history: list[int]
    emitted: int = 0
    finish_reason: str | None = None


@dataclass(frozen=True)
class Batch:
    """The running batch: one row per request still decoding, the backend's cache, and per row the root token
    (chosen, not yet in the cache) and the hidden state that drafts from it. Rows join and leave between steps."""

    keys: tuple[int, ...]  # the caller's id for each row
    rows: tuple[_Row, ...]
    cache: Any
    roots: Tensor  # [B]
    hidden: Tensor  # [B, H]


def propose(root: Tensor, candidates: Tensor | None, tree: TreeBuffers) -> Tensor:
    """root [B], head candidates [B, K, top_k] -> tree tokens [B, T]."""
    if candidates is None:
        return root[:, None]
    depth = tree.max_depth
    assert candidates.shape[1] >= depth, f"tree depth {depth} needs {depth} heads, drafter gave {candidates.shape[1]}"
    flat = torch.cat([root[:, None], candidates[:, :depth].reshape(len(root), -1)], dim=1)  # [B, 1 + D*top_k]
    return flat[:, tree.candidate_index]


def decode(backend: Backend, drafter: Drafter | None, tree: TreeBuffers | None, requests: list[Request],
           epsilon: float = 0.09, alpha: float = 0.3, is_cancelled: Callable[[int], bool] = lambda i: False
           ) -> Iterator[list[StepEvent]]:
    """Yield, per step, one event for each request still in the batch; `is_cancelled(i)` drops request i."""
    batch, events = admit(backend, None, dict(enumerate(requests)))
    yield events
    while True:
        batch, events = retire(backend, batch, is_cancelled)
        if events:
            yield events
        if batch is None:
            return
        batch, events = advance(backend, drafter, tree, batch, epsilon, alpha)
        yield events


def admit(backend: Backend, batch: Batch | None, requests: dict[int, Request]) -> tuple[Batch, list[StepEvent]]:
    """Prefill new requests (keyed by the caller's id) and add them to the running batch; emits their first token."""
    keys, new = tuple(requests), list(requests.values())
    if any(not r.prompt_ids or r.max_tokens is None for r in new):
        raise ValueError("a request joins the batch with prompt_ids and max_tokens set (MedusaGenerator.prepare)")
    fwd, cache = backend.prefill([r.prompt_ids for r in new], None if batch is None else batch.cache)
    rows, roots, events = _start(backend, fwd, requests)
    hidden = fwd.hidden[:, 0]  # [B_new, H]
    if batch is not None:
        keys, rows = batch.keys + keys, batch.rows + rows
        roots, hidden = torch.cat([batch.roots, roots]), torch.cat([batch.hidden, hidden])
    return Batch(keys, rows, cache, roots, hidden), events


def extend(backend: RowExtending, batch: Batch, requests: dict[int, Request]) -> tuple[Batch, list[StepEvent]]:
    """Rows whose request ended take the next request of the same sequence (a conversation's next turn), keyed by the
    row's key: its prompt starts with the row's history (every token the row chose, a Medusa step's past a stop
    included), and only the rest is read onto the row's cache. Emits their first token."""
    where = [batch.keys.index(k) for k in requests]
    tails = []
    for b, r in zip(where, requests.values()):
        history = batch.rows[b].history
        if batch.rows[b].finish_reason not in ("stop", "length"):
            raise ValueError(f"request {batch.keys[b]}'s row is still decoding (or cancelled): nothing to continue")
        if r.max_tokens is None or tuple(r.prompt_ids[: len(history)]) != tuple(history):
            raise ValueError(f"request {batch.keys[b]} does not continue its row: its prompt must start with the row's "
                             "history, and max_tokens be set")
        tails.append(r.prompt_ids[len(history) - 1 :])  # the row's last token is chosen, not yet in the cache
    fwd = backend.extend(batch.cache, where, tails)
    started, new_roots, events = _start(backend, fwd, requests)
    rows, roots, hidden = list(batch.rows), batch.roots.clone(), batch.hidden.clone()
    for i, b in enumerate(where):
        rows[b], roots[b], hidden[b] = started[i], new_roots[i], fwd.hidden[i, 0]
    return Batch(batch.keys, tuple(rows), batch.cache, roots, hidden), events


def _start(backend: Backend, fwd: Forward, requests: dict[int, Request]
           ) -> tuple[tuple[_Row, ...], Tensor, list[StepEvent]]:
    """New rows for requests whose prompts were just read (fwd: each one's last position): their first tokens."""
    rows = tuple(_Row(r, r.sampling.row_seed(), list(r.prompt_ids)) for r in requests.values())
    roots = torch.tensor([choose_token(fwd.logits[b, 0], r.request.sampling, r.seed, len(r.history))
                          for b, r in enumerate(rows)])
    events = [_emit(row, [int(roots[b])], None, backend.eos_token_ids, key)
              for b, (key, row) in enumerate(zip(requests, rows))]
    return rows, roots, events


def retire(backend: Backend, batch: Batch, is_cancelled: Callable[[int], bool]
           ) -> tuple[Batch | None, list[StepEvent]]:
    """Rows that ended (EOS, length) or were cancelled leave the batch (None once no row is left; the next
    admission starts a new one); one event per cancelled row."""
    events = []
    for key, row in zip(batch.keys, batch.rows):
        if row.finish_reason is None and is_cancelled(key):
            row.finish_reason = "cancelled"
            events.append(StepEvent(key, (), None, "cancelled"))
    keep = [b for b, row in enumerate(batch.rows) if row.finish_reason is None]
    if len(keep) == len(batch.rows):
        return batch, events
    if not keep:
        return None, events
    cache = backend.select(batch.cache, torch.tensor(keep, dtype=torch.long))
    return Batch(tuple(batch.keys[b] for b in keep), tuple(batch.rows[b] for b in keep), cache,
                 batch.roots[keep], batch.hidden[keep]), events


def advance(backend: Backend, drafter: Drafter | None, tree: TreeBuffers | None, batch: Batch, epsilon: float = 0.09,
            alpha: float = 0.3) -> tuple[Batch, list[StepEvent]]:
    """One decode step of the whole batch; plain decoding (the root-only tree) when no row speculates."""
    if drafter is None or tree is None or not any(r.request.mode == "medusa" for r in batch.rows):
        tree = plain_tree()
    acc, tokens, hidden = step(backend, drafter, tree, batch.cache, batch.roots, batch.hidden, list(batch.rows),
                               epsilon, alpha)
    events = [_emit(row, _step_tokens(tokens[b], acc, b), int(acc.accept_len[b]), backend.eos_token_ids, key,
                    _accepted_path(tree, acc, b)) for b, (key, row) in enumerate(zip(batch.keys, batch.rows))]
    return Batch(batch.keys, batch.rows, batch.cache, acc.bonus, hidden), events


def step(backend: Backend, drafter: Drafter | None, tree: TreeBuffers, cache, roots: Tensor, hidden: Tensor,
         rows: list[_Row], epsilon: float, alpha: float) -> tuple[Accepted, Tensor, Tensor]:
    """One decode step for the batch: propose -> verify -> accept, then keep the accepted nodes in the cache."""
    speculate = torch.tensor([r.request.mode == "medusa" for r in rows])
    candidates = None
    if tree.num_nodes > 1:
        candidates = drafter.draft(hidden, roots, [r.history for r in rows], tree.max_depth, tree.top_k, backend)
        candidates = candidates.cpu()
    tokens = propose(roots, candidates, tree)  # [B, T]
    out = backend.verify(cache, tokens, tree)
    # The root is the last token of each row's history; the first token this step samples comes after it.
    acc = accept(tokens, out.logits.cpu(), tree, [r.request.sampling for r in rows], [r.seed for r in rows],
                 [len(r.history) for r in rows], speculate, epsilon, alpha)
    backend.keep(cache, acc.nodes, acc.accept_len + 1)
    last = acc.nodes[torch.arange(len(rows)), acc.accept_len]  # [B]
    return acc, tokens, out.hidden[torch.arange(len(rows)), last.to(out.hidden.device)]


def _step_tokens(tokens: Tensor, acc: Accepted, b: int) -> list[int]:
    accepted = tokens[acc.nodes[b, 1 : int(acc.accept_len[b]) + 1]]
    return [int(t) for t in accepted] + [int(acc.bonus[b])]


def _accepted_path(tree: TreeBuffers, acc: Accepted, b: int) -> tuple[int, ...]:
    last = int(acc.nodes[b, int(acc.accept_len[b])])
    return tree.paths[last - 1] if last > 0 else ()


def _emit(row: _Row, new: list[int], accept_len: int | None, eos: tuple[int, ...], index: int,
          accepted_path: tuple[int, ...] = ()) -> StepEvent:
    """Apply the stopping rules to a step's tokens and record them on the row."""
    out: list[int] = []
    for t in new:
        if t in eos and not row.request.ignore_eos:
            row.finish_reason = "stop"
            break
        out.append(t)
        if row.emitted + len(out) >= row.request.max_tokens:
            row.finish_reason = "length"
            break
    row.emitted += len(out)
    row.history.extend(new)
    return StepEvent(index, tuple(out), accept_len, row.finish_reason, accepted_path)
