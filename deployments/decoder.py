"""The Decoder deployment: one Medusa generator per replica; concurrent requests are decoded together.

`stream(request)` tokenizes and checks one request (`MedusaGenerator.prepare`), then `admit`s it: `@serve.batch`
gathers requests that arrive together and hands them to the replica's `Engine`, which keeps one running batch (a
`DecodeSession`, one forward pass per step for all rows) and lets them join it at the next step: continuous
batching, so a request never waits for a whole batch to finish. Each step runs in a worker thread so the replica's
event loop stays free to admit, cancel and health-check requests; each step's text goes to the callers' queues. A
caller that goes away (client disconnect) sets its job's `cancelled` flag and its row leaves the batch at the next
step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from deployments.metrics import DecoderMetrics
from deployments.schemas import DecodeChunk, ErrorInfo
from medusa_core.config import GeneratorConfig
from medusa_core.generator import DecodeSession, MedusaGenerator, RequestError, TextDelta, load_generator
from medusa_core.request import Request

logger = logging.getLogger("ray.serve")
STUCK_STEP_S = 60.0  # one decode step takes well under a second here; a minute means the backend hangs
GAUGE_REFRESH_S = 1.0  # below two metrics reports (Ray's default report: 10 s; the tests': 1 s)
ENGINE_GRACE_S = 30.0  # a timed-out job normally ends within one decode step; this only catches a stopped engine


class DecoderOptions(BaseModel):
    """The decoder's `user_config` in serve_config.yaml, applied live by `reconfigure()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch_size: int = Field(8, ge=1, le=256, description="Most requests decoded together.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=10, description="How long a batch waits to fill up.")
    request_timeout_s: float = Field(300, gt=0, description="A request still decoding this long after the ingress "
                                     "received it ends with a 504 error.")


DEFAULTS = DecoderOptions()  # the batch knobs' one home: @serve.batch and the Engine start from these


def checked_options(user_config: dict, max_rows: int | None) -> DecoderOptions:
    """The validated user_config; a batch larger than the rows the backend holds KV space for is a config error."""
    options = DecoderOptions.model_validate(user_config)
    if max_rows is not None and options.max_batch_size > max_rows:
        raise ValueError(f"user_config.max_batch_size={options.max_batch_size} exceeds the {max_rows} rows the model "
                         f"config reserves KV space for (base_model.llamacpp.n_seq_max)")
    return options


@dataclass
class Job:
    """One request in the replica. `cancelled` is written by the caller's task and read by the decode thread."""

    request: Request  # prepared: token ids and budget set
    received_at: float
    deadline: float
    chunks: asyncio.Queue = field(default_factory=asyncio.Queue)  # what the caller streams back
    key: int = -1  # the request's key in the DecodeSession once admitted
    cancelled: bool = False
    timed_out: bool = False
    batch_size: int = 0
    queue_wait_s: float = 0.0


def should_stop(job: Job) -> bool:
    """Read by the decode thread before each step: the caller left, or the request ran out of time."""
    if not job.cancelled and time.time() > job.deadline:
        job.timed_out = True
    return job.cancelled or job.timed_out


def timeout_chunk(job: Job) -> DecodeChunk:
    limit = job.deadline - job.received_at
    return DecodeChunk(error=ErrorInfo(message=f"request timed out after {limit:g} s", type="timeout_error",
                                       code="timeout"), status=504, finish_reason="timeout")


async def next_chunk(job: Job) -> DecodeChunk:
    """The job's next chunk. The engine ends timed-out jobs itself; the wait is bounded anyway, so that no caller
    can hang on a replica whose engine stopped."""
    try:
        return await asyncio.wait_for(job.chunks.get(), timeout=max(0.0, job.deadline - time.time()) + ENGINE_GRACE_S)
    except asyncio.TimeoutError:
        job.timed_out = True
        return timeout_chunk(job)


def replica_stats(delta: TextDelta, job: Job):
    """The final delta's stats with what only the replica knows: queue wait and batch size (None before the end)."""
    if (s := delta.stats) is None:
        return None
    return replace(s, time_to_first_token_s=s.time_to_first_token_s + job.queue_wait_s, batch_size=job.batch_size,
                   queue_wait_s=job.queue_wait_s)


def to_chunk(delta: TextDelta, job: Job) -> DecodeChunk:
    if job.timed_out and delta.finish_reason == "cancelled":
        return timeout_chunk(job)
    return DecodeChunk(text=delta.text, finish_reason=delta.finish_reason,
                       prompt_tokens=len(job.request.prompt_ids), stats=replica_stats(delta, job))


