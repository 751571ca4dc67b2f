"""Reliability of the real app under overload (of the decoder and of the ingress itself), slow bodies, timeouts,
disconnects, full decode slots, replica death and freezing (fuzzing: test_fuzz.py).

Uses the session's `server` (conftest.py). Each test prints the figure it measures; the replica and soak tests are
`-m slow`. Every HTTP call has a client timeout, so a hung request fails the test instead of hanging it. Decoder
state that HTTP does not show (rows in the running batch, cancelled requests) is read from Ray's Prometheus
endpoints, as an operator would.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_harness import MODEL, complete, deployment, post, ray_metrics

pytestmark = pytest.mark.ray
CLIENT_TIMEOUT_S = 120  # a request that takes longer than this is a hang
PROMPTS = ["The capital of France is", "def add(a, b):\n", "My favourite fruit is", "1, 1, 2, 3, 5,"]
LONG_TOKENS = 1900  # with a short prompt, nearly the whole context window: decoding it takes half a minute or more
# The dropped row's first step, the steps while the disconnect travels client -> proxy -> ingress -> decoder (tens
# of ms; a step takes 15-40 ms here), and the one that retires it. Decoding to the end would be LONG_TOKENS steps.
MAX_STEPS_AFTER_DISCONNECT = 40


def is_error_body(r: httpx.Response) -> bool:
    try:
        body = r.json()
    except ValueError:  # e.g. the proxy's plain-text 503
        return False
    return set(body.get("error", {})) == {"message", "type", "param", "code"}


def test_overload_answers_503_fast_and_admitted_requests_finish(server):
    # Long enough that admitted requests take several times what the ingress needs to refuse 40 connections on two
    # cores (~2 s for the last one), so a refusal that waited for decoding would show.
    n_tokens = 48
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}  # not one still starting after earlier tests

    def send(i: int) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        r = post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPTS[i % 4], "max_tokens": n_tokens,
                                             "temperature": 0, "medusa": {"ignore_eos": True}},
                 timeout=CLIENT_TIMEOUT_S)
        return r, time.perf_counter() - start

    with ThreadPoolExecutor(40) as pool:
        results = list(pool.map(send, range(40)))
    codes = [r.status_code for r, _ in results]
    assert set(codes) <= {200, 503}, codes
    # At least the router's queue is admitted; how many more reach a replica slot before it fills depends on how
    # fast the router hears back from the replica, which is slow on a busy two-core machine.
    queued = deployment(server.config, "Decoder")["max_queued_requests"]
    assert codes.count(503) >= 1 and codes.count(200) >= queued, codes
    busy = sorted(t for r, t in results if r.status_code == 503)
    served = sorted(t for r, t in results if r.status_code == 200)
    p99 = busy[min(len(busy) - 1, int(0.99 * len(busy)))]
    print(f"overload: {len(served)} admitted (p50 {statistics.median(served):.2f} s), {len(busy)} x 503: "
          f"p50 {statistics.median(busy):.3f} s, p99 {p99:.3f} s")
    # Refused requests must not queue behind the admitted ones: they answer before most admitted ones finish.
    assert p99 < min(10.0, statistics.median(served))
    for r, _ in results:
        if r.status_code == 503:
            assert r.headers["retry-after"] and is_error_body(r) and r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["usage"]["completion_tokens"] == n_tokens


def test_request_timeout_ends_with_504_and_counts_as_a_timeout(server):
    def endings():
        return tuple(ray_metrics("ray_medusa_requests_total", finish_reason=f) for f in ("timeout", "cancelled"))

    before = settled(endings)
    start = time.perf_counter()
    r = post(server, "/v1/completions", {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 1500,
                                         "temperature": 0, "medusa": {"ignore_eos": True, "timeout_s": 3}},
             timeout=CLIENT_TIMEOUT_S)
    took = time.perf_counter() - start
    assert r.status_code == 504 and is_error_body(r) and r.json()["error"]["code"] == "timeout", r.text
    print(f"timeout: 504 after {took:.1f} s (limit 3 s)")
    assert 3 <= took < 30
    deadline = time.monotonic() + 30
    while endings() == before and time.monotonic() < deadline:  # exported with the next report
        time.sleep(0.2)
    timeouts, cancelled = (a - b for a, b in zip(settled(endings), before))
    assert (timeouts, cancelled) == (1, 0), f"the timed-out request counted {timeouts:g} timeouts, " \
                                            f"{cancelled:g} cancelled"


def test_disconnect_frees_the_row_and_spares_neighbours(server):
    """A client that drops its stream cancels its request: its row leaves the replica's running batch within a few
    decode steps (it ends `cancelled`, and the `ray_medusa_running_requests` gauge returns to 0), and its neighbours'
    text is unchanged. Rows join a running batch at any step, so a leaked row would not delay the next request; the
    metrics show it. The dropped request decodes in plain mode, so the plain-mode counters are its own."""
    neighbours = ["The capital of France is", "1, 1, 2, 3, 5,"]
    alone = [complete(server, p, 24) for p in neighbours]
    before = settled(plain_counters)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(complete, server, p, 24) for p in neighbours]
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=CLIENT_TIMEOUT_S,
                          json={"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": LONG_TOKENS,
                                "temperature": 0, "stream": True, "medusa": {"ignore_eos": True, "mode": "plain"}}
                          ) as r:
            assert next(r.iter_lines()).startswith("data: ")
        dropped = time.monotonic()
        together = [f.result() for f in futures]
    assert [b["choices"][0]["text"] for b in together] == [b["choices"][0]["text"] for b in alone]
    while (rows := ray_metrics("ray_medusa_running_requests")) > 0 and time.monotonic() - dropped < 30:
        time.sleep(0.2)
    gone = time.monotonic() - dropped
    while plain_counters()[0] == before[0] and time.monotonic() - dropped < 30:  # exported with the next report
        time.sleep(0.2)
    cancelled, steps = (a - b for a, b in zip(plain_counters(), before))
    print(f"disconnect: the dropped row decoded {steps:g} steps in all; running rows 0 after {gone:.1f} s "
          f"(metrics are exported every second)")
    assert cancelled == 1, f"{cancelled:g} requests ended cancelled: the dropped stream was not cancelled"
    assert steps <= MAX_STEPS_AFTER_DISCONNECT, f"the dropped row decoded {steps:g} steps"
    assert rows == 0 and gone < 5, f"{rows:g} rows still decoding {gone:.1f} s after the client disconnected"


def plain_counters() -> tuple[float, float]:
    """Plain-mode requests that ended cancelled, and plain-mode decode steps, over all replicas."""
    return (ray_metrics("ray_medusa_requests_total", mode="plain", finish_reason="cancelled"),
            ray_metrics("ray_medusa_decode_steps_total", mode="plain"))


def settled(read, interval_s: float = 1.2, timeout_s: float = 30):
    """`read()` once two reads a metrics report apart agree: everything before is exported."""
    deadline, last = time.monotonic() + timeout_s, read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        if (now := read()) == last:
            return now
        last = now
    raise AssertionError(f"metrics did not settle: {last}")


def test_health_answers_while_every_decode_slot_is_busy(server):
    """/health must not wait for a decode slot: with every slot of the one replica streaming a long request, it
    still answers 200 at once."""
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}
    slots = deployment(server.config, "Decoder")["max_ongoing_requests"]
    body = {"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": LONG_TOKENS, "temperature": 0,
            "stream": True, "medusa": {"ignore_eos": True}}
    with Streams(server, [body] * slots) as streams:
        streams.wait_started(slots)
        deadline = time.monotonic() + 10
        while ray_metrics("ray_medusa_running_requests") < slots and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ray_metrics("ray_medusa_running_requests") == slots, "the decode slots did not fill"
        took = []
        for _ in range(5):
            start = time.perf_counter()
            r = httpx.get(f"{server.url}/health", timeout=30)
            took.append(time.perf_counter() - start)
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "ok"
    print(f"health with {slots} busy slots: {max(took) * 1000:.0f} ms at most")
    assert max(took) < 1.0


def test_ingress_queue_is_bounded(server):
    """Slow-body clients fill the ingress's slots and then the proxy's queue in front of it (the shipped
    `max_queued_requests`); further requests get Ray's proxy 503 with Retry-After at once (plain text: README
    "Errors") instead of waiting for a slot."""
    ingress = deployment(server.config, "Ingress")
    slots, queued = ingress["max_ongoing_requests"], ingress.get("max_queued_requests", -1)
    window_s = ingress["user_config"]["body_timeout_s"]  # after it, the first slow bodies leave with a 408
    # The two cores must be free to route the slow bodies within the window: no rows left from earlier tests, and
    # no replica the autoscaler started for them still loading its model or shutting down.
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}
    idle = time.monotonic() + 30
    while ray_metrics("ray_medusa_running_requests") > 0 and time.monotonic() < idle:
        time.sleep(0.2)
    start, full = time.monotonic(), False
    clients = [slow_body(server) for _ in range(slots + (queued if queued > 0 else 64))]
    try:
        while not full and time.monotonic() - start < window_s - 1:  # until the proxy has queued them all
            with contextlib.suppress(httpx.TimeoutException):  # a probe that got queued leaves after 1 s
                full = httpx.get(f"{server.url}/v1/models", timeout=1).status_code == 503
        filled = time.monotonic() - start
        assert full, f"no 503 within {window_s - 1} s: requests wait for an ingress slot without bound"
        assert filled < window_s, "the first slow bodies timed out meanwhile"
        refused = []
        for _ in range(4):
            t = time.perf_counter()
            r = httpx.get(f"{server.url}/v1/models", timeout=CLIENT_TIMEOUT_S)
            refused.append(time.perf_counter() - t)
            assert r.status_code == 503 and r.headers.get("retry-after") == "1", (r.status_code, r.text)
            assert r.text.startswith("Request dropped due to backpressure"), r.text
    finally:
        for c in clients:
            c.close()
    closed = time.monotonic()
    while httpx.get(f"{server.url}/v1/models", timeout=CLIENT_TIMEOUT_S).status_code == 503 \
            and time.monotonic() - closed < 30:  # the proxy drops the closed clients' queued requests
        time.sleep(0.2)
    freed = time.monotonic() - closed
    print(f"ingress overload: {slots} + {queued} slow bodies queued in {filled:.1f} s; 503 in "
          f"{max(refused) * 1000:.0f} ms at most; places free again {freed:.1f} s after the clients closed")
    assert max(refused) < 1.0
    assert freed < 10, f"the closed clients' places were still taken after {freed:.1f} s"
    assert complete(server, "Hello", 4)["usage"]["completion_tokens"] > 0


def test_slow_body_gets_408_after_body_timeout(server):
    """A client that sends part of its body gets a 408 with the error body after the Ingress's `body_timeout_s`
    (10 s in the tests' server; the proxy would otherwise hold it for its 600-s request timeout)."""
    timeout_s = deployment(server.config, "Ingress")["user_config"]["body_timeout_s"]
    start = time.perf_counter()
    status, body = read_response(slow_body(server), timeout=timeout_s + 30)
    took = time.perf_counter() - start
    print(f"slow body: {status} after {took:.1f} s (body_timeout_s {timeout_s})")
    assert status == 408 and set(body["error"]) == {"message", "type", "param", "code"}, (status, body)
    assert body["error"]["code"] == "body_timeout" and timeout_s <= took < timeout_s + 3


def slow_body(server) -> socket.socket:
    """A POST that announces 100 bytes of body and sends 13 of them."""
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\": \"x\"" % host.encode())
    return s


