"""HTTP schemas: the OpenAI-compatible subset we serve, the legacy /generate and /compare bodies, and the messages
that travel between the ingress and the decoder replicas. Pure pydantic: no ray, no torch.

Requests are strict (`extra="forbid"`, no type coercion, no NaN/inf) so a malformed body gets a 400 that names the
field instead of a guess. Medusa controls ride in the optional `medusa` extension field, which the `openai` client
sends through `extra_body`.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from medusa_core.request import Acceptance, Mode, Stats

MAX_STOP = 4  # as OpenAI: at most four stop strings
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 200_000  # far above any context window; the decoder checks tokens exactly


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


Text = Annotated[str, StringConstraints(max_length=MAX_PROMPT_CHARS)]
# An empty prompt has no token to decode from. Stating it (and the stop count) in the type puts it in the OpenAPI
# schema, so a client generated from the schema (or Schemathesis) does not send what the server refuses.
Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


class MedusaOptions(Strict):
    """Extension field `medusa`: how to decode this request."""

    mode: Mode = Field("medusa", description="medusa: tree speculation; plain: one token a step.")
    acceptance: Acceptance | None = Field(
        None, description="Acceptance rule; default greedy at temperature 0, lossless above it (exact, seedable).")
    ignore_eos: bool = Field(False, description="Decode max_tokens tokens even past the end-of-sequence token.")
    timeout_s: float | None = Field(None, gt=0, description="End the request with a 504 after this many seconds "
                                    "(the server's request_timeout_s caps it).")


class StreamOptions(Strict):
    include_usage: bool = False


class SamplingFields(Strict):
    """Fields shared by completions and chat completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="New tokens; default: the model config's, capped to fit.")
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = Field(
        None, description=f"Up to {MAX_STOP} stop strings.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=1, description="Only n=1 is supported.")
    user: str | None = Field(None, max_length=256)
    medusa: MedusaOptions = MedusaOptions()

    @model_validator(mode="after")
    def _greedy_needs_zero_temperature(self) -> SamplingFields:
        if self.medusa.acceptance == "greedy" and self.temperature > 0:
            raise ValueError("medusa.acceptance 'greedy' needs temperature 0")
        return self

    def stop_strings(self) -> tuple[str, ...]:
        return () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingFields):
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)] = Field(
        description="The prompt: a string, or a list holding one string.")

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text
    name: str | None = Field(None, max_length=64)


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1, description="Newer name for max_tokens.")


class PromptRequest(Strict):
    """The original services' body of /compare and /generate/{medusa,normal}. `max_length` counts new tokens;
    decoding is greedy."""

    prompt: Prompt
    max_length: int = Field(128, ge=1)


class GenerateRequest(PromptRequest):
    """The original service's /generate body: the mode is a field."""

    mode: Literal["medusa", "normal"] = "medusa"


# ---- ingress -> decoder -> ingress -------------------------------------------------------------------------


class ErrorInfo(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class DecodeChunk(BaseModel):
    """What the decoder streams back: text gained in one step; the last chunk has finish_reason and stats."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    stats: Stats | None = None
    error: ErrorInfo | None = None
    status: int = 200


# ---- responses ---------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
