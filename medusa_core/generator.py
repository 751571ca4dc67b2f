"""Text in, text out: prompts and chat messages -> token ids -> the decode loop -> text, stop strings and stats.

`load_generator(config)` builds the backend, heads and tree from a validated config; `prepare` fills in a
`Request`'s token ids and budget and checks it against the context window; `DecodeSession` is a
running batch that requests join and leave between steps (continuous batching) and turns decode events into text
deltas; `MedusaGenerator.stream` decodes a fixed list of requests with one, and `generate` collects them.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from medusa_core.adaptive import TreePolicy, load_or_calibrate, shipped_prior
from medusa_core.backends import Backend, load_backend
from medusa_core.config import GeneratorConfig, HeadsConfig, cache_root, resolve_repo_path
from medusa_core.files import hub_offline
from medusa_core.decode import Batch, Drafter, StepEvent, admit, advance, retire
from medusa_core.heads import MedusaHeads, load_heads, random_heads
from medusa_core.lookup import LookupDrafter
from medusa_core.request import Request, Stats
from medusa_core.tree import TreeBuffers, build_tree_buffers

COST_FORMAT = 6  # part of the step-cost file's key: bump when a backend's kernels or the timing change a step's cost


class RequestError(ValueError):
    """A request that cannot be served as asked; `param` names the offending field (OpenAI error style)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TextDelta:
    key: int  # the caller's key for the request
    text: str  # new text since the last delta
    token_ids: tuple[int, ...]
    finish_reason: str | None
    stats: Stats | None  # set on the final delta
    accept_len: int | None = None  # speculated tokens accepted in this step; None for the prefill's first token


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    stats: Stats


@dataclass
class _Tracker:
    """Per-request text state: detokenizes incrementally, cuts at stop strings, and counts stats."""

    request: Request
    start: float
    ids: list[int] = field(default_factory=list)
    sent: int = 0
    first_token_at: float | None = None
    accept_lens: list[int] = field(default_factory=list)
    finish_reason: str | None = None


class MedusaGenerator:
    def __init__(self, config: GeneratorConfig, backend: Backend, drafter: Drafter | None, tree: TreeBuffers,
                 policy: TreePolicy | None = None):
        self.config, self.backend, self.drafter, self.tree = config, backend, drafter, tree
        self.policy = policy  # adaptive tree choice per step; None: always `tree`
        self.tokenizer = backend.tokenizer

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Render messages with the model's chat template (never a hard-coded one) and tokenize."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"model {self.config.name!r} has no chat template; set base_model.chat_template")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def default_max_tokens(self, n_prompt: int) -> int:
        """The config's max_new_tokens, capped to what the context window leaves after the prompt (at least 1)."""
        return max(1, min(self.config.decoding.max_new_tokens, self.backend.context_length - n_prompt))

    def prepare(self, request: Request) -> Request:
        """The request with its prompt tokenized (chat messages through the chat template) and its token budget set;
        RequestError if it cannot fit the context window."""
        ids = request.prompt_ids
        if not ids and request.messages is not None:
            ids = tuple(self.encode_chat([dict(m) for m in request.messages]))
        elif not ids:
            ids = tuple(self.encode(request.prompt or ""))
        n, ctx = len(ids), self.backend.context_length
        if n == 0:
            raise RequestError("prompt is empty", "prompt")
        if n >= ctx:
            raise RequestError(f"prompt ({n} tokens) leaves no room in the context window of {ctx} tokens", "prompt")
        max_tokens = request.max_tokens or self.default_max_tokens(n)
        if n + max_tokens > ctx:
            raise RequestError(f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds the context window of {ctx} "
                               "tokens", "max_tokens")
        return replace(request, prompt_ids=ids, max_tokens=max_tokens)

    def generate(self, requests: list[Request]) -> list[GenerationResult]:
        text = ["" for _ in requests]
        ids: list[list[int]] = [[] for _ in requests]
        final: dict[int, TextDelta] = {}
        for deltas in self.stream(requests):
            for d in deltas:
                text[d.key] += d.text
                ids[d.key] += d.token_ids
                if d.finish_reason is not None:
                    final[d.key] = d
        return [GenerationResult(text[i], tuple(ids[i]), final[i].finish_reason, final[i].stats)
                for i in range(len(requests))]

    def stream(self, requests: list[Request], is_cancelled: Callable[[int], bool] = lambda i: False
               ) -> Iterator[list[TextDelta]]:
        """Decode all requests together (at most backend.max_rows at once, the rest join as rows finish); yield the
        text each one gained per step. `is_cancelled(i)` stops one."""
        session, waiting = DecodeSession(self, is_cancelled), dict(enumerate(map(self.prepare, requests)))
        while True:
            room = len(waiting) if self.backend.max_rows is None else self.backend.max_rows - session.rows
            deltas = session.step({k: waiting.pop(k) for k in list(waiting)[:room]})
            if deltas:
                yield deltas
            if not session.rows and not waiting:
                return


