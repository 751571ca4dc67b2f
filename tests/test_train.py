"""Training on a tiny random Llama: the loss drops, checkpoints reload bit-identically and resume, Ray Train runs."""
from dataclasses import replace

import pytest
import torch

from medusa_core.tools.data import Encoded
from medusa_core.tools.distill import HiddenCache, build_cache
from medusa_core.heads import load_heads, save_heads
from medusa_core.tools.train import CHECKPOINT, TrainConfig, head_loss, loss_positions, new_heads, train


def sequences(n: int, length: int, seed: int = 0) -> list[Encoded]:
    """Token sequences with structure (a random walk over a small alphabet) so that heads have something to learn."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        steps = torch.randint(1, 4, (length,), generator=g)
        ids = ((torch.cumsum(steps, 0) % 50) + 10).tolist()
        out.append(Encoded(ids, [i >= 4 for i in range(length)]))  # a 4-token "prompt" carries no loss
    return out


@pytest.fixture(scope="module")
def cache(tiny_backend) -> HiddenCache:
    return build_cache(tiny_backend, sequences(12, 40), top_k=4, batch_tokens=160)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"num_heads": 3, "steps": 100, "batch_positions": 64, "lr": 2e-2, "checkpoint_every": 10,
                          **kw})


def soft_floor(cache, positions, c: TrainConfig) -> float:
    """The least soft loss: the weighted entropy of the base model's distribution at each head's target."""
    _, valid = cache.targets(positions, c.num_heads, "self")
    at = positions[:, None] + torch.arange(c.num_heads)[None, :] + 1
    p = torch.softmax(cache.hidden[at].float() @ cache.lm_head.T, -1)  # [N, K, V]
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)  # [N, K]
    per_head = (entropy * valid).sum(0) / valid.sum(0)
    return float((per_head * c.head_decay ** torch.arange(c.num_heads)).sum())


def test_cache_layout(cache, tiny_backend):
    assert cache.hidden.shape == (12 * 40, 64) and cache.top_ids.shape == (12 * 40, 4)
    assert torch.equal(cache.lm_head, tiny_backend.model.lm_head.weight)
    pool = loss_positions(cache)
    assert len(pool) > 0 and bool((pool + 2 < cache.seq_end[pool]).all())
    target, valid = cache.targets(pool[:5], 3, "self")
    assert torch.equal(target[:, 0], cache.top_ids[pool[:5] + 1, 0])  # head 0 at t learns the argmax at t+1


def test_shards_concatenate_to_the_whole_cache(cache, tiny_backend):
    seqs = sequences(12, 40)  # equal lengths: build_cache keeps their order
    shards = [build_cache(tiny_backend, seqs[:5], top_k=4), build_cache(tiny_backend, seqs[5:], top_k=4)]
    joined = HiddenCache.concat(shards)
    for name in ("tokens", "assistant", "top_ids", "seq_end"):
        assert torch.equal(getattr(joined, name), getattr(cache, name)), name
    torch.testing.assert_close(joined.hidden, cache.hidden, atol=2e-3, rtol=0)  # fp16; batch shapes differ
    target, valid = joined.targets(loss_positions(joined), 3, "self")
    assert torch.equal(target, cache.targets(loss_positions(cache), 3, "self")[0])


def test_a_cache_folder_keeps_one_lm_head(cache, tmp_path):
    cache.save(tmp_path / "shard-0000.pt")
    cache.save(tmp_path / "shard-0001.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lm_head.pt", "shard-0000.pt", "shard-0001.pt"]
    assert "lm_head" not in torch.load(tmp_path / "shard-0001.pt", weights_only=True)
    joined = HiddenCache.load(tmp_path)
    assert torch.equal(joined.lm_head, cache.lm_head) and torch.equal(joined.tokens, torch.cat([cache.tokens] * 2))
    other = HiddenCache(**{**cache.__dict__, "lm_head": cache.lm_head + 1})
    with pytest.raises(ValueError, match="another model"):
        other.save(tmp_path / "shard-0002.pt")
    torch.save(cache.__dict__, tmp_path / "shard-0003.pt")  # the older layout: an lm_head copy in the shard
    with pytest.raises(ValueError, match="older version"):
        HiddenCache.load(tmp_path / "shard-0003.pt")


@pytest.mark.parametrize("targets,vocab,layers,root,sequential", [
    ("self", "batch", 1, False, False), ("dataset", "full", 1, False, False), ("self", "batch", 2, False, False),
    ("self", "batch", 2, True, False), ("soft", "batch", 1, True, False), ("soft", "full", 1, False, False),
    ("self", "batch", 1, True, True), ("soft", "batch", 1, True, True)])
def test_training_lowers_the_loss(cache, targets, vocab, layers, root, sequential, tmp_path):
    c = cfg(targets=targets, vocab=vocab, num_layers=layers, root_conditioned=root, sequential=sequential)
    probe = loss_positions(cache)[:200]
    scored = replace(c, vocab="full")  # soft targets: the loss above its floor (the base model's entropy) is the KL
    floor = soft_floor(cache, probe, c) if targets == "soft" else 0.0
    before = float(head_loss(new_heads(c, 64), cache, probe, scored).detach()) - floor
    result = train(cache, c)
    after = float(head_loss(result.heads, cache, probe, scored)) - floor
    assert after < 0.7 * before, (before, after)
    save_heads(result.heads, tmp_path, "tiny")  # every layer round-trips through the published layout
    loaded = load_heads(tmp_path, 64, 256)
    assert loaded.num_layers == layers and torch.equal(loaded.weight, result.heads.weight)
    if root:  # the root weights train (they start at zero) and round-trip too
        assert result.heads.root.abs().sum() > 0 and torch.equal(loaded.root, result.heads.root)
    else:
        assert loaded.root is None
    if sequential:
        assert result.heads.prev.abs().sum() > 0 and torch.equal(loaded.prev, result.heads.prev)
    else:
        assert loaded.prev is None


def test_soft_targets_are_the_base_models_distribution_at_the_next_position(cache):
    """With the full vocabulary, the soft loss minus the hard one is the base model's entropy gap: the loss of heads
    that output exactly the base model's logits at t+k+1 equals that distribution's entropy (its minimum)."""
    c = cfg(targets="soft", vocab="full", num_heads=1)
    pos = loss_positions(cache)[:50]

    class Oracle(torch.nn.Module):  # head 0 at t outputs the hidden state at t+1: the base model's own logits
        num_heads, root, prev = 1, None, None

        def head_hidden(self, hidden, root_rows=None, prev_rows=None):
            return cache.hidden[pos + 1].float()[:, None]

    p = torch.softmax(cache.hidden[pos + 1].float() @ cache.lm_head.T, -1)  # [N, V]
    entropy = -(p * p.clamp(min=1e-30).log()).sum(-1)  # [N]
    _, valid = cache.targets(pos, 1, "self")
    want = float(entropy[valid[:, 0]].mean())
    assert abs(float(head_loss(Oracle(), cache, pos, c)) - want) < 1e-4
    assert float(head_loss(new_heads(c, 64), cache, pos, c)) > want + 0.1  # identity heads are worse


def test_sequential_heads_read_the_base_models_own_previous_token(cache):
    """Training feeds head k the base model's argmax at t+k (teacher forcing); drafting feeds it head k-1's top-1.
    Where the drafts follow the base model's path, the two give the same head hidden states."""
    heads = train(cache, cfg(steps=40, sequential=True, root_conditioned=True)).heads
    pos = loss_positions(cache)[:8]
    from medusa_core.tools.train import cached_head_hidden

    taught = cached_head_hidden(heads, cache, pos)  # [N, K, H]
    for k in range(heads.num_heads):
        prev = cache.top_ids[pos + k, 0]
        alone = heads.head_hidden(cache.hidden[pos].float(), cache.root_rows(pos), cache.lm_head[prev][:, None],
                                  depth=k + 1, first=k)
        torch.testing.assert_close(alone[:, 0], taught[:, k])
    other = heads.head_hidden(cache.hidden[pos].float(), cache.root_rows(pos), cache.lm_head[prev * 0 + 11][:, None],
                              depth=heads.num_heads, first=heads.num_heads - 1)
    assert not torch.allclose(other[:, 0], taught[:, -1])  # the previous token does reach the head


