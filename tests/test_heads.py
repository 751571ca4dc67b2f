"""Heads checkpoints: the published layout in both formats and file types loads strictly and round-trips."""
import json

import pytest
import torch
from safetensors.torch import save_file

from medusa_core.heads import HeadsFormatError, MedusaHeads, load_heads, random_heads, save_heads

H, V = 16, 32


def published(num_heads=5, legacy=True, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k in range(num_heads):
        sd[f"{k}.0.linear.weight"] = torch.randn(H, H, generator=g).to(dtype)
        sd[f"{k}.0.linear.bias"] = torch.randn(H, generator=g).to(dtype)
        if legacy:
            sd[f"{k}.1.weight"] = torch.randn(V, H, generator=g).to(dtype)
    return sd


def write(folder, sd, fmt, config_heads=2):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"medusa_num_heads": config_heads, "medusa_num_layers": 1}))
    if fmt == "safetensors":
        save_file(sd, str(folder / "medusa_lm_head.safetensors"))
    else:
        torch.save(sd, folder / "medusa_lm_head.pt")


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
@pytest.mark.parametrize("legacy", [True, False])
def test_published_layout_loads_and_counts_heads_from_keys(tmp_path, fmt, legacy):
    sd = published(legacy=legacy)
    write(tmp_path / "h", sd, fmt, config_heads=2)  # the config under-reports, as the Vicuna-7B release does
    heads = load_heads(tmp_path / "h", H, V)
    assert heads.num_heads == 5 and heads.num_layers == 1
    assert (heads.lm_head is not None) == legacy
    assert heads.weight.dtype == torch.bfloat16
    torch.testing.assert_close(heads.weight[3, 0], sd["3.0.linear.weight"])
    if legacy:
        torch.testing.assert_close(heads.lm_head[4], sd["4.1.weight"])


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_save_then_load_round_trips(tmp_path, fmt):
    heads = random_heads(3, H, seed=1, scale=1.0, dtype=torch.float32)
    save_heads(heads, tmp_path / "h", base_model="tiny", fmt=fmt)
    again = load_heads(tmp_path / "h", H, V)
    assert torch.equal(again.weight, heads.weight) and again.lm_head is None
    assert json.loads((tmp_path / "h" / "config.json").read_text())["medusa_num_heads"] == 3


@pytest.mark.parametrize("corrupt, names", [
    (lambda sd: sd.pop("2.0.linear.bias"), ["2.0.linear.bias"]),
    (lambda sd: sd.update({"1.0.linear.weight": torch.zeros(H, H + 1)}), ["1.0.linear.weight"]),
    (lambda sd: sd.update({"extra.thing": torch.zeros(1)}), ["extra.thing"]),
    (lambda sd: sd.pop("4.1.weight"), ["4.1.weight"]),
])
def test_corrupted_checkpoint_names_keys(tmp_path, corrupt, names):
    sd = published()
    corrupt(sd)
    write(tmp_path / "h", sd, "safetensors")
    with pytest.raises(HeadsFormatError) as e:
        load_heads(tmp_path / "h", H, V)
    for n in names:
        assert n in str(e.value)


def test_pt_with_pickled_object_is_refused(tmp_path):
    folder = tmp_path / "h"
    folder.mkdir()
    torch.save({"0.0.linear.weight": torch.nn.Linear(2, 2)}, folder / "medusa_lm_head.pt")  # a module, not a tensor
    with pytest.raises(HeadsFormatError, match="refusing to unpickle"):
        load_heads(folder, H, V)


def test_missing_folder_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="medusa_lm_head"):
        load_heads(tmp_path, H, V)


class TinyLmHead:
    """The two Backend methods heads use: the shared lm_head over ids below `vocab`, and its rows per token."""

    def __init__(self, seed=0):
        self.weight = torch.randn(V, H, generator=torch.Generator().manual_seed(seed))  # [V, H]

    def lm_head(self, x, vocab=None):
        return x @ self.weight[:vocab].T

    def lm_head_rows(self, ids):
        return self.weight[ids]


def test_zero_heads_are_identity_and_draft_shapes():
    heads = MedusaHeads(4, 1, H, vocab=None)
    lm = TinyLmHead()
    hidden = torch.randn(2, H)
    logits = heads.logits(hidden, None, lm.lm_head)
    assert logits.shape == (2, 4, V)
    torch.testing.assert_close(logits[:, 2], lm.lm_head(hidden))  # zero-initialised ResBlock = identity
    assert heads.draft(hidden, torch.tensor([1, 2]), [[], []], 4, 5, lm).shape == (2, 4, 5)
    shallow = heads.draft(hidden, torch.tensor([1, 2]), [[], []], 2, 5, lm)  # a depth-2 tree runs 2 heads
    assert torch.equal(shallow, heads.draft(hidden, torch.tensor([1, 2]), [[], []], 4, 5, lm)[:, :2])
    with pytest.raises(ValueError, match="needs 5 heads"):
        heads.draft(hidden, torch.tensor([1, 2]), [[], []], 5, 5, lm)


