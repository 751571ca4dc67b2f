"""The paper's greedy tree construction: valid trees of the requested size, expected length growing with size."""
import pytest
import torch

from medusa_core.tree import build_tree_buffers
from medusa_core.tools.tune_tree import StepCost, choose_size, expected_length, greedy_tree

# Rank accuracies shaped like the paper's Vicuna-7B heads (top-1 0.56/0.32/0.20/0.15), decaying with rank.
ACC = torch.tensor([[0.56, 0.12, 0.05, 0.03, 0.02], [0.32, 0.12, 0.06, 0.03, 0.03],
                    [0.20, 0.10, 0.06, 0.03, 0.03], [0.15, 0.08, 0.06, 0.03, 0.02]])


@pytest.mark.parametrize("nodes", [1, 2, 5, 16, 33, 64])
def test_trees_are_valid_and_sized(nodes):
    paths = greedy_tree(ACC, nodes)
    assert len(paths) == nodes - 1
    tree = build_tree_buffers(paths, top_k=ACC.shape[1], num_heads=ACC.shape[0])  # validates prefix closure
    assert tree.num_nodes == nodes


def test_expected_length_grows_with_size():
    lengths = [expected_length(ACC, greedy_tree(ACC, n)) for n in range(1, 65)]
    assert lengths[0] == 1.0
    assert all(b > a for a, b in zip(lengths, lengths[1:]))
    assert lengths[1] == pytest.approx(1.56)


def test_greedy_beats_other_trees_of_the_same_size():
    for n, other in [(4, [[0], [0, 0], [0, 0, 0]]), (4, [[0], [1], [2]]), (5, [[0], [1], [0, 0], [0, 1]])]:
        assert expected_length(ACC, greedy_tree(ACC, n)) >= expected_length(ACC, other) - 1e-9
    assert greedy_tree(ACC, 4) == [[0], [0, 0], [1]]  # 0.56, 0.179, 0.12


def test_choose_size_trades_length_for_cost():
    flat = [StepCost(n, 0.01, 0.0) for n in range(1, 33)]  # free nodes: the biggest tree wins
    assert choose_size(ACC, flat)[0].nodes == 32
    steep = [StepCost(n, 0.01 * n, 0.0) for n in range(1, 33)]  # cost proportional to nodes: plain wins
    assert choose_size(ACC, steep)[0].nodes == 1


def test_measure_step_cost_times_every_size(tiny_backend):
    from medusa_core.heads import random_heads
    from medusa_core.tools.tune_tree import measure_step_cost

    heads = random_heads(3, tiny_backend.hidden_size, seed=0, scale=0.02, dtype=tiny_backend.dtype)
    acc = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.1, 0.05], [0.2, 0.1, 0.05]])
    costs = measure_step_cost(tiny_backend, heads, acc, max_nodes=6, context=16, repeats=2)
    assert [c.nodes for c in costs] == [1, 2, 3, 4, 5, 6]
    assert all(0 < c.verify_s < 1 for c in costs)
    assert costs[0].heads_s == 0 and all(c.heads_s > 0 for c in costs[1:])
