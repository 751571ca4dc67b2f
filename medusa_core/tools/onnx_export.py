"""ONNX export of Medusa heads: hidden state (and root / previous tokens) -> per-head logits, for other runtimes.

The graph holds the heads' ResBlocks and the lm_head they rank with: their own (legacy format) or the base model's
shared one (version 2), cut to `head_vocab` when the heads have one. Inputs, B dynamic:
- `hidden` [B, H] float32: the base model's final-norm hidden state at a position;
- `root_ids` [B] int64 (root-conditioned heads): the token the base model chose there;
- `prev_ids` [B, K] int64 (sequential heads): the token before each head's target (the root, then the drafts).
Output: `logits` [B, K, V] float32. Not covered: the base model, the tree, verification and acceptance.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from medusa_core.heads import MedusaHeads


class HeadsGraph(nn.Module):
    """The heads with the lm_head as a constant: token ids in, rows looked up inside the graph."""

    def __init__(self, heads: MedusaHeads, lm_head: Tensor) -> None:
        super().__init__()
        self.heads = heads.float().eval()
        self.register_buffer("lm_head", lm_head.float())  # [V, H]

    def shared(self, x: Tensor, vocab: int | None) -> Tensor:
        return x @ self.lm_head[:vocab].T

    def forward(self, hidden: Tensor, root_ids: Tensor | None = None, prev_ids: Tensor | None = None) -> Tensor:
        root_rows = self.lm_head[root_ids] if root_ids is not None else None
        prev_rows = self.lm_head[prev_ids] if prev_ids is not None else None
        return self.heads.logits(hidden, root_rows, self.shared, prev_rows=prev_rows)


def example_inputs(heads: MedusaHeads, hidden_size: int, batch: int = 2, seed: int = 0) -> dict[str, Tensor]:
    """Inputs of the graph's shape: random hidden states and token ids below the heads' vocabulary."""
    rng = torch.Generator().manual_seed(seed)
    inputs = {"hidden": torch.randn(batch, hidden_size, generator=rng)}
    vocab = heads.head_vocab or 1000
    if heads.root is not None:
        inputs["root_ids"] = torch.randint(0, vocab, (batch,), generator=rng)
    if heads.prev is not None:
        inputs["prev_ids"] = torch.randint(0, vocab, (batch, heads.num_heads), generator=rng)
    return inputs


def export(heads: MedusaHeads, lm_head: Tensor, out: str | Path) -> list[str]:
    """Write the heads' graph to `out` (one file, weights inside); returns its input names."""
    graph = HeadsGraph(heads, lm_head)
    inputs = example_inputs(heads, lm_head.shape[1])
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = {name: {0: batch} for name in inputs}
    with torch.no_grad():
        program = torch.onnx.export(graph, (), kwargs=inputs, input_names=list(inputs), output_names=["logits"],
                                    dynamic_shapes=shapes, dynamo=True, external_data=False)
    program.save(str(out))
    return list(inputs)
