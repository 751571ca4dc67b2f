"""The real Ray Serve app (serve_config.yaml, embedded model) over HTTP on 127.0.0.1: the API, batching, errors,
autoscaling. The `server` fixture (conftest.py) is one `serve run` for the session; autoscaling comes last here
because it adds a replica.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from serve_harness import MODEL, REPO, SERVED_CONFIG, complete, deployment, post

pytestmark = pytest.mark.ray
PROMPTS = ["The capital of France is", "def add(a, b):\n", "My favourite fruit is", "1, 1, 2, 3, 5,",
           "Water boils at", "The opposite of hot is", "import os\nimport", "Roses are red,"]


def speculated(body: dict) -> int:
    """Decode steps of a response that accepted at least one speculated token."""
    return sum(body["medusa"]["accept_len_histogram"][1:])


def test_completion_greedy_equals_cli(server):
    """HTTP and the CLI on the same model config (the server's: the served one with its chain fixed, so Medusa
    speculates): the same text, token counts, and speculation seen in the stats."""
    prompt = "The capital of France is"
    body = complete(server, prompt, 32)
    config = server.config["applications"][0]["args"]["config"]
    cli = subprocess.run([sys.executable, "-m", "medusa_core", "generate", "--config", config, "--prompt",
                          prompt, "--max-tokens", "32", "--json"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr
    want = json.loads(cli.stdout.strip().splitlines()[-1])
    assert body["choices"][0]["text"] == want["text"]
    assert body["usage"]["prompt_tokens"] == want["stats"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == want["stats"]["generated_tokens"]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    stats = body["medusa"]
    assert stats["mode"] == "medusa" and stats["decode_steps"] >= 1
    assert speculated(body) > 0 and stats["mean_accepted_length"] > 1, stats
    assert stats["accept_len_histogram"] == want["stats"]["accept_len_histogram"]
    assert stats["time_to_first_token_s"] > 0 and stats["tokens_per_second"] > 0


def test_seeded_sampling_is_reproducible_alone_batched_and_plain(server):
    """Five identical seeded chat requests at temperature 0.8 (the default rule), sent together, one sent alone, and
    one in plain mode: the same text every time (before keyed sampling: 4 different texts of 5)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a short poem about autumn."}],
            "max_tokens": 32, "temperature": 0.8, "seed": 7}

    def chat(extra: dict) -> dict:
        r = post(server, "/v1/chat/completions", {**body, **extra})
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(5) as pool:
        together = list(pool.map(chat, [{}] * 5))
    runs = together + [chat({}), chat({"medusa": {"mode": "plain"}})]
    texts = {r["choices"][0]["message"]["content"] for r in runs}
    assert len(texts) == 1, texts
    assert max(r["medusa"]["batch_size"] for r in together) > 1
    assert sum(speculated(r) for r in together) > 0, "no sampled step accepted a speculated token"
    assert chat({"seed": 8})["choices"][0]["message"]["content"] not in texts


def test_plain_mode_gives_the_same_greedy_text(server):
    medusa = complete(server, "Water boils at", 20)
    plain = complete(server, "Water boils at", 20, medusa={"mode": "plain"})
    assert plain["choices"][0]["text"] == medusa["choices"][0]["text"]
    assert plain["medusa"]["mode"] == "plain" and plain["medusa"]["mean_accepted_length"] == 1.0


def read_sse(response: httpx.Response) -> list[dict | str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_stream_equals_chat(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 20,
            "temperature": 0}
    whole = post(server, "/v1/chat/completions", body).json()
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=300,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == whole["choices"][0]["message"]["content"] and text
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert events[-2]["usage"] == whole["usage"]


def test_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    c = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=16, temperature=0)
    streamed = client.completions.create(model=MODEL, prompt="Roses are red,", max_tokens=16, temperature=0,
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == c.choices[0].text
    messages = [{"role": "user", "content": "Say hello."}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                          extra_body={"medusa": {"mode": "plain"}})
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed) == chat.choices[0].message.content
    assert chat.usage.completion_tokens > 0


