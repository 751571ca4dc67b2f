"""Adaptive tree: each step verifies the prefix of the configured tree that promises the most tokens per second at
the current batch size, down to the root alone (plain decoding) when speculation does not pay.

Both sides are measured, not assumed:
- cost: `calibrate` times one decode step (heads + verification pass + cache update) on the real backend for each
  candidate tree and batch sizes 1, 2, 4, ... (the trees in turns, best of 3 rounds: a replica calibrates while
  Ray is still starting around it); other batch sizes interpolate linearly. The timings (seconds, once per machine
  and settings) are kept in the cache root (`config.cache_root`) so that later replica starts skip them. Then each
  step the policy runs is timed too (`time_step`) and its tree's cost at that batch size follows those live
  timings, so a tree that a noisy calibration made look cheap stops being chosen once it has run a few times.
- gain: with distinct candidates among siblings, greedy acceptance accepts at most one node per depth, so a tree's
  tokens per step is 1 + the number of its nodes on the accepted path, and its expectation is 1 + the sum of its
  nodes' acceptance rates. `observe` counts, per node path, how often it was accepted out of the steps it was in
  the tree, from the running traffic; any prefix of the configured tree is scored from the same counts.
A fresh policy starts from the heads' offline accuracy (`shipped_prior`, from the evaluation shipped beside the
heads), counted as PRIOR_STEPS observed steps, so it speculates from the first request where the tree pays; live
counts outweigh it within a few dozen steps. A node with neither scores 0. To keep every node measured, the whole
tree is verified now and then, spending at most `explore_share` of the decoding time on it (a step of the whole tree
costs more at large batches, so it is explored less often there). The choice never changes the output (verification is
lossless); it only moves the speed.
"""
from __future__ import annotations

import json
import pathlib
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Sequence

import numpy as np
import torch

from medusa_core.backends import Backend
from medusa_core.files import written_whole
from medusa_core.timing import fastest_in_turns, timed_step
from medusa_core.tree import Path, TreeBuffers, build_tree_buffers, validate_paths

CANDIDATE_SIZES = (1, 2, 4, 8, 16, 32, 64)  # nodes, root included; each one costs calibration time
PRIOR_STEPS = 20  # the offline acceptance weighs as much as this many live steps of the node
LIVE_WEIGHT = 0.1  # each timed step moves its cost this far towards its own time (~20 steps to follow a change)


@dataclass
class TreePolicy:
    trees: tuple[TreeBuffers, ...]  # candidate prefixes of the configured tree, root alone first
    batch_sizes: tuple[int, ...]  # calibrated batch sizes, ascending
    step_s: tuple[tuple[float, ...], ...]  # [batch size][tree] measured seconds of one step
    explore_share: float = 0.03
    accepted: Counter = field(default_factory=Counter)  # node path -> steps it was accepted
    tried: Counter = field(default_factory=Counter)  # node path -> steps it was in the verified tree
    budget_s: float = 0.0  # step time exploration may still spend
    live_s: dict[tuple[int, int], float] = field(default_factory=dict)  # (batch, tree index) -> timed steps' average
    prior: dict[Path, float] = field(default_factory=dict)  # node path -> acceptance measured offline

    def acceptance(self, path: Path) -> float:
        """The node's acceptance rate: live counts, with the offline prior as PRIOR_STEPS extra steps."""
        weight = PRIOR_STEPS if path in self.prior else 0
        steps = self.tried[path] + weight
        return (self.accepted[path] + weight * self.prior.get(path, 0.0)) / steps if steps else 0.0

    def expected_length(self, tree: TreeBuffers) -> float:
        """Expected tokens per step: 1 + the nodes' acceptance rates (0 for a node never tried and without prior)."""
        return 1.0 + sum(self.acceptance(p) for p in tree.paths)

    def cost(self, batch: int, index: int) -> float:
        """Seconds of one step of trees[index] for `batch` rows: the live average once such steps ran, else
        interpolated between calibrated batch sizes, proportional to the rows beyond the largest."""
        if (live := self.live_s.get((batch, index))) is not None:
            return live
        xs, ys = self.batch_sizes, [row[index] for row in self.step_s]
        if batch >= xs[-1]:
            return ys[-1] * batch / xs[-1]
        return float(np.interp(batch, xs, ys))

    def choose(self, batch: int) -> TreeBuffers:
        """The tree for the next step of a batch of `batch` rows: the best by expected tokens/s, or the whole tree
        when the exploration budget (explore_share of the time spent so far) pays for its extra cost."""
        rates = [batch * self.expected_length(t) / self.cost(batch, i) for i, t in enumerate(self.trees)]
        best = max(range(len(rates)), key=rates.__getitem__)
        extra = self.cost(batch, len(self.trees) - 1) - self.cost(batch, best)
        self.budget_s += self.explore_share * self.cost(batch, best)
        if extra > 0 and self.budget_s >= extra:
            self.budget_s -= extra
            return self.trees[-1]
        return self.trees[best]

    def time_step(self, batch: int, tree: TreeBuffers, seconds: float) -> None:
        """Fold one step's measured seconds (heads + verification + cache update) into its tree's cost, starting
        from the calibrated cost: one slow step (a pause elsewhere) must not bar a tree that is then never re-timed."""
        index = next(i for i, t in enumerate(self.trees) if t is tree)
        old = self.cost(batch, index)
        self.live_s[(batch, index)] = old + LIVE_WEIGHT * (seconds - old)

    def observe(self, tree: TreeBuffers, accepted_paths: Sequence[Path]) -> None:
        """Record one step: the tree verified and, per speculating row, the path it accepted (() for none)."""
        for p in tree.paths:
            self.tried[p] += len(accepted_paths)
        for path in accepted_paths:
            for d in range(1, len(path) + 1):
                self.accepted[path[:d]] += 1


