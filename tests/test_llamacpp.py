"""The llama.cpp backend on the embedded SmolLM2 Q4_1 GGUF as shipped, and on the Q8_0 copy that the served config
re-encodes from it: greedy Medusa == plain greedy, both through llama.cpp; the KV layout (a stream per row, chains).

Tokens are only ever compared within this backend (llama.cpp and torch disagree on near-ties of the same model;
tests/test_reference.py compares with llama-cpp-python's own decoding). A divergence passes only where
llama-cpp-python's own `Llama`, scoring our tokens on the same file, has a top-2 gap below equivalence.NEAR_TIE (1e-3)
and our token is its runner-up; at most MAX_NEAR_TIES such partings per test.
"""
import re

import pytest
import torch

from conftest import PROMPTS, OracleDrafter
from equivalence import (MAX_NEAR_TIES, assert_same_or_near_tie, llama_reference, llama_scorer, run_decode,
                         run_staggered)
from medusa_core.config import REPO_ROOT, ConfigError, load_config
from medusa_core.tree import build_tree_buffers, plain_tree
from medusa_core.tree_presets import preset_paths

pytest.importorskip("llama_cpp")

CONFIG = REPO_ROOT / "configs" / "smollm2-135m-llamacpp.yaml"
N_NEW = 64


@pytest.fixture(scope="module")
def gen():
    from medusa_core.generator import load_generator

    config = load_config(CONFIG)
    # One thread: llama.cpp's spinning thread barrier stalls when the 2-core test machine is oversubscribed.
    # The Q4_1 file as shipped (the config serves an F16 copy of it: see the f16 tests below).
    return load_generator(_test_config(config, n_threads=1, requantize=None))


def _test_config(config, **llamacpp):
    settings = config.base_model.llamacpp.model_copy(update=llamacpp)
    base = config.base_model.model_copy(update={"torch_threads": None, "llamacpp": settings})
    tree = config.tree.model_copy(update={"adaptive": None})  # the configured tree every step
    return config.model_copy(update={"base_model": base, "tree": tree})


@pytest.fixture(scope="module")
def plain(gen):
    prompts = [tuple(gen.encode(p)) for p in PROMPTS]
    out, _ = run_decode(gen.backend, None, plain_tree(), prompts, N_NEW, speculate=False)
    return prompts, out


@pytest.fixture(scope="module")
def score(gen):
    """llama-cpp-python's own Llama on the shipped file: the independent scorer of near-ties."""
    return llama_scorer(llama_reference(gen.backend.gguf_path, gen.backend.settings, 1024))


def assert_all_same(score, prompts, got, refs, label) -> int:
    """Each row equals its reference up to near-ties of the independent scorer, at most MAX_NEAR_TIES in all."""
    ties = sum(assert_same_or_near_tie(score, p, g, r, f"{label}/prompt {i}")
               for i, (p, g, r) in enumerate(zip(prompts, got, refs)))
    assert ties <= MAX_NEAR_TIES, f"{label}: {ties} near-tie partings in {len(prompts)} prompts"
    return ties


