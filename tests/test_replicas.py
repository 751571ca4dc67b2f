"""The real app when a decoder replica dies (SIGKILL) or freezes (SIGSTOP), and a 1,000-request soak: requests in
flight end with a clean error or finish, nothing hangs, and a new replica serves.

Uses the session's `server` (conftest.py) and test_reliability.py's clients; every test here is `-m slow`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_harness import MODEL, complete, post
from test_reliability import CLIENT_TIMEOUT_S, PROMPTS, Background, Streams, is_error_body

pytestmark = pytest.mark.ray


class Load(Background):
    """Closed-loop load from `workers` threads until stopped; records (status, seconds, error-body ok)."""

    def __init__(self, server, workers: int, max_tokens: int) -> None:
        self.server, self.max_tokens, self.stop = server, max_tokens, threading.Event()
        self.results: list[tuple[int, float, bool]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(workers)]

    def _run(self, i: int) -> None:
        while not self.stop.is_set():
            start = time.perf_counter()
            r = post(self.server, "/v1/completions", {"model": MODEL, "prompt": PROMPTS[i % 4], "temperature": 0,
                                                      "max_tokens": self.max_tokens}, timeout=CLIENT_TIMEOUT_S)
            ok = r.status_code == 200 or (is_error_body(r) and (r.status_code != 503 or "retry-after" in r.headers))
            self.results.append((r.status_code, time.perf_counter() - start, ok))


@pytest.mark.slow  # ~1 min: a replica restart and model load
def test_replica_kill_fails_requests_cleanly_and_recovers(server):
    """SIGKILL the decoder under streaming and non-streaming load. A stream that has sent its first byte ends with
    an error event (`replica_failed`) and [DONE]; a request that has not gets a 503 `replica_failed` with
    Retry-After; nothing gets a 500 or hangs; /health says 503 until a new replica serves."""
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}
    pid = server.decoder_pids()[0]
    long = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 1000, "temperature": 0,
            "stream": True, "medusa": {"ignore_eos": True}}
    # Prompts whose prefill (one step for both) is still running when the replica dies: no byte sent yet.
    prefill = {**long, "prompt": "The quick brown fox jumps over the lazy dog. " * 150, "max_tokens": 8}
    health: list[int] = []
    with Streams(server, [long] * 3) as decoding:
        decoding.wait_started(3)
        with Streams(server, [prefill, {**prefill, "stream": False}]) as prefilling, \
                Load(server, workers=3, max_tokens=24) as load:
            time.sleep(0.6)
            os.kill(pid, signal.SIGKILL)
            killed = time.monotonic()
            recovered = None
            while recovered is None and time.monotonic() - killed < 180:
                health.append(httpx.get(f"{server.url}/health", timeout=30).status_code)
                if health[-1] == 200 and 503 in health:  # back after the outage: it must serve
                    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 2,
                                                         "temperature": 0}, timeout=CLIENT_TIMEOUT_S)
                    recovered = time.monotonic() - killed if r.status_code == 200 else None
                time.sleep(0.5)
    codes = [c for c, _, _ in load.results]
    print(f"replica kill: recovered in {recovered} s; prefilling {prefilling.status}; load saw {len(codes)} "
          f"requests, codes {sorted(set(codes))}; /health in order: {health}")
    for events in decoding.events:  # had their first byte: an error event, then [DONE]
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "replica_failed", events[-3:]
        assert set(events[-2]["error"]) == {"message", "type", "param", "code"}
    for status, error in zip(prefilling.status, prefilling.errors):  # no byte yet: a clean 503
        assert status == 503 and error["retry_after"] and error["body"]["error"]["code"] == "replica_failed", \
            (status, error)
    assert 503 in health, "/health never said the decoder was gone"
    assert recovered is not None and recovered < 180
    assert all(ok for _, _, ok in load.results), "an error without the OpenAI error body and Retry-After"
    assert set(codes) <= {200, 503} and max(t for _, t, _ in load.results) < CLIENT_TIMEOUT_S
    assert pid not in server.decoder_pids()


@pytest.mark.slow  # ~1 min: a health-check timeout, a replica restart and model load
def test_unresponsive_replica_is_replaced(server):
    """A decoder that stops answering (SIGSTOP: a wedged native call looks the same) fails Ray's health check and is
    replaced; from the failed check until a replica runs again /health says 503. The autoscaler may have started a
    second replica meanwhile (the earlier tests' load is still in its look-back window): then that one serves and
    /health rightly stays 200, which the test tells apart by the replicas' pids."""
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}
    pid = server.decoder_pids()[0]
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped, seen = time.monotonic(), []
        while time.monotonic() - stopped < 120:
            code, running = httpx.get(f"{server.url}/health", timeout=30).status_code, server.decoder_pids()
            seen.append((round(time.monotonic() - stopped, 1), code, running))
            if code == 503 or (pid not in running and running):  # down, or another replica serves
                break
            time.sleep(0.5)
        print(f"/health after the replica stopped (s, code, running pids): {seen[-3:]}")
        assert code == 503 or (pid not in running and running), f"/health never said 503: {seen[-5:]}"
        if code == 200:
            print(f"another replica ({running}) served while {pid} was stopped")
        while pid in server.decoder_pids() and time.monotonic() - stopped < 120:
            time.sleep(1)
        assert pid not in server.decoder_pids(), "the unresponsive replica was not replaced"
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray usually killed it already
            os.kill(pid, signal.SIGCONT)
    while server.decoder_replicas().get("RUNNING", 0) < 1 and time.monotonic() - stopped < 300:
        time.sleep(1)
    assert complete(server, "Hello", 4)["usage"]["completion_tokens"] > 0
    print(f"unresponsive replica replaced and serving after {time.monotonic() - stopped:.0f} s")


