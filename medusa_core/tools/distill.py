"""The training cache: the frozen base model's hidden states and its own predictions, computed once.

Medusa-1 freezes the base model, so everything the heads need from it can be computed in one pass and reused for
every epoch, experiment and evaluation: the final-norm hidden state at each position, the base model's top-k next
tokens there (self-distillation targets: head k at position t learns the base model's argmax at t+k+1, i.e. its
prediction of token t+k+2), the text's own tokens (dataset targets) and the assistant mask. The base model's
lm_head is stored too, once per cache folder (`lm_head.pt` beside the shards), so training needs no base model at
all (and Ray workers load only these files).

The text itself can come from the base model (`replies.py`: its own greedy replies), the Medusa paper's
self-distillation data: then hidden states at training time look like those the heads see when decoding.

Differences from FasterDecoding/Medusa: the reference runs the frozen base model on every training step; caching
makes a CPU run affordable (one forward pass per token instead of one per token per epoch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from medusa_core.backends import Backend
from medusa_core.files import written_whole
from medusa_core.tools.data import Encoded

LM_HEAD_FILE = "lm_head.pt"


@dataclass
class HiddenCache:
    hidden: Tensor  # [N, H] float16, final-norm hidden state of every cached token
    tokens: Tensor  # [N] long, the text's tokens
    assistant: Tensor  # [N] bool, loss positions (assistant replies)
    top_ids: Tensor  # [N, k0] long, base model's top-k0 prediction for the NEXT token (column 0 = argmax)
    seq_end: Tensor  # [N] long, index one past the last token of the position's sequence
    lm_head: Tensor  # [V, H] float32, the base model's output projection (shared by version-2 heads)

    @property
    def num_tokens(self) -> int:
        return self.tokens.shape[0]

    def save(self, path: str | Path) -> None:
        """Per-token tensors to `path`; the lm_head to `lm_head.pt` in the same folder, once for all its shards."""
        path = Path(path)
        head = path.parent / LM_HEAD_FILE
        if not head.is_file():
            with written_whole(head) as tmp:  # a resumed build never reads half a file
                torch.save(self.lm_head, tmp)
        elif not torch.equal(load_lm_head(path.parent), self.lm_head):
            raise ValueError(f"{path.parent} holds the cache of another model; use another --cache-dir")
        with written_whole(path) as tmp:
            torch.save({k: v for k, v in self.__dict__.items() if k != "lm_head"}, tmp)

    @classmethod
    def load(cls, path: str | Path, lm_head: Tensor | None = None) -> HiddenCache:
        """One cache file, or a folder of shard-*.pt files joined in order; `lm_head` saves reading the folder's."""
        path = Path(path)
        if path.is_dir() and (shards := sorted(path.glob("shard-*.pt"))):
            head = load_lm_head(path)
            return cls.concat([cls.load(p, head) for p in shards])
        if not path.is_file():
            raise FileNotFoundError(f"no hidden-state cache at {path}; build it with `python -m medusa_core train`")
        tensors = torch.load(path, map_location="cpu", weights_only=True)
        if "lm_head" in tensors:
            raise ValueError(f"{path} was written by an older version (an lm_head copy in every shard); delete "
                             f"{path.parent} and rebuild the cache")
        return cls(**tensors, lm_head=load_lm_head(path.parent) if lm_head is None else lm_head)

    @classmethod
    def concat(cls, parts: list[HiddenCache]) -> HiddenCache:
        """Caches one after another (e.g. the shards of one split); they must share the lm_head."""
        if not parts:
            raise ValueError("no caches to join")
        assert all(p.lm_head is parts[0].lm_head or torch.equal(p.lm_head, parts[0].lm_head) for p in parts), \
            "caches of different models"
        starts = torch.cumsum(torch.tensor([0] + [p.num_tokens for p in parts[:-1]]), 0)
        return cls(hidden=torch.cat([p.hidden for p in parts]), tokens=torch.cat([p.tokens for p in parts]),
                   assistant=torch.cat([p.assistant for p in parts]), top_ids=torch.cat([p.top_ids for p in parts]),
                   seq_end=torch.cat([p.seq_end + s for p, s in zip(parts, starts)]), lm_head=parts[0].lm_head)

    def root_rows(self, positions: Tensor) -> Tensor:
        """The lm_head rows [N, H] of the base model's argmax at positions [N]: the root a greedy decode step
        drafts from, as root-conditioned heads see it."""
        return self.lm_head[self.top_ids[positions, 0]]

    def targets(self, positions: Tensor, num_heads: int, kind: str) -> tuple[Tensor, Tensor]:
        """Targets [N, K] for heads at positions [N] (head k: token t+k+2), and where they count [N, K] bool."""
        offsets = torch.arange(num_heads)[None, :] + 2  # [1, K]
        at = positions[:, None] + offsets  # [N, K] position of the predicted token
        valid = at < self.seq_end[positions][:, None]
        at = torch.where(valid, at, positions[:, None])  # any in-range index; masked below
        if kind == "self":
            target = self.top_ids[at - 1, 0]  # the base model's argmax at t+k+1
        elif kind == "dataset":
            target = self.tokens[at]
        else:
            raise ValueError(f"unknown target kind {kind!r} (self or dataset)")
        return target, valid & self.assistant[at]


