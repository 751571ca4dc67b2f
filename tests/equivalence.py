"""Helpers for the lossless contract: run the decode loop token-level and compare with a reference."""
from __future__ import annotations

import torch
from transformers import GenerationConfig

from medusa_core.decode import DecodeRequest, admit, advance, decode, retire

NEAR_TIE = 1e-3  # top-2 logit gap under which float reordering may legitimately flip an argmax


def run_decode(backend, drafter, tree, prompts, max_new_tokens, speculate=True, sampling=None):
    """Token ids per prompt, decoded together in one batch, EOS ignored."""
    kwargs = {} if sampling is None else {"sampling": sampling}
    reqs = [DecodeRequest(tuple(p), max_new_tokens, speculate=speculate, ignore_eos=True, **kwargs)
            for p in prompts]
    out = [[] for _ in prompts]
    steps = 0
    for events in decode(backend, drafter, tree, reqs):
        steps += 1
        for e in events:
            out[e.request].extend(e.tokens)
    return out, steps


def run_staggered(backend, drafter, tree, prompts, max_new_tokens, join_at):
    """Continuous batching: request i joins the running batch before step join_at[i]; token ids per prompt."""
    out = [[] for _ in prompts]
    batch = None
    for step in range(10 * max_new_tokens):
        events = []
        if batch is not None:
            batch, _ = retire(backend, batch, lambda key: False)
        if batch is not None:
            batch, events = advance(backend, drafter, tree, batch)
        new = {i: DecodeRequest(tuple(p), max_new_tokens, ignore_eos=True)
               for i, p in enumerate(prompts) if join_at[i] == step}
        if new:
            batch, first = admit(backend, batch, new)
            events += first
        for e in events:
            out[e.request].extend(e.tokens)
        if batch is None and step > max(join_at):
            return out
    raise AssertionError("the staggered batch did not finish")


def hf_generate(model, prompt, max_new_tokens):
    """transformers' own greedy generate, one prompt, EOS ignored."""
    # No EOS in the config: generate must run the full length and keep an argmax EOS, as ignore_eos does.
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[], pad_token_id=0)
    ids = torch.tensor([list(prompt)])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(prompt):].tolist()


def assert_same_or_near_tie(backend, prompt, got, ref, label="") -> int:
    """0 if identical; 1 if the first divergence is a near-tie (top-2 gap < NEAR_TIE) and our token is the runner-up
    there; otherwise fail."""
    assert len(got) == len(ref), f"{label}: length {len(got)} != {len(ref)}"
    if got == ref:
        return 0
    i = next(j for j, (a, b) in enumerate(zip(got, ref)) if a != b)
    fwd, _ = backend.prefill([list(prompt) + ref[:i]])
    top = fwd.logits[0, 0].float().topk(2)
    gap, runner_up = float(top.values[0] - top.values[1]), int(top.indices[1])
    assert gap < NEAR_TIE, f"{label}: token {i} differs ({got[i]} vs {ref[i]}) and the top-2 gap {gap:.2e} is no tie"
    assert got[i] == runner_up, f"{label}: token {i} is {got[i]}, not the runner-up {runner_up} of a near-tie"
    print(f"near-tie at token {i} ({label}): gap {gap:.2e}")
    return 1
