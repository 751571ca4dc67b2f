"""Prompt lookup (medusa_core/lookup.py): what it guesses, how guesses merge with the heads', and that decoding with
it stays lossless on the embedded model (fp32, CPU) while accepting more."""
import pytest
import torch

from conftest import PROMPTS
from equivalence import MAX_NEAR_TIES, assert_same_or_near_tie, run_decode
from medusa_core.heads import random_heads
from medusa_core.lookup import NO_GUESS, LookupDrafter, continuation, merge
from medusa_core.tree import build_tree_buffers
from medusa_core.tree_presets import preset_paths


def test_continuation_follows_latest_longest_match():
    #          0  1  2  3  4  5  6  7  8  9
    history = [5, 6, 7, 1, 6, 7, 2, 9, 6, 7]
    assert continuation(history, 2, 1, 4) == [2, 9]  # "6 7" last seen at 4-5, followed by 2 9
    assert continuation(history + [3], 3, 1, 4) == []  # 3 never occurred before
    assert continuation([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 1, 1, 4) == [9]  # "1 2 3" (at 0) beats the later "2 3"
    assert continuation([1, 2, 3, 9, 2, 3, 8, 1, 2, 3], 1, 1, 2) == [8]  # up to 2-grams: the latest "2 3"
    assert continuation([4, 1, 2, 3, 1, 2], 1, 3, 4) == []  # min_ngram 3: "3 1 2" never occurred before


def test_continuation_extends_a_loop_past_the_history():
    assert continuation([9, 1, 2, 1, 2], 5, 1, 4) == [1, 2, 1, 2, 1]  # period 2, 5 tokens asked
    assert continuation([3, 3], 4, 1, 4) == [3, 3, 3, 3]


def test_continuation_of_short_histories():
    assert continuation([], 3, 1, 4) == []
    assert continuation([7], 3, 1, 4) == []


def test_merge_puts_guess_first_and_keeps_siblings_distinct():
    heads = torch.tensor([[[10, 11, 12, 13], [20, 21, 22, 23]]])  # [B=1, D=2, k=4]
    got = merge(heads, torch.tensor([[12, 99]]))
    assert got.tolist() == [[[12, 10, 11, 13], [99, 20, 21, 22]]]
    assert torch.equal(merge(heads, torch.tensor([[NO_GUESS, NO_GUESS]])), heads)


class _FixedHeads:
    """Heads whose candidates are given: lets a test see exactly what the lookup changes."""

    num_heads = 2

    def draft(self, hidden, roots, history, depth, top_k, backend):
        return torch.arange(depth * top_k).reshape(1, depth, top_k).repeat(len(history), 1, 1) + 100


def test_drafter_fills_depths_beyond_the_heads():
    drafter = LookupDrafter(_FixedHeads(), 1, 4)
    got = drafter.draft(None, torch.tensor([2, 5]), [[1, 2, 3, 1, 2], [4, 5]], 3, 2, None)
    assert got.shape == (2, 3, 2)
    assert got[0, :, 0].tolist() == [3, 1, 2]  # "1 2" occurred before: 3 1 2 follows
    assert got[0, 0, 1] == 100 and got[0, 1, 1] == 102  # heads moved down one rank
    assert got[1, :2].tolist() == [[100, 101], [102, 103]]  # no match: the heads' own candidates
    assert got[1, 2].tolist() == [0, 0]  # no match, deeper than the heads: filler


REPEATING = "one two three, one two three, one two three, one two"


@pytest.fixture(scope="module")
def setup(embedded_generator, embedded_scorer):
    gen = embedded_generator
    prompts = [tuple(gen.encode(p)) for p in PROMPTS + [REPEATING]]
    plain, _ = run_decode(gen.backend, None, gen.tree, prompts, 48, speculate=False)
    heads = random_heads(2, gen.backend.hidden_size, seed=0, scale=0.02, dtype=gen.backend.dtype)
    return gen, prompts, plain, heads, embedded_scorer


@pytest.mark.parametrize("tree_name", ["smollm2_greedy_4", "deep"])
def test_lookup_is_lossless(setup, tree_name):
    """Random heads with the lookup merged in: the same tokens as plain decoding. "deep" reaches past the 2 heads,
    where only the lookup proposes (filler elsewhere)."""
    gen, prompts, plain, heads, score = setup
    deeper = [[0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0, 0]] if tree_name == "deep" else []
    tree = build_tree_buffers(preset_paths("smollm2_greedy_4") + deeper, top_k=10)
    got, steps = run_decode(gen.backend, LookupDrafter(heads, 1, 4), tree, prompts, 48)
    ties = sum(assert_same_or_near_tie(score, p, g, r, f"{tree_name}/prompt {i}")
               for i, (p, g, r) in enumerate(zip(prompts, got, plain)))
    print(f"{tree_name}: {steps} steps with lookup, {ties} near-ties")
    assert ties <= MAX_NEAR_TIES


def test_lookup_accepts_repeated_text(setup):
    """On a reply that repeats itself the lookup's guesses are accepted: fewer steps than the heads alone."""
    gen, prompts, plain, heads, _ = setup
    tree = build_tree_buffers(preset_paths("smollm2_greedy_4") + [[0, 0, 0], [0, 0, 0, 0]], top_k=10)
    _, alone = run_decode(gen.backend, heads, build_tree_buffers(preset_paths("smollm2_greedy_4"), 10),
                          prompts[-1:], 48)
    got, with_lookup = run_decode(gen.backend, LookupDrafter(heads, 1, 4), tree, prompts[-1:], 48)
    assert got == plain[-1:]
    assert with_lookup < 0.75 * alone, (with_lookup, alone)  # measured: 22 steps against 36


def test_lookup_batched_equals_alone(setup):
    gen, prompts, _, heads, _ = setup
    drafter = LookupDrafter(heads, 2, 4)
    tree = build_tree_buffers(preset_paths("smollm2_greedy_4") + [[0, 0, 0]], top_k=10)
    together, _ = run_decode(gen.backend, drafter, tree, prompts[:3] + prompts[-1:], 24)
    for p, t in zip(prompts[:3] + prompts[-1:], together):
        alone, _ = run_decode(gen.backend, drafter, tree, [p], 24)
        assert alone[0] == t


def test_benchmark_runs_trees_deeper_than_the_heads(tiny_backend):
    """eval's benchmark: a lookup tree deeper than the heads decodes the same tokens as plain decoding."""
    from medusa_core.tools.evaluate import benchmark_trees

    heads = random_heads(2, tiny_backend.hidden_size, seed=0, scale=0.02, dtype=tiny_backend.dtype)
    deep = build_tree_buffers([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]], top_k=4)
    runs = benchmark_trees(tiny_backend, {"chain_2": (heads, build_tree_buffers([[0], [0, 0]], top_k=4)),
                                          "deep+lookup": (LookupDrafter(heads, 1, 4), deep)},
                           [[1, 2, 3, 1, 2, 3, 1, 2], [7, 8, 9]], 24)
    assert [r.name for r in runs] == ["plain", "chain_2", "deep+lookup"]
    assert all(r.matches_plain and r.tokens == 2 * 24 for r in runs)
    assert runs[2].nodes == 5 and runs[2].steps <= runs[0].steps