def test_a_time_budget_stops_checkpointed_and_resumes(cache, tmp_path):
    c = cfg(steps=400, checkpoint_every=1000)
    short = train(cache, c, tmp_path, max_seconds=0.5)
    assert 0 < short.steps < c.steps
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == short.steps  # saved where it stopped
    assert train(cache, c, tmp_path).steps == c.steps


def test_checkpoint_resume_is_bit_identical(cache, tmp_path):
    c = cfg(steps=20, checkpoint_every=5)
    straight = train(cache, c, tmp_path / "a")
    interrupted = train(cache, c, tmp_path / "b", stop_after=12)  # checkpoint at step 10, 2 steps lost
    assert interrupted.steps == 12
    state = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    assert state["step"] == 10
    resumed = train(cache, c, tmp_path / "b")
    assert resumed.steps == c.steps
    assert torch.equal(straight.heads.weight, resumed.heads.weight)
    assert torch.equal(straight.heads.bias, resumed.heads.bias)
    save_heads(resumed.heads, tmp_path / "heads", "tiny")
    reloaded = load_heads(tmp_path / "heads", 64, 256)
    assert torch.equal(reloaded.weight, resumed.heads.weight) and torch.equal(reloaded.bias, resumed.heads.bias)


def test_resume_refuses_another_config(cache, tmp_path):
    train(cache, cfg(steps=10), tmp_path)
    with pytest.raises(ValueError, match="different training config"):
        train(cache, cfg(steps=10, lr=1e-4), tmp_path)


