"""The ingress's body guard and request schemas, without Ray: hostile JSON is refused with the right status."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.guards import BadBody, check_json
from deployments.openai_format import validation_error
from deployments.schemas import ChatRequest, CompletionRequest


@pytest.mark.parametrize("body, code", [
    (b'{"a": 1, "a": 2}', "duplicate_key"),
    (b'{"a": {"b": 1, "b": 1}}', "duplicate_key"),
    (b"[NaN]", "invalid_json"),
    (b'{"t": -Infinity}', "invalid_json"),
    (b"\xff\xfe", "invalid_utf8"),
    (b"[" * 200_000 + b"]" * 200_000, "too_deep"),
    (b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}", "too_deep"),
    (b"", "invalid_json"),
    (b"{", "invalid_json"),
])
def test_hostile_bodies_are_refused(body, code):
    with pytest.raises(BadBody) as e:
        check_json(body, max_depth=32)
    assert e.value.code == code and e.value.status == 400


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4),
                    max_leaves=20))
@settings(max_examples=200, deadline=None)
def test_any_plain_json_passes_the_guard(value):
    check_json(json.dumps(value).encode(), max_depth=32)


@given(st.dictionaries(st.sampled_from(["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "n",
                                        "seed", "stream", "medusa", "bogus"]),
                       st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.lists(st.text())))
@settings(max_examples=300, deadline=None)
def test_schema_accepts_or_names_the_field(body):
    """Whatever the body, validation either passes or yields one error naming what is wrong: never an exception."""
    from pydantic import ValidationError

    try:
        CompletionRequest.model_validate(body)
    except ValidationError as e:
        info = validation_error(e.errors())
        assert info.message and info.type == "invalid_request_error"


def test_schema_rules():
    ok = CompletionRequest.model_validate({"model": "m", "prompt": ["hi"], "stop": "x"})
    assert ok.prompt_text() == "hi" and ok.stop_strings() == ("x",) and ok.temperature == 1.0
    for bad in [{"model": "m", "prompt": "hi", "temperature": 0.5, "medusa": {"acceptance": "greedy"}},
                {"model": "m", "prompt": ["a", "b"]}, {"model": "m", "prompt": "hi", "stop": ["x"] * 5},
                {"model": "m", "prompt": "hi", "seed": -1}, {"model": "m", "prompt": "hi", "stream": 1}]:
        with pytest.raises(ValueError):
            CompletionRequest.model_validate(bad)
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                       "max_completion_tokens": 3})
    assert chat.max_completion_tokens == 3
