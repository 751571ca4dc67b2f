"""Tree buffers against the worked example of the issue and hand-drawn trees; validation errors."""
import pytest
import torch

from medusa_core.tree import build_tree_buffers, plain_tree
from medusa_core.tree_presets import TREE_PRESETS, preset_paths

EXAMPLE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_worked_example():
    t = build_tree_buffers(EXAMPLE, top_k=10)
    assert t.candidate_index.tolist() == [0, 1, 2, 11, 12, 11, 21]
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.leaf_nodes.tolist() == [[0, 1, 3, 6], [0, 2, 5, 0], [0, 1, 4, 0]]
    assert t.leaf_valid.tolist() == [[True] * 4, [True, True, True, False], [True, True, True, False]]
    assert t.parent.tolist() == [0, 0, 0, 1, 1, 2, 3]


def test_mask_of_hand_drawn_tree():
    # root -> a=[0] -> c=[0,0]; root -> b=[1]
    t = build_tree_buffers([[1], [0, 0], [0]], top_k=2)
    assert t.paths == ((0,), (1,), (0, 0))
    expected = [[1, 0, 0, 0],
                [1, 1, 0, 0],
                [1, 0, 1, 0],
                [1, 1, 0, 1]]
    assert t.mask.int().tolist() == expected
    assert t.candidate_index.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("name", sorted(TREE_PRESETS))
def test_presets_are_ancestor_closed(name):
    t = build_tree_buffers(preset_paths(name), top_k=10)
    for i, p in enumerate(t.paths, start=1):
        ancestors = {0} | {t.paths.index(p[:d]) + 1 for d in range(1, len(p))}
        assert set(torch.nonzero(t.mask[i]).flatten().tolist()) == ancestors | {i}
        assert int(t.depth[i]) == len(p)
    covered = set(t.leaf_nodes[t.leaf_valid].tolist())
    assert covered == set(range(t.num_nodes)), "every node lies on some leaf path"


def test_reference_tree_size():
    t = build_tree_buffers(preset_paths("mc_sim_7b_63"), top_k=10)
    assert (t.num_nodes - 1, t.max_depth) == (63, 4)


def test_plain_tree_is_root_only():
    t = plain_tree()
    assert t.num_nodes == 1 and t.leaf_nodes.tolist() == [[0]]


@pytest.mark.parametrize("paths, top_k, heads, match", [
    ([[0, 0]], 10, None, "lacks its parent"),
    ([[0], [10]], 10, None, "outside 0..9"),
    ([[0], [0]], 10, None, "duplicates"),
    ([[0], [0, 0], [0, 0, 0]], 10, 2, "deeper than the 2 heads"),
    ([[]], 10, None, "non-empty"),
])
def test_invalid_trees(paths, top_k, heads, match):
    with pytest.raises(ValueError, match=match):
        build_tree_buffers(paths, top_k, heads)


def test_unknown_preset_names_known_ones():
    with pytest.raises(ValueError, match="mc_sim_7b_63"):
        preset_paths("nope")