def read_response(s: socket.socket, timeout: float) -> tuple[int, dict]:
    s.settimeout(timeout)
    r = http.client.HTTPResponse(s)
    r.begin()
    status, body = r.status, json.loads(r.read())
    s.close()
    return status, body


class Background:
    """Threads started when the block opens; on exit they are told to stop and joined (a request holding one past
    the client timeout is a hang)."""

    threads: list[threading.Thread]
    stop: threading.Event

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(CLIENT_TIMEOUT_S + 10)


class Streams(Background):
    """Streaming completions read from threads until they end or the block exits (which drops them)."""

    def __init__(self, server, bodies: list[dict]) -> None:
        self.server, self.stop = server, threading.Event()
        self.status: list[int | None] = [None] * len(bodies)
        self.errors: list[dict | None] = [None] * len(bodies)  # a non-200's JSON body
        self.events: list[list] = [[] for _ in bodies]
        self.threads = [threading.Thread(target=self._read, args=(i, b)) for i, b in enumerate(bodies)]

    def _read(self, i: int, body: dict) -> None:
        with httpx.stream("POST", f"{self.server.url}/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as r:
            self.status[i] = r.status_code
            if r.status_code != 200:
                self.errors[i] = {"body": json.loads(r.read()), "retry_after": r.headers.get("retry-after")}
                return
            for line in r.iter_lines():
                if line.startswith("data: "):
                    self.events[i].append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))
                if self.stop.is_set():
                    return

    def wait_started(self, n: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while sum(bool(e) for e in self.events) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sum(bool(e) for e in self.events) >= n, f"{self.status} {[len(e) for e in self.events]}"

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        assert not any(t.is_alive() for t in self.threads), "a stream hung"


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
