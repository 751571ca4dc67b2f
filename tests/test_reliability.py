"""Reliability of the real app under overload (of the decoder and of the ingress itself), slow bodies, timeouts,
disconnects and full decode slots (replica death, freezing and the soak: test_replicas.py; fuzzing: test_fuzz.py).

Uses the session's `server` (conftest.py). Each test prints the figure it measures. Every HTTP call has a client
timeout, so a hung request fails the test instead of hanging it. Decoder state that HTTP does not show (rows in the
running batch, cancelled requests) is read from Ray's Prometheus endpoints, as an operator would.
"""
from __future__ import annotations

import http.client
import json
import os
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
    # After the shipped body timeout the first slow bodies leave with a 408. Filling takes ~1 s, but twice in a
    # full test run (a CI machine, a fresh clone here) it took over 9 s: the window is 30 s, not the 10 s it was.
    window_s = ingress["user_config"]["body_timeout_s"]
    # The two cores must be free to route the slow bodies within the window: no rows left from earlier tests, and
    # no replica the autoscaler started for them still loading its model or shutting down.
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}
    idle = time.monotonic() + 30
    while ray_metrics("ray_medusa_running_requests") > 0 and time.monotonic() < idle:
        time.sleep(0.2)
    start, full, cpu = time.monotonic(), False, os.times()
    clients = [slow_body(server) for _ in range(slots + (queued if queued > 0 else 64))]
    sent = time.monotonic() - start
    try:
        probes = []
        while not full and time.monotonic() - start < window_s - 1:  # until the proxy has queued them all
            try:
                probes.append(httpx.get(f"{server.url}/v1/models", timeout=1).status_code)
            except httpx.TimeoutException:  # a probe that got queued leaves after 1 s
                probes.append("timeout")
            full = probes[-1] == 503
        filled, load = time.monotonic() - start, ingress_load()
        used = os.times()
        load += (f"; this client sent its {len(clients)} slow bodies in {sent:.1f} s and used "
                 f"{used.user - cpu.user + used.system - cpu.system:.1f} s of CPU in {filled:.1f} s with "
                 f"{threading.active_count()} threads; load average {os.getloadavg()}")
        assert full, f"no 503 within {window_s - 1} s: requests wait for an ingress slot unbounded: {probes}, {load}"
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
          f"{max(refused) * 1000:.0f} ms at most; places free again {freed:.1f} s after the clients closed ({load})")
    assert max(refused) < 1.0
    assert freed < 10, f"the closed clients' places were still taken after {freed:.1f} s"
    assert complete(server, "Hello", 4)["usage"]["completion_tokens"] > 0


def ingress_load() -> str:
    """What Ray reports of the Ingress's load: requests its replica holds and requests queued in front of it."""
    held = ray_metrics("ray_serve_replica_processing_queries", deployment="Ingress")
    queued = ray_metrics("ray_serve_deployment_queued_queries", deployment="Ingress")
    return f"Ray's last export (every 1 s): the Ingress replica held {held:g} requests, {queued:g} queued"


def test_slow_body_gets_408_after_body_timeout(server):
    """A client that sends part of its body gets a 408 with the error body after the Ingress's `body_timeout_s`
    (the shipped 30 s; the proxy would otherwise hold it for its 600-s request timeout)."""
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