class DecodeSession:
    """A running batch that requests join and leave between steps (continuous batching), with each request's text
    state. `step` advances the batch by one decode step and admits new requests; one caller steps it at a time.
    Keys are the caller's ids for requests; `is_cancelled(key)` is read before each step."""

    def __init__(self, generator: MedusaGenerator, is_cancelled: Callable[[int], bool] = lambda key: False) -> None:
        self.generator, self.is_cancelled = generator, is_cancelled
        self.batch: Batch | None = None
        self.trackers: dict[int, _Tracker] = {}  # requests whose final delta has not gone out yet
        self.tree_nodes = 0  # nodes per row the last step verified (1: plain decoding; 0: no decode step ran)

    @property
    def rows(self) -> int:
        return len(self.batch.rows) if self.batch is not None else 0

    def step(self, new: Mapping[int, Request] | None = None) -> list[TextDelta]:
        """Drop ended rows, advance the batch one step, then prefill `new` into it; the text each request gained."""
        g, events = self.generator, []
        new = {k: g.prepare(r) for k, r in (new or {}).items()}
        self.tree_nodes = 0
        if self.batch is not None:  # a closed tracker (stop string hit) cancels its row
            self.batch, events = retire(g.backend, self.batch, lambda k: k not in self.trackers or self.is_cancelled(k))
        if self.batch is not None:
            events += self._advance()
        if new:
            now = time.perf_counter()
            self.trackers.update({k: _Tracker(r, now) for k, r in new.items()})
            self.batch, first = admit(g.backend, self.batch, new)
            events += first
        deltas = [self._delta(self.trackers[e.key], e) for e in events if e.key in self.trackers]
        for d in deltas:
            if d.finish_reason is not None:
                del self.trackers[d.key]
        return deltas

    def _advance(self) -> list[StepEvent]:
        """One decode step with the configured tree, or the one the adaptive policy picks for this batch size."""
        g, dec = self.generator, self.generator.config.decoding
        rows = len(self.batch.rows)
        tree = g.tree if g.policy is None else g.policy.choose(rows)
        start = time.perf_counter()
        self.batch, events = advance(g.backend, g.drafter, tree, self.batch, dec.typical_epsilon, dec.typical_alpha)
        seconds = time.perf_counter() - start
        medusa = [e for e in events if self.trackers[e.key].request.mode == "medusa"]
        self.tree_nodes = tree.num_nodes if medusa and g.drafter is not None else 1  # as `advance` decided
        if g.policy is not None:
            g.policy.time_step(rows, tree if medusa else g.policy.trees[0], seconds)  # no medusa row: a plain step
            if tree.num_nodes > 1:
                g.policy.observe(tree, [e.accepted_path for e in medusa])
        return events

    def _delta(self, tr: _Tracker, event: StepEvent) -> TextDelta:
        now = time.perf_counter()
        tr.first_token_at = tr.first_token_at or now
        if event.accept_len is not None:
            tr.accept_lens.append(event.accept_len)
        tr.ids.extend(event.tokens)
        if tr.finish_reason is None and event.finish_reason not in (None, "cancelled"):
            tr.finish_reason = event.finish_reason
        full = self.generator.tokenizer.decode(tr.ids, skip_special_tokens=True)
        ended = tr.finish_reason is not None or event.finish_reason == "cancelled"
        # Until the request ends, a trailing U+FFFD stands for a character whose bytes are still arriving: a stop
        # string must not match it (a "\ufffd" stop cut a reply before an emoji whose first token decodes to it).
        end = _stop_at(full if ended else full.rstrip("\ufffd"), tr.request.stop, tr.sent)
        if end is not None:
            full, tr.finish_reason = full[:end], "stop"
        done = tr.finish_reason is not None or event.finish_reason == "cancelled"
        safe = len(full) if done else _safe_end(full, tr.request.stop)
        text = full[tr.sent : max(safe, tr.sent)]
        tr.sent = max(safe, tr.sent)
        reason = tr.finish_reason or ("cancelled" if done else None)
        stats = self._stats(tr, now) if done else None
        return TextDelta(event.key, text, event.tokens, reason, stats, event.accept_len)

    def _stats(self, tr: _Tracker, now: float) -> Stats:
        steps = len(tr.accept_lens)
        depth = max(self.generator.tree.max_depth, max(tr.accept_lens, default=0))
        hist = [tr.accept_lens.count(a) for a in range(depth + 1)]
        per_head = [sum(1 for a in tr.accept_lens if a > k) for k in range(depth)]
        wall = now - tr.start
        return Stats(
            mode=tr.request.mode, prompt_tokens=len(tr.request.prompt_ids), generated_tokens=len(tr.ids),
            decode_steps=steps,
            mean_accepted_length=(sum(tr.accept_lens) + steps) / steps if steps else 0.0,
            accepted_per_head=tuple(per_head), accept_len_histogram=tuple(hist),
            time_to_first_token_s=(tr.first_token_at or now) - tr.start, wall_time_s=wall,
            tokens_per_second=len(tr.ids) / wall if wall > 0 else 0.0,
        )


