"""Choose the tree by measurement: the paper's greedy construction plus the backend's measured verification cost.

Medusa paper, section 3.3.1 ("optimized tree construction"): with acc[k][r] the measured probability that head k's
rank-r candidate is the right token, and heads treated as independent, a node with path (r_1, ..., r_d) is accepted
with probability prod_i acc[i][r_i], and the expected tokens per step of a tree is 1 + the sum of that over its
nodes. Adding the node of highest probability whose parent is already in the tree, one at a time, gives the best
tree of every size (the probability of a child never exceeds its parent's, so greedy order is optimal).

A step costs the heads plus one verification forward pass over the tree's nodes; on a CPU that grows with the
node count. `measure_step_cost` times both for 1..max nodes, and `choose_size` maximises
expected tokens per step / cost per step.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from medusa_core.backends import Backend
from medusa_core.heads import MedusaHeads
from medusa_core.timing import best_time, fastest_in_turns, timed_step
from medusa_core.tree import build_tree_buffers


def greedy_tree(acc: Tensor, num_nodes: int) -> list[list[int]]:
    """acc [K, R] rank accuracies -> the best tree with num_nodes - 1 speculated nodes (paths in added order)."""
    K, R = acc.shape
    paths: list[list[int]] = []
    frontier = [(-float(acc[0, r]), (r,)) for r in range(R)]  # max-heap of (probability, path) by negation
    heapq.heapify(frontier)
    while len(paths) < num_nodes - 1 and frontier:
        neg_p, path = heapq.heappop(frontier)
        paths.append(list(path))
        if len(path) < K:
            for r in range(R):
                heapq.heappush(frontier, (neg_p * float(acc[len(path), r]), path + (r,)))
    return paths


def expected_length(acc: Tensor, paths: list[list[int]]) -> float:
    """Expected tokens per step (accept_len + 1) of a tree under independent heads."""
    return 1.0 + sum(float(torch.prod(torch.stack([acc[d, r] for d, r in enumerate(p)]))) for p in paths)


@dataclass(frozen=True)
class StepCost:
    nodes: int
    verify_s: float  # best-of-repeats seconds of one verification pass (other load only adds time)
    heads_s: float  # best-of-repeats seconds of the draft by the heads the tree reads (0 for the root-only tree)

    @property
    def step_s(self) -> float:
        return self.verify_s + self.heads_s


@torch.inference_mode()
def measure_step_cost(backend: Backend, heads: MedusaHeads, acc: Tensor, max_nodes: int, context: int = 256,
                      repeats: int = 5) -> list[StepCost]:
    """Time heads + verify for trees of 1..max_nodes nodes (batch 1) after a `context`-token prompt. The sizes take
    turns, one timed pass each per round, so a drift in the machine's speed touches every size alike."""
    token = 1000 % backend.vocab_size  # content does not change the cost
    prompt = [(token + i) % backend.vocab_size for i in range(context)]
    hidden = torch.zeros(1, backend.hidden_size, dtype=backend.dtype, device=backend.device)
    root = torch.tensor([token])
    heads_s = [0.0] + [best_time(lambda: heads.draft(hidden, root, [[]], d, acc.shape[1], backend), repeats)
                       for d in range(1, heads.num_heads + 1)]  # by tree depth: only that many heads run
    trees = [build_tree_buffers(greedy_tree(acc, n), top_k=acc.shape[1]) for n in range(1, max_nodes + 1)]
    passes = [partial(timed_step, backend, backend.prefill([prompt])[1], tree) for tree in trees]
    verify_s = fastest_in_turns(passes, repeats, desc="timing verification (rounds over all sizes)")
    return [StepCost(t.num_nodes, v, heads_s[t.max_depth]) for t, v in zip(trees, verify_s)]


@dataclass(frozen=True)
class SizeChoice:
    nodes: int
    expected_length: float
    step_s: float

    @property
    def tokens_per_second(self) -> float:
        return self.expected_length / self.step_s


def choose_size(acc: Tensor, costs: list[StepCost]) -> tuple[SizeChoice, list[SizeChoice]]:
    """The size with the highest expected tokens/s, and the whole curve."""
    curve = [SizeChoice(c.nodes, expected_length(acc, greedy_tree(acc, c.nodes)), c.step_s) for c in costs]
    return max(curve, key=lambda s: s.tokens_per_second), curve


def format_curve(curve: list[SizeChoice], best: SizeChoice) -> str:
    lines = [f"{'nodes':>5}{'E[tok/step]':>13}{'step ms':>9}{'E[tok/s]':>10}"]
    for s in curve:
        mark = "  <- best" if s is best else ""
        lines.append(f"{s.nodes:>5}{s.expected_length:>13.3f}{1000 * s.step_s:>9.1f}{s.tokens_per_second:>10.1f}"
                     f"{mark}")
    return "\n".join(lines)
