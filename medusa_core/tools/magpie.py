"""User turns the base model writes itself (Magpie, Xu et al. 2024): heads' data that reads like everyday chat.

ShareGPT's user turns are mostly long and technical; served users ask everyday things, and heads trained on replies
to the model's own user turns accept more of them (benchmarks/README.md, "Magpie"). Given its chat template up to
where the user's text goes, an instruct model writes a plausible user turn. Turn i is sampled with seed i
(temperature 1, top_p 0.95, at most `MAX_TURN` tokens) through the batched decode loop, so the stream is fixed and
`UserTurns[a:b]` samples only seeds a..b-1: a resumed `replies --prompts magpie` starts where its shards end. A
sample that does not end its turn, or is shorter than `MIN_CHARS`, stays as a conversation with no user turn (no
reply, an empty sequence), so index i is always seed i. Held-out turns use their own seeds.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import overload

from tqdm import tqdm

from medusa_core.backends import Backend
from medusa_core.decode import decode
from medusa_core.request import Request, SamplingParams
from medusa_core.tools.data import Conversation

MAX_TURN = 64  # tokens a user turn may take
MIN_CHARS = 12  # shorter turns ("Hi", a lone "?") teach little
HELD_OUT_SEED = 1 << 32  # held-out turn i is seed HELD_OUT_SEED + i: never a held-in seed
SAMPLING = dict(temperature=1.0, top_p=0.95)
_MARK = "\x00"  # stands for the user's text, to cut the rendered template there


def user_prefix(tokenizer) -> str:
    """The chat template (its default system turn included) up to where the user's text goes."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
    return text[: text.index(_MARK)]


def sample_turns(backend: Backend, seeds: Sequence[int], rows: int = 8) -> list[str | None]:
    """One user turn per seed (None where the sample is unusable), `rows` sampled at once."""
    tok = backend.tokenizer
    prefix = tuple(tok.encode(user_prefix(tok), add_special_tokens=False))
    turns: list[str | None] = []
    for start in tqdm(range(0, len(seeds), rows), desc="sampling user turns", unit=f"x{rows}", leave=False):
        group = seeds[start : start + rows]
        requests = [Request(prompt_ids=prefix, max_tokens=MAX_TURN, mode="plain",
                            sampling=SamplingParams(**SAMPLING, seed=seed)) for seed in group]
        tokens: list[list[int]] = [[] for _ in group]
        ended = [False] * len(group)
        for events in decode(backend, None, None, requests):
            for e in events:
                tokens[e.key] += e.tokens
                ended[e.key] = ended[e.key] or e.finish_reason == "stop"
        for ids, stopped in zip(tokens, ended):
            text = tok.decode(ids, skip_special_tokens=True).strip()
            turns.append(text if stopped and len(text) >= MIN_CHARS else None)
    return turns


class UserTurns(Sequence[Conversation]):
    """The fixed stream of sampled one-turn conversations, sampled lazily: item i is seed i (held-in) or
    HELD_OUT_SEED + i (held-out)."""

    def __init__(self, backend: Backend, held_out: bool, rows: int = 8, count: int = 10_000_000):
        self.backend, self.held_out, self.rows, self.count = backend, held_out, rows, count

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> Conversation: ...
    @overload
    def __getitem__(self, index: slice) -> list[Conversation]: ...

    def __getitem__(self, index):
        if isinstance(index, int):
            return self[index : index + 1][0]
        indices = range(self.count)[index]
        base = HELD_OUT_SEED if self.held_out else 0
        turns = sample_turns(self.backend, [base + i for i in indices], self.rows)
        split = "heldout" if self.held_out else "train"
        return [Conversation(f"magpie-{split}-{i}", () if t is None else ({"role": "user", "content": t},))
                for i, t in zip(indices, turns)]
