"""What Medusa can gain on this machine: plain vs Medusa with random, configured and oracle heads, per tree.

    python benchmarks/ceiling.py [--config configs/smollm2-135m.yaml] [--tokens 64] [--trees chain_4 mc_16 ...]

Oracle heads know the greedy continuation, so every step accepts a whole path: their tokens/s is the ceiling a
tree can reach on this backend. Random heads are the floor (about one token per step plus the tree's cost).
All rows decode the same prompts one at a time, EOS ignored, in one run; every row's output must equal plain.
"""
from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from medusa_core.config import DEFAULT_CONFIG, load_config
from medusa_core.decode import decode
from medusa_core.request import Request
from medusa_core.generator import load_generator
from medusa_core.heads import random_heads
from medusa_core.tools.oracle import OracleDrafter
from medusa_core.tree import build_tree_buffers, plain_tree
from medusa_core.tree_presets import preset_paths

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "List three primary colors:", "The quick brown fox"]


def run(backend, drafter, tree, prompts, n: int, speculate: bool) -> tuple[list[list[int]], float, int]:
    """Decode each prompt alone; return tokens, seconds and decode steps."""
    outs, steps, start = [], 0, time.perf_counter()
    for p in prompts:
        out = []
        request = Request(prompt_ids=p, max_tokens=n, mode="medusa" if speculate else "plain", ignore_eos=True)
        for events in decode(backend, drafter, tree, [request]):
            steps += 1
            out += events[0].tokens
        outs.append(out)
    return outs, time.perf_counter() - start, steps - len(prompts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--trees", nargs="+", default=["chain_4", "mc_8", "mc_16", "mc_32", "mc_sim_7b_63"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = load_generator(load_config(args.config))
    prompts = [tuple(gen.encode(t)) for t in PROMPTS]
    ref, secs, steps = run(gen.backend, None, plain_tree(), prompts, args.tokens, False)
    total = len(prompts) * args.tokens
    rows = [("plain", "-", total / secs, total / steps, True)]
    heads = {"random": random_heads(4, gen.backend.hidden_size, 0, 0.02, gen.backend.dtype).to(gen.backend.device),
             "configured": gen.drafter,
             "oracle": OracleDrafter(dict(zip(prompts, ref)), 5, gen.backend.vocab_size)}
    for tree_name in tqdm(args.trees, desc="trees"):
        for name, drafter in heads.items():
            tree = build_tree_buffers(preset_paths(tree_name), top_k=10)
            if tree.max_depth > getattr(drafter, "num_heads", 5):
                continue
            out, secs, steps = run(gen.backend, drafter, tree, prompts, args.tokens, True)
            rows.append((f"medusa/{name}", tree_name, total / secs, total / steps, out == ref))
    base = rows[0][2]
    print(f"\n{len(prompts)} prompts x {args.tokens} tokens, one at a time, {args.threads} threads, {gen.config.name}")
    print("| decoding | tree | tokens/s | vs plain | tokens/step | output == plain |")
    print("|---|---|---|---|---|---|")
    for name, tree_name, rate, per_step, same in rows:
        print(f"| {name} | {tree_name} | {rate:.1f} | {rate / base:.2f}x | {per_step:.2f} | {same} |")


if __name__ == "__main__":
    main()