def load_lm_head(folder: str | Path) -> Tensor:
    """The lm_head [V, H] shared by the caches in `folder`."""
    path = Path(folder) / LM_HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {LM_HEAD_FILE} in {folder}: the cache folder is incomplete; delete and rebuild it")
    return torch.load(path, map_location="cpu", weights_only=True)


def base_hidden(backend: Backend, ids: Tensor, attention: Tensor) -> Tensor:
    """ids [B, S] right-padded -> final-norm hidden states [B, S, H] (one plain causal forward pass; zeros at pads)."""
    # The backend's prefill returns only the last position; training needs all of them: the transformers model body
    # gives them, llama.cpp outputs every position of a sequence decoded on its own.
    from medusa_core.backends.hf import HFBackend

    if isinstance(backend, HFBackend):
        out = backend.model.model(input_ids=ids.to(backend.device), attention_mask=attention.to(backend.device))
        return out.last_hidden_state
    hidden = torch.zeros(*ids.shape, backend.hidden_size)
    for b, n in enumerate(attention.sum(1).tolist()):
        hidden[b, :n] = backend.sequence_hidden(ids[b, :n].tolist())
    return hidden


@torch.no_grad()  # not inference_mode: training later backpropagates through ops on these tensors
def build_cache(backend: Backend, sequences: list[Encoded], top_k: int = 8, batch_tokens: int = 2048,
                desc: str = "caching hidden states") -> HiddenCache:
    """Run the frozen base model once over every sequence (longest first, padded batches of ~batch_tokens)."""
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i].ids))
    parts: list[tuple[Tensor, Tensor]] = []
    bar = tqdm(total=sum(len(s.ids) for s in sequences), desc=desc, unit="tok")
    i = 0
    while i < len(order):
        S = len(sequences[order[i]].ids)
        batch = [sequences[j] for j in order[i : i + max(1, batch_tokens // S)]]
        i += len(batch)
        ids = torch.zeros(len(batch), S, dtype=torch.long)
        attention = torch.zeros(len(batch), S, dtype=torch.long)
        for b, s in enumerate(batch):
            ids[b, : len(s.ids)], attention[b, : len(s.ids)] = torch.tensor(s.ids), 1
        hidden = base_hidden(backend, ids, attention)  # [B, S, H]
        top = backend.lm_head(hidden).topk(top_k, dim=-1).indices  # [B, S, k0]
        for b, s in enumerate(batch):
            parts.append((hidden[b, : len(s.ids)].to(torch.float16).cpu(), top[b, : len(s.ids)].cpu()))
        bar.update(sum(len(s.ids) for s in batch))
    bar.close()
    ordered = [sequences[j] for j in order]
    lengths = torch.tensor([len(s.ids) for s in ordered])
    ends = torch.cumsum(lengths, 0)
    return HiddenCache(
        hidden=torch.cat([h for h, _ in parts]),
        tokens=torch.tensor([t for s in ordered for t in s.ids]),
        assistant=torch.tensor([a for s in ordered for a in s.assistant]),
        top_ids=torch.cat([t for _, t in parts]),
        seq_end=torch.repeat_interleave(ends, lengths),
        lm_head=backend.lm_head_rows(torch.arange(backend.vocab_size)).detach().float().cpu().clone(),
    )
