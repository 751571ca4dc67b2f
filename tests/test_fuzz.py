"""Fuzzing the real app over HTTP. Invalid requests (Schemathesis negative mode from the OpenAPI schema, Hypothesis
JSON) get a 4xx with the OpenAI error body. Valid requests (Schemathesis positive mode, greedy requests with stop
strings, prompts at the context limit) decode: never a 5xx or an error event, every 200 has the OpenAI shape (SSE
chunks then [DONE] when streaming), at most max_tokens tokens, and no stop string in the text. Uses the session's
`server` (conftest.py); every decode is real, so max_tokens stays at 1-4 tokens.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, example, given, note, settings
from hypothesis import strategies as st
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import BaseModel, ConfigDict
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance
from serve_harness import MODEL, REPO, SERVED_CONFIG, post
from test_reliability import CLIENT_TIMEOUT_S, is_error_body

from deployments.schemas import Usage

pytestmark = pytest.mark.ray
ST_CONFIG = Path(__file__).parent / "schemathesis.toml"
SERVED = yaml.safe_load((REPO / SERVED_CONFIG).read_text())  # the model config serve_config.yaml serves
CONTEXT, DEFAULT_TOKENS = SERVED["base_model"]["context_length"], SERVED["decoding"]["max_new_tokens"]
# No shrinking: each example is a real decode on the shared server, and shrinking a failure re-sends hundreds of them
# (minutes); the first failing example is reported as found.
FUZZ = settings(deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def test_schemathesis_negative_fuzz(server):
    """Schemathesis generates invalid requests from the app's own OpenAPI schema: every one must get a 4xx."""
    st_cli = Path(sys.executable).parent / "st"
    run = subprocess.run([str(st_cli), "--config-file", str(ST_CONFIG), "run", f"{server.url}/openapi.json",
                          "--mode", "negative", "--max-examples", "30", "--checks",
                          "not_a_server_error,negative_data_rejection", "--request-timeout", "60", "--no-color"],
                         check=False, capture_output=True, text=True, timeout=900)
    tail = run.stdout[-3000:]
    assert run.returncode == 0, tail
    generated, passed = map(int, re.search(r"(\d+) generated, (\d+) passed", run.stdout).groups())
    print(f"schemathesis: {generated} cases generated, {passed} passed (4xx)")
    assert generated == passed > 100
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=False)
    | st.text(max_size=50),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=10), c, max_size=3), max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "stop", "stream", "seed", "n",
          "medusa", "max_length", "mode", "bogus"]


@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/generate", "/generate/medusa", "/compare"]),
       body=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=6) | JSON_VALUES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_hypothesis_json_fuzz_gets_4xx(server, path, body):
    """Arbitrary JSON (wrong types, huge numbers, unicode, nesting, unknown fields) on every POST route: 4xx."""
    if isinstance(body, dict) and "max_tokens" not in body and "max_length" not in body:
        body["max_tokens"] = -1  # keep every case invalid: a valid request would just decode
    r = httpx.post(f"{server.url}{path}", content=json.dumps(body), headers={"content-type": "application/json"},
                   timeout=CLIENT_TIMEOUT_S)
    assert 400 <= r.status_code < 500 and is_error_body(r), (r.status_code, r.text[:300])


# ---- what a 200 must look like ------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MedusaStats(_Strict):
    """The `medusa` object of every response, as the README lists it."""

    mode: Literal["medusa", "plain"]
    prompt_tokens: int
    generated_tokens: int
    decode_steps: int
    mean_accepted_length: float
    accepted_per_head: list[int]
    accept_len_histogram: list[int]
    time_to_first_token_s: float
    wall_time_s: float
    tokens_per_second: float
    batch_size: int
    queue_wait_s: float


class _TextChoice(_Strict):
    index: Literal[0]
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None


class _CompletionChunk(_Strict):  # the openai client parses these without validating, so we hold them to this
    id: str
    object: Literal["text_completion"]
    created: int
    model: Literal[MODEL]
    choices: list[_TextChoice]
    medusa: MedusaStats | None = None
    usage: Usage | None = None


