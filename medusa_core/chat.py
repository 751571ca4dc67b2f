"""A terminal chat with the model (`python -m medusa_core chat`): multi-turn through the model's chat template, each
reply streamed as the decode steps accept its tokens, then one summary line (tokens, tokens/s, tokens per step).

`/reset` starts a new conversation, `/quit` (or Ctrl-D) leaves; Ctrl-C stops a reply, and at the prompt leaves.
A turn that would not fit the context window is refused with the reason, and the conversation is kept as it was.
"""
from __future__ import annotations

from dataclasses import replace
from typing import TextIO

from medusa_core.generator import DecodeSession, MedusaGenerator, RequestError
from medusa_core.request import Request, Stats

HELP = "/reset: new conversation · /quit or Ctrl-D: leave · Ctrl-C: stop a reply"


def run_chat(generator: MedusaGenerator, template: Request, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    """Read user turns from `stdin` until /quit or end of input; `template` says how to decode (max_tokens, sampling,
    mode); replies go to `stdout`, the rest to `stderr`."""
    print(f"chat with {generator.config.name} ({generator.config.base_model.backend}); {HELP}", file=stderr)
    messages: list[dict[str, str]] = []
    while True:
        try:
            stderr.write("> ")
            stderr.flush()
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line or line.strip() == "/quit":  # "": end of input
            break
        text = line.strip()
        if text == "/reset":
            messages = []
            print("(new conversation)", file=stderr)
            continue
        if not text:
            continue
        turn = [*messages, {"role": "user", "content": text}]
        try:
            reply, stats = _reply(generator, replace(template, messages=tuple(turn)), stdout)
        except RequestError as e:
            print(f"error: {e}; /reset starts a new conversation", file=stderr)
            continue
        messages = [*turn, {"role": "assistant", "content": reply}]
        print(f"[{stats.generated_tokens} tokens, {stats.tokens_per_second:.1f} tokens/s, "
              f"{stats.mean_accepted_length:.2f} tokens/step]", file=stderr)
    print(file=stderr)


def _reply(generator: MedusaGenerator, request: Request, stdout: TextIO) -> tuple[str, Stats]:
    """Stream one reply to `stdout`; Ctrl-C cuts it short (what was written so far is the reply)."""
    stopped: list[bool] = []  # set on Ctrl-C; read by the session before each step
    session, parts, stats = DecodeSession(generator, lambda key: bool(stopped)), [], None
    deltas = session.step({0: request})
    while True:
        for d in deltas:
            stdout.write(d.text)
            stdout.flush()
            parts.append(d.text)
            stats = d.stats or stats
        if stats is not None:
            stdout.write("\n")
            return "".join(parts), stats
        try:
            deltas = session.step()
        except KeyboardInterrupt:
            stopped.append(True)  # the row leaves at the next step, which sends its last delta
            deltas = session.step()
