"""Acceptance rules on literal tensors: greedy (all, none, partial, ties), typical, lossless walk, top_p."""
import math

import pytest
import torch

from medusa_core.request import SamplingParams
from medusa_core.sampling import probabilities
from medusa_core.tree import build_tree_buffers
from medusa_core.verify import accept, greedy_node_ok, longest_path, typical_node_ok, walk_tree

# root(0) -> [0](1) -> [0,0](3) -> [0,0,0](6);  root -> [1](2) -> [1,0](5);  [0] -> [0,1](4)
TREE = build_tree_buffers([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]], top_k=10)
V = 8


def logits_for(argmax_per_node, peak=10.0):
    """[1, T, V] logits whose argmax at node i is argmax_per_node[i]."""
    x = torch.zeros(1, len(argmax_per_node), V)
    for i, a in enumerate(argmax_per_node):
        x[0, i, a] = peak
    return x


def greedy(tokens, argmax):
    tokens = torch.tensor([tokens])
    ok = greedy_node_ok(tokens, logits_for(argmax), TREE)
    leaf, n = longest_path(ok, TREE)
    return TREE.leaf_nodes[leaf[0]].tolist(), int(n[0])


def test_greedy_accepts_all():
    # tokens per node:      root a  b  aa ab ba aaa
    path, n = greedy([5, 1, 2, 3, 4, 6, 7], argmax=[1, 3, 6, 7, 0, 0, 0])
    assert (path, n) == ([0, 1, 3, 6], 3)


def test_greedy_accepts_none():
    path, n = greedy([5, 1, 2, 3, 4, 6, 7], argmax=[0, 0, 0, 0, 0, 0, 0])
    assert n == 0 and path[0] == 0


def test_greedy_partial_on_second_branch():
    # root's argmax is b's token (2); b's argmax is ba's token (6); ba's argmax is irrelevant (leaf)
    path, n = greedy([5, 1, 2, 3, 4, 6, 7], argmax=[2, 0, 6, 0, 0, 0, 0])
    assert (path, n) == ([0, 2, 5, 0], 2)


def test_greedy_tie_takes_first_leaf_in_order():
    # a accepted, then both aa and ab rejected: leaves [0,1,3,6] and [0,1,4] tie at accept_len 1
    path, n = greedy([5, 1, 2, 3, 4, 6, 7], argmax=[1, 0, 0, 0, 0, 0, 0])
    assert n == 1 and path == [0, 1, 3, 6]


def test_padding_never_counts():
    # Padding slots point at node 0; a root token equal to the argmax must not extend short paths.
    path, n = greedy([0, 1, 2, 3, 4, 6, 7], argmax=[2, 0, 6, 0, 0, 0, 0])
    assert (path, n) == ([0, 2, 5, 0], 2)


def test_typical_threshold():
    T = TREE.num_nodes
    logits = torch.full((1, T, V), -10.0)
    logits[0, :, 0] = 10.0  # every node confident in token 0, which no child proposes
    logits[0, 0, 1] = 20.0  # root: confident in token 1 (node a)
    logits[0, 1, :] = 0.0  # a: uniform -> entropy log V, threshold alpha/V = 0.0375 < p = 1/8 -> accept
    tokens = torch.tensor([[5, 1, 2, 3, 4, 6, 7]])
    ok, logp = typical_node_ok(tokens, logits, TREE, temperature=1.0, epsilon=0.09, alpha=0.3)
    assert ok[0].tolist() == [True, True, False, True, True, False, False]
    assert math.isclose(float(logp[0, 3]), -math.log(V), rel_tol=1e-5)
    leaf, n = longest_path(ok, TREE, logp)
    assert int(n[0]) == 2


def test_typical_rejects_when_flat_and_below_epsilon():
    logits = torch.zeros(1, TREE.num_nodes, 1000)  # p = 0.001 < min(0.09, 0.3/1000)? no: 0.3/1000 = 0.0003
    tokens = torch.tensor([[5, 1, 2, 3, 4, 6, 7]])
    ok, _ = typical_node_ok(tokens, logits, TREE, 1.0, 0.09, 0.3)
    assert ok[0, 1:].all()  # uniform over 1000: p=1e-3 > 3e-4, accepted (high entropy lowers the bar)
    logits[0, :, 0] = 8.0  # peaked: entropy ~0 -> threshold = epsilon = 0.09, p(others) tiny -> rejected
    ok, _ = typical_node_ok(tokens, logits, TREE, 1.0, 0.09, 0.3)
    assert not ok[0, 1:].any()


