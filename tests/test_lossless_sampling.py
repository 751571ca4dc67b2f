"""Sampling with Medusa: the law of what it emits, and seeded reproducibility.

- Law: the first three tokens of a request (the prefill's, then the tree walk's root and depth-1 samples) follow
  the base model's exact joint distribution, computed by enumeration on a tiny model (V = 256) that does not share
  the code under test; a chi-square test at a fixed seed set, for two temperatures and a top_p < 1. The drafter
  proposes the model's own top-k continuations, so most depth-1 tokens come from accepted tree nodes.
- Reproducibility: a seeded request gives the same tokens as plain sampling with that seed, whatever the tree,
  the batch around it, or a tree that changes every step (as the adaptive policy's does).
"""
from __future__ import annotations

import math
from dataclasses import replace
from collections import Counter

import pytest
import torch
from conftest import tiny_llama
from equivalence import run_joining

from medusa_core.decode import decode
from medusa_core.request import Request, SamplingParams
from medusa_core.sampling import probabilities
from medusa_core.tree import build_tree_buffers, plain_tree
from medusa_core.tree_presets import preset_paths

PROMPT = (5, 17, 42, 99)
N = 2000  # samples per law test: cells with >= 5 expected draws are tested one by one
SUPPORT = 1e-5  # tokens below this probability are never enumerated (their mass goes to the "other" cell)
TREES = {name: build_tree_buffers(preset_paths(name), top_k=10) for name in ("chain_4", "mc_16")}


class TopKDrafter:
    """Head k proposes the base model's top-k tokens at depth k along the greedy continuation of the root."""

    def __init__(self, model):
        self.model = model

    def draft(self, hidden, roots, history, depth, top_k, backend):
        out = torch.zeros(len(history), depth, top_k, dtype=torch.long)
        for length in {len(h) for h in history}:  # rows of one length go through the model together
            rows = [b for b, h in enumerate(history) if len(h) == length]
            ids = torch.tensor([history[b] for b in rows])
            for k in range(depth):
                with torch.inference_mode():
                    out[rows, k] = self.model(ids).logits[:, -1].topk(top_k).indices
                ids = torch.cat([ids, out[rows, k, :1]], dim=1)
        return out


@pytest.fixture(scope="module")
def reference():
    """The same tiny Llama as `tiny_backend`, built afresh: never patched by our backend."""
    return tiny_llama()


def next_probs(model, prefixes: list[tuple[int, ...]], params: SamplingParams) -> torch.Tensor:
    """[len(prefixes), V] next-token probabilities after temperature and top_p (prefixes of equal length)."""
    with torch.inference_mode():
        logits = model(torch.tensor(prefixes)).logits[:, -1]
    return probabilities(logits, params.temperature, params.top_p)


def exact_law(model, params: SamplingParams, depth: int = 3) -> dict[tuple[int, ...], float]:
    """P(first `depth` tokens) by enumeration over every token of probability >= SUPPORT at each position."""
    law = {(): 1.0}
    for _ in range(depth):
        prefixes = list(law)
        probs = next_probs(model, [PROMPT + p for p in prefixes], params)
        law = {p + (t,): law[p] * float(probs[i, t]) for i, p in enumerate(prefixes)
               for t in torch.nonzero(probs[i] >= SUPPORT).flatten().tolist()}
    return law


def chi_square(samples: list[tuple[int, ...]], law: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """Pearson's statistic over cells with >= 5 expected draws plus one "other" cell, and its 1e-4 critical value
    (Wilson-Hilferty)."""
    n, seen = len(samples), Counter(samples)
    cells = [c for c, p in law.items() if p * n >= 5]
    other_p = 1 - sum(law[c] for c in cells)
    stat = sum((seen[c] - law[c] * n) ** 2 / (law[c] * n) for c in cells)
    stat += (n - sum(seen[c] for c in cells) - other_p * n) ** 2 / (other_p * n)
    df, z = len(cells), 3.719  # len(cells) + 1 cells, one constraint; z: the normal's 1 - 1e-4 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def sample_runs(backend, drafter, tree, params: SamplingParams, seeds: range, max_new_tokens: int = 3,
                speculate: bool = True) -> tuple[list[tuple[int, ...]], int]:
    """The tokens of one request per seed, decoded together; and for how many the third token was sampled at an
    accepted depth-1 node of the first step's tree (rather than in a later step)."""
    reqs = [Request(prompt_ids=PROMPT, max_tokens=max_new_tokens, mode="medusa" if speculate else "plain",
                    sampling=replace(params, seed=s, acceptance="lossless"), ignore_eos=True) for s in seeds]
    tokens, first_step = [[] for _ in reqs], {}
    for events in decode(backend, drafter, tree, reqs):
        for e in events:
            tokens[e.key] += e.tokens
            if e.accept_len is not None:
                first_step.setdefault(e.key, e.accept_len)
    return [tuple(t) for t in tokens], sum(n >= 1 for n in first_step.values())


