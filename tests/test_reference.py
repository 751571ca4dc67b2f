"""Greedy Medusa on the served config against an independent reference: llama-cpp-python's own
`Llama.create_completion(temperature=0, top_k=1)` on the same GGUF file with the same context settings.

The reference shares no code with ours (its own context, batch, sampler and decode loop). Where the two part, the
reference's top-2 logit gap there must be below NEAR_TIE and our token must be its runner-up (a float near-tie that
llama.cpp's one-row kernel and its several-row kernel break differently); at most one such parting in the test.
"""
import pytest

from equivalence import MAX_NEAR_TIES, NEAR_TIE, llama_reference
from medusa_core.config import REPO_ROOT, load_config

pytest.importorskip("llama_cpp")

SERVED = REPO_ROOT / "configs" / "smollm2-135m-llamacpp.yaml"
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Explain how a bicycle works.",
        "Give me three tips for sleeping better.", "What is 17 times 23? Show your steps.",
        "Describe a sunset to someone who has never seen one."]
N_NEW = 64


@pytest.fixture(scope="module")
def ours():
    from medusa_core.generator import load_generator

    config = load_config(SERVED)
    tree = config.tree.model_copy(update={"adaptive": None})  # the fixed chain every step: Medusa speculates
    gen = load_generator(config.model_copy(update={"tree": tree}))
    assert gen.tree.num_nodes > 1
    return gen


@pytest.fixture(scope="module")
def reference(ours):
    return llama_reference(ours.backend.gguf_path, ours.backend.settings, ours.backend.context_length)


def reference_decode(llm, prompt: list[int], n: int) -> tuple[list[int], list]:
    """create_completion's greedy tokens for the prompt, and its logits before each of them."""
    llm.reset()
    out = llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1, repeat_penalty=1.0)
    total = len(prompt) + out["usage"]["completion_tokens"]
    evaluated = list(llm.input_ids[: llm.n_tokens])
    tokens = evaluated[len(prompt):]
    if len(tokens) < total - len(prompt):  # the last sampled token is not evaluated: take it from the logits
        tokens.append(int(llm.scores[llm.n_tokens - 1].argmax()))
    logits = [llm.scores[len(prompt) - 1 + i] for i in range(len(tokens))]
    return tokens, logits


def compare(ours, reference, prompts: list[str]) -> tuple[list, int]:
    """Our greedy tokens against create_completion's for each chat prompt: the near-tie partings (any other parting
    fails) and how many tokens speculation gave beyond one per step."""
    from medusa_core.request import Request

    partings, speculated = [], 0
    for text in prompts:
        prompt = ours.encode_chat([{"role": "user", "content": text}])
        ref, logits = reference_decode(reference, prompt, N_NEW)
        got = ours.generate([Request(prompt_ids=tuple(prompt), max_tokens=N_NEW)])[0]
        speculated += got.stats.generated_tokens - got.stats.decode_steps - 1  # tokens beyond one per step
        mine = list(got.token_ids)
        if mine == ref:
            continue
        i = next((j for j, (a, b) in enumerate(zip(mine, ref)) if a != b), min(len(mine), len(ref)))
        assert i < min(len(mine), len(ref)), f"{text!r}: same tokens, lengths {len(mine)} vs {len(ref)}"
        top2 = logits[i].argsort()[-2:][::-1]
        gap = float(logits[i][top2[0]] - logits[i][top2[1]])
        assert mine[i] == int(top2[1]), f"{text!r}: token {i} is {mine[i]}, not the reference's runner-up {top2}"
        assert gap < NEAR_TIE, f"{text!r}: parts at token {i} where the reference's top-2 gap is {gap:.2e}"
        partings.append((text, i, gap))
    print(f"{len(partings)} near-tie partings {partings}; {speculated} tokens accepted from speculation")
    return partings, speculated


def test_greedy_medusa_equals_llama_cpp_create_completion(ours, reference):
    partings, speculated = compare(ours, reference, CHAT)
    assert speculated > 0, "Medusa never accepted a speculated token: the test compared plain decoding"
    assert len(partings) <= MAX_NEAR_TIES, partings


REPEATS = ["Repeat this sentence three times: the quick brown fox jumps over the lazy dog."]


@pytest.mark.parametrize("tree", [None, {"preset": "chain_4", "top_k": 1, "lookup": {"min_ngram": 2}}],
                         ids=["plain", "lookup"])
def test_a_model_config_without_heads_serves(ours, reference, tree):
    """Your own model before it has heads: a config without `heads` decodes plainly, or with prompt lookup alone
    when its tree sets `lookup`; either way its greedy output is create_completion's."""
    from medusa_core.config import GeneratorConfig
    from medusa_core.generator import load_generator

    fields = load_config(SERVED).model_dump(exclude={"heads", "tree"}) | ({"tree": tree} if tree else {})
    gen = load_generator(GeneratorConfig.model_validate(fields))
    partings, speculated = compare(gen, reference, CHAT[:2] + REPEATS)
    assert (speculated > 0) == (tree is not None), speculated
    assert len(partings) <= MAX_NEAR_TIES, partings
