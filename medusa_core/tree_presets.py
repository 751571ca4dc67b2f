"""Named candidate trees, as plain data (paths of head ranks; the root is implicit).

`mc_sim_7b_63` is the reference tree of FasterDecoding/Medusa (63 nodes, depth 4, ranks < 10), tuned by simulation
for Vicuna-7B on a GPU. On a CPU every tree node costs compute, so smaller trees pay better: `mc_sim_7b_63` is
ordered by expected gain, so its first n paths (`mc_n`) are the best n-node sub-trees under the same estimate.
`chain_d` speculates only the top-1 token of each of d heads.
"""
from __future__ import annotations

MC_SIM_7B_63: list[list[int]] = [
    [0], [0, 0], [1], [0, 1], [2], [0, 0, 0], [1, 0], [0, 2], [3], [0, 3], [4], [0, 4], [2, 0], [0, 5], [0, 0, 1],
    [5], [0, 6], [6], [0, 7], [0, 1, 0], [1, 1], [7], [0, 8], [0, 0, 2], [3, 0], [0, 9], [8], [9], [1, 0, 0],
    [0, 2, 0], [1, 2], [0, 0, 3], [4, 0], [2, 1], [0, 0, 4], [0, 0, 5], [0, 0, 0, 0], [0, 1, 1], [0, 0, 6],
    [0, 3, 0], [5, 0], [1, 3], [0, 0, 7], [0, 0, 8], [0, 0, 9], [6, 0], [0, 4, 0], [1, 4], [7, 0], [0, 1, 2],
    [2, 0, 0], [3, 1], [2, 2], [8, 0], [0, 5, 0], [1, 5], [1, 0, 1], [0, 2, 1], [9, 0], [0, 6, 0], [0, 0, 0, 1],
    [1, 6], [0, 7, 0],
]


# Built by `python -m medusa_core tune-tree --data generated` (the paper's greedy construction) from the held-out
# rank accuracies of the heads shipped on 2026-12-01 with head_vocab 8192: the greedy order's first 7 speculated nodes
# (head 1's top-4 alternatives, head 2 behind head 1's top-2), and its first 3, the size the measured step cost on 2
# CPU cores picked then (shipped in configs/smollm2-135m.yaml). The sequential heads shipped since begin their greedy
# order with the same 3 nodes (docs/design.md, "Choosing the tree").
SMOLLM2_GREEDY_8: list[list[int]] = [[0], [0, 0], [1], [0, 1], [2], [3], [1, 0]]
SMOLLM2_GREEDY_4: list[list[int]] = SMOLLM2_GREEDY_8[:3]


def _chain(depth: int) -> list[list[int]]:
    return [[0] * d for d in range(1, depth + 1)]


TREE_PRESETS: dict[str, list[list[int]]] = {
    "mc_sim_7b_63": MC_SIM_7B_63,
    "mc_4": MC_SIM_7B_63[:4],
    "mc_8": MC_SIM_7B_63[:8],
    "mc_16": MC_SIM_7B_63[:16],
    "mc_32": MC_SIM_7B_63[:32],
    "smollm2_greedy_8": SMOLLM2_GREEDY_8,
    "smollm2_greedy_4": SMOLLM2_GREEDY_4,
    "chain_1": _chain(1),
    "chain_2": _chain(2),
    "chain_3": _chain(3),
    "chain_4": _chain(4),
    "chain_5": _chain(5),
}


def preset_paths(name: str) -> list[list[int]]:
    """The paths of a named preset; an unknown name raises ValueError listing the known ones."""
    if name not in TREE_PRESETS:
        raise ValueError(f"unknown tree preset {name!r}; known presets: {', '.join(sorted(TREE_PRESETS))}")
    return TREE_PRESETS[name]
