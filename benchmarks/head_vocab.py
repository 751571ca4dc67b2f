"""What the heads' vocabulary costs and buys: draft time and acceptance per `heads.head_vocab`, side by side.

    python benchmarks/head_vocab.py --heads heads/smollm2-135m-instruct --vocab 0 16384 8192 4096

For each N (0 = the full vocabulary): the heads' draft time on the config's backend (best of repeats, per batch
size), the held-out top-1 of every head with ids >= N counted as misses, and the expected tokens per step of the
greedy tree of `--nodes` nodes built from those accuracies (`tune_tree.py`). One run, one table: pick the N whose
saved draft time outweighs the tokens it loses.
"""
from __future__ import annotations

import argparse
import types

import torch

from medusa_core.tools.commands import config_and_backend, load_or_build_cache
from medusa_core.tools.evaluate import rank_histogram
from medusa_core.heads import load_heads
from medusa_core.timing import best_time
from medusa_core.tools.tune_tree import expected_length, greedy_tree


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--heads", default="heads/smollm2-135m-instruct")
    ap.add_argument("--vocab", nargs="+", type=int, default=[0, 16384, 8192, 4096], help="0: all token ids")
    ap.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--nodes", type=int, default=16, help="tree size for the expected tokens/step column")
    ap.add_argument("--data", choices=["sharegpt", "generated"], default="generated")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's or torch's)")
    args = ap.parse_args()
    config, backend = config_and_backend(args.config)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache_args = types.SimpleNamespace(cache_dir=None, max_seq=512, eval_tokens=30_000)
    heldout, _ = load_or_build_cache(backend, cache_args, held_out=True, data=args.data)
    print(f"{'head_vocab':>10}" + "".join(f"{f'draft ms B{b}':>13}" for b in args.batch_sizes)
          + "  top-1 per head" + f"{f'E[tok/step] {args.nodes}':>22}")
    for n in args.vocab:
        heads = load_heads(args.heads, backend.hidden_size, backend.vocab_size, n or None).to(backend.dtype)
        times = [draft_ms(heads, backend, b) for b in args.batch_sizes]
        acc = rank_histogram(heads, heldout, "self")  # [K, R]
        length = expected_length(acc, greedy_tree(acc, args.nodes))
        top1 = " ".join(f"{float(a):.3f}" for a in acc[:, 0])
        print(f"{n or 'all':>10}" + "".join(f"{t:>13.2f}" for t in times) + f"  {top1}{length:>12.2f}")


@torch.inference_mode()
def draft_ms(heads, backend, batch: int) -> float:
    hidden = torch.randn(batch, backend.hidden_size, dtype=backend.dtype, device=backend.device)
    roots = torch.full((batch,), 1000)
    return 1000 * best_time(lambda: heads.draft(hidden, roots, [[]] * batch, heads.num_heads, 10, backend),
                            repeats=20)


if __name__ == "__main__":
    main()