@pytest.mark.parametrize("root_a,want", [(2.0, ([0, 2, 5, 0], 2, 4)), (3.0, ([0, 1, 3, 6], 2, 5))])
def test_typical_step_accepts_the_likeliest_of_the_longest_paths(root_a, want):
    """accept() end to end with the typical rule: a and b both pass the root's threshold; each accepts one child
    (aa, ba), aaa is rejected; the tie at length 2 goes to the path with the higher log-likelihood, and the bonus is
    sampled at its last node (peaked there, so the sample is known)."""
    logits = torch.zeros(1, TREE.num_nodes, V)
    logits[0, 0, 1], logits[0, 0, 2] = root_a, 2.5  # root: p(a) vs p(b)
    logits[0, 1, 3] = 4.0  # a: aa likely
    logits[0, 2, 6] = 4.0  # b: ba likely
    logits[0, 3, 5] = 50.0  # aa: certain of 5, so aaa (token 7) is rejected; bonus 5 on path a
    logits[0, 5, 4] = 50.0  # ba (leaf): certain of 4: bonus 4 on path b
    tokens = torch.tensor([[5, 1, 2, 3, 4, 6, 7]])
    params = [SamplingParams(temperature=1.0, seed=3, acceptance="typical")]
    acc = accept(tokens, logits, TREE, params, seeds=[3], positions=[10], speculate=torch.tensor([True]),
                 epsilon=0.09, alpha=0.3)
    assert (acc.nodes[0].tolist(), int(acc.accept_len[0]), int(acc.bonus[0])) == want


def test_typical_step_rejects_unlikely_candidates_and_samples_at_the_root():
    logits = torch.zeros(1, TREE.num_nodes, V)
    logits[0, 0, 0] = 8.0  # root peaked on 0 (proposed by no child): p(a), p(b) << epsilon
    params = [SamplingParams(temperature=1.0, acceptance="typical")]
    acc = accept(torch.tensor([[5, 1, 2, 3, 4, 6, 7]]), logits, TREE, params, seeds=[0], positions=[10],
                 speculate=torch.tensor([True]), epsilon=0.09, alpha=0.3)
    assert int(acc.accept_len[0]) == 0 and acc.nodes[0, 0] == 0


def test_walk_tree_follows_samples():
    # Peaked distributions make sampling deterministic: root -> b (token 2) -> ba (6) -> stop with bonus 3.
    logits = logits_for([2, 0, 6, 0, 0, 3, 0], peak=50.0)[0]
    tokens = torch.tensor([5, 1, 2, 3, 4, 6, 7])
    p = SamplingParams(temperature=1.0, acceptance="lossless", seed=0)
    path, bonus = walk_tree(tokens, logits, TREE, p, seed=0, position=10)
    assert (path, bonus) == ([2, 5], 3)


def test_accept_mixed_rows_and_plain_row():
    tokens = torch.tensor([[5, 1, 2, 3, 4, 6, 7]] * 2)
    logits = torch.cat([logits_for([1, 3, 6, 7, 0, 0, 4])] * 2)
    params = [SamplingParams(), SamplingParams()]
    acc = accept(tokens, logits, TREE, params, seeds=[0, 0], positions=[10, 10],
                 speculate=torch.tensor([True, False]), epsilon=0.09, alpha=0.3)
    assert acc.accept_len.tolist() == [3, 0]
    assert acc.bonus.tolist() == [4, 1]  # row 0: argmax at node 6; row 1 (plain): argmax at the root


def test_top_p_keeps_smallest_prefix():
    probs = probabilities(torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])), temperature=1.0, top_p=0.7)
    assert torch.allclose(probs, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                    dict(temperature=0.5, acceptance="greedy")])
def test_bad_sampling_params(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