class _Legacy(_Strict):
    text: str
    generation_time: float
    tokens_generated: int
    tokens_per_second: float
    acceptance_rate: float
    mode: Literal["medusa", "normal"]
    medusa: MedusaStats


@dataclass(frozen=True)
class Reply:
    text: str
    finish_reason: str | None  # None for /generate, which does not say


def check_reply(path: str, body: dict, r: httpx.Response) -> Reply:
    """A 200 answer to `body` on `path`: its shape, and its token counts and text against what was asked."""
    assert r.status_code == 200, (r.status_code, r.text[:500])
    if path.startswith("/generate") or path == "/compare":
        runs = [r.json()["medusa"], r.json()["normal"]] if path == "/compare" else [r.json()]
        for run in runs:
            legacy = _Legacy.model_validate(run)
            assert legacy.tokens_generated == legacy.medusa.generated_tokens <= body.get("max_length", 128)
            assert 0 <= legacy.acceptance_rate <= 1 and legacy.generation_time >= 0
        return Reply(runs[0]["text"], None)
    chat = path == "/v1/chat/completions"
    text, finish, usage, stats = read_stream(r, chat, body) if body.get("stream") else read_whole(r, chat)
    assert finish in ("stop", "length")
    n, default = stats.generated_tokens, min(DEFAULT_TOKENS, CONTEXT - stats.prompt_tokens)
    limit = ((body.get("max_completion_tokens") if chat else None) or body.get("max_tokens") or default)
    assert stats.prompt_tokens + limit <= CONTEXT
    assert n <= limit and (finish == "stop" or n == limit), (finish, n, limit)
    # A step follows a token that was not EOS (uncounted), so there are at least as many tokens as steps.
    assert stats.decode_steps <= n and (stats.decode_steps == 0 or stats.mean_accepted_length >= 1), stats
    assert stats.prompt_tokens >= 1 and stats.mode == body.get("medusa", {}).get("mode", "medusa")
    if usage is not None:
        assert (usage.prompt_tokens, usage.completion_tokens) == (stats.prompt_tokens, n)
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    stops = body.get("stop") or []
    for s in [stops] if isinstance(stops, str) else stops:
        assert s not in text, (s, text)
    return Reply(text, finish)


def read_whole(r: httpx.Response, chat: bool) -> tuple[str, str, Usage, MedusaStats]:
    body = r.json()
    whole = (ChatCompletion if chat else Completion).model_validate(body)  # what the openai client parses
    assert whole.model == MODEL and len(whole.choices) == 1 and whole.usage is not None
    choice = whole.choices[0]
    text = choice.message.content if chat else choice.text
    if chat:
        assert choice.message.role == "assistant"
    return text or "", choice.finish_reason, Usage.model_validate(body["usage"]), MedusaStats.model_validate(
        body["medusa"])


def read_stream(r: httpx.Response, chat: bool, body: dict) -> tuple[str, str, Usage | None, MedusaStats]:
    """SSE: `data: <json>` events, one per decode step, the last with finish_reason and the stats, then the usage
    chunk if asked for, then `data: [DONE]`. An error event after the 200 is a server error in disguise."""
    assert r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""], r.text[-300:]
    payloads = []
    for e in events[:-2]:
        assert e.startswith("data: ") and "\n" not in e, e
        payloads.append(json.loads(e.removeprefix("data: ")))
    assert not [p for p in payloads if "error" in p], payloads
    usage = None
    if (body.get("stream_options") or {}).get("include_usage"):
        last = payloads.pop()
        assert last["choices"] == [] and last["id"] == payloads[0]["id"]
        usage = Usage.model_validate(last["usage"])
    if chat:
        chunks = [ChatCompletionChunk.model_validate(p) for p in payloads]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and len(c.choices) == 1 for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
    else:
        chunks = [_CompletionChunk.model_validate(p) for p in payloads]
        assert all(len(c.choices) == 1 and c.usage is None for c in chunks)
        text = "".join(c.choices[0].text for c in chunks)
    assert len({c.id for c in chunks}) == 1 and all(c.model == MODEL for c in chunks)
    reasons = [c.choices[0].finish_reason for c in chunks]
    assert all(f is None for f in reasons[:-1]) and reasons[-1] is not None, reasons
    return text, reasons[-1], usage, MedusaStats.model_validate(payloads[-1]["medusa"])


