"""Helpers for the lossless contract: run the decode loop token-level and compare with a reference."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from transformers import GenerationConfig

from medusa_core.decode import admit, advance, decode, retire
from medusa_core.request import Request

NEAR_TIE = 1e-3  # top-2 logit gap under which float reordering may legitimately flip an argmax


def run_decode(backend, drafter, tree, prompts, max_new_tokens, speculate=True, sampling=None):
    """Token ids per prompt, decoded together in one batch, EOS ignored."""
    kwargs = {} if sampling is None else {"sampling": sampling}
    reqs = [Request(prompt_ids=tuple(p), max_tokens=max_new_tokens, mode="medusa" if speculate else "plain",
                    ignore_eos=True, **kwargs)
            for p in prompts]
    out = [[] for _ in prompts]
    steps = 0
    for events in decode(backend, drafter, tree, reqs):
        steps += 1
        for e in events:
            out[e.key].extend(e.tokens)
    return out, steps


def run_staggered(backend, drafter, tree, prompts, max_new_tokens, join_at):
    """Continuous batching: request i joins the running batch before step join_at[i]; token ids per prompt."""
    requests = {i: Request(prompt_ids=tuple(p), max_tokens=max_new_tokens, ignore_eos=True)
                for i, p in enumerate(prompts)}
    out = run_joining(backend, drafter, [tree], requests, dict(enumerate(join_at)), 10 * max_new_tokens)
    return [out[i] for i in range(len(prompts))]


def run_joining(backend, drafter, trees, requests: dict, join_at: dict, max_steps: int = 500) -> dict:
    """Continuous batching with the tree of step s being trees[s % len(trees)] (a changing tree, as the adaptive
    policy's choice is); request k joins the running batch before step join_at[k]. Token ids per request key."""
    out = {k: [] for k in requests}
    batch = None
    for step in range(max_steps):
        events = []
        if batch is not None:
            batch, _ = retire(backend, batch, lambda key: False)
        if batch is not None:
            batch, events = advance(backend, drafter, trees[step % len(trees)], batch)
        new = {k: r for k, r in requests.items() if join_at[k] == step}
        if new:
            batch, first = admit(backend, batch, new)
            events += first
        for e in events:
            out[e.key].extend(e.tokens)
        if batch is None and step > max(join_at.values()):
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


Scorer = Callable[[list[int]], Tensor]  # token ids [N] -> an independent reference's logits at every position [N, V]


def hf_scorer(model) -> Scorer:
    """An unpatched transformers model as the reference: one forward pass over the ids."""
    def score(ids: list[int]) -> Tensor:
        with torch.inference_mode():
            return model(torch.tensor([ids], device=model.device)).logits[0].float().cpu()
    return score


def llama_scorer(llm) -> Scorer:
    """llama-cpp-python's own `Llama` (logits_all=True) as the reference: its eval over the ids, not our backend."""
    def score(ids: list[int]) -> Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(llm.scores[: len(ids)].copy())
    return score


def near_ties(score: Scorer, prompt, tokens, label="") -> int:
    """Teacher-forced: the reference scores prompt + our tokens at once; each of our tokens must be its argmax, or its
    runner-up where its top-2 gap is < NEAR_TIE. Returns how many near-ties our tokens took."""
    prompt, tokens = list(prompt), list(tokens)
    logits = score(prompt + tokens)[len(prompt) - 1 : -1]  # [N, V]: row i predicts tokens[i]
    top = logits.topk(2, dim=-1)
    ours = torch.tensor(tokens)
    gap = top.values[:, 0] - top.values[:, 1]
    tie = (ours == top.indices[:, 1]) & (gap < NEAR_TIE)
    bad = torch.nonzero((ours != top.indices[:, 0]) & ~tie).flatten()
    if len(bad):
        i = int(bad[0])
        raise AssertionError(f"{label}: token {i} is {tokens[i]}, the reference's argmax is {int(top.indices[i, 0])} "
                             f"(top-2 gap {float(gap[i]):.2e}; a near-tie needs < {NEAR_TIE} and our token 2nd)")
    if tie.any():
        print(f"{label}: near-ties at {torch.nonzero(tie).flatten().tolist()}")
    return int(tie.sum())


def assert_same_or_near_tie(score: Scorer, prompt, got, ref, label="") -> int:
    """0 if our tokens equal the reference run's; else the near-ties they took under the independent reference
    `score` (at least 1: a parting is counted even where the reference run was the one to flip). Callers cap the
    sum per test (MAX_NEAR_TIES)."""
    assert len(got) == len(ref), f"{label}: length {len(got)} != {len(ref)}"
    if list(got) == list(ref):
        return 0
    return max(1, near_ties(score, prompt, got, label))


MAX_NEAR_TIES = 1  # partings allowed per test


def load_hf_reference(base, device: str = "cpu"):
    """A fresh, unpatched fp32 transformers model of a model config's base model (a GGUF source: the fp32 folder the
    transformers backend converts it to), with transformers' eager attention and its own nn.Linear."""
    from transformers import AutoModelForCausalLM

    from medusa_core.backends.hf import CpuLinear, _converted_gguf, resolve_source
    from medusa_core.config import models_cache

    where = resolve_source(base.source)
    if base.gguf_file is not None:
        where = str(_converted_gguf(where, base.gguf_file, models_cache(base)))
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32,
                                                 attn_implementation="eager").to(device).eval()
    assert not any(isinstance(m, CpuLinear) for m in model.modules()), "the reference runs our CpuLinear"
    return model


def llama_reference(gguf_path, settings, n_ctx: int):
    """llama-cpp-python's own `Llama` on a GGUF file with a backend's context settings and every position's logits:
    shares no code with our llama.cpp backend (its own context, batch and decode loop)."""
    import llama_cpp
    from llama_cpp import llama_cpp as lib

    from medusa_core.backends.llamacpp import GGML_TYPE

    kv = GGML_TYPE[settings.kv_type]
    defaults = lib.llama_model_default_params

    def plain_buffers():  # as our backend loads a model: no AMX or repacked weights (see backends/llamacpp.py)
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = plain_buffers
    try:
        return llama_cpp.Llama(str(gguf_path), n_ctx=n_ctx, n_batch=settings.n_batch, n_ubatch=settings.n_ubatch,
                               n_threads=settings.n_threads, n_threads_batch=settings.n_threads,
                               flash_attn=settings.flash_attn, type_k=kv, type_v=kv, logits_all=True, verbose=False)
    finally:
        lib.llama_model_default_params = defaults
