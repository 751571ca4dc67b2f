"""Hidden-state caches are built in shards of whole conversations: a bigger budget only adds shards."""
import types

import pytest
import torch

from medusa_core.tools import data as sharegpt
from medusa_core.tools.commands import load_or_build_cache

SLICE_CHARS = 400_000  # the file's first ~60 conversations: the test needs ~10 usable held-in ones


@pytest.fixture
def sharegpt_slice(tmp_path, monkeypatch):
    """The head of the real ShareGPT file, cut mid-item as the shipped file is: the same conversations in the same
    order as the first shards built from the whole file, without parsing all 125 MB (~1.8 s) at each read."""
    with sharegpt.sharegpt_path().open(encoding="utf-8") as f:
        head = f.read(SLICE_CHARS)
    path = tmp_path / "sharegpt-head.json"
    path.write_text(head, encoding="utf-8")
    monkeypatch.setattr(sharegpt, "sharegpt_path", lambda: path)
    conversations, report = sharegpt.read_sharegpt()
    assert report.truncated_tail == 1 and report.kept >= 40, report
    return conversations


def test_bigger_budget_adds_shards_and_keeps_the_built_ones(embedded_generator, sharegpt_slice, tmp_path):
    backend = embedded_generator.backend
    args = types.SimpleNamespace(cache_dir=str(tmp_path), max_seq=48, train_tokens=150, eval_tokens=0)
    small, paths = load_or_build_cache(backend, args, held_out=False, data="sharegpt", shard=2)
    assert small.num_tokens >= 150 and len(paths) >= 2 and all(p.parent == paths[0].parent for p in paths)
    built = {p: p.stat().st_mtime_ns for p in paths}

    args.train_tokens = small.num_tokens + 1
    bigger, more = load_or_build_cache(backend, args, held_out=False, data="sharegpt", shard=2)
    assert more[: len(paths)] == paths and len(more) == len(paths) + 1
    assert all(p.stat().st_mtime_ns == t for p, t in built.items())  # loaded, not rebuilt
    assert torch.equal(bigger.tokens[: small.num_tokens], small.tokens)
    assert (paths[0].parent / "lm_head.pt").is_file()  # once per folder, not per shard
    assert torch.equal(bigger.lm_head, backend.model.lm_head.weight.float())

    held_in, _ = sharegpt.split(sharegpt_slice)  # shard k holds the k-th pair of usable conversations
    seqs = [s for c in held_in[:20] if any((s := sharegpt.encode_conversation(backend.tokenizer, c.messages, 48))
                                          .assistant)]
    first = sorted(seqs[:2], key=lambda s: -len(s.ids))  # a shard is cached longest first
    assert bigger.tokens[: sum(len(s.ids) for s in first)].tolist() == [t for s in first for t in s.ids]
    tail = sorted(seqs[2 * len(paths): 2 * len(paths) + 2], key=lambda s: -len(s.ids))  # the added shard
    assert bigger.tokens[small.num_tokens:].tolist() == [t for s in tail for t in s.ids]


def test_written_whole_leaves_the_old_file_or_the_new_one_never_half(tmp_path):
    """A write that dies midway (here: raises) leaves the previous file as it was and no temporary behind; a write
    that ends replaces it in one rename. Shards, checkpoints, step costs and converted models are written so."""
    from medusa_core.files import written_whole

    target = tmp_path / "shard-0000.pt"
    with written_whole(target) as tmp:
        tmp.write_text("old")
    with pytest.raises(RuntimeError), written_whole(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [target.name]
    with written_whole(tmp_path / "folder.tokenizer") as tmp:  # folders too
        tmp.mkdir()
        (tmp / "tokenizer.json").write_text("{}")
    assert (tmp_path / "folder.tokenizer" / "tokenizer.json").is_file()


def test_llamacpp_states_get_their_own_cache_folder():
    """Hidden states from llama.cpp (the served Q8_0 copy) and from the transformers model must never share a cache:
    the folder names the file whose states they are."""
    from medusa_core.backends import load_backend
    from medusa_core.config import REPO_ROOT, load_config
    from medusa_core.tools.commands import states_name

    llama = load_backend(load_config(REPO_ROOT / "configs" / "smollm2-135m-llamacpp.yaml").base_model)
    assert states_name(llama) == "llamacpp-SmolLM2-135M-Instruct.Q4_1.Q8_0"
    base = load_config(REPO_ROOT / "configs" / "smollm2-135m.yaml").base_model
    assert states_name(load_backend(base.model_copy(update={"dtype": "bfloat16"}))) == "bfloat16"