@pytest.mark.slow
def test_soak_1000_requests(server):
    """1,000 mixed requests at concurrency 8 (greedy and seeded sampling, streamed or not, medusa and plain, with
    the server's fixed tree so Medusa speculates): none lost or hung, each equals the same request sent alone."""
    kinds = [dict(prompt=p, max_tokens=n, medusa={"mode": m}) for p in PROMPTS for n in (4, 16) for m in
             ("medusa", "plain")]
    alone = {(i, sampled): complete(server, **k, **({"temperature": 0.8, "seed": i} if sampled else {}))
             for i, k in enumerate(kinds) for sampled in (False, True)}
    assert sum(sum(b["medusa"]["accept_len_histogram"][1:]) for b in alone.values()) > 0, "Medusa never speculated"
    alone = {key: b["choices"][0]["text"] for key, b in alone.items()}
    rss0 = _replica_rss(server)

    def send(j: int) -> tuple[tuple[int, bool], int, str]:
        i, sampled, stream = j % len(kinds), j % 5 == 0, j % 3 == 0
        body = {"model": MODEL, **kinds[i], "temperature": 0.8 if sampled else 0, "seed": i, "stream": stream}
        r = post(server, "/v1/completions", body, timeout=CLIENT_TIMEOUT_S)
        text = _stream_text(r) if stream and r.status_code == 200 else r.json().get("choices", [{}])[0].get("text")
        return (i, sampled), r.status_code, text

    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(send, range(1000)))
    codes = [c for _, c, _ in results]
    mismatched = [key for key, c, text in results if c == 200 and text != alone[key]]
    rss1 = _replica_rss(server)
    print(f"soak: {len(results)} requests in {time.monotonic() - start:.0f} s, codes {sorted(set(codes))}, "
          f"{sum(c != 200 for c in codes)} errors, 0 lost, {len(mismatched)} differ from alone, replica RSS "
          f"{rss0} -> {rss1} MiB")
    assert len(results) == 1000 and set(codes) <= {200, 503} and not mismatched
    assert all(b < 2 * a + 512 for a, b in zip(rss0, rss1)), (rss0, rss1)


def _stream_text(r: httpx.Response) -> str:
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e.get("choices"))


def _replica_rss(server) -> list[int]:
    out = []
    for pid in server.decoder_pids():
        with open(f"/proc/{pid}/status") as f:
            out.append(next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmRSS")))
    return out
