"""Lossless sampling keeps the base model's distribution: Medusa samples and plain samples match in law.

A drafter that proposes the base model's own top-10 next tokens makes the tree walk accept often; the empirical
distribution of the 2nd and 3rd generated tokens over many seeds must then match plain sampling's, within the
distance that two independent plain runs show (plus a margin).
"""
from collections import Counter

import torch

from medusa_core.decode import DecodeRequest, decode
from medusa_core.sampling import SamplingParams
from medusa_core.tree import build_tree_buffers
from medusa_core.tree_presets import preset_paths

N = 1500
PROMPT = (5, 17, 42, 99)


class NextTokenDrafter:
    """Head 0 proposes the base model's top-k tokens after the root; deeper heads propose junk."""

    def __init__(self, model):
        self.model = model

    def draft(self, hidden, roots, history, depth, top_k, backend):
        with torch.inference_mode():
            logits = self.model(torch.tensor(history)).logits[:, -1]  # all rows share one length here
        out = torch.zeros(len(history), 3, top_k, dtype=torch.long)
        out[:, 0] = logits.topk(top_k, dim=-1).indices
        return out


def tv_distance(a, b):
    ca, cb = Counter(a), Counter(b)
    return 0.5 * sum(abs(ca[k] / len(a) - cb[k] / len(b)) for k in set(ca) | set(cb))


def sample(backend, drafter, tree, seed0, speculate):
    params = [SamplingParams(temperature=0.5, seed=seed0 + i, acceptance="lossless") for i in range(N)]
    reqs = [DecodeRequest(PROMPT, 3, p, speculate=speculate, ignore_eos=True) for p in params]
    tokens = [[] for _ in reqs]
    accepted = 0
    for events in decode(backend, drafter, tree, reqs):
        for e in events:
            tokens[e.request] += e.tokens
            accepted += e.accept_len or 0
    return [t[1] for t in tokens], accepted


def test_lossless_sampling_matches_plain_distribution(tiny_backend):
    tree = build_tree_buffers(preset_paths("mc_16"), top_k=10)
    drafter = NextTokenDrafter(tiny_backend.model)
    medusa, accepted = sample(tiny_backend, drafter, tree, 0, True)
    plain_a, _ = sample(tiny_backend, drafter, tree, 10_000, False)
    plain_b, _ = sample(tiny_backend, drafter, tree, 20_000, False)
    noise = tv_distance(plain_a, plain_b)
    d = tv_distance(medusa, plain_a)
    print(f"accepted {accepted} speculated tokens; TV(medusa, plain) {d:.3f}, TV(plain, plain) {noise:.3f}")
    assert accepted > N // 2, "the walk must actually accept candidates for this test to mean anything"
    assert d < noise + 0.06
