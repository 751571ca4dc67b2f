"""Why the transformers backend swaps nn.Linear for RowsLinear on the CPU: both products, side by side.

    python benchmarks/cpu_matmul.py [--config configs/smollm2-135m.yaml] [--rows 1 2 3 4 8 16 64]

For M rows (M = tree nodes x batch in a decode step), times every linear layer of the base model once, in model
order, so the weights stream from memory as in a real step: `F.linear(x, W)` (nn.Linear's product, x @ W.T) and
`rows_linear(x, W)` (the same product computed as (W @ x.T).T, one row padded to two). Best of repeats, ms for
the whole model, one run; the last column checks both give the same numbers.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from medusa_core.backends.hf import load_model_and_tokenizer
from medusa_core.backends.kernels import rows_linear
from medusa_core.config import load_config
from medusa_core.tune_tree import best_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 8, 16, 64])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's or torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    config = load_config(args.config).base_model
    torch.set_num_threads(args.threads or config.torch_threads or torch.get_num_threads())
    model, _ = load_model_and_tokenizer(config)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]  # in model order
    print(f"{len(weights)} linear layers, {sum(w.numel() for w in weights) / 1e6:.1f} M weights, "
          f"{torch.get_num_threads()} threads")
    print(f"{'rows':>5}{'F.linear ms':>13}{'rows_linear ms':>16}{'speed-up':>10}{'max |diff|':>12}")
    with torch.inference_mode():
        for M in args.rows:
            xs = {w.shape[1]: torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M))
                  for w in weights}
            base = best_time(lambda: [nn.functional.linear(xs[w.shape[1]], w) for w in weights], args.repeats)
            fast = best_time(lambda: [rows_linear(xs[w.shape[1]], w) for w in weights], args.repeats)
            diff = max(float((nn.functional.linear(xs[w.shape[1]], w) - rows_linear(xs[w.shape[1]], w)).abs().max())
                       for w in weights)
            print(f"{M:>5}{1000 * base:>13.1f}{1000 * fast:>16.1f}{base / fast:>9.2f}x{diff:>12.1e}", flush=True)


if __name__ == "__main__":
    main()
