"""Medusa heads: K residual blocks on the base model's last hidden state, each followed by an lm_head.

Head k (0-based) reads the final-norm hidden state at position t and predicts token t+k+2 (the base model itself
predicts t+1). Each head is L x ResBlock(H) (`x + SiLU(W x + b)`, W zero-initialised) and then either its own
Linear(H, V, bias=False) ("legacy" format, as published by FasterDecoding) or the base model's shared lm_head
("version 2": only the ResBlocks are stored). With `head_vocab` N the heads rank only token ids below N (a
serving setting, not stored in the checkpoint): the lm_head is most of a head's cost.

Published file layout (`medusa_lm_head.safetensors` or `.pt`): `{k}.{l}.linear.weight [H, H]`,
`{k}.{l}.linear.bias [H]`, and in the legacy format `{k}.{L}.weight [V, H]`.

Differences from FasterDecoding/Medusa: all heads' blocks are stacked into one batched matmul; the number of heads
is counted from the keys (the published Vicuna-7B file holds 5 heads while its config says 2); loading is strict
and never unpickles objects.
"""
from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

HEADS_FILES = ("medusa_lm_head.safetensors", "medusa_lm_head.pt")
_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


class HeadsFormatError(ValueError):
    """A heads checkpoint whose keys or shapes do not match the Medusa layout."""


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden: int, vocab: int | None,
                 head_vocab: int | None = None) -> None:
        super().__init__()
        self.head_vocab = head_vocab  # rank only token ids below this (None: all)
        # Zero weights make every block the identity at init, as in the reference.
        self.weight = nn.Parameter(torch.zeros(num_heads, num_layers, hidden, hidden))  # [K, L, H, H]
        self.bias = nn.Parameter(torch.zeros(num_heads, num_layers, hidden))  # [K, L, H]
        self.lm_head = nn.Parameter(torch.zeros(num_heads, vocab, hidden)) if vocab else None  # [K, V, H]

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @property
    def num_layers(self) -> int:
        return self.weight.shape[1]

    def head_hidden(self, hidden: Tensor) -> Tensor:
        """hidden [B, H] -> per-head hidden [B, K, H]."""
        x = hidden.unsqueeze(1).expand(-1, self.num_heads, -1)
        for layer in range(self.num_layers):
            w, b = self.weight[:, layer], self.bias[:, layer]  # [K, H, H], [K, H]
            x = x + nn.functional.silu(torch.einsum("bkh,koh->bko", x, w) + b)
        return x

    def logits(self, hidden: Tensor, shared_lm_head: Callable[[Tensor], Tensor]) -> Tensor:
        """hidden [B, H] -> head logits [B, K, head_vocab or V]."""
        x = self.head_hidden(hidden.to(self.weight.dtype))
        if self.lm_head is None:
            return shared_lm_head(x.to(hidden.dtype), self.head_vocab)
        return torch.einsum("bkh,kvh->bkv", x, self.lm_head[:, : self.head_vocab])

    def draft(self, hidden: Tensor, history: list[list[int]], top_k: int,
              shared_lm_head: Callable[[Tensor], Tensor]) -> Tensor:
        """Top-k candidates per head, [B, K, top_k]. `history` is unused: heads only read the hidden state."""
        return self.logits(hidden, shared_lm_head).topk(top_k, dim=-1).indices


def random_heads(num_heads: int, hidden: int, seed: int, scale: float, dtype: torch.dtype,
                 head_vocab: int | None = None) -> MedusaHeads:
    """Seeded random version-2 heads (shared lm_head); scale 0 gives the zero-initialised identity heads."""
    heads = MedusaHeads(num_heads, 1, hidden, vocab=None, head_vocab=head_vocab)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=g) * scale)
    return heads.to(dtype).requires_grad_(False)


def to_published_state_dict(heads: MedusaHeads) -> dict[str, Tensor]:
    sd = {}
    for k in range(heads.num_heads):
        for layer in range(heads.num_layers):
            sd[f"{k}.{layer}.linear.weight"] = heads.weight[k, layer].detach().contiguous()
            sd[f"{k}.{layer}.linear.bias"] = heads.bias[k, layer].detach().contiguous()
        if heads.lm_head is not None:
            sd[f"{k}.{heads.num_layers}.weight"] = heads.lm_head[k].detach().contiguous()
    return sd