@pytest.mark.slow  # Ray start-up and two worker processes: over a minute on 2 shared cores
def test_ray_train_two_workers(cache, tmp_path):
    ray = pytest.importorskip("ray")
    from medusa_core.tools.train import train_ray

    cache.save(tmp_path / "shard-0.pt")  # workers load and join the shards they are given
    cache.save(tmp_path / "shard-1.pt")
    c = cfg(steps=10)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        heads = train_ray([tmp_path / "shard-0.pt", tmp_path / "shard-1.pt"], c, tmp_path / "out", num_workers=2)
    finally:
        ray.shutdown()
    save_heads(heads, tmp_path / "heads", "tiny")
    loaded = load_heads(tmp_path / "heads", 64, 256)
    assert loaded.num_heads == 3 and loaded.weight.abs().sum() > 0
    probe = loss_positions(cache)[:200]
    assert float(head_loss(loaded, cache, probe, c)) < float(head_loss(new_heads(c, 64), cache, probe, c))


def test_rank_histogram_of_bf16_heads_ranks_as_their_fp32_copy(cache):
    """eval and tune-tree load the heads in the backend's dtype (bf16 with --dtype bfloat16) and rank them on the
    fp32 cache: that once failed with a dtype mismatch."""
    from medusa_core.tools.evaluate import rank_histogram

    heads = train(cache, cfg(steps=30)).heads
    fp32 = rank_histogram(heads, cache, max_rank=10)
    bf16 = rank_histogram(heads.to(torch.bfloat16), cache, max_rank=10)
    assert heads.weight.dtype == torch.bfloat16  # the caller's heads stay as they were
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0)


def test_rank_histogram_counts_targets_beyond_head_vocab_as_misses(cache):
    from medusa_core.tools.evaluate import rank_histogram

    heads = train(cache, cfg(steps=30)).heads
    full = rank_histogram(heads, cache, max_rank=60)  # [K, R]
    cut_at = 35  # ids run 10..59: some targets lie at or above 35
    heads.head_vocab = cut_at
    cut = rank_histogram(heads, cache, max_rank=60)
    pool = loss_positions(cache)
    target, valid = cache.targets(pool, 3, "self")
    reachable = ((target < cut_at) & valid).sum(0) / valid.sum(0)  # [K]
    torch.testing.assert_close(cut.sum(1), reachable)  # every reachable target has some rank below 60
    assert bool((cut.sum(1) < full.sum(1) - 0.05).all())
