"""Self-distilled replies: the base model's own greedy answers, turn by turn, kept as uint16 shards that resume."""
import json

import numpy as np
import pytest
import torch

from equivalence import MAX_NEAR_TIES, llama_reference, llama_scorer, near_ties
from medusa_core.tools import replies
from medusa_core.config import REPO_ROOT, load_config
from medusa_core.tree import plain_tree
from medusa_core.tools.data import Conversation, Encoded

pytest.importorskip("llama_cpp")

CONFIG = REPO_ROOT / "configs" / "smollm2-135m-llamacpp.yaml"
TURNS = [["What is a good name for a goldfish?", "Why that one?"],
         ["Say hello in French."],
         ["Name a primary color.", "Name another.", "And a third?"],
         ["Write one line about the sea."],
         ["What is two plus two?", "And times three?"]]


def conversation(i: int, users: list[str]) -> Conversation:
    messages = []
    for u in users:  # the assistant turns are placeholders: `answer` replaces them with the model's own
        messages += [{"role": "user", "content": u}, {"role": "assistant", "content": "(written reply)"}]
    return Conversation(str(i), tuple(messages))


@pytest.fixture(scope="module")
def backend():
    """The embedded GGUF as shipped on llama.cpp, with room for 2 rows only: five conversations make the batch
    refill as turns end."""
    from medusa_core.backends.llamacpp import LlamaCppBackend
    from medusa_core.generator import load_generator

    config = load_config(CONFIG)
    settings = config.base_model.llamacpp.model_copy(update={"n_threads": 1, "requantize": None})
    config = config.model_copy(update={"base_model": config.base_model.model_copy(update={"llamacpp": settings})})
    gen = load_generator(config)
    return LlamaCppBackend(gen.backend.gguf_path, settings.model_copy(update={"n_seq_max": 2}),
                           tokenizer=gen.tokenizer, context_length=256)


@pytest.fixture(scope="module", params=["llamacpp", "hf"])
def case(request, backend, embedded_generator, embedded_scorer):
    """(backend, rows, independent scorer, answers): llama.cpp with 2 rows, and the transformers backend with 16 rows,
    where rows join and leave 2 at a time (an ended turn keeps its row, ignored, until a second one ends)."""
    if request.param == "llamacpp":
        return backend, 2, llama_scorer(llama_reference(backend.gguf_path, backend.settings, 512)), answer_all(backend)
    hf = embedded_generator.backend
    return hf, 16, embedded_scorer, answer_all(hf, rows=16)


def answer_all(backend, max_seq=160, max_reply=20, rows=8):
    return replies.answer(backend, [conversation(i, t) for i, t in enumerate(TURNS)], max_seq, max_reply, rows=rows)


def spans(seq: Encoded) -> list[tuple[int, int]]:
    """(start, end) of each run of assistant tokens."""
    out, start = [], None
    for i, a in enumerate(seq.assistant + [False]):
        if a and start is None:
            start = i
        elif not a and start is not None:
            out.append((start, i))
            start = None
    return out


def test_every_reply_is_the_models_greedy_reply_in_its_context(case):
    """An independent reference (llama-cpp-python's own Llama; an unpatched fp32 transformers model) reads each stored
    conversation: every reply token is its argmax given everything before it (earlier replies included), up to
    capped near-ties."""
    _, _, score, answered = case
    ties = 0
    for i, seq in enumerate(answered):
        for a, b in spans(seq):
            ties += near_ties(score, seq.ids[:a], seq.ids[a:b], f"conversation {i} reply at {a}")
    assert ties <= MAX_NEAR_TIES


def test_conversations_keep_their_user_turns_in_order_and_fit(case):
    backend, rows, _, answered = case
    assert len(answered) == len(TURNS)
    for seq, users in zip(answered, TURNS):
        assert len(seq.ids) <= 160 and len(seq.ids) == len(seq.assistant)
        text = backend.tokenizer.decode(seq.ids)
        where = [text.index(u) for u in users]
        assert where == sorted(where)
        assert len(spans(seq)) == len(users)  # every turn answered (the replies are short enough to fit)
        assert all(b - a <= 20 + 1 for a, b in spans(seq))  # max_reply tokens and the end-of-turn token
    assert answer_all(backend, rows=rows) == answered  # greedy and deterministic: the same shards on every run


def test_a_conversation_ends_where_the_next_reply_would_not_fit(backend):
    short = replies.answer(backend, [conversation(0, TURNS[2])], max_seq=60, max_reply=20)
    assert len(short) == 1 and len(short[0].ids) <= 60 and 1 <= len(spans(short[0])) < 3


