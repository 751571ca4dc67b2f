"""The Decoder deployment: one Medusa generator per replica; concurrent requests are decoded together.

`stream(input)` tokenizes and checks one request, then joins the replica's batch queue. `@serve.batch` hands a
batch of requests to `decode_batch`, which runs `MedusaGenerator.stream` on all of them at once (one forward pass
per step for the whole batch) and fans each step's text out to the callers. Each step runs in a worker thread so
the replica's event loop stays free to admit, cancel and health-check requests while the batch decodes. A caller
that goes away (client disconnect) sets its job's `cancelled` flag and its row leaves the batch at the next step.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.metrics import DecoderMetrics
from deployments.schemas import DecodeChunk, DecodeInput, ErrorInfo, MedusaStats
from medusa_core.config import load_config, resolve_repo_path
from medusa_core.generator import MedusaGenerator, RequestError, TextDelta, TextRequest, load_generator
from medusa_core.sampling import SamplingParams

logger = logging.getLogger("ray.serve")


class DecoderOptions(BaseModel):
    """The decoder's `user_config` in serve_config.yaml, applied live by `reconfigure()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests decoded together.")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=10, description="How long a batch waits to fill up.")
    request_timeout_s: float = Field(300, gt=0, description="A request still decoding this long after the ingress "
                                     "received it ends with a 504 error.")


@dataclass
class Job:
    """One admitted request. `cancelled` is written by the caller's task and read by the decode thread."""

    request: TextRequest
    received_at: float
    deadline: float
    cancelled: bool = False
    timed_out: bool = False
    batch_size: int = 0
    queue_wait_s: float = 0.0


def to_text_request(generator: MedusaGenerator, inp: DecodeInput) -> TextRequest:
    """Tokenize (chat template for messages) and check the request against the context window."""
    if inp.messages is not None:
        ids = generator.encode_chat([{"role": m.role, "content": m.content} for m in inp.messages])
    else:
        ids = generator.encode(inp.prompt or "")
    max_tokens = inp.max_tokens or generator.default_max_tokens(len(ids))
    sampling = SamplingParams(inp.temperature, inp.top_p, inp.seed, inp.acceptance)
    request = TextRequest(tuple(ids), max_tokens, sampling, inp.mode, inp.stop, inp.ignore_eos)
    generator.check(request)
    return request


def should_stop(job: Job) -> bool:
    """Read by the decode thread before each step: the caller left, or the request ran out of time."""
    if not job.cancelled and time.time() > job.deadline:
        job.timed_out = True
    return job.cancelled or job.timed_out


def to_chunk(delta: TextDelta, job: Job) -> DecodeChunk:
    if job.timed_out and delta.finish_reason == "cancelled":
        limit = job.deadline - job.received_at
        return DecodeChunk(error=ErrorInfo(message=f"request timed out after {limit:g} s", type="timeout_error",
                                           code="timeout"), status=504, finish_reason="timeout")
    stats = None
    if delta.stats is not None:
        s = delta.stats
        stats = MedusaStats(
            mode=job.request.mode, prompt_tokens=s.prompt_tokens, generated_tokens=s.generated_tokens,
            decode_steps=s.decode_steps, mean_accepted_length=s.mean_accepted_length,
            accepted_per_head=list(s.accepted_per_head), accept_len_histogram=list(s.accept_len_histogram),
            time_to_first_token_s=s.time_to_first_token_s + job.queue_wait_s, wall_time_s=s.wall_time_s,
            tokens_per_second=s.tokens_per_second, batch_size=job.batch_size, queue_wait_s=job.queue_wait_s)
    return DecodeChunk(text=delta.text, finish_reason=delta.finish_reason,
                       prompt_tokens=len(job.request.prompt_ids), stats=stats)


async def decode_batch(generator: MedusaGenerator, jobs: list[Job], metrics: DecoderMetrics
                       ) -> AsyncIterator[list[DecodeChunk | type[StopIteration]]]:
    """Decode the jobs together; per step, one chunk per job (StopIteration once a job has ended)."""
    start = time.time()
    for job in jobs:
        job.batch_size, job.queue_wait_s = len(jobs), max(0.0, start - job.received_at)
    metrics.record_batch(generator.config.name, len(jobs))
    steps = generator.stream([j.request for j in jobs], lambda i: should_stop(jobs[i]))
    ended: set[int] = set()
    while (deltas := await asyncio.to_thread(next, steps, None)) is not None:
        # Ray wants one result per job each time: an empty chunk for a job without news this time (a yield that
        # only reports another job's cancellation), StopIteration for one that has ended.
        out: list[DecodeChunk | type[StopIteration]] = [
            StopIteration if i in ended else DecodeChunk(prompt_tokens=len(j.request.prompt_ids))
            for i, j in enumerate(jobs)]
        for d in deltas:
            out[d.request] = chunk = to_chunk(d, jobs[d.request])
            if chunk.finish_reason is not None:
                ended.add(d.request)
            if chunk.stats is not None:
                metrics.record_request(generator.config.name, chunk.stats, chunk.finish_reason or "")
        yield out


@serve.deployment
class Decoder:
    def __init__(self, config: str) -> None:
        self.generator = load_generator(load_config(resolve_repo_path(config)))
        self.metrics = DecoderMetrics(self.generator.tree.max_depth)
        self.failed: str | None = None  # set when a batch raised; check_health then reports the replica broken
        self.options = DecoderOptions()

    def reconfigure(self, user_config: dict) -> None:
        self.options = DecoderOptions.model_validate(user_config)
        self.decode_batch.set_max_batch_size(self.options.max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)

    def check_health(self) -> None:
        if self.failed is not None:
            raise RuntimeError(f"decoder failed: {self.failed}")

    def info(self) -> dict:
        return {"model": self.generator.config.name, "context_length": self.generator.backend.context_length}

    async def stream(self, inp: DecodeInput) -> AsyncIterator[DecodeChunk]:
        try:
            request = to_text_request(self.generator, inp)
        except RequestError as e:
            yield DecodeChunk(error=ErrorInfo(message=str(e), param=e.param), status=400)
            return
        limit = min(inp.timeout_s or self.options.request_timeout_s, self.options.request_timeout_s)
        job = Job(request, inp.received_at, inp.received_at + limit)
        try:
            async for chunk in self.decode_batch(job):
                yield chunk
        except Exception as e:  # a failed batch: every caller gets a clean 500 and the replica reports unhealthy
            logger.exception("decode batch failed")
            self.failed = f"{type(e).__name__}: {e}"
            yield DecodeChunk(error=ErrorInfo(message="internal error while decoding", type="server_error"),
                              status=500)
        finally:
            job.cancelled = True

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def decode_batch(self, jobs: list[Job]) -> AsyncIterator[list[DecodeChunk | type[StopIteration]]]:
        async for out in decode_batch(self.generator, jobs, self.metrics):
            yield out
