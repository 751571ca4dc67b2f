"""Self-distilled training text: conversations answered, turn by turn, by the base model itself.

Medusa's self-distillation (paper, section 3.2.1) trains the heads on the base model's own replies, so the hidden
states they learn from are the ones they meet when serving. `answer` keeps the user turns of a conversation and
replaces every assistant turn with the base model's greedy reply, the earlier replies in context, until the
conversation or `max_seq` tokens run out. Rows decode in one continuously refilled batch through any backend; on
llama.cpp (the fast one here) a conversation keeps its row and each next turn is read onto the cache the row holds
(`decode.extend`), elsewhere a finished turn leaves and its next turn joins as a new request.

The conversations are ShareGPT's, or one-turn ones whose user turn the model wrote itself (`magpie.UserTurns`). The
replies are kept as token ids (the vocabulary fits uint16), in compressed shards of SHARD conversations taken in the
split's fixed order: `python -m medusa_core replies` resumes at the first missing shard, and a new machine
rebuilds the hidden-state cache from the shards by prefill alone (`commands.load_or_build_cache`). A folder holds the
replies of one model, setting and prompt source (source.json); a folder made another way can continue another's
numbering (`build(..., extends=...)`), and readers take each shard from the first folder of their list that holds
it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from medusa_core.backends import Backend, RowExtending
from medusa_core.decode import Batch, StepEvent, admit, advance, extend, retire
from medusa_core.files import written_whole
from medusa_core.request import Request
from medusa_core.tools.data import Conversation, Encoded

SHARD = 64  # conversations per shard
MIN_REPLY = 16  # a turn is answered only when at least this many reply tokens fit in max_seq
REPLY_GUESS = 256  # reply tokens per conversation assumed before any is stored (sizes a first, small group)


@dataclass
class _Dialogue:
    """One conversation being answered: the user turns still to come, the messages so far (text, for the chat
    template) and the token ids the model has seen and written (its KV context)."""

    user_turns: list[str]
    messages: list[dict[str, str]] = field(default_factory=list)
    text: str = ""  # what `ids` decode to, in the chat template's terms
    ids: list[int] = field(default_factory=list)
    assistant: list[bool] = field(default_factory=list)


def check_source(folder: Path, source: dict) -> None:
    """Shards of one folder come from one model and setting: the first run records them (source.json), later runs
    must match, so a resumed build never mixes replies of two models."""
    path = folder / "source.json"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(source, indent=2) + "\n")
    elif (kept := json.loads(path.read_text())) != source:
        raise ValueError(f"{folder} holds replies made with {kept}, not {source}; use another --out")


def check_extends(folders: Sequence[Path], source: dict) -> None:
    """A folder continued by another holds the same model's replies at the same lengths: only how they were computed
    (backend, weights) may differ, so the chain is one self-distilled dataset."""
    for folder in folders:
        path = folder / "source.json"
        kept = json.loads(path.read_text()) if path.is_file() else {}
        if differ := [k for k in ("model", "prompts", "max_seq", "max_reply") if kept.get(k) != source[k]]:
            raise ValueError(f"--extends {folder}: its replies have " + ", ".join(f"{k}={kept.get(k)!r}" for k in
                             differ) + f", not {', '.join(f'{k}={source[k]!r}' for k in differ)}")


def by_prompts(folders: Sequence[Path]) -> dict[str, list[Path]]:
    """Reply folders grouped by prompt source (source.json; none: ShareGPT), in order: each group is one dataset
    with one shard numbering."""
    groups: dict[str, list[Path]] = {}
    for folder in folders:
        path = Path(folder) / "source.json"
        prompts = json.loads(path.read_text()).get("prompts", "sharegpt") if path.is_file() else "sharegpt"
        groups.setdefault(prompts, []).append(Path(folder))
    return groups


def shard_path(folder: str | Path, held_out: bool, index: int) -> Path:
    return Path(folder) / f"{'heldout' if held_out else 'train'}-{index:04d}.npz"


def save_shard(path: Path, sequences: list[Encoded]) -> None:
    """Token ids (uint16), assistant mask and sequence offsets, compressed; written whole or not at all."""
    ids = np.array([t for s in sequences for t in s.ids], dtype=np.int64)
    if len(ids) and ids.max() >= 2**16:
        raise ValueError("token ids above 65,535 do not fit the uint16 reply shards")
    offsets = np.cumsum([0] + [len(s.ids) for s in sequences])
    assistant = np.array([a for s in sequences for a in s.assistant], dtype=bool)
    with written_whole(path) as tmp:
        np.savez_compressed(tmp, ids=ids.astype(np.uint16), assistant=np.packbits(assistant), offsets=offsets)


def find_shard(folders: Sequence[str | Path], held_out: bool, index: int) -> Path | None:
    """Shard `index` of a split from the first of `folders` that holds it (None if none does)."""
    return next((p for f in folders if (p := shard_path(f, held_out, index)).is_file()), None)


def load_shard(path: Path) -> list[Encoded]:
    with np.load(path) as f:
        ids, offsets = f["ids"].astype(np.int64), f["offsets"]
        assistant = np.unpackbits(f["assistant"], count=len(ids)).astype(bool)
    return [Encoded(ids[a:b].tolist(), assistant[a:b].tolist()) for a, b in zip(offsets[:-1], offsets[1:])]


def reply_tokens(sequences: list[Encoded]) -> int:
    return sum(sum(s.assistant) for s in sequences)


def answer(backend: Backend, conversations: list[Conversation], max_seq: int, max_reply: int,
           bar: tqdm | None = None, rows: int = 8) -> list[Encoded]:
    """Every assistant turn replaced by the base model's greedy reply (earlier replies in context), one sequence per
    conversation in input order (empty where not even the first reply fits): each holds exactly the ids the model
    read and wrote, its replies (and end-of-turn tokens) marked."""
    dialogues = [_Dialogue([m["content"] for m in c.messages if m["role"] == "user"]) for c in conversations]
    book = _Turns(backend.tokenizer, dialogues, max_seq, max_reply, isinstance(backend, RowExtending), bar)
    rows = min(rows, backend.max_rows or rows)
    burst = max(1, rows // 8)  # rows join and leave the batch this many at a time: each join or leave copies caches
    batch: Batch | None = None
    while book.waiting or batch is not None:
        new = book.first_turns(rows - (len(batch.rows) if batch else 0), burst)
        if new:
            batch, events = admit(backend, batch, new)
        elif batch is None:
            continue
        else:
            batch, events = advance(backend, None, None, batch)
        while events:  # a next turn's first token may end it at once
            nexts = book.record(batch, events)
            batch, events = extend(backend, batch, nexts) if nexts else (batch, [])
        if len(book.ended) >= min(burst, len(batch.rows)) or _filling(batch, book.ended, backend.context_length):
            batch, _ = retire(backend, batch, lambda key: False)
            book.ended.clear()
    return [Encoded(d.ids, d.assistant) if any(d.assistant) else Encoded([], []) for d in dialogues]


def _filling(batch: Batch, ended: set[int], limit: int) -> bool:
    """Whether a row kept (ignored) until a burst of them leaves is about to outgrow the context window."""
    return any(len(batch.rows[batch.keys.index(k)].history) >= limit for k in ended)


@dataclass
class _Turns:
    """`answer`'s bookkeeping: which conversation each batch key is answering, its reply so far, and what comes next.
    With `follow` (a backend with `extend`) a conversation's next turn continues on its row; without, it waits for a
    new row, ahead of conversations not yet started."""

    tok: Any
    dialogues: list[_Dialogue]
    max_seq: int
    max_reply: int
    follow: bool
    bar: tqdm | None
    waiting: list[int] = field(default_factory=list)  # a stack: conversations (or next turns) to start, first on top
    turns: dict[int, tuple[int, list[int]]] = field(default_factory=dict)  # batch key -> (conversation, reply so far)
    ended: set[int] = field(default_factory=set)  # keys of rows done (decoding on, ignored) until a burst leaves

    def __post_init__(self) -> None:
        self.waiting = list(range(len(self.dialogues)))[::-1]

    def first_turns(self, room: int, burst: int) -> dict[int, Request]:
        """Requests for waiting conversations to join the batch: a burst of them at once, or none, within `room`."""
        new: dict[int, Request] = {}
        while self.waiting and room - len(new) >= (1 if new else min(burst, len(self.waiting))) and len(new) < room:
            conversation = self.waiting.pop()
            if (request := self.next_turn(conversation)) is not None:
                key = len(self.turns)
                new[key], self.turns[key] = request, (conversation, [])
        return new

    def next_turn(self, conversation: int) -> Request | None:
        return _next_turn(self.tok, self.dialogues[conversation], self.max_seq, self.max_reply)

    def record(self, batch: Batch, events: list[StepEvent]) -> dict[int, Request]:
        """Add a step's tokens to the replies; returns the next turns to read onto the rows whose turn just ended."""
        nexts: dict[int, Request] = {}
        for e in events:
            if e.key in self.ended:
                continue
            conversation, reply = self.turns[e.key]
            reply += e.tokens
            if self.bar is not None:
                self.bar.update(len(e.tokens))
            if e.finish_reason is None:
                continue
            # plain decoding: a stopped row's last token is the one that stopped it
            end = [batch.rows[batch.keys.index(e.key)].history[-1]] if e.finish_reason == "stop" else []
            _end_turn(self.tok, self.dialogues[conversation], reply, end)
            if not self.follow:
                self.waiting.append(conversation)  # its next turn goes next, while its context is fresh
                self.ended.add(e.key)
            elif (request := self.next_turn(conversation)) is not None:
                nexts[e.key], self.turns[e.key] = request, (conversation, [])
            else:
                self.ended.add(e.key)
        return nexts