# ---- valid requests ----------------------------------------------------------------------------------------


# Control characters that SmolLM2's vocabulary has no byte token for (llama.cpp's tokenizer and ours both drop them):
# a prompt of only these has no tokens and gets the documented "prompt is empty" 400.
UNTOKENIZED = "\x04\x06\x13\x14\x16\x1d"


def bounded_schema(schema: dict) -> dict:
    """The app's OpenAPI schema narrowed to requests that decode quickly and that the schema alone can call valid:
    the served model, 1-4 new tokens, short texts, no timeout_s (a client's own short timeout is a documented 504),
    no greedy acceptance, which needs temperature 0 (a rule across fields that JSON Schema here cannot state), and
    no prompt made only of UNTOKENIZED characters."""
    schema = copy.deepcopy(schema)
    defs = schema["components"]["schemas"]
    tokens = {"type": "integer", "minimum": 1, "maximum": 4}
    for name in ("CompletionRequest", "ChatRequest"):
        props = defs[name]["properties"]
        props["model"] = {"const": MODEL}
        props["max_tokens"] = tokens
        defs[name]["required"].append("max_tokens")  # the default, 256 tokens, is slow here
    defs["ChatRequest"]["properties"]["max_completion_tokens"] = {"anyOf": [tokens, {"type": "null"}]}
    defs["ChatRequest"]["properties"]["messages"]["maxItems"] = 3
    defs["ChatMessage"]["properties"]["content"]["maxLength"] = 200
    for name in ("GenerateRequest", "PromptRequest"):
        defs[name]["properties"]["max_length"] = tokens
        defs[name]["required"].append("max_length")
    for name in ("CompletionRequest", "GenerateRequest", "PromptRequest"):
        options = defs[name]["properties"]["prompt"].get("anyOf", [defs[name]["properties"]["prompt"]])
        for string in [*options, *(o["items"] for o in options if "items" in o)]:  # a string, or a list of one
            if string.get("type") == "string":
                string.update(maxLength=200, pattern=f"[^{re.escape(UNTOKENIZED)}]")
    # FastAPI writes bounds as floats: seed's "< 2**63" became 9.223372036854776e18, which Schemathesis reads loosely
    # enough to draw 2**63 + 191. The exact integer bound:
    seed = {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 2**63 - 1}, {"type": "null"}]}
    defs["CompletionRequest"]["properties"]["seed"] = defs["ChatRequest"]["properties"]["seed"] = seed
    options = defs["MedusaOptions"]["properties"]
    del options["timeout_s"]
    options["acceptance"] = {"enum": ["typical", "lossless", None]}
    return schema


INTEGERS = {"max_tokens", "max_completion_tokens", "max_length", "seed", "n"}
EXAMPLES = {"/v1/completions": 15, "/v1/chat/completions": 15, "/generate": 8, "/compare": 6}  # other routes: 2


def test_schemathesis_positive_fuzz_decodes(server):
    """Schemathesis generates valid requests from the (narrowed) OpenAPI schema, route by route: every one is
    accepted (200), and every 200 passes check_reply."""
    raw = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    config = schemathesis.config.SchemathesisConfig.from_path(ST_CONFIG)
    schema = schemathesis.openapi.from_dict(bounded_schema(raw), config=config)

    def call(case):
        if isinstance(case.body, dict):  # JSON Schema counts 4.0 as an integer; this server's strict fields do not
            case.body.update({k: int(v) for k, v in case.body.items() if k in INTEGERS and isinstance(v, float)})
        r = case.call(base_url=server.url, timeout=CLIENT_TIMEOUT_S)
        case.validate_response(r, checks=[not_a_server_error, positive_data_acceptance])
        if case.method == "POST":
            headers = [(k, v) for k, values in r.headers.items() for v in values]  # Schemathesis: name -> list
            check_reply(case.path, case.body, httpx.Response(r.status_code, headers=headers, content=r.content))

    operations = [result.ok() for result in schema.get_all_operations()]
    assert set(EXAMPLES) <= {op.path for op in operations}
    for op in operations:
        strategy = op.as_strategy(generation_mode=schemathesis.GenerationMode.POSITIVE)
        settings(FUZZ, max_examples=EXAMPLES.get(op.path, 2))(given(case=strategy)(call))()