@pytest.mark.parametrize("tree_name, heads", [
    ("chain_3", "oracle"),
    pytest.param("chain_4", "oracle", marks=pytest.mark.slow),
    pytest.param("chain_3", "oracle_to_depth_1", marks=pytest.mark.slow),
    pytest.param("chain_2", "random", marks=pytest.mark.slow),
])
def test_medusa_equals_plain(gen, plain, score, tree_name, heads):
    prompts, ref = plain
    tree = build_tree_buffers(preset_paths(tree_name), top_k=10)
    if heads == "random":
        drafter = gen.drafter
    else:
        depth = None if heads == "oracle" else int(heads[-1])
        drafter = OracleDrafter(dict(zip(prompts, ref)), 4, gen.backend.vocab_size, depth)
    got, steps = run_decode(gen.backend, drafter, tree, prompts, N_NEW)
    ties = assert_all_same(score, prompts, got, ref, f"{tree_name}/{heads}")
    print(f"{tree_name}/{heads}: {steps} steps, {ties} near-ties in {len(prompts)} prompts")
    if heads == "oracle" and ties == 0:  # each step accepts a full path
        assert steps == 1 + -(-(N_NEW - 1) // (tree.max_depth + 1))


@pytest.mark.slow
def test_shipped_heads_and_tree_equal_plain(gen, plain, score):
    prompts, ref = plain
    got, steps = run_decode(gen.backend, gen.drafter, gen.tree, prompts, N_NEW)
    ties = assert_all_same(score, prompts, got, ref, "shipped")
    print(f"shipped heads and tree: {steps} steps, {ties} near-ties")


def test_batched_equals_alone(gen, plain, score):
    prompts, ref = plain
    alone, _ = run_decode(gen.backend, None, plain_tree(), [prompts[3]], 32, speculate=False)
    assert_all_same(score, prompts[3:4], alone, [ref[3][:32]], "plain alone")
    tree = build_tree_buffers(preset_paths("chain_2"), top_k=10)
    short = [p[:n] for p, n in zip(prompts[:3], (9, 4, 6))]  # uneven lengths
    together, _ = run_decode(gen.backend, gen.drafter, tree, short, 16)
    alone = [run_decode(gen.backend, gen.drafter, tree, [p], 16)[0][0] for p in short]
    assert_all_same(score, short, together, alone, "medusa batched")


def test_requests_joining_a_running_batch_equal_alone(gen, plain, score):
    """Continuous batching: rows that join between steps take the next streams, rows that finish first move the
    later rows down a stream; outputs unchanged."""
    prompts, ref = plain
    tree = build_tree_buffers(preset_paths("chain_3"), top_k=10)
    drafter = OracleDrafter(dict(zip(prompts, ref)), 4, gen.backend.vocab_size, 1)
    got = run_staggered(gen.backend, drafter, tree, prompts[:3], 24, join_at=[0, 2, 5])
    assert_all_same(score, prompts[:3], got, [r[:24] for r in ref[:3]], "staggered")


def test_keep_and_select_equal_sequential(gen):
    """After verify + keep a row's sequence holds exactly its accepted tokens; after a middle row leaves, the row
    that moved down a stream still continues exactly as a fresh prefill of its tokens."""
    be = gen.backend
    tree = build_tree_buffers(preset_paths("chain_3"), top_k=10)
    prompts = [[1, 504, 3458, 282, 4649, 314], [19556, 28, 940], [504, 3458, 282]]
    _, cache = be.prefill(prompts)
    tokens = torch.tensor([[30, 31, 32, 33], [40, 41, 42, 43], [50, 51, 52, 53]])  # [B, T]
    out = be.verify(cache, tokens, tree)
    keep_len = torch.tensor([4, 2, 3])
    be.keep(cache, torch.arange(4).expand(3, 4), keep_len)
    assert cache.lens == [10, 5, 6]
    for b in range(3):
        assert be.lc.llama_memory_seq_pos_min(be.mem, b) == 0
        assert be.lc.llama_memory_seq_pos_max(be.mem, b) == cache.lens[b] - 1
    cache = be.select(cache, torch.tensor([0, 2]))
    assert cache.lens == [10, 6] and be.lc.llama_memory_seq_pos_max(be.mem, 2) == -1
    nxt = be.verify(cache, torch.tensor([[7], [8]]), plain_tree())
    for i, b in enumerate([0, 2]):
        kept = tokens[b, : keep_len[b]].tolist()
        ref_fwd, _ = be.prefill([prompts[b] + kept])
        torch.testing.assert_close(out.logits[b, keep_len[b] - 1], ref_fwd.logits[0, 0], atol=2e-2, rtol=0)
        ref_next, _ = be.prefill([prompts[b] + kept + [7 + i]])
        torch.testing.assert_close(nxt.logits[i, 0], ref_next.logits[0, 0], atol=2e-2, rtol=0)
        torch.testing.assert_close(nxt.hidden[i, 0], ref_next.hidden[0, 0], atol=2e-3, rtol=0)


@pytest.mark.parametrize("threads, kv_type, alike", [(2, "bf16", True), (1, "f16", True), (2, "f16", False)])
def test_a_chain_pass_equals_one_token_steps_past_256_tokens(gen, threads, kv_type, alike):
    """Past 256 cells (a 512-cell KV view) llama.cpp's flash attention splits a one-token pass of one row across its
    threads and sums the parts, a chain pass it computes whole: a bf16 cache, which that split does not take, or one
    thread (one part: the served config) keep a chain pass equal to plain decoding. f16 (and f32) on more threads
    part: the config refuses them (test_config); if the last case ever stops parting, that rule is moot."""
    from medusa_core.backends.llamacpp import LlamaCppBackend

    b = gen.backend
    settings = b.settings.model_copy(update={"n_threads": threads, "kv_type": kv_type, "n_seq_max": 1})
    backend = LlamaCppBackend(b.gguf_path, settings, b.tokenizer, context_length=400)
    ids = b.tokenizer.encode((REPO_ROOT / "README.md").read_text())
    prompt, nodes = ids[:300], ids[300:304]
    _, cache = backend.prefill([prompt])
    chained = backend.verify(cache, torch.tensor([nodes]), build_tree_buffers(preset_paths("chain_3"), top_k=10))
    _, cache = backend.prefill([prompt])
    same = []
    for t, node in enumerate(nodes):
        step = backend.verify(cache, torch.tensor([[node]]), plain_tree())
        backend.keep(cache, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
        same.append(torch.equal(step.logits[0, 0], chained.logits[0, t]))
    assert all(same) == alike


def test_hidden_state_feeds_the_heads(gen):
    """The hidden state is the final-norm one: the torch lm_head on it reproduces llama.cpp's logits."""
    fwd, _ = gen.backend.prefill([gen.encode("The capital of France is")])
    ours, theirs = gen.backend.lm_head(fwd.hidden[0, 0]), fwd.logits[0, 0]
    # llama.cpp multiplies Q8_0 weights by 8-bit-quantized activations; torch uses the dequantized fp32 weights
    torch.testing.assert_close(ours, theirs, atol=0.5, rtol=0)
    top_ours, top_theirs = ours.topk(5), theirs.topk(5)
    assert int(top_ours.indices[0]) == int(top_theirs.indices[0])
    # A near-tie at the 5th place may swap with the 6th (which one depends on the CPU's SIMD path): every token of
    # our top-5 is within the tolerance of llama.cpp's 5th-best logit.
    assert bool((theirs[top_ours.indices] >= top_theirs.values[-1] - 0.5).all())


def test_sequence_hidden_is_every_position_of_a_decode(gen):
    """Training caches from llama.cpp: each position's state equals the one decoding reaches at that position
    (prefill, then one token per step), and a cache built through this backend holds them."""
    from medusa_core.tools.data import Encoded
    from medusa_core.tools.distill import build_cache

    be = gen.backend
    ids = gen.encode("Name three colours and say why the sky is blue.")
    fwd, cache = be.prefill([ids[:4]])
    stepwise = [fwd.hidden[0, 0]]
    for t in ids[4:]:
        stepwise.append(be.verify(cache, torch.tensor([[t]]), plain_tree()).hidden[0, 0])
        be.keep(cache, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, dtype=torch.long))
    every = be.sequence_hidden(ids)  # [S, H]
    assert every.shape == (len(ids), be.hidden_size)
    # the Q4_1 file: a pass of several rows reproduces one-row steps bit for bit (module docstring of the backend)
    torch.testing.assert_close(every[3:], torch.stack(stepwise), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="earlier batch"):  # the context was cleared
        be.verify(cache, torch.tensor([[ids[0]]]), plain_tree())
    built = build_cache(be, [Encoded(ids, [True] * len(ids)), Encoded(ids[:5], [True] * 5)])
    torch.testing.assert_close(built.hidden, torch.cat([every, every[:5]]).half(), atol=0, rtol=0)  # kept as fp16


def test_stale_cache_row_limit_and_branching_tree(gen):
    be = gen.backend
    _, old = be.prefill([[1, 2, 3]])
    be.prefill([[4, 5]])
    with pytest.raises(RuntimeError, match="earlier batch"):
        be.verify(old, torch.tensor([[6]]), plain_tree())
    with pytest.raises(ValueError, match="n_seq_max"):
        be.prefill([[1, 2]] * (be.max_rows + 1))
    _, cache = be.prefill([[1, 2]] * 2)
    branching = build_tree_buffers(preset_paths("mc_4"), top_k=10)
    with pytest.raises(ValueError, match="chains"):
        be.verify(cache, torch.zeros(2, branching.num_nodes, dtype=torch.long), branching)


def test_branching_tree_rejected_at_startup(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(re.sub(r"preset: \w+", "preset: mc_8", CONFIG.read_text()))
    with pytest.raises(ConfigError, match="verifies chains"):
        load_config(path)


def test_generator_text(gen):
    from medusa_core.request import Request

    ids = tuple(gen.encode_chat([{"role": "user", "content": "List the days of the week."}]))
    medusa, plain = gen.generate([Request(prompt_ids=ids, max_tokens=24),
                                  Request(prompt_ids=ids, max_tokens=24, mode="plain")])
    assert medusa.token_ids == plain.token_ids and medusa.text.strip(), medusa.text
    # The shipped heads accept on this prompt: Medusa must take fewer steps than plain decoding, not merely as many.
    assert medusa.stats.decode_steps < plain.stats.decode_steps, (medusa.stats, plain.stats)


@pytest.fixture(scope="module")
def small(gen):
    """A second context on the same file: 2 rows of a 256-token context window."""
    from medusa_core.backends.llamacpp import LlamaCppBackend

    settings = gen.backend.settings.model_copy(update={"n_seq_max": 2})
    return LlamaCppBackend(gen.backend.gguf_path, settings, tokenizer=gen.tokenizer, context_length=256)


def test_lm_head_over_the_first_token_ids(gen):
    be = gen.backend
    hidden = be.prefill([gen.encode("The capital of France is")])[0].hidden[0]  # [1, H]
    full, cut = be.lm_head(hidden), be.lm_head(hidden, 8192)
    assert full.shape[-1] == be.vocab_size and cut.shape[-1] == 8192
    torch.testing.assert_close(cut, full[:, :8192])


def test_requests_filling_the_context_window_never_run_out_of_kv(gen, small):
    """Rows that use their whole context window with a deep chain every step (rejected cells and all) finish: a
    row's stream holds its window plus the chain."""
    tree = build_tree_buffers(preset_paths("chain_4"), top_k=10)
    prompts = [tuple(gen.encode(p * 12))[:200] for p in PROMPTS[:2]]
    got, steps = run_decode(small, gen.drafter, tree, prompts, small.context_length - 200)
    assert [len(g) for g in got] == [56, 56]


def test_more_requests_than_rows_wait_for_room(gen, small, score):
    """generate() with more requests than the context has rows: the rest join as rows finish (admission, never a
    KV failure), and each equals the request decoded alone."""
    from medusa_core.generator import MedusaGenerator
    from medusa_core.request import Request

    g = MedusaGenerator(gen.config, small, gen.drafter, build_tree_buffers(preset_paths("chain_2"), top_k=10))
    requests = [Request(prompt_ids=tuple(gen.encode(p)), max_tokens=8 + 4 * i, ignore_eos=True)
                for i, p in enumerate(PROMPTS)]
    together = g.generate(requests)
    assert [len(r.token_ids) for r in together] == [r.max_tokens for r in requests]
    alone = [list(g.generate([r])[0].token_ids) for r in requests]
    assert_all_same(score, [r.prompt_ids for r in requests], [list(t.token_ids) for t in together], alone, "waited")


def test_served_copy_medusa_equals_plain_and_batched_equals_alone(gen):
    """The served config's file: the shipped Q4_1 re-encoded as Q8_0 by llama.cpp, whose matmuls of two or more rows
    take another kernel than one row; oracle chain_3 and the shipped heads on chain_2, batched and alone, all equal
    plain decoding of the same file up to bounded near-ties."""
    from medusa_core.generator import load_generator

    config = load_config(CONFIG)
    assert config.base_model.llamacpp.requantize == "Q8_0"
    served = load_generator(_test_config(config, n_threads=1))
    encoding = config.base_model.llamacpp.requantize
    assert served.backend.gguf_path.name == f"SmolLM2-135M-Instruct.Q4_1.{encoding}.gguf"
    assert served.backend.vocab_size == gen.backend.vocab_size and served.encode("Hi") == gen.encode("Hi")
    prompts = [tuple(served.encode(p)) for p in PROMPTS]
    ref, _ = run_decode(served.backend, None, plain_tree(), prompts, 32, speculate=False)
    served_score = llama_scorer(llama_reference(served.backend.gguf_path, served.backend.settings, 1024))
    oracle = OracleDrafter(dict(zip(prompts, ref)), 4, served.backend.vocab_size, None)
    chain_2 = build_tree_buffers(preset_paths("chain_2"), top_k=10)
    for name, drafter, tree in [("chain_3/oracle", oracle, build_tree_buffers(preset_paths("chain_3"), 10)),
                                ("chain_2/shipped heads", served.drafter, chain_2)]:
        got, steps = run_decode(served.backend, drafter, tree, prompts, 32)
        ties = assert_all_same(served_score, prompts, got, ref, f"served {name}")
        print(f"served {name}: {steps} steps, {ties} near-ties in {len(prompts)} prompts")
    alone, _ = run_decode(served.backend, served.drafter, chain_2, [prompts[2]], 32)
    assert_all_same(served_score, prompts[2:3], alone, ref[2:3], "served chain_2 alone")