def from_published_state_dict(sd: dict[str, Tensor], hidden: int, vocab: int,
                              head_vocab: int | None = None) -> MedusaHeads:
    """Strictly rebuild heads from the published key layout; errors name every bad key."""
    bad = [k for k in sd if not _KEY.match(k)]
    if bad:
        raise HeadsFormatError(f"unexpected keys in heads checkpoint: {sorted(bad)}")
    num_heads = 1 + max(int(_KEY.match(k).group(1)) for k in sd) if sd else 0
    num_layers = 1 + max((int(m.group(2)) for k in sd if (m := _KEY.match(k)).group(3) != "weight"), default=-1)
    if num_heads == 0 or num_layers == 0:
        raise HeadsFormatError("heads checkpoint holds no ResBlock weights ({k}.{l}.linear.weight)")
    legacy = any(_KEY.match(k).group(3) == "weight" for k in sd)
    expected = _expected_shapes(num_heads, num_layers, hidden, vocab, legacy)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {list(sd[k].shape)} != {list(s)}" for k, s in expected.items()
                   if k in sd and tuple(sd[k].shape) != s)
    if missing or unexpected or wrong:
        raise HeadsFormatError(f"heads checkpoint does not match {num_heads} heads x {num_layers} layers "
                               f"(H={hidden}, V={vocab}): missing {missing}, unexpected {unexpected}, "
                               f"wrong shape {wrong}")
    dtype = next(iter(sd.values())).dtype
    heads = MedusaHeads(num_heads, num_layers, hidden, vocab if legacy else None, head_vocab).to(dtype)
    with torch.no_grad():
        for k in range(num_heads):
            for layer in range(num_layers):
                heads.weight[k, layer].copy_(sd[f"{k}.{layer}.linear.weight"])
                heads.bias[k, layer].copy_(sd[f"{k}.{layer}.linear.bias"])
            if legacy:
                heads.lm_head[k].copy_(sd[f"{k}.{num_layers}.weight"])
    return heads.requires_grad_(False)


def _expected_shapes(num_heads: int, num_layers: int, hidden: int, vocab: int,
                     legacy: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(num_heads):
        for layer in range(num_layers):
            shapes[f"{k}.{layer}.linear.weight"] = (hidden, hidden)
            shapes[f"{k}.{layer}.linear.bias"] = (hidden,)
        if legacy:
            shapes[f"{k}.{num_layers}.weight"] = (vocab, hidden)
    return shapes


def load_heads(folder: str | Path, hidden: int, vocab: int, head_vocab: int | None = None) -> MedusaHeads:
    """Load a FasterDecoding-format folder: config.json + medusa_lm_head.safetensors (preferred) or .pt."""
    folder = Path(folder)
    files = [folder / f for f in HEADS_FILES if (folder / f).is_file()]
    if not files:
        raise FileNotFoundError(f"no {' or '.join(HEADS_FILES)} in {folder}")
    if files[0].suffix == ".safetensors":
        sd = load_file(str(files[0]))
    else:
        try:
            sd = torch.load(files[0], map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
        except pickle.UnpicklingError as e:
            raise HeadsFormatError(f"{files[0]} holds objects other than tensors; refusing to unpickle them") from e
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise HeadsFormatError(f"{files[0]} is not a flat state dict of tensors")
    return from_published_state_dict(sd, hidden, vocab, head_vocab)


def save_heads(heads: MedusaHeads, folder: str | Path, base_model: str, fmt: str = "safetensors",
               extra: dict | None = None) -> None:
    """Write config.json + medusa_lm_head.{safetensors,pt} in the published layout."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = to_published_state_dict(heads)
    if fmt == "safetensors":
        save_file(sd, str(folder / "medusa_lm_head.safetensors"))
    elif fmt == "pt":
        torch.save(sd, folder / "medusa_lm_head.pt")
    else:
        raise ValueError(f"unknown heads format {fmt!r} (safetensors or pt)")
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "base_model_name_or_path": base_model, "shared_lm_head": heads.lm_head is None, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