def _next_turn(tok, d: _Dialogue, max_seq: int, max_reply: int) -> Request | None:
    """The next user turn appended to the dialogue's ids, as a request; None when the conversation is over or the
    next reply would not fit in max_seq."""
    if not d.user_turns:
        return None
    messages = d.messages + [{"role": "user", "content": d.user_turns.pop(0)}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if not text.startswith(d.text):  # the template rewrote an earlier turn: the context would not be what we read
        d.user_turns.clear()
        return None
    new = tok.encode(text[len(d.text):], add_special_tokens=False)
    room = max_seq - len(d.ids) - len(new) - 1  # the end-of-turn token counts too
    if room < MIN_REPLY:
        d.user_turns.clear()
        return None
    d.messages, d.text = messages, text
    d.ids, d.assistant = d.ids + new, d.assistant + [False] * len(new)
    return Request(prompt_ids=tuple(d.ids), max_tokens=min(max_reply, room), mode="plain")


def _end_turn(tok, d: _Dialogue, reply: list[int], end: list[int]) -> None:
    """Record a finished reply: its tokens, and the end-of-turn token the model chose if it stopped itself."""
    content = tok.decode(reply, skip_special_tokens=True)
    d.messages = d.messages + [{"role": "assistant", "content": content}]
    d.text += tok.decode(reply + end, skip_special_tokens=False)
    d.ids, d.assistant = d.ids + reply + end, d.assistant + [True] * (len(reply) + len(end))


def build(backend: Backend, conversations: Sequence[Conversation], folder: str | Path, held_out: bool,
          budget: int, max_seq: int, max_reply: int, shard: int = SHARD, rows: int = 8,
          extends: Sequence[str | Path] = ()) -> int:
    """Answer conversations into shards until `budget` reply tokens are stored (existing shards, in `folder` or in
    the folders it `extends`, count and are kept; new ones go to `folder`). Returns the reply tokens stored."""
    index, stored, done = 0, 0, 0
    while (path := find_shard([folder, *extends], held_out, index)) is not None:
        part = load_shard(path)
        stored, done, index = stored + reply_tokens(part), done + len(part), index + 1
    bar = tqdm(total=budget, initial=min(stored, budget), desc=f"{'held-out' if held_out else 'train'} replies",
               unit="tok", smoothing=0.05)
    # Conversations answered in one batch, which drains only at the group's end (held-out: small budgets, one shard).
    group = shard if held_out else shard * max(1, rows // 8)
    while stored < budget:
        # A group shrinks to the conversations the rest of the budget needs at the mean reply so far, so a small
        # budget answers a few conversations (its last shard holds fewer than `shard`), not a whole group.
        per_conversation = stored / done if stored else REPLY_GUESS
        size = min(group, math.ceil((budget - stored) / per_conversation))
        pending = list(conversations[done : done + size])  # sliced: a lazy sequence makes only these
        if not pending:
            break
        stored, index = _save_group(backend, pending, folder, held_out, index, shard, max_seq, max_reply, bar,
                                    rows, stored)
        done += len(pending)
    bar.close()
    return stored


def _save_group(backend: Backend, conversations: list[Conversation], folder, held_out: bool, index: int, shard: int,
                max_seq: int, max_reply: int, bar: tqdm, rows: int, stored: int) -> tuple[int, int]:
    """Answer a group of whole shards in one batch and save them in order; returns (stored, next index)."""
    answered = answer(backend, conversations, max_seq, max_reply, bar, rows)
    for start in range(0, len(conversations), shard):
        part = answered[start : start + shard]
        save_shard(shard_path(folder, held_out, index), part)
        stored, index = stored + reply_tokens(part), index + 1
    return stored, index
