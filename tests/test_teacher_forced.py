"""Greedy Medusa on the embedded model, checked against a reference that shares none of the code under test.

`HFBackend` patches the model it runs in place (every nn.Linear becomes `CpuLinear`, attention runs through
`gqa_sdpa`), so a `generate()` on `backend.model` runs our kernels too and cannot catch a bug in them. Here an
unpatched transformers model, loaded afresh from the folder the embedded config's loader produces (the fp32
conversion of the GGUF under <cache root>/models/) with transformers' eager attention, scores prompt + our output in one
forward pass (teacher forcing). At every generated position our token must be the reference's argmax, or its
runner-up where its top-2 gap is below NEAR_TIE (1e-3): a near-tie, counted, at most MAX_NEAR_TIES per test.

Decoding goes through the transformers backend with the embedded config's drafter (shipped heads + prompt lookup),
the tree overridden (mc_16: 17 nodes, and mc_sim_7b_63: 64) and the adaptive policy off, as the
`embedded_generator` fixture does: 5 chat prompts x 64 new tokens, EOS ignored, decoded as one batch. Speculation
must happen (more than one token per decode step on average), or the check would only cover plain decoding.
"""
from __future__ import annotations

import pytest
from equivalence import MAX_NEAR_TIES, hf_scorer, near_ties

from medusa_core.generator import MedusaGenerator
from medusa_core.request import Request
from medusa_core.tree import build_tree_buffers

CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Explain how a bicycle works.",
        "Give me three tips for sleeping better.", "What is 17 times 23? Show your steps."]
N_NEW = 64
TREES = ["mc_16", "mc_sim_7b_63"]


def mean_tokens_per_step(results) -> float:
    """Tokens emitted per decode step over all requests (accept_len + 1, averaged; the prefill's token excluded)."""
    steps = sum(r.stats.decode_steps for r in results)
    return sum(r.stats.mean_accepted_length * r.stats.decode_steps for r in results) / steps


def with_tree(base: MedusaGenerator, preset: str) -> MedusaGenerator:
    """The embedded generator (backend, drafter, config) with its tree replaced by a preset; adaptive stays off."""
    tree_config = base.config.tree.model_copy(update={"preset": preset, "paths": None, "adaptive": None})
    config = base.config.model_copy(update={"tree": tree_config})
    tree = build_tree_buffers(tree_config.resolved_paths(), tree_config.top_k)
    return MedusaGenerator(config, base.backend, base.drafter, tree)


@pytest.fixture(scope="module")
def reference(embedded_generator, embedded_reference):
    ours = {p.data_ptr() for p in embedded_generator.backend.model.parameters()}
    assert not ours & {p.data_ptr() for p in embedded_reference.parameters()}, "the reference shares our weights"
    assert embedded_reference.config._attn_implementation == "eager"
    return hf_scorer(embedded_reference)


@pytest.mark.parametrize("preset", TREES)
def test_greedy_medusa_is_the_unpatched_models_argmax(embedded_generator, reference, preset):
    gen = with_tree(embedded_generator, preset)
    assert gen.policy is None and gen.tree.num_nodes >= 17, gen.tree.num_nodes
    prompts = [gen.encode_chat([{"role": "user", "content": text}]) for text in CHAT]
    results = gen.generate([Request(prompt_ids=tuple(p), max_tokens=N_NEW, ignore_eos=True) for p in prompts])
    ties = 0
    for text, prompt, result in zip(CHAT, prompts, results):
        assert len(result.token_ids) == N_NEW, (text, len(result.token_ids))
        ties += near_ties(reference, prompt, list(result.token_ids), f"{preset}/{text!r}")
    per_step = mean_tokens_per_step(results)
    print(f"{preset} ({gen.tree.num_nodes} nodes): {per_step:.2f} tokens per step, {ties} near-ties")
    assert per_step > 1.0, f"no speculated token was accepted ({per_step:.2f} per step): only plain was checked"
    assert ties <= MAX_NEAR_TIES, f"{ties} near-ties (at most {MAX_NEAR_TIES})"