@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.2, 0.9)])
def test_medusa_samples_follow_the_exact_joint_law(tiny_backend, reference, temperature, top_p):
    params = SamplingParams(temperature=temperature, top_p=top_p, acceptance="lossless")
    law = exact_law(reference, params)
    medusa, from_tree = sample_runs(tiny_backend, TopKDrafter(reference), TREES["mc_16"], params, range(N))
    plain, _ = sample_runs(tiny_backend, None, None, params, range(N, 2 * N), speculate=False)
    (stat, crit), (plain_stat, _) = chi_square(medusa, law), chi_square(plain, law)
    cells = sum(p * N >= 5 for p in law.values())
    print(f"T={temperature} top_p={top_p}: {cells} cells, chi2 medusa {stat:.1f}, plain {plain_stat:.1f}, "
          f"critical {crit:.1f}; third token sampled at an accepted depth-1 node in {from_tree} of {N} runs")
    assert from_tree > N // 3, "the tree must supply many third tokens for this test to mean anything"
    assert cells >= 10, "too few cells to test the law"
    assert plain_stat < crit, "plain sampling does not follow the exact law: the test itself is off"
    assert stat < crit


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_seeded_request_equals_plain_sampling_whatever_the_tree_and_batch(tiny_backend, reference, top_p):
    drafter = TopKDrafter(reference)
    sampling = SamplingParams(temperature=0.8, top_p=top_p, seed=7, acceptance="lossless")
    request = Request(prompt_ids=PROMPT, max_tokens=24, sampling=sampling, ignore_eos=True)
    plain = run_joining(tiny_backend, None, [plain_tree()], {0: request}, {0: 0})[0]
    others = {k: Request(prompt_ids=(k, 3 * k, 7), max_tokens=10 + 5 * k,
                        sampling=SamplingParams(temperature=0.8, seed=100 + k), ignore_eos=True)
              for k in range(1, 4)}
    runs = {
        "mc_16 alone": ([TREES["mc_16"]], {0: 0}),
        "chain_4 in a batch": ([TREES["chain_4"]], {0: 0, 1: 0, 2: 0, 3: 0}),
        "tree changing every step, joining a running batch": (
            [TREES["mc_16"], plain_tree(), TREES["chain_4"]], {0: 2, 1: 0, 2: 1, 3: 4}),
    }
    for name, (trees, join_at) in runs.items():
        reqs = {0: request, **{k: others[k] for k in join_at if k}}
        got = run_joining(tiny_backend, drafter, trees, reqs, join_at)[0]
        assert got == plain, f"{name}: seeded tokens differ from plain sampling with the same seed"
    steps_alone = sum(1 for _ in decode(tiny_backend, drafter, TREES["mc_16"], [request]))
    assert steps_alone < len(plain) - 4, "the tree must accept tokens for this test to mean anything"
    other = Request(prompt_ids=PROMPT, max_tokens=24, sampling=SamplingParams(temperature=0.8, top_p=top_p, seed=8),
                    ignore_eos=True)
    other_seed = run_joining(tiny_backend, None, [plain_tree()], {0: other}, {0: 0})[0]
    assert other_seed != plain, "another seed must sample other tokens"


def nucleus_by_hand(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The top_p nucleus written out in plain Python (no torch, no shortcut): tokens by descending probability,
    kept while the mass before them is below top_p, renormalised."""
    top = max(logits)
    weights = [math.exp((x - top) / temperature) for x in logits]
    total = sum(weights)
    probs = [w / total for w in weights]
    kept, mass = [0.0] * len(probs), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if mass >= top_p:
            break
        kept[i], mass = probs[i], mass + probs[i]
    total = sum(kept)
    return [p / total for p in kept]


@pytest.mark.parametrize("scale", [0.3, 2.0, 4.0, 12.0])  # flat (nucleus ~ the vocabulary) to peaked (a few tokens)
@pytest.mark.parametrize("top_p", [0.5, 0.95])
def test_nucleus_equals_its_definition_however_wide(scale, top_p):
    """`probabilities` looks for the nucleus in the top 256, then the top 2,048 tokens before sorting all of them:
    the result must not depend on where the nucleus ends (V = 49,152, as the embedded model's)."""
    logits = torch.randn(49_152, generator=torch.Generator().manual_seed(int(scale * 10))) * scale
    got = probabilities(logits, 1.0, top_p)
    want = torch.tensor(nucleus_by_hand(logits.tolist(), 1.0, top_p))
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want.float(), rtol=1e-4, atol=1e-9)
