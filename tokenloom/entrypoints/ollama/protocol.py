"""The Ollama API's request and response bodies (pydantic models, also the OpenAPI document's schemas), its
default options and their mapping onto SamplingParams, and the documented error responses."""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, \
    create_model, model_validator
from pydantic_core import PydanticCustomError

from tokenloom.entrypoints.openai.protocol import (
    STRICT,
    Integer,
    integer,
    LogprobCount,
    ModelName,
    Penalty,
    Positive,
    Seed,
    Share,
    Temperature,
    Text,
    TokenIdList,
    TopP,
    explained,
)
from tokenloom.config import DURATION_PATTERN
from tokenloom.loader.created import NAME_PATTERN
from tokenloom.loader.modelfile import PARAMETER_TYPES, ModelfileError, check_parameters
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
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    temperature: Temperature | None = Field(None, description="0 = greedy (default 0.8)")
    top_k: integer(ge=0) | None = Field(None, description="default 40; 0 = off")
    top_p: TopP | None = Field(None, description="In (0, 1] (default 0.9)")
    min_p: Share | None = None
    num_predict: Literal[-2, -1] | integer(ge=1) | None = Field(
        None, description="Tokens to generate; -1 (default) or -2 = up to the context")
    stop: list[str] | str | None = None
    seed: Seed | None = None
    repeat_penalty: Positive | None = Field(None, description="Repetition penalty (1 = off, the default)")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    num_ctx: Integer | None = Field(None, description="Ignored: the context window is the server's")


KeepAlive = float | Annotated[str, Field(pattern=DURATION_PATTERN)]
KEEP_ALIVE_DOC = ("How long the model stays loaded after this request: seconds, or a duration such as \"5m\"; 0 "
                  "unloads it at once, negative keeps it (default: the server's --keep-alive; ignored by "
                  "`tokenloom serve MODEL`, which keeps its model)")


class _Common(BaseModel):
    model_config = STRICT
    model: ModelName = Field(..., description="A model name from GET /api/tags (NAME[:TAG], ':latest' optional)")
    options: Options | None = None
    stream: bool = Field(True, description="Stream newline-delimited JSON objects (default true)")
    format: str | dict | None = Field(None, description="'json' (any JSON value) or a JSON schema the output matches")
    keep_alive: KeepAlive | None = Field(None, description=KEEP_ALIVE_DOC)
    think: bool | str | None = Field(None, description="Ignored")
    logprobs: bool = False
    top_logprobs: LogprobCount | None = Field(None, description="With logprobs: the top-N alternatives per token "
                                                                "(0..20)")


class GenerateRequest(_Common):
    prompt: str | None = Field(None, description="Empty or missing: just report the model loaded")
    suffix: str | None = Field(None, description="Not supported", json_schema_extra={"maxLength": 0})
    system: str | None = Field(None, description="System message for the chat template")
    template: str | None = Field(None, description="Ignored (Go templates): the model's chat template is used")
    context: TokenIdList | None = Field(None, description="Token ids (integers >= 0) from a previous response, "
                                                           "prepended")
    raw: bool = Field(False, description="Send the prompt as is, without the chat template")
    images: list[str] | None = Field(None, description="Not supported", json_schema_extra={"maxItems": 0})


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    images: list[str] | None = Field(None, description="Not supported", json_schema_extra={"maxItems": 0})


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
    keep_alive: KeepAlive | None = Field(None, description=KEEP_ALIVE_DOC)
    dimensions: Integer | None = None


class EmbeddingsRequest(BaseModel):
    """The legacy /api/embeddings body: one prompt, no truncation."""
    model_config = ConfigDict(extra="ignore")
    model: ModelName = Field(..., description="A model name from GET /api/tags (NAME[:TAG], ':latest' optional)")
    prompt: str = Field("", description="The text to embed; empty: an empty embedding (as Ollama answers)")
    options: Options | None = Field(None, description="Ignored")
    keep_alive: KeepAlive | None = Field(None, description=KEEP_ALIVE_DOC)


def _model_or_name(*more: dict) -> dict:
    """The schema's rule that a body names its model in `model` or (deprecated) `name` (plus any more rules)."""
    rules = [{"anyOf": [{"required": ["model"]}, {"required": ["name"]}]}, *more]
    return {"anyOf": rules[0]["anyOf"]} if len(rules) == 1 else {"allOf": rules}


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_model_or_name())
    model: ModelName = Field(None, description="The model: the served one, a created one or a pulled one "
                                               "(one of model or name is required)")
    name: ModelName = Field(None, description="Deprecated alias of model")
    verbose: bool = Field(False, description="Accepted; the answer is the same")


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
    kv_cache_bytes: int = Field(0, description="The KV-cache pool reserved")
    kv_cache_resident_bytes: int = Field(0, description="Of which in memory now (free blocks go back to the OS)")


class PsResponse(BaseModel):
    models: list[PsModel]