@pytest.mark.parametrize("legacy", [True, False])
def test_head_vocab_ranks_only_the_first_ids(tmp_path, legacy):
    write(tmp_path, published(4, legacy, torch.float32), "safetensors")
    full, cut = load_heads(tmp_path, H, V), load_heads(tmp_path, H, V, head_vocab=12)
    hidden, lm, roots = torch.randn(64, H), TinyLmHead(), torch.zeros(64, dtype=torch.long)
    torch.testing.assert_close(cut.logits(hidden, None, lm.lm_head), full.logits(hidden, None, lm.lm_head)[..., :12])
    drafted = cut.draft(hidden, roots, [[]] * 64, 4, 5, lm)  # [B, K, 5]
    assert drafted.max() < 12 and full.draft(hidden, roots, [[]] * 64, 4, 5, lm).max() >= 12


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_root_conditioned_heads_round_trip_and_read_the_root(tmp_path, fmt):
    heads = random_heads(3, H, seed=2, scale=0.5, dtype=torch.float32, root_conditioned=True)
    save_heads(heads, tmp_path / "h", base_model="tiny", fmt=fmt)
    assert json.loads((tmp_path / "h" / "config.json").read_text())["root_conditioned"] is True
    again = load_heads(tmp_path / "h", H, V)
    assert torch.equal(again.root, heads.root) and torch.equal(again.weight, heads.weight)
    lm, hidden = TinyLmHead(), torch.randn(8, H).expand(2, 8, H).reshape(16, H)  # each hidden state twice
    roots = torch.arange(16) % V  # ... with two different roots
    logits = again.logits(hidden, lm.lm_head_rows(roots), lm.lm_head)
    assert not torch.allclose(logits[:8], logits[8:])  # the root changes the guess
    assert torch.equal(again.draft(hidden, roots, [[]] * 16, 3, 4, lm), logits.topk(4, dim=-1).indices)
    first = again.draft(hidden, roots, [[]] * 16, 1, 4, lm)  # depth 1: head 1 alone, same guesses
    assert torch.equal(first, logits[:, :1].topk(4, dim=-1).indices)
    with pytest.raises(ValueError, match="root tokens"):
        again.logits(hidden, None, lm.lm_head)


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_sequential_heads_round_trip_and_draft_depth_by_depth(tmp_path, fmt):
    heads = random_heads(3, H, seed=4, scale=0.5, dtype=torch.float32, sequential=True)
    save_heads(heads, tmp_path / "h", base_model="tiny", fmt=fmt)
    assert json.loads((tmp_path / "h" / "config.json").read_text())["sequential"] is True
    again = load_heads(tmp_path / "h", H, V)
    assert torch.equal(again.prev, heads.prev) and torch.equal(again.root, heads.root)
    lm, hidden, roots = TinyLmHead(), torch.randn(16, H), torch.arange(16) % V
    drafted = again.draft(hidden, roots, [[]] * 16, 3, 4, lm)  # [B, 3, 4]
    previous = roots
    for k in range(3):  # head k's guesses follow from the top-1 guess before it (the root for head 0)
        logits = again.logits(hidden, lm.lm_head_rows(roots), lm.lm_head, k + 1, lm.lm_head_rows(previous)[:, None],
                              first=k)
        assert torch.equal(drafted[:, k : k + 1], logits.topk(4, dim=-1).indices)
        previous = drafted[:, k, 0]
    shifted = again.logits(hidden, lm.lm_head_rows(roots), lm.lm_head, 3, lm.lm_head_rows((previous + 1) % V)[:, None],
                           first=2)
    assert not torch.allclose(shifted, logits)  # the previous draft changes the guess
    with pytest.raises(ValueError, match="previous token"):
        again.logits(hidden, lm.lm_head_rows(roots), lm.lm_head)
    with pytest.raises(ValueError, match="root_conditioned"):
        MedusaHeads(2, 1, H, None, sequential=True)


def test_sequential_weights_must_cover_every_head(tmp_path):
    sd = published(2, legacy=False, dtype=torch.float32)
    sd |= {"0.root.weight": torch.zeros(H, H), "1.root.weight": torch.zeros(H, H), "0.prev.weight": torch.zeros(H, H)}
    write(tmp_path / "h", sd, "safetensors")
    with pytest.raises(HeadsFormatError, match="1.prev.weight"):
        load_heads(tmp_path / "h", H, V)


def test_root_weights_must_cover_every_head(tmp_path):
    sd = published(3, legacy=False, dtype=torch.float32)
    sd["0.root.weight"] = torch.zeros(H, H)  # heads 1 and 2 lack theirs
    write(tmp_path / "h", sd, "safetensors")
    with pytest.raises(HeadsFormatError, match="1.root.weight"):
        load_heads(tmp_path / "h", H, V)
