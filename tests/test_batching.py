"""Batched decoding equals unbatched decoding, and on a tiny random Llama equals transformers' generate.

The tiny model runs a broad grid fast: batch 1 and 3 with uneven prompt lengths, oracle / partial / random heads,
two trees, and max_new_tokens that do not divide by the step size.
"""
import pytest
import torch

from conftest import OracleDrafter
from equivalence import MAX_NEAR_TIES, assert_same_or_near_tie, hf_generate, run_decode, run_staggered
from medusa_core.heads import random_heads
from medusa_core.request import SamplingParams
from medusa_core.tree import build_tree_buffers
from medusa_core.tree_presets import preset_paths

TINY_PROMPTS = [(5, 17, 42, 99, 3, 8, 120, 7), (200, 1), (64, 65, 66, 67, 68)]
N_NEW = 37


@pytest.fixture(scope="module")
def tiny_refs(tiny_reference):
    """transformers' generate on the tiny Llama built afresh (our backend patches the model it runs)."""
    return {p: hf_generate(tiny_reference, p, N_NEW) for p in TINY_PROMPTS}


def assert_all_same(score, prompts, got, refs, label) -> None:
    """Each row equals its reference up to near-ties of the independent reference, at most MAX_NEAR_TIES in all."""
    ties = sum(assert_same_or_near_tie(score, p, g, r, f"{label} {p}") for p, g, r in zip(prompts, got, refs))
    assert ties <= MAX_NEAR_TIES, f"{label}: {ties} near-tie partings"


def test_tiny_plain_equals_generate(tiny_backend, tiny_refs, tiny_scorer):
    got, _ = run_decode(tiny_backend, None, build_tree_buffers([], 1), TINY_PROMPTS, N_NEW, speculate=False)
    assert_all_same(tiny_scorer, TINY_PROMPTS, got, [tiny_refs[p] for p in TINY_PROMPTS], "plain")


@pytest.mark.parametrize("tree_name", ["chain_3", "mc_sim_7b_63"])
@pytest.mark.parametrize("heads", ["oracle", "oracle_to_depth_2", "random"])
@pytest.mark.parametrize("batch", [1, 3])
def test_tiny_medusa_equals_generate(tiny_backend, tiny_refs, tiny_scorer, tree_name, heads, batch):
    tree = build_tree_buffers(preset_paths(tree_name), top_k=10)
    if heads == "random":
        drafter = random_heads(4, 64, seed=3, scale=1.0, dtype=torch.float32)
    else:
        drafter = OracleDrafter(tiny_refs, 4, 256, None if heads == "oracle" else 2)
    prompts = TINY_PROMPTS[:batch]
    got, _ = run_decode(tiny_backend, drafter, tree, prompts, N_NEW)
    assert_all_same(tiny_scorer, prompts, got, [tiny_refs[p] for p in prompts], f"{tree_name}/{heads}")


@pytest.mark.parametrize("heads", ["oracle_to_depth_2", "random"])
def test_requests_joining_a_running_batch_equal_generate(tiny_backend, tiny_refs, tiny_scorer, heads):
    """Continuous batching: rows join between steps at other KV lengths and leave when done; outputs unchanged."""
    tree = build_tree_buffers(preset_paths("mc_16"), top_k=10)
    if heads == "random":
        drafter = random_heads(4, 64, seed=3, scale=1.0, dtype=torch.float32)
    else:
        drafter = OracleDrafter(tiny_refs, 4, 256, 2)
    got = run_staggered(tiny_backend, drafter, tree, TINY_PROMPTS, N_NEW, join_at=[0, 3, 9])
    assert_all_same(tiny_scorer, TINY_PROMPTS, got, [tiny_refs[p] for p in TINY_PROMPTS], f"staggered {heads}")


def test_mixed_plain_and_medusa_rows_in_one_batch(tiny_backend, tiny_refs):
    from medusa_core.decode import decode
    from medusa_core.request import Request

    tree = build_tree_buffers(preset_paths("mc_16"), top_k=10)
    drafter = OracleDrafter(tiny_refs, 4, 256)
    reqs = [Request(prompt_ids=p, max_tokens=N_NEW, mode="plain" if i == 1 else "medusa", ignore_eos=True)
            for i, p in enumerate(TINY_PROMPTS)]
    out = {i: [] for i in range(3)}
    accept = {i: [] for i in range(3)}
    for events in decode(tiny_backend, drafter, tree, reqs):
        for e in events:
            out[e.key] += e.tokens
            if e.accept_len is not None:
                accept[e.key].append(e.accept_len)
    assert all(out[i] == tiny_refs[p] for i, p in enumerate(TINY_PROMPTS))
    assert set(accept[1]) == {0} and max(accept[0]) > 0


@pytest.mark.slow  # the engine test (test_engine.py) and the service test decode the embedded model batched too
def test_embedded_batched_equals_alone(embedded_generator, embedded_scorer):
    gen = embedded_generator
    prompts = [tuple(gen.encode(p)) for p in ["Hello, my name is", "import numpy as np\n", "1, 2, 3, 4,"]]
    together, _ = run_decode(gen.backend, gen.drafter, gen.tree, prompts, 24)
    alone = [run_decode(gen.backend, gen.drafter, gen.tree, [p], 24)[0][0] for p in prompts]
    assert_all_same(embedded_scorer, prompts, together, alone, "batched")


def test_sampled_batched_equals_alone_with_seeds(tiny_backend):
    tree = build_tree_buffers(preset_paths("mc_16"), top_k=10)
    drafter = random_heads(4, 64, seed=3, scale=1.0, dtype=torch.float32)
    for acceptance in ["typical", "lossless"]:
        params = SamplingParams(temperature=0.8, top_p=0.9, seed=7, acceptance=acceptance)
        together, _ = run_decode(tiny_backend, drafter, tree, TINY_PROMPTS, N_NEW, sampling=params)
        alone, _ = run_decode(tiny_backend, drafter, tree, TINY_PROMPTS[1:2], N_NEW, sampling=params)
        again, _ = run_decode(tiny_backend, drafter, tree, TINY_PROMPTS[1:2], N_NEW, sampling=params)
        assert alone == again, "a seed makes sampling reproducible"
        assert together[1] == alone[0], f"{acceptance}: a row's samples do not depend on its batch"
