"""The Backend protocol the decode loop talks to, and `load_backend(config)`.

A backend owns the base model and its KV cache. The loop only ever asks it to prefill prompts (alone or into a
running batch), to run one forward pass over a tree of nodes for every row, to keep the accepted nodes in the cache,
and to drop finished rows.
Backends are imported lazily by name so that a missing optional dependency only matters when it is used.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from medusa_core.config import BaseModelConfig
from medusa_core.tree import TreeBuffers


@dataclass(frozen=True)
class Forward:
    logits: Tensor  # [B, T, V] float32
    hidden: Tensor  # [B, T, H] final-norm hidden states


class Backend(Protocol):
    vocab_size: int
    hidden_size: int
    context_length: int
    max_rows: int | None  # most rows a batch may hold (KV space reserved per row), None: no limit
    eos_token_ids: tuple[int, ...]
    device: torch.device  # where heads should run
    dtype: torch.dtype  # the dtype heads should use
    tokenizer: Any  # a transformers tokenizer: encode/decode/apply_chat_template

    def prefill(self, prompts: Sequence[Sequence[int]], cache: Any = None) -> tuple[Forward, Any]:
        """Run the prompts; Forward holds only each row's last position ([B, 1, ...]); returns it and the cache.
        With a running batch's cache, the new rows join it after its rows (continuous batching)."""

    def verify(self, cache: Any, tokens: Tensor, tree: TreeBuffers) -> Forward:
        """tokens [B, T] at positions len_b + depth under the tree mask; tree nodes enter the cache."""

    def keep(self, cache: Any, nodes: Tensor, keep_len: Tensor) -> None:
        """After verify: keep tree nodes nodes[b, :keep_len[b]] (root first) as row b's next cache entries."""

    def select(self, cache: Any, rows: Tensor) -> Any:
        """Keep only these batch rows (finished rows leave the batch)."""

    def lm_head(self, hidden: Tensor, vocab: int | None = None) -> Tensor:
        """[..., H] -> [..., vocab or V]: the base model's output projection over token ids below `vocab` (all by
        default), shared by version-2 heads."""

    def lm_head_rows(self, ids: Tensor) -> Tensor:
        """Token ids [...] -> their lm_head rows [..., H] (each token's output embedding): how root-conditioned
        heads see the root token."""


@runtime_checkable
class RowExtending(Protocol):
    """A backend that can grow one row of a running batch (llama.cpp: each row is its own KV stream)."""

    def extend(self, cache: Any, rows: Sequence[int], tokens: Sequence[Sequence[int]]) -> Forward:
        """Append tokens to these rows' sequences (a conversation's next turn after what the row holds), as if they
        had been part of its prompt; Forward holds each row's last position ([len(rows), 1, ...])."""


def load_backend(config: BaseModelConfig) -> Backend:
    if config.backend == "hf":
        from medusa_core.backends.hf import HFBackend

        return HFBackend.load(config)
    if config.backend == "llamacpp":
        from medusa_core.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend.load(config)
    raise ValueError(f"unknown backend {config.backend!r}")
