"""Medusa candidate trees and the buffers that let one forward pass verify a whole tree.

Follows the Medusa paper (arXiv 2401.10774, section 2.1.2) and the behaviour of
FasterDecoding/Medusa's `generate_medusa_buffers`.

Vocabulary (used the same way everywhere in medusa_core):
- node: one token slot in the tree. Node 0 is the root: the last emitted token, not yet in the KV cache.
- path: a node's address, a tuple of head ranks; path (0, 2) is "head 0's top-1, then head 1's top-3".
  A node at depth d was proposed by head d-1. A leaf path runs root -> leaf.
- depth: number of speculated tokens from the root to a node (root 0). D is the tree's maximum depth.
- candidate: the token a node proposes. Candidates are read from a flat vector
  [root, head 0 top-k, head 1 top-k, ...] through `candidate_index`.
- accept_len: how many speculated tokens of the best path were accepted (0..D).
- bonus token: the token chosen from the base model's logits at the last accepted node.
  A step emits accept_len + 1 tokens: the accepted candidates and the bonus token.

Differences from FasterDecoding/Medusa: buffers are a frozen, validated dataclass; padded path slots carry an
explicit `leaf_valid` mask instead of pointing at a dummy zero token (a zero token could match an argmax).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

Path = tuple[int, ...]


@dataclass(frozen=True)
class TreeBuffers:
    paths: tuple[Path, ...]  # sorted by (depth, path); node i+1 is paths[i]
    top_k: int
    mask: Tensor  # [T, T] bool, node i attends to node j (ancestors and itself)
    depth: Tensor  # [T] long, position offset of each node from the root
    parent: Tensor  # [T] long, parent node (root points at itself)
    candidate_index: Tensor  # [T] long, index into the flat candidate vector
    leaf_nodes: Tensor  # [P, D+1] long, nodes along each leaf path from the root, padded with 0
    leaf_valid: Tensor  # [P, D+1] bool, False on padding

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)

    def to(self, device: torch.device | str) -> TreeBuffers:
        return TreeBuffers(
            self.paths, self.top_k, self.mask.to(device), self.depth.to(device), self.parent.to(device),
            self.candidate_index.to(device), self.leaf_nodes.to(device), self.leaf_valid.to(device),
        )


def validate_paths(paths: Sequence[Sequence[int]], top_k: int, num_heads: int | None = None) -> None:
    """Raise ValueError unless `paths` is a well-formed tree: unique, prefix-closed, ranks < top_k, depth <= heads."""
    seen = {tuple(p) for p in paths}
    if len(seen) != len(paths):
        raise ValueError("tree paths contain duplicates")
    for p in seen:
        if len(p) == 0:
            raise ValueError("tree paths must be non-empty (the root is implicit)")
        if any((not isinstance(r, int)) or r < 0 or r >= top_k for r in p):
            raise ValueError(f"tree path {list(p)} has a rank outside 0..{top_k - 1} (top_k={top_k})")
        if len(p) > 1 and p[:-1] not in seen:
            raise ValueError(f"tree path {list(p)} lacks its parent {list(p[:-1])}")
        if num_heads is not None and len(p) > num_heads:
            raise ValueError(f"tree path {list(p)} is deeper than the {num_heads} heads")


def build_tree_buffers(paths: Sequence[Sequence[int]], top_k: int, num_heads: int | None = None) -> TreeBuffers:
    """Build the verification buffers for a tree given as a list of paths (root implicit)."""
    validate_paths(paths, top_k, num_heads)
    ordered = tuple(sorted((tuple(p) for p in paths), key=lambda p: (len(p), p)))
    node_of = {p: i + 1 for i, p in enumerate(ordered)}
    num_nodes = len(ordered) + 1

    mask = torch.eye(num_nodes, dtype=torch.bool)
    mask[:, 0] = True
    depth = torch.zeros(num_nodes, dtype=torch.long)
    parent = torch.zeros(num_nodes, dtype=torch.long)
    candidate_index = torch.zeros(num_nodes, dtype=torch.long)
    for p, i in node_of.items():
        depth[i] = len(p)
        parent[i] = node_of.get(p[:-1], 0)
        candidate_index[i] = 1 + (len(p) - 1) * top_k + p[-1]
        for d in range(1, len(p)):
            mask[i, node_of[p[:d]]] = True

    leaf_nodes, leaf_valid = _leaf_buffers(ordered, node_of)
    return TreeBuffers(ordered, top_k, mask, depth, parent, candidate_index, leaf_nodes, leaf_valid)


def _leaf_buffers(ordered: tuple[Path, ...], node_of: dict[Path, int]) -> tuple[Tensor, Tensor]:
    # Leaves in reverse sorted order, as the reference does: on equal accept_len the first leaf wins.
    prefixes = {p[:-1] for p in ordered}
    leaves = [p for p in reversed(ordered) if p not in prefixes] or [()]
    max_depth = max(len(p) for p in leaves)
    rows = [[0] + [node_of[leaf[:d]] for d in range(1, len(leaf) + 1)] for leaf in leaves]
    leaf_nodes = torch.tensor([r + [0] * (max_depth + 1 - len(r)) for r in rows], dtype=torch.long)
    leaf_valid = torch.tensor([[True] * len(r) + [False] * (max_depth + 1 - len(r)) for r in rows])
    return leaf_nodes, leaf_valid


def plain_tree() -> TreeBuffers:
    """The root alone: verifying it is one step of plain autoregressive decoding."""
    return build_tree_buffers([], top_k=1)
