"""Medusa heads: K residual blocks on the base model's last hidden state, each followed by an lm_head.

Head k (0-based) reads the final-norm hidden state at position t and predicts token t+k+2 (the base model itself
predicts t+1). Each head is L x ResBlock(H) (`x + SiLU(W x + b)`, W zero-initialised) and then either its own
Linear(H, V, bias=False) ("legacy" format, as published by FasterDecoding) or the base model's shared lm_head
("version 2": only the ResBlocks are stored). With `head_vocab` N the heads rank only token ids below N (a
serving setting, not stored in the checkpoint): the lm_head is most of a head's cost.

Root-conditioned heads (an extension, flagged `root_conditioned` in config.json) also read the root: the token the
base model chose at t (the bonus token of the step that drafts), as its lm_head row e. The first block of head k
becomes `x + SiLU(W x + U e + b)` with U zero-initialised, so the heads know token t+1 when they guess t+2 onwards,
as Hydra and EAGLE heads do; on the embedded model it lifts held-out head-1 top-1 from 0.34 to 0.43
(README, "Medusa heads for the embedded model").

Sequential heads (Hydra-style, flagged `sequential`; root-conditioned too) make head k also read the token just
before its own target, the draft at depth k (depth 0: the root), through P_k zero-initialised beside U:
`x + SiLU(W x + U e_root + P e_k + b)`. Drafting then runs depth by depth along each depth's top-1 draft, which is
the whole tree on a chain (llama.cpp) and its main path on a branching tree; training feeds the base model's own
greedy tokens there (teacher forcing), so a head learns what follows a correct prefix, the only case a chain keeps.

Published file layout (`medusa_lm_head.safetensors` or `.pt`): `{k}.{l}.linear.weight [H, H]`,
`{k}.{l}.linear.bias [H]`, in the legacy format `{k}.{L}.weight [V, H]`, for root-conditioned heads
`{k}.root.weight [H, H]` (U) and for sequential heads `{k}.prev.weight [H, H]` (P).

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
_ROOT_KEY = re.compile(r"^(\d+)\.(root|prev)\.weight$")


class HeadsFormatError(ValueError):
    """A heads checkpoint whose keys or shapes do not match the Medusa layout."""


class MedusaHeads(nn.Module):
    def __init__(self, num_heads: int, num_layers: int, hidden: int, vocab: int | None,
                 head_vocab: int | None = None, root_conditioned: bool = False, sequential: bool = False) -> None:
        super().__init__()
        if sequential and not root_conditioned:
            raise ValueError("sequential heads read the root too: they need root_conditioned")
        self.head_vocab = head_vocab  # rank only token ids below this (None: all)
        # Zero weights make every block the identity at init, as in the reference.
        self.weight = nn.Parameter(torch.zeros(num_heads, num_layers, hidden, hidden))  # [K, L, H, H]
        self.bias = nn.Parameter(torch.zeros(num_heads, num_layers, hidden))  # [K, L, H]
        self.lm_head = nn.Parameter(torch.zeros(num_heads, vocab, hidden)) if vocab else None  # [K, V, H]
        self.root = nn.Parameter(torch.zeros(num_heads, hidden, hidden)) if root_conditioned else None  # [K, H, H]
        self.prev = nn.Parameter(torch.zeros(num_heads, hidden, hidden)) if sequential else None  # [K, H, H]

    @property
    def num_heads(self) -> int:
        return self.weight.shape[0]

    @property
    def num_layers(self) -> int:
        return self.weight.shape[1]

    def head_hidden(self, hidden: Tensor, root_rows: Tensor | None = None, prev_rows: Tensor | None = None,
                    depth: int | None = None, first: int = 0) -> Tensor:
        """hidden [B, H], the roots' lm_head rows [B, H] (root-conditioned heads), the lm_head rows of each head's
        previous token [B, D - first, H] (sequential heads) -> per-head hidden [B, D - first, H] of heads
        first .. D - 1 (D = depth, all K by default)."""
        heads = slice(first, self.num_heads if depth is None else depth)
        x = hidden.unsqueeze(1).expand(-1, heads.stop - first, -1)
        for layer in range(self.num_layers):
            w, b = self.weight[heads, layer], self.bias[heads, layer]  # [D, H, H], [D, H]
            z = torch.einsum("bkh,koh->bko", x, w) + b
            if layer == 0 and self.root is not None:
                if root_rows is None:
                    raise ValueError("root-conditioned heads need the root tokens' lm_head rows")
                z = z + torch.einsum("bh,koh->bko", root_rows.to(self.root.dtype), self.root[heads])
            if layer == 0 and self.prev is not None:
                if prev_rows is None:
                    raise ValueError("sequential heads need the lm_head rows of each head's previous token")
                z = z + torch.einsum("bkh,koh->bko", prev_rows.to(self.prev.dtype), self.prev[heads])
            x = x + nn.functional.silu(z)
        return x

    def logits(self, hidden: Tensor, root_rows: Tensor | None, shared_lm_head: Callable[..., Tensor],
               depth: int | None = None, prev_rows: Tensor | None = None, first: int = 0) -> Tensor:
        """hidden [B, H], root rows [B, H] or None, previous-token rows or None -> logits [B, D - first,
        head_vocab or V] of heads first .. D - 1."""
        x = self.head_hidden(hidden.to(self.weight.dtype), root_rows, prev_rows, depth, first)
        if self.lm_head is None:
            return shared_lm_head(x.to(hidden.dtype), self.head_vocab)
        return torch.einsum("bkh,kvh->bkv", x, self.lm_head[first : first + x.shape[1], : self.head_vocab])

    def draft(self, hidden: Tensor, roots: Tensor, history: list[list[int]], depth: int, top_k: int,
              backend) -> Tensor:
        """Top-k candidates of the first `depth` heads, [B, depth, top_k], from the hidden state [B, H] that chose
        the roots [B]. `history` is unused: heads read only the hidden state (and the root, if root-conditioned)."""
        if depth > self.num_heads:
            raise ValueError(f"a tree of depth {depth} needs {depth} heads; these heads are {self.num_heads}")
        root_rows = backend.lm_head_rows(roots) if self.root is not None else None
        if self.prev is None:
            return self.logits(hidden, root_rows, backend.lm_head, depth).topk(top_k, dim=-1).indices
        drafts, previous = [], roots
        for k in range(depth):  # depth by depth: head k reads the top-1 draft before it
            prev_rows = backend.lm_head_rows(previous)[:, None]  # [B, 1, H]
            top = self.logits(hidden, root_rows, backend.lm_head, k + 1, prev_rows, first=k).topk(top_k, dim=-1)
            drafts.append(top.indices)  # [B, 1, top_k]
            previous = top.indices[:, 0, 0]
        return torch.cat(drafts, dim=1)


def random_heads(num_heads: int, hidden: int, seed: int, scale: float, dtype: torch.dtype,
                 head_vocab: int | None = None, root_conditioned: bool = False,
                 sequential: bool = False) -> MedusaHeads:
    """Seeded random version-2 heads (shared lm_head); scale 0 gives the zero-initialised identity heads."""
    heads = MedusaHeads(num_heads, 1, hidden, vocab=None, head_vocab=head_vocab,
                        root_conditioned=root_conditioned or sequential, sequential=sequential)
    rng = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        heads.weight.copy_(torch.randn(heads.weight.shape, generator=rng) * scale)
        if heads.root is not None:
            heads.root.copy_(torch.randn(heads.root.shape, generator=rng) * scale)
        if heads.prev is not None:
            heads.prev.copy_(torch.randn(heads.prev.shape, generator=rng) * scale)
    return heads.to(dtype).requires_grad_(False)


def to_published_state_dict(heads: MedusaHeads) -> dict[str, Tensor]:
    sd = {}
    for k in range(heads.num_heads):
        for layer in range(heads.num_layers):
            sd[f"{k}.{layer}.linear.weight"] = heads.weight[k, layer].detach().contiguous()
            sd[f"{k}.{layer}.linear.bias"] = heads.bias[k, layer].detach().contiguous()
        if heads.lm_head is not None:
            sd[f"{k}.{heads.num_layers}.weight"] = heads.lm_head[k].detach().contiguous()
        if heads.root is not None:
            sd[f"{k}.root.weight"] = heads.root[k].detach().contiguous()
        if heads.prev is not None:
            sd[f"{k}.prev.weight"] = heads.prev[k].detach().contiguous()
    return sd


def from_published_state_dict(sd: dict[str, Tensor], hidden: int, vocab: int,
                              head_vocab: int | None = None) -> MedusaHeads:
    """Strictly rebuild heads from the published key layout; errors name every bad key."""
    bad = [k for k in sd if not (_KEY.match(k) or _ROOT_KEY.match(k))]
    if bad:
        raise HeadsFormatError(f"unexpected keys in heads checkpoint: {sorted(bad)}")
    blocks = [m for k in sd if (m := _KEY.match(k))]
    num_heads = 1 + max(int((_KEY.match(k) or _ROOT_KEY.match(k)).group(1)) for k in sd) if sd else 0
    num_layers = 1 + max((int(m.group(2)) for m in blocks if m.group(3) != "weight"), default=-1)
    if num_heads == 0 or num_layers == 0:
        raise HeadsFormatError("heads checkpoint holds no ResBlock weights ({k}.{l}.linear.weight)")
    legacy = any(m.group(3) == "weight" for m in blocks)
    rooted = any(_ROOT_KEY.match(k) for k in sd)
    sequential = any((m := _ROOT_KEY.match(k)) and m.group(2) == "prev" for k in sd)
    expected = _expected_shapes(num_heads, num_layers, hidden, vocab, legacy, rooted, sequential)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k} {list(sd[k].shape)} != {list(s)}" for k, s in expected.items()
                   if k in sd and tuple(sd[k].shape) != s)
    if missing or unexpected or wrong:
        raise HeadsFormatError(f"heads checkpoint does not match {num_heads} heads x {num_layers} layers "
                               f"(H={hidden}, V={vocab}): missing {missing}, unexpected {unexpected}, "
                               f"wrong shape {wrong}")
    dtype = next(iter(sd.values())).dtype
    heads = MedusaHeads(num_heads, num_layers, hidden, vocab if legacy else None, head_vocab, rooted,
                        sequential).to(dtype)
    with torch.no_grad():
        for k in range(num_heads):
            for layer in range(num_layers):
                heads.weight[k, layer].copy_(sd[f"{k}.{layer}.linear.weight"])
                heads.bias[k, layer].copy_(sd[f"{k}.{layer}.linear.bias"])
            if legacy:
                heads.lm_head[k].copy_(sd[f"{k}.{num_layers}.weight"])
            if rooted:
                heads.root[k].copy_(sd[f"{k}.root.weight"])
            if sequential:
                heads.prev[k].copy_(sd[f"{k}.prev.weight"])
    return heads.requires_grad_(False)


def _expected_shapes(num_heads: int, num_layers: int, hidden: int, vocab: int, legacy: bool,
                     rooted: bool, sequential: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(num_heads):
        for layer in range(num_layers):
            shapes[f"{k}.{layer}.linear.weight"] = (hidden, hidden)
            shapes[f"{k}.{layer}.linear.bias"] = (hidden,)
        if legacy:
            shapes[f"{k}.{num_layers}.weight"] = (vocab, hidden)
        if rooted or sequential:
            shapes[f"{k}.root.weight"] = (hidden, hidden)
        if sequential:
            shapes[f"{k}.prev.weight"] = (hidden, hidden)
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
              "base_model_name_or_path": base_model, "shared_lm_head": heads.lm_head is None,
              "root_conditioned": heads.root is not None, "sequential": heads.prev is not None, **(extra or {})}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