class ShowResponse(BaseModel):
    license: str = ""
    modelfile: str
    parameters: str
    template: str
    system: str = Field("", description="A created model's system prompt")
    messages: list[dict] = Field(default_factory=list, description="A created model's MESSAGEs")
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


# ---- model management: /api/pull, /api/delete, /api/copy, /api/create -------------------------------------------
NewModelName = Annotated[str, Field(pattern=NAME_PATTERN, max_length=250), explained(
    lambda v: f"invalid model name {v!r}: use [namespace/]model[:tag] (letters, digits, '_', '-', '.'; each part "
              "starting with a letter or digit)" if isinstance(v, str) else None)]
_NOT_SUPPORTED = "Not supported: must be empty"


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_model_or_name())
    model: ModelName = Field(None, description="A catalogue model (GET /api/tags lists what is pulled already)")
    name: ModelName = Field(None, description="Deprecated alias of model")
    insecure: StrictBool = Field(False, description="Ignored (wheels come from PyPI over HTTPS)")
    stream: StrictBool = Field(True, description="Stream progress objects as newline-delimited JSON (default true)")


class DeleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra=_model_or_name())
    model: ModelName = Field(None, description="A created model, or a pulled catalogue model")
    name: ModelName = Field(None, description="Deprecated alias of model")


class CopyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: ModelName = Field(..., description="The served model, a created model or a pulled catalogue model")
    destination: NewModelName = Field(..., description="The new (created) model's name: [namespace/]model[:tag]")


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


_PARAMETER_FIELD_TYPES = {
    "float": StrictFloat | StrictInt, "int": Annotated[StrictInt, BeforeValidator(_integral)], "bool": StrictBool,
    "list": StrictStr | list[StrictStr],
}


class _Parameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _known(cls, data: Any) -> Any:
        if isinstance(data, dict):
            try:
                check_parameters({k: v for k, v in data.items() if k not in PARAMETER_TYPES})
            except ModelfileError as exc:
                raise PydanticCustomError("unknown_parameter", str(exc)) from None
        return data


ModelParameters = create_model(  # one field per Ollama PARAMETER, typed
    "ModelParameters", __base__=_Parameters, __doc__="Ollama's PARAMETERs: sampling ones become the created "
    "model's defaults; the others are kept and shown only",
    **{name: (_PARAMETER_FIELD_TYPES[kind], None) for name, kind in PARAMETER_TYPES.items()})


class CreateMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class CreateRequest(BaseModel):
    """Ollama's create body, current ({model, from, system, parameters, ...}) or older ({name, modelfile});
    fields given alongside a modelfile override what it says."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True, json_schema_extra=_model_or_name(
        {"anyOf": [{"required": ["from"]}, {"required": ["modelfile"]}]}))
    model: NewModelName = Field(None, description="The new model's name: [namespace/]model[:tag] (one of model or "
                                                  "name is required)")
    name: NewModelName = Field(None, description="Deprecated alias of model")
    from_: ModelName = Field(None, alias="from", description="The model it is made from: the served model, a "
                                                             "created model, a catalogue model or local weights")
    modelfile: StrictStr = Field(None, description="A Modelfile (FROM, PARAMETER, SYSTEM, TEMPLATE, MESSAGE, "
                                                   "LICENSE)")
    system: StrictStr = Field(None, description="The system prompt used when a request has none")
    template: StrictStr = Field(None, description="A Go template: stored and shown, not rendered (the base "
                                                  "model's chat template is)")
    parameters: ModelParameters = Field(None, description="Default options (Ollama PARAMETERs)")
    messages: list[CreateMessage] = Field(None, description="Messages put before every conversation")
    license: StrictStr | list[StrictStr] = Field(None, description="A license text, or several")
    stream: StrictBool = Field(True, description="Stream status objects as newline-delimited JSON (default true)")
    quantize: str | None = Field(None, max_length=0, description=_NOT_SUPPORTED)
    files: dict[str, str] | None = Field(None, max_length=0, description=_NOT_SUPPORTED + " (no blob uploads)")
    adapters: dict[str, str] | None = Field(None, max_length=0, description=_NOT_SUPPORTED)


class StatusResponse(BaseModel):
    status: str


class ProgressResponse(StatusResponse):
    digest: str | None = Field(None, description="While pulling: the file's id")
    total: int | None = Field(None, description="While pulling: its size in bytes")
    completed: int | None = Field(None, description="While pulling: the bytes done")


MANAGE_ERRORS = {
    400: {"model": OllamaError, "description": "Malformed JSON, wrong types, an invalid model name, a bad "
                                               "Modelfile or PARAMETER, or the served model's name where it "
                                               "cannot be (deleting it, creating or copying over it)"},
    401: ERRORS[401],
    404: {"model": OllamaError, "description": "Unknown model"},
}


def status_doc(what: str) -> dict:
    return {200: {"description": f"{what}; with stream=true (the default), newline-delimited JSON status objects, "
                                 "the last {\"status\": \"success\"} (or {\"error\": ...})",
                  "content": {"application/x-ndjson": {"schema": {"type": "string"}}}}}