def shipped_prior(accuracy: Sequence[dict], paths: Sequence[Sequence[int]]) -> dict[Path, float]:
    """Each node's acceptance from the heads' offline accuracy per head ({"top1", "top5"}, head 1 first), with heads
    taken as independent (as tune_tree does): the product over the path of each rank's accuracy, where rank 0 is
    top-1, ranks 1-4 share top-5 minus top-1 equally, and deeper ranks count 0. Depths without a head count 0."""
    def rank_acc(depth: int, rank: int) -> float:
        if depth >= len(accuracy) or rank > 4:
            return 0.0
        a = accuracy[depth]
        return a["top1"] if rank == 0 else (a["top5"] - a["top1"]) / 4
    return {tuple(p): float(np.prod([rank_acc(d, r) for d, r in enumerate(p)])) for p in paths}


def prefix_trees(paths: Sequence[Sequence[int]], top_k: int) -> tuple[TreeBuffers, ...]:
    """The configured tree's prefixes (paths in configured order) of CANDIDATE_SIZES nodes that are trees."""
    trees = []
    for n in sorted({min(s, len(paths) + 1) for s in CANDIDATE_SIZES}):
        prefix = [list(p) for p in paths[: n - 1]]
        try:
            validate_paths(prefix, top_k)
        except ValueError:  # a child listed before its parent: not a tree at this size
            continue
        trees.append(build_tree_buffers(prefix, top_k))
    return tuple(trees)


def load_or_calibrate(backend: Backend, drafter, paths: Sequence[Sequence[int]], top_k: int, max_batch: int,
                      explore_share: float, cache_file: pathlib.Path) -> TreePolicy:
    """The policy with step costs from `cache_file` if an earlier start measured them (the file name carries
    everything the costs depend on), else measured now and saved there."""
    if cache_file.is_file():
        saved = json.loads(cache_file.read_text())
        trees = prefix_trees(paths, top_k)
        if saved["nodes"] == [t.num_nodes for t in trees]:
            step_s = tuple(tuple(row) for row in saved["step_s"])
            return TreePolicy(trees, tuple(saved["batch_sizes"]), step_s, explore_share)
    policy = calibrate(backend, drafter, paths, top_k, max_batch, explore_share)
    with written_whole(cache_file) as tmp:  # replicas starting together read a whole file or none
        tmp.write_text(json.dumps({"nodes": [t.num_nodes for t in policy.trees], "batch_sizes": policy.batch_sizes,
                                   "step_s": policy.step_s}))
    return policy


@torch.inference_mode()
def calibrate(backend: Backend, drafter, paths: Sequence[Sequence[int]], top_k: int, max_batch: int,
              explore_share: float = 0.03, context: int = 64, repeats: int = 3) -> TreePolicy:
    """Time one step of every candidate tree at batch sizes 1, 2, 4, ... max_batch on this backend: per batch size
    the trees take turns, one step each per round, and each keeps its fastest of `repeats` rounds after a warm-up
    round, so load that comes and goes while a replica starts touches every tree alike."""
    trees = prefix_trees(paths, top_k)
    batch_sizes = tuple(sorted({min(2 ** i, max_batch) for i in range(max_batch.bit_length() + 1)}))
    step_s = []
    for b in batch_sizes:
        prompt = [t % backend.vocab_size for t in range(1000, 1000 + context)]  # content does not change the cost
        _, cache = backend.prefill([prompt] * b)  # each timed pass adds one token per row
        steps = [partial(timed_step, backend, cache, tree, b, drafter) for tree in trees]
        step_s.append(tuple(fastest_in_turns(steps, repeats)))
    return TreePolicy(trees, batch_sizes, tuple(step_s), explore_share)

