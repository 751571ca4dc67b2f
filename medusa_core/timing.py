"""Timing of decode steps on the machine at hand: the adaptive tree policy calibrates its step costs with these, and
the tree tuner and the benchmarks measure with the same functions (best of repeated runs, sizes taking turns)."""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from tqdm import tqdm

from medusa_core.backends import Backend
from medusa_core.tree import TreeBuffers


def timed_step(backend: Backend, cache, tree: TreeBuffers, batch: int = 1, drafter=None) -> float:
    """Seconds of one decode step of `tree` for `batch` rows on `cache`: the drafter's heads if one is given, the
    verification pass and the cache update, accepting the root only (the context grows by 1). Infinite when the
    backend cannot hold this tree for this many rows (e.g. llama.cpp's sequence limit)."""
    tokens = torch.full((batch, tree.num_nodes), 1000 % backend.vocab_size, dtype=torch.long)  # content: same cost
    root_only = torch.zeros(batch, tree.max_depth + 1, dtype=torch.long)
    start = time.perf_counter()
    try:
        if drafter is not None and tree.num_nodes > 1:
            hidden = torch.zeros(batch, backend.hidden_size, dtype=backend.dtype, device=backend.device)
            drafter.draft(hidden, tokens[:, 0], [[] for _ in range(batch)], tree.max_depth, tree.top_k, backend)
        backend.verify(cache, tokens, tree)
    except ValueError:
        return float("inf")
    backend.keep(cache, root_only, torch.ones(batch, dtype=torch.long))
    return time.perf_counter() - start


def fastest_in_turns(steps: Sequence[Callable[[], float]], repeats: int, desc: str | None = None) -> list[float]:
    """Each step's fastest of `repeats` rounds after a warm-up round; within a round the steps take turns, so a drift
    in the machine's speed touches every one alike. A step returns the seconds it measured (inf if it cannot run)."""
    rounds = [[step() for step in steps]
              for _ in tqdm(range(1 + repeats), desc=desc, unit="round", disable=desc is None)]
    return [min(times) for times in zip(*rounds[1:])]  # round 0 warms every step up


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` timed calls after one warm-up call (other load only ever adds time)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