STOP_CHARS = st.characters(codec="utf-8")  # any code point a JSON body can carry (no lone surrogates)
UNICODE_TEXT = st.text(STOP_CHARS, min_size=1, max_size=40) | st.sampled_from(
    ["The capital of France is", "def add(a, b):\n", "日本の首都は", "Ünïcödé ✓ 🙂 and \u200b zero width",
     "\x00\x01 control\tchars\r\n", "1, 2, 3, 4,"])
RANDOM_STOPS = st.lists(st.sampled_from([" ", "e", ",", ".", "\n", "the", "I"]) | st.text(STOP_CHARS, min_size=1,
                                                                                            max_size=4), max_size=3)


@given(chat=st.booleans(), prompt=UNICODE_TEXT, max_tokens=st.integers(1, 4), stream=st.booleans(),
       usage=st.booleans(), mode=st.sampled_from(["medusa", "plain"]), data=st.data())
@settings(FUZZ, max_examples=25)
def test_stop_strings_cut_the_greedy_text_at_their_first_match(server, chat, prompt, max_tokens, stream, usage,
                                                             mode, data):
    """A greedy request without stop strings gives the reference text; the same request with a stop string drawn
    from that text (plus random ones) must return the reference cut just before a stop, never past the drawn one's
    first match, and exactly at it when it is the only stop. Unicode prompts, chat and completions, streaming or not:
    the stop check runs on text that streaming holds back and detokenization builds up piece by piece."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "medusa": {"mode": mode, "ignore_eos": True},
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    full = check_reply(path, body, post(server, path, body)).text
    if not full:
        return  # only special tokens decoded: nothing to cut
    start = data.draw(st.integers(0, len(full) - 1), label="start")
    drawn = full[start : start + data.draw(st.integers(1, min(4, len(full) - start)), label="length")]
    stops = data.draw(st.permutations([drawn, *data.draw(RANDOM_STOPS, label="others")]), label="stops")
    cut = {**body, "stop": stops, "stream": stream, **({"stream_options": {"include_usage": usage}} if stream else {})}
    note(f"reference: {full!r}; request: {json.dumps(cut)}")
    reply = check_reply(path, cut, post(server, path, cut))
    assert reply.finish_reason == "stop" and full.startswith(reply.text), (full, reply)
    assert any(full[len(reply.text):].startswith(s) for s in stops), (full, reply.text, stops)
    assert len(reply.text) <= full.index(drawn)
    if len(stops) == 1:
        assert reply.text == full[: full.index(drawn)]


def test_a_stop_string_never_matches_a_character_still_arriving(server):
    """Found by the fuzz above: this greedy reply's 🌟 arrives as three tokens, the first two decoding to U+FFFD, and
    a "\ufffd" stop matched that placeholder and cut the reply to "". Only the reply's real last character may match."""
    path, prompt = "/v1/chat/completions", "\u00ab\u0093\U000d5391\u00bfB"
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 4, "temperature": 0,
            "medusa": {"ignore_eos": True}}
    assert check_reply(path, body, post(server, path, body)).text == "🌟\ufffd"  # then a character cut by max_tokens
    for stream in (False, True):
        cut = {**body, "stop": ["\ufffd"], "stream": stream}
        assert check_reply(path, cut, post(server, path, cut)) == Reply("🌟", "stop")


@given(temperature=st.floats(0, 1e-30, exclude_min=True), acceptance=st.sampled_from([None, "typical", "lossless"]),
       mode=st.sampled_from(["medusa", "plain"]), seed=st.integers(0, 2**63 - 1))