def _stop_at(text: str, stops: tuple[str, ...], sent: int) -> int | None:
    """Index where the earliest stop string starts, searching only text not yet sent (plus overlap)."""
    hits = [i for s in stops if (i := text.find(s, max(0, sent - len(s) + 1))) >= 0]
    return min(hits) if hits else None


def _safe_end(text: str, stops: tuple[str, ...]) -> int:
    """How much text can be sent: hold back an incomplete UTF-8 character and a possible stop-string prefix."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


def load_drafter(heads: HeadsConfig, hidden: int, vocab: int, dtype, device) -> MedusaHeads:
    if heads.random is not None:
        r = heads.random
        drafter = random_heads(r.num_heads, hidden, r.seed, r.scale, dtype, heads.head_vocab)
    else:
        drafter = load_heads(_heads_folder(heads), hidden, vocab, heads.head_vocab)
    return drafter.to(device=device, dtype=dtype)


def _heads_folder(heads: HeadsConfig) -> str:
    src = heads.source
    if src.path is not None:
        return str(resolve_repo_path(src.path))
    if src.package is not None:
        raise ValueError("heads.source.package is not supported; use path or hub_id")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(src.hub_id, local_files_only=hub_offline())  # offline: a local copy or fail now
    except (OSError, LocalEntryNotFoundError) as e:
        raise FileNotFoundError(
            f"could not fetch Medusa heads {src.hub_id!r} ({e.__class__.__name__}). Offline: on a connected machine "
            f"run `hf download {src.hub_id} --local-dir heads/{src.hub_id.split('/')[-1]}`, copy the folder here and "
            f"set heads.source.path to it."
        ) from e


def shipped_accuracy(heads: HeadsConfig) -> list[dict]:
    """The heads' offline per-head accuracy from the evaluation.json shipped beside them ([] if none)."""
    if heads.source is None:
        return []
    file = Path(_heads_folder(heads)) / "evaluation.json"
    return json.loads(file.read_text())["accuracy"]["self"] if file.is_file() else []


def _cost_file(config: GeneratorConfig, heads: MedusaHeads | None) -> Path:
    """Where the adaptive tree's measured step costs are kept: keyed by the model, heads (every parameter's shape
    too: a folder can be retrained with more heads, layers or root conditioning), tree, threads and CPU."""
    shapes = [] if heads is None else sorted((name, tuple(p.shape)) for name, p in heads.named_parameters())
    heads_config = config.heads.model_dump(mode="json") if config.heads else None
    key = json.dumps([COST_FORMAT, config.base_model.model_dump(mode="json"), heads_config, shapes,
                      config.tree.model_dump(mode="json"), torch.get_num_threads(), platform.machine(),
                      platform.processor(), os.cpu_count()], sort_keys=True)
    return cache_root() / "medusa" / f"tree-cost-{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def load_generator(config: GeneratorConfig) -> MedusaGenerator:
    """The backend, heads and tree of a validated config. Without heads and tree the generator decodes plainly;
    without heads but with tree.lookup it speculates with prompt lookup alone."""
    backend = load_backend(config.base_model)
    if config.tree is None:
        return MedusaGenerator(config, backend, None, build_tree_buffers([], 1))
    heads = None
    if config.heads is not None:
        heads = load_drafter(config.heads, backend.hidden_size, backend.vocab_size, backend.dtype, backend.device)
    drafter = heads if (lookup := config.tree.lookup) is None else LookupDrafter(heads, lookup.min_ngram,
                                                                                  lookup.max_ngram)
    paths = config.tree.resolved_paths()
    tree = build_tree_buffers(paths, config.tree.top_k, heads.num_heads if lookup is None else None)
    policy = None
    if (adaptive := config.tree.adaptive) is not None:
        policy = load_or_calibrate(backend, drafter, paths, config.tree.top_k, adaptive.max_batch,
                                   adaptive.explore_share, _cost_file(config, heads))
        policy.prior = shipped_prior(shipped_accuracy(config.heads) if config.heads else [], paths)
    return MedusaGenerator(config, backend, drafter, tree, policy)
