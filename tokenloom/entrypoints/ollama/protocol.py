"""The Ollama API's request and response bodies (pydantic models, also the OpenAPI document's schemas), its
default options and their mapping onto SamplingParams, and the documented error responses."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tokenloom.entrypoints.openai.protocol import ModelName, Text, TokenIdList, explained
from tokenloom.entrypoints.server_state import APIError, documented_errors
from tokenloom.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams

OLLAMA_DEFAULTS = dict(temperature=0.8, top_k=40, top_p=0.9)


# ---- schemas -------------------------------------------------------------------------------------------------
class OllamaError(BaseModel):
    error: str


ERRORS = documented_errors(OllamaError, "invalid options", "num_predict")


def _explain_inputs(value: Any) -> str:
    """Why an /api/embed input is neither a text nor a list of texts (none empty)."""
    if value == "" or value == []:
        return "must not be empty"
    for k, item in enumerate(value if isinstance(value, list) else []):
        if item == "":
            return f"item {k} is empty"
    return "must be a non-empty string or a list of non-empty strings"


class Options(BaseModel):
    """Model options; unknown ones are accepted and ignored, as Ollama does for options it cannot apply."""
    model_config = ConfigDict(extra="allow")

    temperature: float | None = Field(None, description="0 = greedy (default 0.8)")
    top_k: int | None = Field(None, description="default 40; 0 = off")
    top_p: float | None = Field(None, description="default 0.9")
    min_p: float | None = None
    num_predict: int | None = Field(None, description="Tokens to generate; -1 (default) or -2 = up to the context")
    stop: list[str] | str | None = None
    seed: int | None = None
    repeat_penalty: float | None = Field(None, description="Repetition penalty (1 = off, the default)")
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    num_ctx: int | None = Field(None, description="Ignored: the context window is the server's")


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName = Field(..., description="The served model's name (GET /api/tags), ':latest' optional")
    options: Options | None = None
    stream: bool = Field(True, description="Stream newline-delimited JSON objects (default true)")
    format: str | dict | None = Field(None, description="'json' (any JSON value) or a JSON schema the output matches")
    keep_alive: float | str | None = Field(None, description="Ignored (the model stays loaded)")
    think: bool | str | None = Field(None, description="Ignored")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, description="With logprobs: the top-N alternatives per token (0..20)")


class GenerateRequest(_Common):
    prompt: str | None = Field(None, description="Empty or missing: just report the model loaded")
    suffix: str | None = Field(None, description="Not supported")
    system: str | None = Field(None, description="System message for the chat template")
    template: str | None = Field(None, description="Ignored (Go templates): the model's chat template is used")
    context: TokenIdList | None = Field(None, description="Token ids (integers >= 0) from a previous response, "
                                                           "prepended")
    raw: bool = Field(False, description="Send the prompt as is, without the chat template")
    images: list[str] | None = Field(None, description="Not supported")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | None = None
    images: list[str] | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[dict] | None = Field(None, description="Functions the model may call; its calls come back as "
                                                        "message.tool_calls")


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: ModelName
    input: Annotated[Text | Annotated[list[Text], Field(min_length=1)], explained(_explain_inputs)] = Field(
        ..., description="A text or a list of texts (none empty)")
    truncate: bool = Field(True, description="Cut inputs to the context window (false: error instead)")
    options: Options | None = None
    keep_alive: float | str | None = None
    dimensions: int | None = None


class EmbeddingsRequest(BaseModel):
    """The legacy /api/embeddings body: one prompt, no truncation."""
    model_config = ConfigDict(extra="ignore")
    model: ModelName = Field(..., description="The served model's name (GET /api/tags), ':latest' optional")
    prompt: str = Field("", description="The text to embed; empty: an empty embedding (as Ollama answers)")
    options: Options | None = Field(None, description="Ignored")
    keep_alive: float | str | None = Field(None, description="Ignored (the model stays loaded)")


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = Field(None, description="Deprecated alias of model")
    verbose: bool = False


class ModelDetails(BaseModel):
    parent_model: str = ""
    format: str
    family: str
    families: list[str]
    parameter_size: str
    quantization_level: str


class _Stats(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class GenerateResponse(_Stats):
    response: str
    context: list[int] | None = None
    logprobs: list[dict] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[dict] | None = Field(None, description="[{'function': {'name', 'arguments': {...}}}]")


class ChatResponse(_Stats):
    message: AssistantMessage
    logprobs: list[dict] | None = None


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]]
    total_duration: int
    load_duration: int
    prompt_eval_count: int


class EmbeddingsResponse(BaseModel):
    embedding: list[float]


class TagModel(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int
    digest: str
    details: ModelDetails


class TagsResponse(BaseModel):
    models: list[TagModel]


class PsModel(TagModel):
    expires_at: str
    size_vram: int
    context_length: int


class PsResponse(BaseModel):
    models: list[PsModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


def ndjson_doc(what: str) -> dict:
    return {200: {"description": f"{what}; with stream=true (the default), newline-delimited JSON objects, the "
                                 "last with done=true and the timings",
                  "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}


def format_constraint(fmt: str | dict | None) -> StructuredOutputsParams | None:
    """Ollama's format: "json" (any JSON value; a JSON object, as Ollama's own grammar gives), a JSON schema, or
    empty (free text)."""
    if fmt in (None, "", {}):
        return None
    try:
        if fmt == "json":
            return StructuredOutputsParams(json_object=True)
        if isinstance(fmt, dict):
            return StructuredOutputsParams(json=fmt)
    except SamplingParamsError as exc:
        raise APIError(400, str(exc).replace("structured_outputs", "format", 1), param="format") from None
    raise APIError(400, f"format must be 'json' or a JSON schema, got {fmt!r}", param="format")


def to_sampling_params(opts: Options | None, logprobs: bool, top_logprobs: int | None,
                       structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    o = opts or Options()
    num_predict = o.num_predict
    if num_predict is not None and num_predict not in (-1, -2) and num_predict < 1:
        raise APIError(400, f"num_predict must be a positive number of tokens, or -1 / -2, got {num_predict}",
                       param="num_predict")
    if top_logprobs is not None and not 0 <= top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {top_logprobs}", param="top_logprobs")
    try:
        return SamplingParams(
            temperature=OLLAMA_DEFAULTS["temperature"] if o.temperature is None else o.temperature,
            top_k=OLLAMA_DEFAULTS["top_k"] if o.top_k is None else o.top_k,
            top_p=OLLAMA_DEFAULTS["top_p"] if o.top_p is None else o.top_p,
            min_p=o.min_p or 0.0,
            max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
            stop=o.stop, seed=o.seed,
            repetition_penalty=1.0 if o.repeat_penalty is None else o.repeat_penalty,
            presence_penalty=o.presence_penalty or 0.0, frequency_penalty=o.frequency_penalty or 0.0,
            logprobs=(top_logprobs or 0) if logprobs else None, structured_outputs=structured_outputs,
        )
    except SamplingParamsError as exc:
        param = {"repetition_penalty": "repeat_penalty", "max_tokens": "num_predict"}.get(exc.param, exc.param)
        raise APIError(400, str(exc).replace(exc.param, param, 1), param=param) from None
