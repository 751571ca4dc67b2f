"""Compare training choices on one cache and a small budget: targets (self vs dataset), loss vocabulary, head count.

    python -m medusa_core train --data sharegpt --train-tokens 100000 --steps 0 --out /tmp/x  # builds the caches
    python benchmarks/compare_training.py --train-cache .cache/medusa/train-sharegpt-512 \
        --heldout-cache .cache/medusa/heldout-sharegpt-512 --steps 1000

Each variant trains from scratch for the same number of steps, then is scored on the held-out cache (top-1 vs the
base model's argmax, which is what greedy acceptance needs) and by real greedy decoding of held-out chat prompts with
a chain tree as deep as the heads (accepted tokens per step, identical output checked). Prints one table.
"""
from __future__ import annotations

import argparse

import torch

from medusa_core import data as sharegpt
from medusa_core.backends import load_backend
from medusa_core.config import DEFAULT_CONFIG, load_config
from medusa_core.distill import HiddenCache
from medusa_core.evaluate import accuracy_table, rank_histogram, run_tree
from medusa_core.train import TrainConfig, train
from medusa_core.tree import build_tree_buffers, plain_tree
from medusa_core.tree_presets import preset_paths

VARIANTS = {
    "self/batch/4": dict(targets="self", vocab="batch", num_heads=4),
    "dataset/batch/4": dict(targets="dataset", vocab="batch", num_heads=4),
    "self/full/4": dict(targets="self", vocab="full", num_heads=4),
    "self/batch/5": dict(targets="self", vocab="batch", num_heads=5),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-cache", required=True)
    parser.add_argument("--heldout-cache", required=True)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(2)
    cache, heldout = HiddenCache.load(args.train_cache), HiddenCache.load(args.heldout_cache)
    backend = load_backend(load_config(DEFAULT_CONFIG).base_model)
    _, held_out = sharegpt.split(sharegpt.read_sharegpt()[0])
    prompts = [p for c in held_out if (p := sharegpt.first_turn_prompt(backend.tokenizer, c, 160))][: args.prompts]
    plain, _, _ = run_tree(backend, None, plain_tree(), prompts, args.max_new_tokens)
    rows = []
    for name in args.variants:
        cfg = TrainConfig(steps=args.steps, batch_positions=args.batch, **VARIANTS[name])
        result = train(cache, cfg)
        acc = accuracy_table(rank_histogram(result.heads, heldout, "self", max_positions=2000))
        tree = build_tree_buffers(preset_paths(f"chain_{cfg.num_heads}"), 10, cfg.num_heads)
        got, steps, _ = run_tree(backend, result.heads, tree, prompts, args.max_new_tokens)
        emitted = sum(map(len, got)) - len(prompts)
        rows.append((name, result.seconds, acc, emitted / steps, got == plain))
        print(f"{name}: {result.seconds:.0f} s, head-1 top-1 {acc[0]['top1']:.3f}, chain {emitted / steps:.2f} tok/step")
    print(f"\n{args.steps} steps x {args.batch} positions on {cache.num_tokens} cached tokens; "
          f"held-out accuracy vs base argmax; chain tree tokens/step on {len(prompts)} prompts x "
          f"{args.max_new_tokens} tokens")
    print(f"{'variant':<18}{'train s':>8}" + "".join(f"{'h' + str(k + 1) + ' top1':>9}" for k in range(5))
          + f"{'chain tok/step':>16}  same")
    for name, secs, acc, length, same in rows:
        accs = "".join(f"{a['top1']:>9.3f}" for a in acc) + " " * 9 * (5 - len(acc))
        print(f"{name:<18}{secs:>8.0f}{accs}{length:>16.2f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
