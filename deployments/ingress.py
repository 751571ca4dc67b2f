"""The HTTP ingress: OpenAI-compatible routes, the original service's /generate and /compare, /health.

Validation, routing and streaming only: every route turns its body into one `medusa_core.request.Request` and
reads the decoder's stream of `DecodeChunk`s. No tensor code here. Every error, ours or the framework's, leaves as
one OpenAI-style body `{"error": {"message", "type", "param", "code"}}` and never carries a stack trace or a path.
No `from __future__ import annotations` here: FastAPI reads the route annotations at runtime to find the bodies.
"""

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import (BackPressureError, DeploymentUnavailableError, RayServeException,
                                  ReplicaUnavailableError)
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from deployments import openai_format as fmt
from deployments.guards import BodyGuard
from deployments.schemas import (ChatRequest, CompletionRequest, DecodeChunk, ErrorInfo,
                                 GenerateRequest, PromptRequest, SamplingFields)
from medusa_core.request import Request, SamplingParams

logger = logging.getLogger("ray.serve")
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 1
HEALTH_TIMEOUT_S = 5.0
REPLICA_CHECK_S = 1.0  # how often a request waiting for its first chunk checks that a replica still runs
HEALTH_CACHE_S = 1.0  # /health asks the Serve controller at most once a second, however often it is probed
# A replica that died under a request: Ray raises ActorDiedError & co. (RayError) on a call in flight, and its router
# ReplicaUnavailableError / DeploymentUnavailableError (not RayErrors) on one it was about to send.
REPLICA_LOST = (RayError, ReplicaUnavailableError, DeploymentUnavailableError)