def test_a_next_turn_is_read_onto_its_row_as_a_prefill_of_the_whole_would(backend):
    """llama.cpp's `extend`: tokens appended to a row that holds a conversation give what a fresh prefill of the
    whole gives, bit for bit, and leave the other rows as they were."""
    first, second = backend.tokenizer.encode("Name a primary color."), backend.tokenizer.encode("Red. Another?")
    other = backend.tokenizer.encode("Say hello in French.")
    whole, _ = backend.prefill([first + second])
    alone, _ = backend.prefill([other])
    _, cache = backend.prefill([other, first])
    extended = backend.extend(cache, [1], [second])
    assert torch.equal(extended.logits, whole.logits) and torch.equal(extended.hidden, whole.hidden)
    assert cache.lens == [len(other), len(first + second)]
    step = backend.verify(cache, torch.tensor([[int(alone.logits[0, 0].argmax())], [7]]), plain_tree())
    again, _ = backend.prefill([other + [int(alone.logits[0, 0].argmax())]])
    assert torch.equal(step.logits[0, 0], again.logits[0, 0])  # row 0 untouched by row 1's turn


def test_later_turns_are_not_read_again(backend, monkeypatch):
    """On llama.cpp a conversation keeps its row from turn to turn: the only prefills are first turns, and later
    turns read just their new tokens (the speed-up of `replies`, benchmarks/README.md)."""
    prefilled, extended = [], []
    prefill, extend = backend.prefill, backend.extend
    monkeypatch.setattr(backend, "prefill", lambda prompts, cache=None: prefilled.extend(prompts) or prefill(prompts,
                                                                                                           cache))
    monkeypatch.setattr(backend, "extend", lambda cache, rows, tokens: extended.extend(tokens) or extend(cache, rows,
                                                                                                         tokens))
    answered = answer_all(backend, rows=2)
    assert len(prefilled) == len(TURNS)  # one per conversation
    later_turns = sum(len(spans(seq)) - 1 for seq in answered)
    assert later_turns > 0 and len(extended) == later_turns
    read = sum(map(len, prefilled)) + sum(map(len, extended))
    assert read == sum(len(seq.ids) for seq in answered) - sum(sum(seq.assistant) for seq in answered) + later_turns


def test_a_row_continues_only_a_request_that_extends_its_history(backend):
    from medusa_core.decode import admit, extend
    from medusa_core.request import Request

    ids = tuple(backend.tokenizer.encode("Say hello in French."))
    batch, _ = admit(backend, None, {0: Request(prompt_ids=ids, max_tokens=4, mode="plain")})
    with pytest.raises(ValueError, match="still decoding"):  # its request would be lost
        extend(backend, batch, {0: Request(prompt_ids=tuple(batch.rows[0].history) + (5,), max_tokens=4)})
    batch, _ = admit(backend, None, {0: Request(prompt_ids=ids, max_tokens=1, mode="plain")})  # ends at once
    with pytest.raises(ValueError, match="does not continue its row"):
        extend(backend, batch, {0: Request(prompt_ids=(5,) + ids, max_tokens=4, mode="plain")})
    batch, events = extend(backend, batch, {0: Request(prompt_ids=tuple(batch.rows[0].history) + (5,), max_tokens=4)})
    assert batch.rows[0].finish_reason is None and len(events) == 1


def test_shards_round_trip_as_uint16_and_refuse_wider_ids(tmp_path):
    seqs = [Encoded([1, 65535, 7], [False, True, True]), Encoded([], []), Encoded([4] * 9, [True] * 9)]
    path = tmp_path / "train-0000.npz"
    replies.save_shard(path, seqs)
    assert replies.load_shard(path) == seqs
    with np.load(path) as f:
        assert f["ids"].dtype == np.uint16
    with pytest.raises(ValueError, match="uint16"):
        replies.save_shard(tmp_path / "wide.npz", [Encoded([65536], [True])])
    assert not (tmp_path / "wide.npz").exists()