@example(temperature=1e-40, acceptance=None, mode="medusa", seed=0)
@settings(FUZZ, max_examples=6)
def test_a_tiny_temperature_decodes_like_greedy(server, temperature, acceptance, mode, seed):
    """As the temperature goes to 0 sampling becomes greedy: at <= 1e-30 no logit gap is small enough to tell apart
    (before: below ~1e-37 logits / temperature overflowed float32 and the NaN probabilities picked token 0, EOS)."""
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
            "medusa": {"mode": mode, "ignore_eos": True}}
    greedy = check_reply("/v1/completions", body, post(server, "/v1/completions", body)).text
    tiny = {**body, "temperature": temperature, "seed": seed,
            "medusa": {**body["medusa"], **({"acceptance": acceptance} if acceptance else {})}}
    assert check_reply("/v1/completions", tiny, post(server, "/v1/completions", tiny)).text == greedy


# ---- the context limit -------------------------------------------------------------------------------------


def the_prompt(tokens: int) -> str:
    """`tokens` tokens of text: "the" and " the" are one token each (each reply's usage.prompt_tokens checks it)."""
    return "the" + " the" * (tokens - 1)


def test_prompt_at_the_context_limit_decodes_and_one_more_token_is_refused(server):
    """prompt + max_tokens == context decodes to the last cell (Medusa steps verify past it, so the backend must
    keep room for the tree); one token more in either is the documented 400, before any prefill."""
    body = {"model": MODEL, "prompt": the_prompt(CONTEXT - 4), "max_tokens": 4, "temperature": 0,
            "medusa": {"ignore_eos": True}}
    r = post(server, "/v1/completions", body)
    check_reply("/v1/completions", body, r)
    assert r.json()["usage"] == {"prompt_tokens": CONTEXT - 4, "completion_tokens": 4, "total_tokens": CONTEXT}
    for path, over, param in [
        ("/v1/completions", {**body, "max_tokens": 5}, "max_tokens"),
        ("/v1/completions", {**body, "prompt": the_prompt(CONTEXT), "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": the_prompt(CONTEXT)}, "prompt"),  # default max_tokens
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": the_prompt(CONTEXT)}]},
         "prompt"),
        ("/generate", {"prompt": the_prompt(CONTEXT - 4), "max_length": 5}, "max_tokens"),
    ]:
        r = post(server, path, over)
        assert r.status_code == 400 and is_error_body(r) and r.json()["error"]["param"] == param, (path, r.text)


def chat_template_tokens(server) -> int:
    """Tokens the chat template adds around one user message (a reply's usage.prompt_tokens counts them)."""
    probe = {"model": MODEL, "messages": [{"role": "user", "content": "the"}], "max_tokens": 1}
    return post(server, "/v1/chat/completions", probe).json()["usage"]["prompt_tokens"] - 1


@pytest.mark.slow  # ~18 s each: a prefill of 2,000 tokens on one core
@pytest.mark.parametrize("case", ["chat-stream", "completion-stream-plain", "generate", "default-max-tokens"])
def test_every_route_decodes_at_the_context_limit(server, case):
    """The same boundary on the other routes, streaming, plain decoding, and the default max_tokens (capped to the
    one token the context leaves)."""
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    if case == "chat-stream":
        content = the_prompt(CONTEXT - 3 - chat_template_tokens(server))
        path, body = "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": content}],
                                              "max_tokens": 3, **stream}
    elif case == "completion-stream-plain":
        path, body = "/v1/completions", {"model": MODEL, "prompt": the_prompt(CONTEXT - 3), "max_tokens": 3,
                                         "medusa": {"mode": "plain"}, **stream}
    elif case == "generate":
        path, body = "/generate", {"prompt": the_prompt(CONTEXT - 3), "max_length": 3}
    else:
        path, body = "/v1/completions", {"model": MODEL, "prompt": the_prompt(CONTEXT - 1)}
    check_reply(path, body, post(server, path, body))