class Engine:
    """The replica's running batch: decodes one step at a time in a worker thread and admits waiting jobs between
    steps (continuous batching), at most `max_rows` at once. Chunks go to each job's queue."""

    def __init__(self, generator: MedusaGenerator, metrics: DecoderMetrics) -> None:
        self.generator, self.metrics = generator, metrics
        self.session = DecodeSession(generator, lambda key: should_stop(self.jobs[key]))
        self.jobs: dict[int, Job] = {}  # admitted and still decoding, by key
        self.waiting: list[Job] = []  # gathered by @serve.batch, admitted at the next step
        self.keys = itertools.count()
        self.task: asyncio.Task | None = None
        self.max_rows = DEFAULTS.max_batch_size
        self.failed: str | None = None  # set when a step raised; check_health then reports the replica broken
        self.step_started: float | None = None  # while a step runs: when it began (a stuck backend shows here)

    def submit(self, jobs: list[Job]) -> None:
        self.waiting += jobs
        self.report_load()
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self.run())

    async def run(self) -> None:
        while self.waiting or self.session.rows:
            new = self.admissions()
            self.step_started = time.time()
            try:
                deltas = await asyncio.to_thread(self.session.step, {j.key: j.request for j in new})
                self.publish(deltas)
            except Exception as e:  # every job in the batch gets a clean 500; the replica reports unhealthy
                logger.exception("decode step failed")
                self.fail(e)
            finally:
                self.step_started = None
                self.report_load()

    def report_load(self) -> None:
        """The running/waiting gauges. Rows that ended this step are still counted until the next one retires them."""
        self.metrics.record_load(self.generator.config.name, self.session.rows, len(self.waiting))

    def health(self) -> str | None:
        """Why this replica cannot serve, or None: a step failed, or one has run for longer than STUCK_STEP_S."""
        if self.failed is not None:
            return f"decoder failed: {self.failed}"
        started = self.step_started
        if started is not None and time.time() - started > STUCK_STEP_S:
            return f"a decode step has been running for {time.time() - started:.0f} s"
        return None

    def admissions(self) -> list[Job]:
        """Waiting jobs that fit the batch now; jobs that ended while waiting get their last chunk."""
        now, room, new, keep = time.time(), self.max_rows - self.session.rows, [], []
        for job in self.waiting:
            if should_stop(job):
                job.chunks.put_nowait(timeout_chunk(job) if job.timed_out else DecodeChunk(finish_reason="cancelled"))
                self.record_end(job, "timeout" if job.timed_out else "cancelled")
            elif len(new) < room:
                job.key, job.queue_wait_s = next(self.keys), max(0.0, now - job.received_at)
                new.append(job)
            else:
                keep.append(job)
        self.waiting = keep
        self.jobs.update({j.key: j for j in new})
        return new

    def publish(self, deltas: list[TextDelta]) -> None:
        model = self.generator.config.name
        self.metrics.record_batch(model, self.session.rows, self.session.tree_nodes)
        for job in self.jobs.values():
            job.batch_size = max(job.batch_size, self.session.rows)
        tokens: dict[str, int] = {}  # per mode: tokens this step
        accept_lens: dict[str, list[int]] = {}  # per mode: accepted speculated tokens of each decoding row
        for d in deltas:
            job = self.jobs[d.key]
            mode = job.request.mode
            tokens[mode] = tokens.get(mode, 0) + len(d.token_ids)
            accept_lens.setdefault(mode, []).extend([d.accept_len] if d.accept_len is not None else [])
            job.chunks.put_nowait(chunk := to_chunk(d, job))
            if chunk.finish_reason is not None:
                self.record_end(job, chunk.finish_reason, replica_stats(d, job))
                del self.jobs[d.key]
        for mode, n in tokens.items():
            self.metrics.record_steps(model, mode, n, accept_lens[mode])

    def record_end(self, job: Job, finish_reason: str, stats=None) -> None:
        self.metrics.record_request(self.generator.config.name, job.request.mode, finish_reason, stats)

    def fail(self, e: Exception) -> None:
        self.failed = f"{type(e).__name__}: {e}"
        error = DecodeChunk(error=ErrorInfo(message="internal error while decoding", type="server_error"), status=500)
        for job in [*self.jobs.values(), *self.waiting]:
            job.chunks.put_nowait(error)
            self.record_end(job, "error")
        self.jobs, self.waiting = {}, []
        self.session = DecodeSession(self.generator, self.session.is_cancelled)


@serve.deployment
class Decoder:
    def __init__(self, config: GeneratorConfig) -> None:
        generator = load_generator(config)  # validated once, by the app builder
        self.engine = Engine(generator, DecoderMetrics(generator.tree.max_depth))
        self.options = DEFAULTS
        threading.Thread(target=self.refresh_gauges, name="gauges", daemon=True).start()

    def refresh_gauges(self) -> None:
        """Ray drops a gauge series that was not set within two metrics reports, so an idle replica's load gauges
        would vanish from Prometheus (and its dashboards' panels go blank): set them again every second."""
        while True:
            time.sleep(GAUGE_REFRESH_S)
            self.engine.report_load()

    def reconfigure(self, user_config: dict) -> None:
        self.options = checked_options(user_config, self.engine.generator.backend.max_rows)
        self.engine.max_rows = self.options.max_batch_size
        self.admit.set_max_batch_size(self.options.max_batch_size)
        self.admit.set_batch_wait_timeout_s(self.options.batch_wait_timeout_s)

    def check_health(self) -> None:
        if (problem := self.engine.health()) is not None:
            raise RuntimeError(problem)

    async def stream(self, request: Request) -> AsyncIterator[DecodeChunk]:
        try:
            prepared = self.engine.generator.prepare(request)
        except RequestError as e:
            yield DecodeChunk(error=ErrorInfo(message=str(e), param=e.param), status=400)
            return
        limit = min(request.timeout_s or self.options.request_timeout_s, self.options.request_timeout_s)
        job = Job(prepared, request.received_at, request.received_at + limit)
        try:
            await self.admit(job)
            while True:
                chunk = await next_chunk(job)
                yield chunk
                if chunk.finish_reason is not None or chunk.error is not None:
                    return
        finally:
            job.cancelled = True

    @serve.batch(max_batch_size=DEFAULTS.max_batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_timeout_s)
    async def admit(self, jobs: list[Job]) -> list[None]:
        """Concurrent arrivals join the running batch together (one prefill for all of them)."""
        self.engine.submit(jobs)
        return [None] * len(jobs)