class IngressOptions(BaseModel):
    """The ingress's `user_config` in serve_config.yaml, applied live by `reconfigure()`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    body_timeout_s: float = Field(30, gt=0, le=600, description="A request body not fully received this long after "
                                  "the request reached the ingress gets a 408: a slow client holds an ingress slot.")


app = FastAPI(title="medusa-serve", description="Medusa speculative decoding, OpenAI-compatible API.")
app.state.options = IngressOptions()


class ServeError(Exception):
    def __init__(self, status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> None:
        self.status, self.info, self.headers = status, info, headers or {}


def error_response(status: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": info.model_dump()}, status_code=status, headers=headers)


@app.exception_handler(ServeError)
async def _serve_error(request: HTTPRequest, e: ServeError) -> JSONResponse:
    return error_response(e.status, e.info, e.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: HTTPRequest, e: RequestValidationError) -> JSONResponse:
    return error_response(400, fmt.validation_error(e.errors()))


@app.exception_handler(HTTPException)
async def _http_error(request: HTTPRequest, e: HTTPException) -> JSONResponse:
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(e.status_code, ErrorInfo(message=str(e.detail), type=kind), getattr(e, "headers", None))


@app.exception_handler(Exception)
async def _unexpected(request: HTTPRequest, e: Exception) -> JSONResponse:
    logger.exception("unhandled error in %s %s", request.method, request.url.path)
    return error_response(500, ErrorInfo(message="internal server error", type="server_error"))


def _reject(status: int, message: str, code: str) -> JSONResponse:
    return error_response(status, ErrorInfo(message=message, code=code))


app.add_middleware(BodyGuard, max_bytes=MAX_BODY_BYTES, reject=_reject,
                   timeout_s=lambda: app.state.options.body_timeout_s)


@serve.deployment
@serve.ingress(app)
class Ingress:
    def __init__(self, decoder: DeploymentHandle, model: str, backend: str) -> None:
        self.decoder, self.model, self.backend = decoder, model, backend
        self.app_name = serve.get_replica_context().app_name
        self.replicas: tuple[float, dict[str, int]] = (-HEALTH_CACHE_S, {})  # (when asked, decoder replica states)
        self.served = False  # whether /health has seen a running decoder replica yet
        self.asking: asyncio.Future | None = None  # the question to the controller in flight, if any

    def reconfigure(self, user_config: dict) -> None:
        app.state.options = IngressOptions.model_validate(user_config)

    @app.get("/health")
    async def health(self) -> JSONResponse:
        """200 while Serve's controller counts a running decoder replica. The controller health-checks every replica
        itself (`Decoder.check_health`: a failed or stuck decode step, or no answer) without taking a request slot;
        a call to the decoder would wait behind its requests, so a busy, healthy server would look down."""
        try:
            replicas = await asyncio.wait_for(self._decoder_replicas(), HEALTH_TIMEOUT_S)
        except (TimeoutError, RayError, RayServeException) as e:
            # Before any decoder replica has run, a slow controller is start-up, not a failure worth a warning.
            level = logging.WARNING if self.served else logging.INFO
            logger.log(level, "health check: the Serve controller did not answer (%s)", type(e).__name__)
            replicas = {}
        if replicas.get("RUNNING", 0) < 1:
            return error_response(503, fmt.no_replica(), {"Retry-After": str(RETRY_AFTER_S)})
        self.served = True
        return JSONResponse({"status": "ok", "model": self.model, "backend": self.backend,
                             "decoder_replicas": replicas})

    async def _decoder_replicas(self) -> dict[str, int]:
        """Decoder replicas per state, as the controller sees them, at most a second old; concurrent callers share
        one question to the controller (serve.status() blocks: it runs in a thread)."""
        asked, replicas = self.replicas
        if time.monotonic() - asked < HEALTH_CACHE_S:
            return replicas
        if self.asking is None or self.asking.done():
            self.asking = asyncio.ensure_future(asyncio.to_thread(self._read_replicas))
        return await asyncio.shield(self.asking)  # a caller's timeout leaves the question to the others

    def _read_replicas(self) -> dict[str, int]:
        status = serve.status().applications.get(self.app_name)
        deployment = status.deployments.get(self.decoder.deployment_name) if status is not None else None
        states = deployment.replica_states if deployment is not None else {}
        replicas = {str(getattr(state, "value", state)): n for state, n in states.items()}
        self.replicas = (time.monotonic(), replicas)
        return replicas

    @app.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "medusa-serve",
                                            "created": 0}]}

    @app.post("/v1/completions")
    async def completions(self, body: CompletionRequest):
        inp = self._input(body, prompt=body.prompt_text(), max_tokens=body.max_tokens)
        return await self._respond(body, inp, fmt.completion_chunk, fmt.completion)

    @app.post("/v1/chat/completions")
    async def chat(self, body: ChatRequest):
        messages = tuple({"role": m.role, "content": m.content} for m in body.messages)
        inp = self._input(body, messages=messages, max_tokens=body.max_completion_tokens or body.max_tokens)
        return await self._respond(body, inp, fmt.chat_chunk, fmt.chat_completion)

    @app.post("/generate")
    async def generate(self, body: GenerateRequest) -> dict:
        return await self._generate(body, body.mode)

    # The original services' routes: the path names the mode.
    @app.post("/generate/medusa")
    async def generate_medusa(self, body: PromptRequest) -> dict:
        return await self._generate(body, "medusa")

    @app.post("/generate/normal")
    async def generate_normal(self, body: PromptRequest) -> dict:
        return await self._generate(body, "normal")

    @app.post("/compare")
    async def compare(self, body: PromptRequest) -> dict:
        # One after the other, so neither slows the other down.
        return fmt.legacy_compare(await self._generate(body, "medusa"), await self._generate(body, "normal"))

    async def _generate(self, body: PromptRequest, mode: str) -> dict:
        inp = Request(prompt=body.prompt, max_tokens=body.max_length, mode="medusa" if mode == "medusa" else "plain",
                      received_at=time.time())
        return fmt.legacy_generate(*await self._collect(inp), mode=mode)

    def _input(self, body: SamplingFields, **text) -> Request:
        if body.model != self.model:
            raise ServeError(404, ErrorInfo(message=f"model {body.model!r} does not exist; this server has "
                                            f"{self.model!r}", type="not_found_error", param="model",
                                            code="model_not_found"))
        sampling = SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                                  acceptance=body.medusa.acceptance)
        return Request(**text, sampling=sampling, stop=body.stop_strings(), mode=body.medusa.mode,
                       ignore_eos=body.medusa.ignore_eos, timeout_s=body.medusa.timeout_s, received_at=time.time())

    async def _start(self, inp: Request) -> tuple[DecodeChunk, AsyncIterator[DecodeChunk]]:
        """Open the decoder stream and read its first chunk, so errors become a status code before any byte."""
        retry = {"Retry-After": str(RETRY_AFTER_S)}
        no_replica = ServeError(503, fmt.no_replica(), retry)
        if not await self._a_replica_may_serve():
            raise no_replica
        stream = self.decoder.options(stream=True).stream.remote(inp)
        first = asyncio.ensure_future(stream.__anext__())
        try:
            # Serve's router holds a request until a replica can take it; if every replica is lost meanwhile (a node
            # died), that is until one is back, so the wait is checked every second against the controller's count.
            while not (await asyncio.wait({first}, timeout=REPLICA_CHECK_S))[0]:
                if not await self._a_replica_may_serve():
                    first.cancel()
                    stream.cancel()
                    raise no_replica
            first = first.result()
        except BackPressureError:
            raise ServeError(503, ErrorInfo(message="server overloaded: the request queue is full, retry later",
                                            type="server_error", code="queue_full"), retry) from None
        except REPLICA_LOST:
            raise ServeError(503, fmt.replica_lost(), retry) from None
        if first.error is not None:
            raise ServeError(first.status, first.error, retry if first.status == 503 else None)
        return first, self._rest(stream)

    async def _a_replica_may_serve(self) -> bool:
        """False when the controller knows the decoder but counts no running replica (its node is gone, every replica
        is restarting): a request would wait in Serve's router until one is back, so it is refused at once instead.
        True when a replica runs, or when the controller does not answer in time (the request goes ahead)."""
        try:
            replicas = await asyncio.wait_for(self._decoder_replicas(), HEALTH_TIMEOUT_S)
        except (TimeoutError, RayError, RayServeException):
            return True
        return not replicas or replicas.get("RUNNING", 0) > 0

    async def _rest(self, stream: AsyncIterator[DecodeChunk]) -> AsyncIterator[DecodeChunk]:
        """The stream after its first chunk; a replica lost on the way becomes one last error chunk, so a stream
        ends with an error event and [DONE], never a cut connection or a hang."""
        try:
            async for chunk in stream:
                yield chunk
        except REPLICA_LOST:
            yield DecodeChunk(error=fmt.replica_lost(), status=503)

    async def _collect(self, inp: Request) -> tuple[str, DecodeChunk]:
        first, stream = await self._start(inp)
        text, last = first.text, first
        async for chunk in stream:
            if chunk.error is not None:
                raise ServeError(chunk.status, chunk.error, {"Retry-After": str(RETRY_AFTER_S)}
                                 if chunk.status == 503 else None)
            text, last = text + chunk.text, chunk
        return text, last

    async def _respond(self, body: SamplingFields, inp: Request, chunk_fn, whole_fn):
        rid = fmt.new_id()
        if not body.stream:
            return whole_fn(rid, self.model, *await self._collect(inp))
        first, stream = await self._start(inp)
        usage = body.stream_options is not None and body.stream_options.include_usage
        events = fmt.sse(rid, self.model, first, stream, chunk_fn, usage)
        return StreamingResponse(events, media_type="text/event-stream")
