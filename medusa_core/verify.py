"""Accept: which tree candidates the base model agrees with, and the bonus token. Pure tensor code.

Rules (Medusa paper, section 2.3.1, and FasterDecoding/Medusa `evaluate_posterior`):
- greedy: a node is accepted when its candidate equals the base model's argmax at its parent. Lossless.
- typical: accepted when p(candidate) > min(epsilon, alpha * exp(-H(p))) under the parent's tempered
  distribution; among paths of equal accept_len the one with the highest log-likelihood wins. Not lossless.
- lossless sampling: walk down from the root, sampling x ~ p at each node; move to the child whose candidate is x,
  stop when there is none. Every emitted token is then an exact sample of p, whatever the heads proposed; with
  samples keyed by (seed, position) (sampling.py) it is the very token plain sampling would draw there.
A path's accept_len counts its accepted nodes up to the first rejected one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from medusa_core.sampling import TINY, SamplingParams, choose_token
from medusa_core.tree import TreeBuffers


@dataclass(frozen=True)
class Accepted:
    nodes: Tensor  # [B, D+1] tree nodes of the chosen path, root first; padding repeats node 0
    accept_len: Tensor  # [B] speculated tokens accepted, 0..D
    bonus: Tensor  # [B] token chosen at the last accepted node


def greedy_node_ok(tokens: Tensor, logits: Tensor, tree: TreeBuffers) -> Tensor:
    """tokens [B, T], logits [B, T, V] -> [B, T] bool: candidate == argmax at the parent (root: True)."""
    argmax = logits.argmax(dim=-1)  # [B, T]
    ok = tokens == argmax[:, tree.parent]
    ok[:, 0] = True
    return ok


def typical_node_ok(tokens: Tensor, logits: Tensor, tree: TreeBuffers, temperature: float,
                    epsilon: float, alpha: float) -> tuple[Tensor, Tensor]:
    """-> (ok [B, T] bool, log p(candidate) under the parent [B, T])."""
    logits = logits.float()  # shifted as in sampling.probabilities, so a tiny temperature gives no NaN
    logp = torch.log_softmax((logits - logits.amax(-1, keepdim=True)) / max(temperature, TINY), dim=-1)  # [B, T, V]
    entropy = torch.special.entr(logp.exp()).sum(-1)  # [B, T]; entr(0) = 0 where p * log p is 0 * -inf
    threshold = torch.minimum(torch.full_like(entropy, epsilon), alpha * torch.exp(-entropy))  # [B, T]
    cand_logp = logp[:, tree.parent].gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [B, T]
    ok = cand_logp.exp() > threshold[:, tree.parent]
    ok[:, 0] = True
    cand_logp[:, 0] = 0.0
    return ok, cand_logp


def longest_path(node_ok: Tensor, tree: TreeBuffers, score: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """node_ok [B, T] -> (chosen leaf path [B], accept_len [B]). Ties: highest score, else the first leaf."""
    path_ok = node_ok[:, tree.leaf_nodes] & tree.leaf_valid  # [B, P, D+1]
    accept_len = path_ok[:, :, 1:].long().cumprod(dim=-1).sum(dim=-1)  # [B, P]
    best_len = accept_len.max(dim=-1).values  # [B]
    if score is None:
        return (accept_len == best_len[:, None]).long().argmax(dim=-1), best_len
    depth = torch.arange(1, tree.leaf_nodes.shape[1], device=node_ok.device)
    counted = depth[None, None, :] <= accept_len[:, :, None]  # [B, P, D]
    path_score = (score[:, tree.leaf_nodes[:, 1:]] * counted).sum(-1)  # [B, P]
    path_score = path_score.masked_fill(accept_len != best_len[:, None], float("-inf"))
    return path_score.argmax(dim=-1), best_len


def walk_tree(tokens: Tensor, logits: Tensor, tree: TreeBuffers, params: SamplingParams, seed: int,
              position: int) -> tuple[list[int], int]:
    """One row, lossless sampling. tokens [T], logits [T, V]; `position` is the sequence position of the token after
    the root -> (accepted nodes after the root, bonus token)."""
    children: dict[tuple[int, int], int] = {}
    for node in range(1, tree.num_nodes):
        children[(int(tree.parent[node]), int(tokens[node]))] = node
    node, path = 0, []
    while True:
        x = choose_token(logits[node], params, seed, position + len(path))
        child = children.get((node, x))
        if child is None:
            return path, x
        path.append(child)
        node = child


def accept(tokens: Tensor, logits: Tensor, tree: TreeBuffers, params: list[SamplingParams], seeds: list[int],
           positions: list[int], speculate: Tensor, epsilon: float, alpha: float) -> Accepted:
    """tokens [B, T], logits [B, T, V]; per row its sampling params, seed and the sequence position of the token after
    its root; speculate [B] bool (False: plain decoding)."""
    B = tokens.shape[0]
    node_ok = greedy_node_ok(tokens, logits, tree) & speculate[:, None]
    leaf, accept_len = longest_path(node_ok, tree)
    nodes = tree.leaf_nodes[leaf].clone()  # [B, D+1]
    bonus = torch.empty(B, dtype=torch.long)
    for b in range(B):
        rule = params[b].rule if bool(speculate[b]) else "plain"
        if rule == "typical":
            ok, score = typical_node_ok(tokens[b : b + 1], logits[b : b + 1], tree, params[b].temperature,
                                        epsilon, alpha)
            row_leaf, row_len = longest_path(ok, tree, score)
            nodes[b], accept_len[b] = tree.leaf_nodes[row_leaf[0]], row_len[0]
        elif rule == "lossless":
            path, bonus[b] = walk_tree(tokens[b], logits[b], tree, params[b], seeds[b], positions[b])
            nodes[b] = torch.tensor([0] + path + [0] * (nodes.shape[1] - 1 - len(path)))
            accept_len[b] = len(path)
            continue
        last = nodes[b, accept_len[b]]
        bonus[b] = choose_token(logits[b, last], params[b], seeds[b], positions[b] + int(accept_len[b]))
    return Accepted(nodes, accept_len, bonus)
