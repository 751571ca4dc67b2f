"""Response bodies: OpenAI completion and chat objects, their SSE chunks, the legacy /generate and /compare
bodies, and validation errors turned into one OpenAI-style error. Plain functions on schema objects; no ray, no torch.
"""
from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray.exceptions import RayError

from deployments.schemas import DecodeChunk, ErrorInfo, Usage
from medusa_core.request import Stats

ChunkFn = Callable[[str, str, DecodeChunk, bool], dict]


def new_id() -> str:
    return uuid.uuid4().hex[:24]


def usage(last: DecodeChunk) -> dict:
    n = last.stats.generated_tokens if last.stats else 0
    total = last.prompt_tokens + n
    return Usage(prompt_tokens=last.prompt_tokens, completion_tokens=n, total_tokens=total).model_dump()


def _finish(last: DecodeChunk) -> str:
    return "length" if last.finish_reason == "length" else "stop"


def _stats(last: DecodeChunk) -> dict | None:
    return dataclasses.asdict(last.stats) if last.stats else None


def completion(rid: str, model: str, text: str, last: DecodeChunk) -> dict:
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": _finish(last), "logprobs": None}],
            "usage": usage(last), "medusa": _stats(last)}


def chat_completion(rid: str, model: str, text: str, last: DecodeChunk) -> dict:
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish(last), "logprobs": None}],
            "usage": usage(last), "medusa": _stats(last)}


def completion_chunk(rid: str, model: str, chunk: DecodeChunk, first: bool) -> dict:
    done = chunk.finish_reason is not None
    return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": chunk.text, "finish_reason": _finish(chunk) if done else None,
                         "logprobs": None}],
            **({"medusa": _stats(chunk)} if done else {})}


def chat_chunk(rid: str, model: str, chunk: DecodeChunk, first: bool) -> dict:
    done = chunk.finish_reason is not None
    delta = {"role": "assistant", "content": chunk.text} if first else {"content": chunk.text}
    return {"id": f"chatcmpl-{rid}", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": _finish(chunk) if done else None,
                         "logprobs": None}],
            **({"medusa": _stats(chunk)} if done else {})}


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def sse(rid: str, model: str, first: DecodeChunk, rest: AsyncIterator[DecodeChunk], chunk_fn: ChunkFn,
              include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events: one `data:` line per decode step, an error event if decoding fails, then [DONE]."""
    yield _event(chunk_fn(rid, model, first, True))
    last = first
    try:
        async for chunk in rest:
            if chunk.error is not None:
                yield _event({"error": chunk.error.model_dump()})
                break
            if chunk.text or chunk.finish_reason:
                yield _event(chunk_fn(rid, model, chunk, False))
            last = chunk
    except RayError:
        yield _event({"error": replica_lost().model_dump()})
    if include_usage and last.stats is not None:
        yield _event({**chunk_fn(rid, model, last, False), "choices": [], "usage": usage(last)})
    yield "data: [DONE]\n\n"


def replica_lost() -> ErrorInfo:
    return ErrorInfo(message="the decoder replica serving this request failed; retry", type="server_error",
                     code="replica_failed")


def no_replica() -> ErrorInfo:
    return ErrorInfo(message="no decoder replica can serve now; retry later", type="server_error", code="no_replica")


def legacy_generate(text: str, last: DecodeChunk, mode: str) -> dict:
    """The original service's /generate response, `mode` in its words (medusa or normal). acceptance_rate: accepted
    speculated tokens / speculated depth."""
    s: Stats = last.stats
    depth = len(s.accepted_per_head)
    # No decode step (max_length 1: the prefill made the only token): nothing was speculated, and the stats' mean
    # accepted length is 0.0, which would give a negative rate.
    rate = (s.mean_accepted_length - 1) / depth if s.mode == "medusa" and depth and s.decode_steps else 0.0
    return {"text": text, "generation_time": s.wall_time_s + s.queue_wait_s, "tokens_generated": s.generated_tokens,
            "tokens_per_second": s.tokens_per_second, "acceptance_rate": rate, "mode": mode,
            "medusa": dataclasses.asdict(s)}


def legacy_compare(medusa: dict, plain: dict) -> dict:
    """The original service's /compare response: both runs and speedup_factor, the ratio of their tokens/s."""
    speedup = medusa["tokens_per_second"] / plain["tokens_per_second"] if plain["tokens_per_second"] else None
    return {"medusa": medusa, "normal": plain, "speedup_factor": speedup}


def validation_error(errors: list[dict[str, Any]]) -> ErrorInfo:
    """pydantic/FastAPI errors -> one message naming each bad field; `param` is the first field's dotted path."""
    parts, params = [], []
    for err in errors[:5]:
        if err.get("type") == "json_invalid":  # loc is ("body", character offset)
            parts.append(f"body is not valid JSON ({err.get('ctx', {}).get('error', 'parse error')})")
            params.append(None)
            continue
        param = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or None
        params.append(param)
        msg = err.get("msg", "invalid value")
        parts.append(f"{param}: {msg}" if param else msg)
    return ErrorInfo(message="; ".join(parts) or "invalid request", param=params[0] if params else None,
                     code="invalid_value")
