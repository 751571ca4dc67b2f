"""CPU matrix products for the backends' torch code (model linear layers, the heads' lm_head), chosen by rows.

Decode steps and tree verifications multiply each weight by a handful of rows (B x T). MKL's kernel for x @ W.T
with a few rows streams W slower than the same product laid out as (W @ x.T).T, and both fall behind oneDNN's product
on a weight packed once into its blocked layout from a few rows on. `python benchmarks/cpu_matmul.py
[--threads N]` prints all three for every linear layer of the embedded model; the measured table is in
benchmarks/README.md ("cpu_matmul.py").
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Without a packed weight, (W @ x.T).T beats nn.Linear's product up to this many rows per torch thread.
ROWS_PER_THREAD = 4
# With one, (W @ x.T).T (one row padded to two) still wins up to this many rows on 1 and 2 threads
# (benchmarks/cpu_matmul.py).
FEW_ROWS = 4


def pack(weight: Tensor) -> Tensor | None:
    """weight [H_out, H_in] packed into oneDNN's blocked layout for `linear`; None off the CPU, for other dtypes
    than fp32, or without oneDNN (then `linear` runs the unpacked products)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, packed: Tensor | None = None) -> Tensor:
    """x [..., H_in] @ weight.T (+ bias) with the fastest CPU product for its row count: (W @ x.T).T for up to
    FEW_ROWS rows, else the packed product when `packed` (from `pack(weight)`) is given."""
    M = x.numel() // x.shape[-1]
    if packed is None or M <= FEW_ROWS:
        return rows_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [None], "")


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., H_in] @ weight.T [H_in, H_out] (+ bias), as (W @ x.T).T on the CPU for up to ROWS_PER_THREAD rows per
    thread; nn.Linear's product otherwise (other devices, more rows). An odd row count is padded to the next even
    one: MKL's kernels for 1 or 3 columns are slower than for 2 or 4 (one row: its matrix-vector kernel is as slow as
    the product this avoids)."""
    M = x.numel() // x.shape[-1]
    if weight.device.type != "cpu" or M > ROWS_PER_THREAD * torch.get_num_threads():
        return nn.functional.linear(x, weight, bias)
    rows = x.reshape(M, x.shape[-1]).contiguous()  # [M, H_in]; a column-major x would hit the slow kernel again
    if M % 2:
        rows = nn.functional.pad(rows, (0, 0, 0, 1))
    out = (weight @ rows.t())[:, :M].t().contiguous()  # [M, H_out]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