def test_build_answers_what_the_budget_needs_and_resumes_after_it(backend, tmp_path):
    convs = [conversation(i, t) for i, t in enumerate(TURNS)]
    small = replies.build(backend, convs, tmp_path, False, budget=1, max_seq=96, max_reply=8, shard=4)
    assert small > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["train-0000.npz"]
    assert len(replies.load_shard(tmp_path / "train-0000.npz")) == 1  # one conversation met the budget, not four
    first = (tmp_path / "train-0000.npz").stat().st_mtime_ns
    more = replies.build(backend, convs, tmp_path, False, budget=10_000, max_seq=96, max_reply=8, shard=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train-0000.npz", "train-0001.npz", "train-0002.npz"]
    assert (tmp_path / "train-0000.npz").stat().st_mtime_ns == first  # kept, not answered again
    alone = replies.answer(backend, convs[1:3], 96, 8)
    assert replies.load_shard(tmp_path / "train-0001.npz") == alone  # shard 1 is conversations 1 and 2
    assert more == small + replies.reply_tokens(alone) + replies.reply_tokens(
        replies.load_shard(tmp_path / "train-0002.npz"))


def test_chat_prompts_were_never_training_data(backend):
    """The benchmark's everyday prompts must be new to the heads: none occurs in ShareGPT (held-in or not), nor in
    the stored conversations whose user turns the model wrote itself."""
    from medusa_core.tools.data import sharegpt_path

    prompts = json.loads((REPO_ROOT / "benchmarks" / "data" / "chat_prompts.json").read_text())["prompts"]
    assert len(prompts) >= 30 and len(set(prompts)) == len(prompts)
    text = sharegpt_path().read_text(encoding="utf-8").lower()
    assert [p for p in prompts if p.lower() in text] == []
    shards = sorted((REPO_ROOT / "heads" / "smollm2-135m-instruct").glob("replies-magpie/*.npz"))
    own = backend.tokenizer.decode([t for path in shards for s in replies.load_shard(path) for t in s.ids]).lower()
    assert [p for p in prompts if p.lower() in own] == []


def test_build_can_continue_another_folders_numbering(backend, tmp_path):
    """A folder of replies made another way (`extends`) starts where the earlier folder's shards end: its first shard
    answers the conversations after theirs, and the earlier folder is left as it was."""
    convs = [conversation(i, t) for i, t in enumerate(TURNS)]
    replies.build(backend, convs, tmp_path / "a", False, budget=1, max_seq=96, max_reply=8, shard=2)
    before = sorted(p.name for p in (tmp_path / "a").iterdir())
    replies.build(backend, convs, tmp_path / "b", False, budget=10_000, max_seq=96, max_reply=8, shard=2,
                  extends=[tmp_path / "a"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == before == ["train-0000.npz"]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["train-0001.npz", "train-0002.npz"]
    assert replies.load_shard(tmp_path / "b" / "train-0001.npz") == replies.answer(backend, convs[1:3], 96, 8)
    assert replies.find_shard([tmp_path / "a", tmp_path / "b"], False, 2) == tmp_path / "b" / "train-0002.npz"
    assert replies.find_shard([tmp_path / "a", tmp_path / "b"], False, 3) is None


def test_extends_refuses_another_models_or_lengths_replies(tmp_path):
    source = {"model": "m", "prompts": "sharegpt", "backend": "llamacpp", "max_seq": 512, "max_reply": 256,
              "weights": "Q8_0"}
    replies.check_source(tmp_path / "a", source | {"backend": "hf", "weights": "bfloat16"})
    replies.check_extends([tmp_path / "a"], source)  # computed another way: allowed
    replies.check_source(tmp_path / "b", source | {"max_seq": 1024})
    with pytest.raises(ValueError, match="max_seq=1024, not max_seq=512"):
        replies.check_extends([tmp_path / "b"], source)
    with pytest.raises(ValueError, match="model=None"):  # no source.json: not a reply folder
        replies.check_extends([tmp_path / "missing"], source)
    replies.check_source(tmp_path / "c", source | {"prompts": "magpie"})  # other conversations: other numbering
    with pytest.raises(ValueError, match="prompts='magpie', not prompts='sharegpt'"):
        replies.check_extends([tmp_path / "c"], source)


def test_shipped_reply_folders_name_their_prompts():
    """Readers group folders into datasets by prompt source; a shipped folder without one would join ShareGPT's."""
    folders = sorted((REPO_ROOT / "heads" / "smollm2-135m-instruct").glob("replies*"))
    assert len(folders) >= 2
    for folder in folders:
        assert json.loads((folder / "source.json").read_text())["prompts"] in ("sharegpt", "magpie"), folder


def test_magpie_turn_i_is_seed_i_and_only_the_asked_ones_are_sampled(backend, monkeypatch):
    """The stream of the model's own user turns is fixed: a slice samples only its seeds (a resumed build does not
    redo earlier ones), gives the same turns alone as in a longer slice, and held-out seeds are others."""
    from medusa_core.tools import magpie

    asked = []
    sample = magpie.sample_turns
    monkeypatch.setattr(magpie, "sample_turns", lambda b, seeds, rows: asked.append(list(seeds)) or
                        sample(b, seeds, rows))
    turns = magpie.UserTurns(backend, held_out=False, rows=2)
    first, later = turns[0:4], turns[2:4]
    assert asked == [[0, 1, 2, 3], [2, 3]] and later == first[2:]
    assert [c.id for c in first] == [f"magpie-train-{i}" for i in range(4)]
    assert turns[3] == first[3]
    kept = [c.messages for c in first if c.messages]
    assert kept and all(len(m) == 1 and m[0]["role"] == "user" and len(m[0]["content"]) >= magpie.MIN_CHARS
                        for m in kept)
    held_out = magpie.UserTurns(backend, held_out=True, rows=2)[0:4]
    assert asked[-1] == [magpie.HELD_OUT_SEED + i for i in range(4)]
    assert [c.messages for c in held_out] != [c.messages for c in first]


def test_magpie_turns_are_the_models_samples_after_its_user_prefix(backend):
    """Turn i is what seeded sampling draws, token by token, from an independent llama-cpp-python model fed the chat
    template's user prefix: same seed, same positions, until the model ends its turn (or MAX_TURN: no turn)."""
    from medusa_core.request import SamplingParams
    from medusa_core.sampling import choose_token
    from medusa_core.tools import magpie

    reference = llama_reference(backend.gguf_path, backend.settings, 512)
    tok = backend.tokenizer
    text = "Hello there"  # the prefix is where a user's text goes in the model's template, default system turn kept
    assert tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False).startswith(
        magpie.user_prefix(tok) + text + "<|im_end|>")
    prefix = tok.encode(magpie.user_prefix(tok), add_special_tokens=False)
    for seed, ours in enumerate(magpie.sample_turns(backend, range(4), rows=2)):
        ids, params = list(prefix), SamplingParams(**magpie.SAMPLING, seed=seed)
        while len(ids) - len(prefix) < magpie.MAX_TURN and ids[-1] not in backend.eos_token_ids:
            reference.reset()
            reference.eval(ids)
            ids.append(choose_token(torch.from_numpy(reference.scores[len(ids) - 1].copy()), params, seed, len(ids)))
        text = tok.decode(ids[len(prefix):], skip_special_tokens=True).strip()
        stopped = ids[-1] in backend.eos_token_ids
        assert ours == (text if stopped and len(text) >= magpie.MIN_CHARS else None), seed


def test_cache_from_reply_shards_is_a_prefill_of_the_stored_ids(tmp_path, embedded_generator):
    """`--data generated` builds the hidden-state cache from the stored ids alone (no decoding), each shard from the
    first folder that holds it."""
    import types

    from medusa_core.tools.commands import load_or_build_cache

    seqs = [Encoded([1, 2, 3, 4, 5, 6], [False, False, True, True, True, True]), Encoded([9, 8, 7], [False] * 3)]
    later = [Encoded([11, 12, 13], [False, True, True])]
    replies.save_shard(replies.shard_path(tmp_path / "r", False, 0), seqs)
    replies.save_shard(replies.shard_path(tmp_path / "s", False, 1), later)
    replies.save_shard(replies.shard_path(tmp_path / "s", False, 0), [Encoded([40, 41], [False, True])])  # shadowed
    args = types.SimpleNamespace(cache_dir=str(tmp_path / "c"), max_seq=512, train_tokens=1_000, eval_tokens=0,
                                 replies=[str(tmp_path / "r"), str(tmp_path / "s")])
    cache, paths = load_or_build_cache(embedded_generator.backend, args, held_out=False, data="generated")
    assert len(paths) == 2 and sorted(cache.tokens.tolist()) == sorted(s for q in seqs + later for s in q.ids)
    assert int(cache.assistant.sum()) == 6 and torch.isfinite(cache.hidden.float()).all()


def test_cache_takes_each_prompt_sources_shards_in_turn(tmp_path, embedded_generator):
    """Folders of another prompt source (source.json) are a dataset of their own: their shard 0 is not shadowed by
    ShareGPT's shard 0, each is cached in its own folder, and a budget takes shard i of each before shard i + 1."""
    import types

    from medusa_core.tools.commands import load_or_build_cache

    source = {"model": "m", "backend": "llamacpp", "max_seq": 512, "max_reply": 256, "weights": "Q8_0"}
    for name, prompts, first in (("s", "sharegpt", 10), ("m", "magpie", 30)):
        replies.check_source(tmp_path / name, source | {"prompts": prompts})
        for i in range(3):
            ids = [first + 3 * i, first + 3 * i + 1, first + 3 * i + 2]
            replies.save_shard(replies.shard_path(tmp_path / name, False, i), [Encoded(ids, [False, True, True])])
    args = types.SimpleNamespace(cache_dir=str(tmp_path / "c"), max_seq=512, train_tokens=12, eval_tokens=0,
                                 replies=[str(tmp_path / "s"), str(tmp_path / "m")])
    cache, paths = load_or_build_cache(embedded_generator.backend, args, held_out=False, data="generated")
    assert [(p.parent.name.split("-")[1:3], p.name) for p in paths] == [
        (["generated", "512"], "shard-0000.pt"), (["generated", "magpie"], "shard-0000.pt"),
        (["generated", "512"], "shard-0001.pt"), (["generated", "magpie"], "shard-0001.pt")]
    assert cache.tokens.tolist() == [10, 11, 12, 30, 31, 32, 13, 14, 15, 33, 34, 35]
