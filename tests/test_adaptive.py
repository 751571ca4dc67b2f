"""The adaptive tree: which prefix of the tree it picks from measured cost and acceptance, and that the choice never
changes greedy or seeded output (embedded model, shipped heads, adaptive policy calibrated on the real backend)."""
from dataclasses import replace

from medusa_core.adaptive import PRIOR_STEPS, TreePolicy, calibrate, prefix_trees, shipped_prior
from medusa_core.generator import MedusaGenerator
from medusa_core.request import Request, SamplingParams
from medusa_core.tree_presets import preset_paths

PATHS = [[0], [1], [0, 0], [2], [0, 1], [0, 0, 0], [1, 0]]  # 8 nodes, parents listed first


def policy(step_s, explore_share=0.0) -> TreePolicy:
    trees = prefix_trees(PATHS, top_k=10)
    return TreePolicy(trees, (1, 8), step_s, explore_share)


def sizes(p: TreePolicy) -> list[int]:
    return [t.num_nodes for t in p.trees]


def test_prefixes_are_trees_smallest_first():
    trees = prefix_trees(PATHS, top_k=10)
    assert [t.num_nodes for t in trees] == [1, 2, 4, 8]
    assert trees[2].paths == ((0,), (1,), (0, 0))
    shuffled = prefix_trees([[0, 0], [0], [1]], top_k=10)  # a child before its parent: that prefix is skipped
    assert [t.num_nodes for t in shuffled] == [1, 4]


def test_untried_heads_mean_plain_decoding():
    p = policy(((1.0, 1.1, 1.3, 1.7), (2.0, 2.6, 3.8, 6.2)))
    assert p.choose(1).num_nodes == 1


def test_shipped_accuracy_speculates_from_the_first_step_and_live_counts_take_over():
    """A fresh policy with the heads' offline accuracy picks the tree where it pays (before: plain decoding until
    exploration had measured every node); live acceptance then outweighs the prior."""
    accuracy = [{"top1": 0.8, "top5": 0.9}, {"top1": 0.5, "top5": 0.7}, {"top1": 0.3, "top5": 0.5}]
    prior = shipped_prior(accuracy, PATHS)
    assert prior[(0,)] == 0.8 and abs(prior[(1,)] - 0.1 / 4) < 1e-9 and abs(prior[(0, 0, 0)] - 0.12) < 1e-9
    assert shipped_prior([], PATHS) == {tuple(p): 0.0 for p in PATHS}
    p = policy(((1.0, 1.02, 1.06, 1.14), (2.0, 3.0, 5.0, 9.0)))
    assert p.choose(1).num_nodes == 1  # no prior: plain
    p.prior = prior
    assert p.choose(1).num_nodes > 1
    full = p.trees[-1]
    for _ in range(50 * PRIOR_STEPS):  # the heads turn out useless on this traffic
        p.observe(full, [()])
    assert p.acceptance((0,)) < 0.02 and p.choose(1).num_nodes == 1


def test_good_heads_pick_a_tree_and_bigger_batches_shrink_it():
    # Batch 1: a tree costs little more than one token; batch 8: every node costs (a CPU).
    p = policy(((1.0, 1.02, 1.06, 1.14), (2.0, 3.0, 5.0, 9.0)))
    full = p.trees[-1]
    for _ in range(100):  # head 0's top-1 right 80 % of the time, the chain below it 50 %, the rest 5 %
        p.observe(full, [(0, 0, 0)] * 4 + [(0,)] * 4 + [()] * 2)
    assert p.expected_length(full) > 2.0
    assert p.choose(1).num_nodes == 8
    assert 1 < p.choose(8).num_nodes < 8
    assert p.choose(4).num_nodes >= p.choose(8).num_nodes


def test_exploration_spends_its_share_of_time_on_the_whole_tree():
    p = policy(((1.0, 1.1, 1.3, 1.7), (2.0, 2.6, 3.8, 6.2)), explore_share=0.05)
    for batch in (1, 8):
        picks = [p.choose(batch).num_nodes for _ in range(2000)]
        assert set(picks) == {1, 8}, "plain, except exploration steps of the whole tree"
        extra = p.cost(batch, 3) - p.cost(batch, 0)
        spent = picks.count(8) * extra / (len(picks) * p.cost(batch, 0))
        assert abs(spent - 0.05) < 0.005, spent
    assert policy(((1.0, 1.1, 1.3, 1.7), (2.0, 2.6, 3.8, 6.2))).choose(1).num_nodes == 1  # share 0: never


