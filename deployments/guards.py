"""An ASGI guard in front of the routes: a POST body must be bounded, UTF-8, strict JSON, sent as application/json.

It reads the body itself (at most `max_bytes`, whatever Content-Length says or whether the body is chunked, within
`timeout_s()` seconds), and rejects what FastAPI's parser would let through or choke on: duplicate keys (json keeps
the last one silently), NaN/Infinity literals, nesting deeper than `max_depth`, invalid UTF-8. A good body is replayed
to the app unchanged.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BadBody(ValueError):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise BadBody(400, f"duplicate key {dup[:64]!r} in JSON object", "duplicate_key")
    return dict(pairs)


def _no_constants(name: str) -> Any:
    raise BadBody(400, f"{name} is not valid JSON", "invalid_json")


def _depth(value: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, iteratively (so a deep body cannot exhaust the stack)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            if deepest > limit:
                return deepest
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def check_json(body: bytes, max_depth: int) -> None:
    """Raise BadBody unless `body` is UTF-8 strict JSON without duplicate keys, no deeper than max_depth."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody(400, "body is not valid UTF-8", "invalid_utf8") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as e:
        raise BadBody(400, f"body is not valid JSON ({e.msg} at character {e.pos})", "invalid_json") from None
    except RecursionError:  # the parser recurses once per nesting level
        raise BadBody(400, f"JSON nested deeper than {max_depth} levels", "too_deep") from None
    if _depth(value, max_depth) > max_depth:
        raise BadBody(400, f"JSON nested deeper than {max_depth} levels", "too_deep")


class BodyGuard:
    def __init__(self, app: Callable, max_bytes: int = 1 << 20, max_depth: int = 32,
                 reject: Callable[[int, str, str], Callable] | None = None,
                 timeout_s: Callable[[], float] = lambda: 30.0) -> None:
        self.app, self.max_bytes, self.max_depth, self.reject = app, max_bytes, max_depth, reject
        self.timeout_s = timeout_s  # read per request: the ingress's user_config changes it live

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            _check_content_type(scope)
            body = await self._read_within(receive, self.timeout_s())
            check_json(body, self.max_depth)
        except BadBody as e:
            return await self.reject(e.status, str(e), e.code)(scope, receive, send)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: disconnect notices
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read_within(self, receive: Receive, timeout_s: float) -> bytes:
        """The whole body within `timeout_s`: a client trickling its body (or sending less than its Content-Length)
        would hold one of the ingress's request slots until the proxy's request timeout, ten minutes."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._read(receive)
        except TimeoutError:
            raise BadBody(408, f"request body not received within {timeout_s:g} s", "body_timeout") from None

    async def _read(self, receive: Receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise BadBody(400, "client disconnected while sending the body", "disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise BadBody(413, f"request body over {self.max_bytes} bytes", "body_too_large")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _check_content_type(scope: Scope) -> None:
    headers = dict(scope.get("headers") or [])
    ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        raise BadBody(415, "send the body as application/json", "unsupported_media_type")
    length = headers.get(b"content-length")
    if length is not None and not length.isdigit():
        raise BadBody(400, "invalid Content-Length", "invalid_length")
