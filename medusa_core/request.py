"""A request and its statistics, one type each from the HTTP ingress to the decode loop and back.

The ingress builds a `Request` from an API body (text or chat messages), it crosses the Ray boundary to a decoder
replica, the generator fills in the prompt's token ids and the token budget (`MedusaGenerator.prepare`), and the
decode loop reads the same object. `Stats` comes back the same way; the replica adds only what it alone knows
(queue wait, batch size). Torch-free, so the ingress imports it without loading torch.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

Mode = Literal["medusa", "plain"]  # speculate with the heads, or plain decoding (the baseline)
Acceptance = Literal["greedy", "typical", "lossless"]  # the rule that accepts tree candidates


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int | None = None
    acceptance: Acceptance | None = None  # None: greedy at temperature 0, else lossless

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.acceptance == "greedy" and self.temperature > 0:
            raise ValueError("acceptance 'greedy' needs temperature 0")

    @property
    def rule(self) -> Acceptance:
        """The acceptance rule in force: every rule reduces to greedy at temperature 0."""
        if self.temperature == 0:
            return "greedy"
        return self.acceptance or "lossless"

    def row_seed(self) -> int:
        """The seed this request's samples are keyed by: its own, or a fresh random one."""
        return random.getrandbits(63) if self.seed is None else self.seed


@dataclass(frozen=True, kw_only=True)
class Request:
    """What to continue (token ids, or text or chat messages the generator tokenizes) and how."""

    prompt_ids: tuple[int, ...] = ()
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None  # rendered with the model's chat template
    max_tokens: int | None = None  # None: the config's max_new_tokens, capped to the context window
    sampling: SamplingParams = SamplingParams()
    mode: Mode = "medusa"
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    timeout_s: float | None = None  # None: the replica's request_timeout_s
    received_at: float = 0.0  # time.time() when the ingress got it: queue wait and time to first token count from it


@dataclass(frozen=True, kw_only=True)
class Stats:
    """One request's decoding statistics: the `medusa` field of every response."""

    mode: Mode
    prompt_tokens: int
    generated_tokens: int
    decode_steps: int  # verify passes after the prefill
    mean_accepted_length: float  # tokens per decode step: accepted speculated tokens + the bonus token, averaged
    accepted_per_head: tuple[int, ...]  # steps in which head k's candidate was accepted
    accept_len_histogram: tuple[int, ...]  # steps per number of accepted speculated tokens 0..D
    time_to_first_token_s: float
    wall_time_s: float
    tokens_per_second: float
    batch_size: int = 1  # the most requests decoded together with this one (set by the replica)
    queue_wait_s: float = 0.0  # from the ingress receiving it to joining the batch (set by the replica)