def test_live_step_times_overrule_a_calibration_that_made_a_tree_look_cheap():
    # Calibrated (noisily): a 2-node step for 8 rows at 1.1x a plain one. It really takes 2x.
    p = policy(((1.0, 1.02, 1.06, 1.14), (2.0, 2.2, 5.0, 9.0)))
    for _ in range(100):  # head 0's top-1 right half the time: 1.5 tokens per step
        p.observe(p.trees[-1], [(0,)] * 5 + [()] * 5)
    assert p.choose(8).num_nodes == 2 and p.choose(1).num_nodes == 2
    for _ in range(20):
        tree = p.choose(8)
        p.time_step(8, tree, 4.0 if tree.num_nodes == 2 else 2.1)
    assert p.choose(8).num_nodes == 1, "the live times show the tree does not pay at batch 8"
    assert 8 * 1.5 / p.cost(8, 1) < 8 / p.cost(8, 0) and 2.0 < p.cost(8, 0) < 2.1
    assert p.choose(1).num_nodes == 2, "batch 1 keeps its own costs"
    p.time_step(1, p.trees[1], 2.02)
    assert abs(p.cost(1, 1) - 1.12) < 1e-9, "a moving average from the calibrated cost: a slow step moves it a tenth"


def test_cost_interpolates_between_batch_sizes_and_scales_beyond():
    p = policy(((1.0,) * 4, (8.0,) * 4))
    assert p.cost(1, 0) == 1.0 and p.cost(8, 0) == 8.0
    assert abs(p.cost(4, 0) - 4.0) < 1e-9
    assert p.cost(16, 0) == 16.0


def test_adaptive_output_equals_plain(embedded_generator):
    gen = embedded_generator
    adaptive = calibrate(gen.backend, gen.drafter, preset_paths("mc_16"), 10, max_batch=2, explore_share=0.5)
    assert all(s > 0 for row in adaptive.step_s for s in row)
    agen = MedusaGenerator(gen.config, gen.backend, gen.drafter, gen.tree, adaptive)
    reqs = [Request(prompt_ids=tuple(gen.encode(p)), max_tokens=24, ignore_eos=True)
            for p in ["Hello, my name is", "def f(x):"]]
    got = agen.generate(reqs)
    ref = gen.generate([Request(prompt_ids=r.prompt_ids, max_tokens=24, mode="plain", ignore_eos=True) for r in reqs])
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
    # Seeded sampling (the default, lossless rule): the policy's changing tree must not change what a seed samples.
    sampled = [replace(r, sampling=SamplingParams(temperature=0.8, seed=7)) for r in reqs]
    got = agen.generate(sampled)
    ref = gen.generate([replace(r, mode="plain") for r in sampled])
    for g, r in zip(got, ref):
        assert g.token_ids == r.token_ids
    assert sum(adaptive.tried.values()) > 0, "exploration steps measured the nodes"
    assert adaptive.live_s and all(s > 0 for s in adaptive.live_s.values()), "the steps were timed"


def test_step_costs_are_measured_once_then_read_back(tiny_backend, tmp_path):
    from medusa_core.adaptive import load_or_calibrate
    from medusa_core.heads import random_heads

    import torch

    heads = random_heads(4, 64, seed=0, scale=0.02, dtype=torch.float32)
    cache = tmp_path / "tree-cost.json"
    first = load_or_calibrate(tiny_backend, heads, preset_paths("mc_16"), 10, 4, 0.03, cache)
    assert cache.is_file() and first.batch_sizes == (1, 2, 4)
    again = load_or_calibrate(tiny_backend, heads, preset_paths("mc_16"), 10, 4, 0.03, cache)
    assert again.step_s == first.step_s and [t.num_nodes for t in again.trees] == [t.num_nodes for t in first.trees]


def test_step_costs_are_kept_apart_for_heads_of_another_shape():
    """Retrained heads with root conditioning (one more matrix per head) must not reuse the old heads' step costs."""
    import torch

    from medusa_core.config import DEFAULT_CONFIG, load_config
    from medusa_core.generator import _cost_file
    from medusa_core.heads import random_heads

    config = load_config(DEFAULT_CONFIG)
    plain = random_heads(4, 64, seed=0, scale=0.0, dtype=torch.float32)
    rooted = random_heads(4, 64, seed=0, scale=0.0, dtype=torch.float32, root_conditioned=True)
    assert _cost_file(config, plain) != _cost_file(config, rooted)
    assert _cost_file(config, plain) == _cost_file(config, random_heads(4, 64, seed=1, scale=0.5, dtype=torch.float32))