def test_generate_and_compare(server):
    medusa = post(server, "/generate", {"prompt": "My favourite fruit is", "max_length": 20}).json()
    normal = post(server, "/generate", {"prompt": "My favourite fruit is", "max_length": 20, "mode": "normal"}).json()
    assert medusa["text"] == normal["text"] and medusa["tokens_generated"] == normal["tokens_generated"] > 0
    assert normal["acceptance_rate"] == 0.0 and 0 <= medusa["acceptance_rate"] <= 1
    assert medusa["generation_time"] > 0 and medusa["tokens_per_second"] > 0
    assert (medusa["mode"], normal["mode"]) == ("medusa", "normal")  # the caller's word, echoed
    for mode, run in (("medusa", medusa), ("normal", normal)):  # the original services' routes
        alias = post(server, f"/generate/{mode}", {"prompt": "My favourite fruit is", "max_length": 20}).json()
        assert alias["text"] == run["text"] and alias["mode"] == mode
        assert alias["medusa"]["mode"] == ("plain" if mode == "normal" else "medusa")
    clash = post(server, "/generate/normal", {"prompt": "hi", "mode": "medusa"})  # the path says the mode
    assert clash.status_code == 400 and clash.json()["error"]["param"] == "mode"
    both = post(server, "/compare", {"prompt": "My favourite fruit is", "max_length": 20}).json()
    assert both["medusa"]["text"] == both["normal"]["text"] == medusa["text"]
    assert both["speedup_factor"] == pytest.approx(both["medusa"]["tokens_per_second"] /
                                                   both["normal"]["tokens_per_second"])


def test_concurrent_requests_are_batched_and_equal_alone(server):
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda p: complete(server, p, 24), PROMPTS))
    assert max(b["medusa"]["batch_size"] for b in together) > 1, [b["medusa"]["batch_size"] for b in together]
    assert sum(speculated(b) for b in together) > 0, "batched rows never accepted a speculated token"
    for prompt, b in zip(PROMPTS, together):
        alone = complete(server, prompt, 24)
        assert alone["choices"][0]["text"] == b["choices"][0]["text"], prompt


@pytest.mark.slow  # ~1-2 min: 4,500 prompt tokens of prefill at the step size that keeps chains exact
def test_long_requests_never_fail_for_kv_space(server):
    """8 requests at once on the served default, one of ~1,850 prompt tokens (nearly its whole context window) and
    seven of ~370, 64 new tokens each: each row has its own KV stream of the context window, so all of them end 200
    with every token (before: HTTP 500, KV cache full once the rows together outgrew one shared window)."""
    def long_request(i: int) -> dict:
        sentences = 205 if i == 0 else 40  # ~9 tokens each
        prompt = f"Story {i}. " + "The old lighthouse keeper climbed the stairs again. " * sentences
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 64, "temperature": 0,
                "medusa": {"ignore_eos": True}}
        r = post(server, "/v1/completions", body, timeout=900)
        assert r.status_code == 200, r.text
        return r.json()

    with ThreadPoolExecutor(8) as pool:
        bodies = list(pool.map(long_request, range(8)))
    assert all(b["usage"]["completion_tokens"] == 64 for b in bodies), [b["usage"] for b in bodies]
    context = bodies[0]["usage"]["total_tokens"]
    assert context > 1880, context  # one row all but fills its window
    assert sum(b["usage"]["total_tokens"] for b in bodies) > 2 * context  # together they outgrow two windows
    assert max(b["medusa"]["batch_size"] for b in bodies) > 1


def test_batch_size_beyond_the_reserved_rows_is_a_config_error():
    """user_config.max_batch_size above the rows the llama.cpp context reserves KV space for is refused at
    reconfigure, naming both settings (a replica would otherwise hold requests it has no KV space for)."""
    from deployments.decoder import DecoderOptions, checked_options

    assert checked_options({"max_batch_size": 8}, 8) == DecoderOptions(max_batch_size=8)
    assert checked_options({"max_batch_size": 64}, None).max_batch_size == 64  # transformers: no fixed rows
    with pytest.raises(ValueError, match=r"max_batch_size=16 .*n_seq_max"):
        checked_options({"max_batch_size": 16}, 8)


