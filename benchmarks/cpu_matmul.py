"""Why the transformers backend swaps nn.Linear for CpuLinear on the CPU: the products, side by side.

    python benchmarks/cpu_matmul.py [--config configs/smollm2-135m.yaml] [--rows 1 2 3 4 8 16 64] [--low-precision]

For M rows (M = tree nodes x batch in a decode step), times every linear layer of the base model once, in model
order, so the weights stream from memory as in a real step: `F.linear(x, W)` (nn.Linear's product, x @ W.T),
`rows_linear(x, W)` (the same product computed as (W @ x.T).T, one row padded to two), oneDNN's product on the
weight packed once (`kernels.pack`), and `kernels.linear`, which picks one of the last two by row count (what
CpuLinear runs). Best of repeats, ms for the whole model, one run; the last column checks that all give the same
numbers. With --low-precision, also the products a cheaper weight encoding would give (different numbers, so not
checked): bf16 `F.linear`, and int8 weights (one scale per output channel) times bf16 rows,
`torch._weight_int8pack_mm`.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from medusa_core.backends.hf import load_model_and_tokenizer
from medusa_core.backends.kernels import linear, pack, rows_linear
from medusa_core.config import load_config
from medusa_core.timing import best_time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2, 3, 4, 8, 16, 64])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the config's or torch's)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--low-precision", action="store_true", help="also time bf16 and int8-weight products")
    args = ap.parse_args()
    config = load_config(args.config).base_model
    torch.set_num_threads(args.threads or config.torch_threads or torch.get_num_threads())
    model, _ = load_model_and_tokenizer(config)
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear)]  # in model order
    print(f"{len(weights)} linear layers, {sum(w.numel() for w in weights) / 1e6:.1f} M weights, "
          f"{torch.get_num_threads()} threads")
    packed = [pack(w) for w in weights]
    low_weights = low_precision_weights(weights) if args.low_precision else None
    print(f"{'rows':>5}{'F.linear ms':>13}{'rows_linear ms':>16}{'packed ms':>11}{'linear ms':>11}{'speed-up':>10}"
          f"{'max |diff|':>12}")
    with torch.inference_mode():
        for M in args.rows:
            xs = {w.shape[1]: torch.randn(M, w.shape[1], generator=torch.Generator().manual_seed(M))
                  for w in weights}
            products = {
                "F.linear": lambda w, p: nn.functional.linear(xs[w.shape[1]], w),
                "rows_linear": lambda w, p: rows_linear(xs[w.shape[1]], w),
                "packed": lambda w, p: torch.ops.mkldnn._linear_pointwise(xs[w.shape[1]], p, None, "none", [None], ""),
                "linear": lambda w, p: linear(xs[w.shape[1]], w, None, p),
            }
            ms = {name: 1000 * best_time(lambda: [f(w, p) for w, p in zip(weights, packed)], args.repeats)
                  for name, f in products.items()}
            low = low_precision_ms(low_weights, M, args.repeats) if args.low_precision else ""
            diff = max(float((products["F.linear"](w, p) - f(w, p)).abs().max())
                       for w, p in zip(weights, packed) for f in products.values())
            print(f"{M:>5}{ms['F.linear']:>13.1f}{ms['rows_linear']:>16.1f}{ms['packed']:>11.1f}{ms['linear']:>11.1f}"
                  f"{ms['F.linear'] / ms['linear']:>9.2f}x{diff:>12.1e}{low}", flush=True)


def low_precision_weights(weights: list[torch.Tensor]) -> tuple[list, list]:
    """The weights in bf16, and as int8 with one bf16 scale per output channel (made once, timed at every M)."""
    bf16 = [w.to(torch.bfloat16) for w in weights]
    scales = [w.abs().amax(1).clamp(min=1e-8) / 127 for w in weights]
    int8 = [((w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s.to(torch.bfloat16))
            for w, s in zip(weights, scales)]
    return bf16, int8


def low_precision_ms(low_weights: tuple[list, list], M: int, repeats: int) -> str:
    """ms for the whole model with bf16 weights, and with int8 weights (per-channel scales) times bf16 rows."""
    bf16, int8 = low_weights
    xs = {w.shape[1]: torch.randn(M, w.shape[1], dtype=torch.bfloat16) for w in bf16}
    bf16_ms = 1000 * best_time(lambda: [nn.functional.linear(xs[w.shape[1]], w) for w in bf16], repeats)
    int8_ms = 1000 * best_time(lambda: [torch._weight_int8pack_mm(xs[q.shape[1]], q, s) for q, s in int8], repeats)
    return f"   bf16 {bf16_ms:.1f} ms, int8 x bf16 {int8_ms:.1f} ms"


if __name__ == "__main__":
    main()
