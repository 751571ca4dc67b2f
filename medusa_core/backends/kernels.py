"""CPU matrix products for few rows, shared by the backends' torch code (model linear layers, the heads' lm_head).

MKL's kernel for x @ W.T with a handful of rows streams W 1.3-3x slower on this machine than the same product laid
out as (W @ x.T).T; decode steps and small tree verifications are exactly such products. `python
benchmarks/cpu_matmul.py [--threads N]` prints both for every linear layer of the embedded model.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

# Up to this many rows per torch thread (W @ x.T).T is the faster product; above, nn.Linear's own is as fast or
# faster (benchmarks/cpu_matmul.py: the cross-over is at 5-6 rows on 1 thread, 11-12 on 2).
ROWS_PER_THREAD = 4


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., H_in] @ weight.T [H_in, H_out] (+ bias), as (W @ x.T).T on the CPU for up to ROWS_PER_THREAD rows per
    thread; nn.Linear's product otherwise (other devices, more rows). A single row is padded to two: MKL's
    matrix-vector kernel is as slow as the product this avoids."""
    M = x.numel() // x.shape[-1]
    if weight.device.type != "cpu" or M > ROWS_PER_THREAD * torch.get_num_threads():
        return nn.functional.linear(x, weight, bias)
    rows = x.reshape(M, x.shape[-1]).contiguous()  # [M, H_in]; a column-major x would hit the slow kernel again
    if M == 1:
        rows = nn.functional.pad(rows, (0, 0, 0, 1))
    out = (weight @ rows.t())[:, :M].t().contiguous()  # [M, H_out]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])