@pytest.mark.parametrize("path", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_scaling_down_never_cuts_a_request_short(path):
    """A replica being scaled down has graceful_shutdown_timeout_s to finish the requests it holds, and a request
    may decode for up to the Decoder's request_timeout_s: a shorter grace period loses requests in flight (seen: 8
    long requests got 503 replica_failed when a downscaled replica was force-killed after 30 s)."""
    import yaml

    from deployments.decoder import DecoderOptions

    cfg = yaml.safe_load((REPO / path).read_text())
    decoder = deployment(cfg, "Decoder")
    timeout = DecoderOptions(**decoder.get("user_config", {})).request_timeout_s
    assert decoder["graceful_shutdown_timeout_s"] > timeout, (decoder["graceful_shutdown_timeout_s"], timeout)


M = MODEL.encode()
BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b'{"model": "' + M + b'", "prompt": "a", "prompt": "b"}', 400, None),
    ("/v1/completions", b'{"model": "' + M + b'", "prompt": "a", "temperature": NaN}', 400, None),
    ("/v1/completions", b'{"model": "' + M + b'", "prompt": "\xff\xfe"}', 400, None),
    ("/v1/completions", b"[" * 50_000 + b"]" * 50_000, 400, None),
    ("/v1/completions", b'{"model": "' + M + b'", "prompt": "' + b"a" * (2 << 20) + b'"}', 413, None),
    ("/v1/completions", b"", 400, None),
    ("/v1/completions", {"prompt": "hi"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "bogus": 1}, 400, "bogus"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 6}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hello " * 3000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "medusa": {"mode": "fast"}}, 400, "medusa.mode"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400,
     "messages.0.role"),
    ("/generate", {"prompt": "hi", "max_length": -1}, 400, "max_length"),
    ("/generate", {"prompt": "hi", "mode": "turbo"}, 400, "mode"),
    ("/generate/medusa", {"prompt": "hi", "max_length": 0}, 400, "max_length"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_gets_openai_error(server, path, body, status, param):
    if isinstance(body, bytes):
        r = httpx.post(f"{server.url}{path}", content=body, headers={"content-type": "application/json"}, timeout=60)
    else:
        r = post(server, path, body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert (error["param"] or "").startswith(param), error


def test_wrong_content_type_gets_415(server):
    r = httpx.post(f"{server.url}/v1/completions", content=json.dumps({"model": MODEL, "prompt": "hi"}),
                   headers={"content-type": "text/plain"}, timeout=60)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_server_still_serves_after_bad_input(server):
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
    assert complete(server, "Hello", 4)["usage"]["completion_tokens"] > 0


def test_batch_knobs_apply_live_through_user_config(server):
    """`serve deploy` with a new user_config reconfigures the running replicas (same pids, no restart)."""
    pids = server.decoder_pids()
    server.redeploy({"user_config": {"max_batch_size": 1, "batch_wait_timeout_s": 0.05}})
    with ThreadPoolExecutor(4) as pool:
        sizes = [b["medusa"]["batch_size"] for b in pool.map(lambda p: complete(server, p, 8), PROMPTS[:4])]
    assert sizes == [1, 1, 1, 1]
    server.redeploy({})
    with ThreadPoolExecutor(4) as pool:
        sizes = [b["medusa"]["batch_size"] for b in pool.map(lambda p: complete(server, p, 8), PROMPTS[:4])]
    assert max(sizes) > 1 and set(server.decoder_pids()) & set(pids)


@pytest.mark.slow  # ~35 s: two redeploys and a model load
def test_transformers_backend_serves_when_the_config_selects_it(server):
    """The same app on the reference backend (torch), whose Medusa trees pay on this CPU: batched == alone == plain,
    and with the shipped heads some steps accept more than one token."""
    assert SERVED_CONFIG != "configs/smollm2-135m.yaml"
    server.redeploy({}, config="configs/smollm2-135m.yaml")
    try:
        with ThreadPoolExecutor(3) as pool:
            together = list(pool.map(lambda p: complete(server, p, 16), PROMPTS[:3]))
        for prompt, body in zip(PROMPTS[:3], together):
            assert body["usage"]["completion_tokens"] > 0 and body["medusa"]["decode_steps"] >= 1
            assert complete(server, prompt, 16)["choices"][0]["text"] == body["choices"][0]["text"]  # == alone
        plain = complete(server, PROMPTS[0], 16, medusa={"mode": "plain"})
        assert plain["choices"][0]["text"] == together[0]["choices"][0]["text"]
        steps = [complete(server, "1, 2, 3, 4, 5, 6,", 48)["medusa"] for _ in range(3)]  # the policy learns
        assert max(s["mean_accepted_length"] for s in steps) > 1.0, steps
    finally:
        server.redeploy({})


@pytest.mark.slow  # ~60 s: sustained load, a replica start, the downscale delay
def test_autoscaling_up_under_load_and_back_down(server):
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}, "earlier tests' load did not drain"
    stop_at = time.monotonic() + 120
    peak = 0
    with ThreadPoolExecutor(8) as pool:
        while time.monotonic() < stop_at and peak < 2:
            batch = [pool.submit(complete, server, p, 24) for p in PROMPTS]
            while not all(f.done() for f in batch):
                peak = max(peak, server.decoder_replicas().get("RUNNING", 0))
                time.sleep(0.5)
    assert peak >= 2, "sustained load did not add a replica"
    assert server.wait_for_replicas({"RUNNING": 1}) == {"RUNNING": 1}, "replicas did not come back down after the load"
