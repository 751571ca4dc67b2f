"""The decoder replica's engine without Ray: continuous batching, failures and stuck steps.

Requests join the running batch between steps and still equal the same request decoded alone; a backend that
starts failing ends every request with a clean 500 chunk and makes `health()` (the replica's check_health) report
it; a step that hangs is reported too. Faults are injected by wrapping the real embedded backend.
"""
import asyncio
import threading
import time

import pytest

from deployments import decoder as decoder_module
from deployments.decoder import Engine, Job
from deployments.metrics import DecoderMetrics
from medusa_core.generator import MedusaGenerator
from medusa_core.request import Request

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time"]


class FaultyBackend:
    """The real backend, except that verify() raises (or blocks on `release`) once `after` passes have run."""

    def __init__(self, backend, after: int, release: threading.Event | None = None) -> None:
        self._backend, self._left, self._release = backend, after, release

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def verify(self, cache, tokens, tree):
        self._left -= 1
        if self._left < 0:
            if self._release is None:
                raise RuntimeError("device lost")
            self._release.wait(timeout=30)
        return self._backend.verify(cache, tokens, tree)


def requests(gen, n_tokens):
    return [Request(prompt_ids=tuple(gen.encode(p)), max_tokens=n_tokens, ignore_eos=True) for p in PROMPTS]


async def collect(job: Job) -> list:
    chunks = []
    while not chunks or (chunks[-1].finish_reason is None and chunks[-1].error is None):
        chunks.append(await asyncio.wait_for(job.chunks.get(), timeout=120))
    return chunks


async def staggered(engine: Engine, reqs: list[Request]) -> list[list]:
    """Submit one request, then the others while it decodes; all chunks of each."""
    jobs = [Job(r, time.time(), time.time() + 300) for r in reqs]
    engine.submit(jobs[:1])
    first = asyncio.create_task(collect(jobs[0]))
    await asyncio.sleep(0.3)
    engine.submit(jobs[1:])
    rest = await asyncio.gather(*(collect(j) for j in jobs[1:]))
    return [await first, *rest]


@pytest.fixture(scope="module")
def metrics():
    return DecoderMetrics(max_depth=4)


def test_requests_join_the_running_batch(embedded_generator, metrics):
    gen = embedded_generator
    reqs = requests(gen, 16)
    got = asyncio.run(staggered(Engine(gen, metrics), reqs))
    alone = [gen.generate([r])[0] for r in reqs]
    for chunks, ref in zip(got, alone):
        assert "".join(c.text for c in chunks) == ref.text
        assert chunks[-1].finish_reason == "length" and chunks[-1].stats.generated_tokens == 16
    assert max(c[-1].stats.batch_size for c in got) > 1, "later requests decoded together with the first"


def test_failing_backend_ends_requests_and_fails_health(embedded_generator, metrics):
    gen = embedded_generator
    broken = MedusaGenerator(gen.config, FaultyBackend(gen.backend, after=3), gen.drafter, gen.tree)
    engine = Engine(broken, metrics)
    got = asyncio.run(staggered(engine, requests(gen, 16)))
    for chunks in got:
        assert chunks[-1].status == 500 and chunks[-1].error.type == "server_error"
        assert "device lost" not in chunks[-1].error.message  # no internals in the error body
    assert "device lost" in engine.health()
    assert not engine.jobs and not engine.waiting and engine.session.rows == 0


def test_stuck_step_fails_health(embedded_generator, metrics, monkeypatch):
    monkeypatch.setattr(decoder_module, "STUCK_STEP_S", 0.5)
    gen = embedded_generator
    release = threading.Event()
    engine = Engine(MedusaGenerator(gen.config, FaultyBackend(gen.backend, 1, release), gen.drafter, gen.tree),
                    metrics)

    async def run() -> tuple[str | None, str | None]:
        job = Job(requests(gen, 8)[0], time.time(), time.time() + 300)
        engine.submit([job])
        await asyncio.sleep(0.2)
        before = engine.health()
        await asyncio.sleep(2.0)
        during = engine.health()
        release.set()
        chunks = await collect(job)
        assert chunks[-1].finish_reason == "length"
        return before, during

    before, during = asyncio.run(run())
    assert before is None
    assert during is not None and "running for" in during
    assert engine.health() is None, "healthy again once the step finished"
