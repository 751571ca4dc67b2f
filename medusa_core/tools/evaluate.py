"""How good are trained heads: per-head rank accuracy on held-out data, and accepted length and tokens/s per tree.

`rank_histogram` ranks each head's target over the FULL vocabulary on a held-out hidden-state cache: row k, column r
is the fraction of positions where head k's target was its rank-r candidate (so a cumulative sum gives top-r
accuracy; the paper reports top-1 and top-5). The same table drives the tree builder (`tune_tree.py`).

`benchmark_trees` decodes held-out chat prompts one at a time (batch 1, greedy, EOS ignored so every run emits the
same number of tokens), plain and with each tree, interleaved prompt by prompt in one process, and checks that the
tokens match.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from medusa_core.backends import Backend
from medusa_core.decode import Drafter, decode
from medusa_core.heads import MedusaHeads
from medusa_core.request import Request
from medusa_core.tools.distill import HiddenCache
from medusa_core.tools.train import cached_head_hidden, loss_positions
from medusa_core.tree import TreeBuffers, plain_tree


@torch.inference_mode()
def rank_histogram(heads: MedusaHeads, cache: HiddenCache, kind: str = "self", max_rank: int = 10,
                   max_positions: int = 2000, chunk: int = 64) -> Tensor:
    """[K, max_rank]: P(head k's target is its rank-r candidate), over held-out assistant positions.

    Heads with a `head_vocab` rank only ids below it: a target at or above it counts as a miss at every rank.

    Full-vocabulary logits cost ~K x 28 MFLOP per position, so at most `max_positions` evenly spaced positions
    are ranked (a standard error near 1 % on accuracy).
    """
    K = heads.num_heads
    if heads.weight.dtype != torch.float32:  # heads loaded to decode in bf16/fp16: rank in fp32, as training does
        heads = copy.deepcopy(heads).float()
    positions = loss_positions(cache)
    positions = positions[torch.linspace(0, len(positions) - 1, min(max_positions, len(positions))).long()]
    counts = torch.zeros(K, max_rank + 1)  # last column: rank >= max_rank
    totals = torch.zeros(K)
    lm_head = cache.lm_head[: heads.head_vocab]  # [V', H]
    for i in tqdm(range(0, len(positions), chunk), desc="ranking targets", unit="chunk", leave=False):
        pos = positions[i : i + chunk]
        target, valid = cache.targets(pos, K, kind)  # [N, K]
        logits = cached_head_hidden(heads, cache, pos) @ lm_head.T  # [N, K, V']
        reachable = target < lm_head.shape[0]
        score = logits.gather(-1, target.clamp(max=lm_head.shape[0] - 1)[..., None])  # [N, K, 1]
        rank = torch.where(reachable, (logits > score).sum(-1), max_rank).clamp(max=max_rank)  # [N, K]
        for k in range(K):
            counts[k] += torch.bincount(rank[valid[:, k], k], minlength=max_rank + 1).float()
        totals += valid.sum(0)
    return counts[:, :max_rank] / totals[:, None].clamp(min=1)


def accuracy_table(hist: Tensor) -> list[dict[str, float]]:
    """Per head: top-1 and top-5 accuracy from a rank histogram."""
    cum = hist.cumsum(1)
    return [{"head": k + 1, "top1": float(cum[k, 0]), "top5": float(cum[k, min(4, cum.shape[1] - 1)])}
            for k in range(hist.shape[0])]


@dataclass(frozen=True)
class TreeRun:
    name: str
    nodes: int  # tree nodes incl. the root (1 = plain decoding)
    tokens: int
    steps: int  # decode steps after the prefill
    seconds: float  # decode time, prefill excluded
    matches_plain: bool
    prompts: int  # one token per prompt comes from the prefill, not from a decode step

    @property
    def accepted_length(self) -> float:
        """Tokens per decode step (accept_len + 1 averaged); the prefill's token is not counted."""
        return (self.tokens - self.prompts) / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return (self.tokens - self.prompts) / self.seconds


def run_tree(backend: Backend, drafter: Drafter | None, tree: TreeBuffers, prompts: list[list[int]],
             max_new_tokens: int) -> tuple[list[list[int]], int, float]:
    """Decode prompts one by one; (tokens per prompt, decode steps, decode seconds excluding prefills)."""
    outputs, steps, seconds = [], 0, 0.0
    for p in prompts:
        out: list[int] = []
        request = Request(prompt_ids=tuple(p), max_tokens=max_new_tokens, ignore_eos=True)
        events = decode(backend, drafter, tree, [request])
        out += next(events)[0].tokens  # the prefill
        start = time.perf_counter()
        for ev in events:
            out += ev[0].tokens
            steps += 1
        seconds += time.perf_counter() - start
        outputs.append(out)
    return outputs, steps, seconds


def benchmark_trees(backend: Backend, trees: dict[str, tuple[Drafter, TreeBuffers]], prompts: list[list[int]],
                    max_new_tokens: int) -> list[TreeRun]:
    """Plain greedy and each (drafter, tree) decode the same prompts to the same length, interleaved prompt by
    prompt after one warm-up decode each, so that a drift in the machine's speed touches every tree alike."""
    runs = {"plain": (None, plain_tree()), **trees}
    for d, tree in runs.values():
        run_tree(backend, d, tree, prompts[:1], 8)  # first-call allocations stay out of the timing
    outputs = {name: [] for name in runs}
    steps, seconds = dict.fromkeys(runs, 0), dict.fromkeys(runs, 0.0)
    for p in tqdm(prompts, desc="prompts (plain and every tree)", unit="prompt"):
        for name, (d, tree) in runs.items():
            got, s, secs = run_tree(backend, d, tree, [p], max_new_tokens)
            outputs[name] += got
            steps[name] += s
            seconds[name] += secs
    return [TreeRun(name, tree.num_nodes, sum(map(len, outputs[name])), steps[name], seconds[name],
                    outputs[name] == outputs["plain"], len(prompts)) for name, (_, tree) in runs.items()]


@torch.inference_mode()
def top2_gap(backend: Backend, prefix: list[int]) -> float:
    """The gap between the top-2 next-token logits after `prefix`: where two greedy outputs of one model part at a
    gap this small (a near-tie), float summation order (a tree or batch pass against the one-token pass) explains it;
    a large gap would be a bug."""
    fwd, _ = backend.prefill([list(prefix)])
    top = fwd.logits[0, 0].float().topk(2).values
    return float(top[0] - top[1])


def format_runs(runs: list[TreeRun]) -> str:
    base = runs[0].tokens_per_second
    lines = [f"{'tree':<24}{'nodes':>6}{'tok/step':>10}{'tok/s':>9}{'speed-up':>10}  same-as-plain"]
    for r in runs:
        lines.append(f"{r.name:<24}{r.nodes:>6}{r.accepted_length:>10.2f}{r.tokens_per_second:>9.1f}"
                     f"{r.tokens_per_second / base:>9.2f}x  {'yes' if r.matches_plain else 'NO'}")
    return "\n".join(lines)
