"""The OpenAI API's request and response bodies (pydantic models, also the OpenAPI document's schemas), the
mapping of sampling fields onto SamplingParams, and the documented error responses."""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from tokenloom.entrypoints.server_state import APIError, documented_errors
from tokenloom.sampling_params import SamplingParams, SamplingParamsError, StructuredOutputsParams


# ---- errors ------------------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI-style error body (every status >= 400 on the OpenAI endpoints)."""
    error: ErrorDetail


ERROR_RESPONSES = documented_errors(ErrorResponse, "invalid sampling values", "max_tokens")


# ---- constrained field types (the OpenAPI schema states each constraint; the Ollama API shares them) ---------
def explained(explain: Callable[[Any], str | None]) -> WrapValidator:
    """Validate by the annotated type (which the OpenAPI schema shows), but answer a failure with explain(value)'s
    one line (when it gives one): pydantic's errors for a union would list every member's."""
    def validate(value: Any, handler):
        try:
            return handler(value)
        except ValidationError:
            message = explain(value)
            if message is None:
                raise
            raise PydanticCustomError("invalid_value", message) from None
    return WrapValidator(validate)


def _integral(value: Any) -> Any:
    """3.0 -> 3: JSON Schema's integer type includes integral numbers, so the server takes them too."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def integer(**bounds) -> Any:
    """An integer field type within bounds (stated in the document); 3.0 is the integer 3, as in JSON Schema, but
    true is not 1. The bounds come before the validator, so that the schema shows them as minimum / maximum."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


Integer = integer()


def _bad_token_id(ids: list) -> str | None:
    """The first entry of a token-id list that is not an integer >= 0 (booleans are not token ids), as JSON."""
    for t in ids:
        n = _integral(t)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            return json.dumps(t, default=str)
    return None


def _explain_token_ids(value: Any) -> str | None:
    bad = _bad_token_id(value) if isinstance(value, list) else None
    return None if bad is None else f"token ids must be integers >= 0, got {bad}"


def _explain_text_or_tokens(value: Any) -> str:
    """Why a prompt / input is none of: text, texts, token ids, token-id lists (all non-empty)."""
    if value == "" or value == []:
        return "must not be empty"
    for k, item in enumerate(value if isinstance(value, list) else []):
        if item == "" or item == []:
            return f"item {k} is empty"
        bad = None if isinstance(item, str) else _bad_token_id(item if isinstance(item, list) else [item])
        if bad is not None:
            return f"token ids must be integers >= 0, got {bad}"
    return ("must be a non-empty string, a list of non-empty strings, a list of token ids (integers >= 0), or a "
            "list of non-empty token-id lists")


MAX_N = 128  # choices per prompt: each is a sequence in the batch, so a huge n would starve other requests
# strict: JSON true / false are not the token ids 1 / 0; integral floats (3.0) are, as JSON Schema's integer
TokenId = Annotated[int, Strict(), Field(ge=0), BeforeValidator(_integral)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Text = Annotated[str, StringConstraints(min_length=1)]
TextOrTokens = Annotated[Text | Annotated[list[Text], Field(min_length=1)] | TokenIds
                         | Annotated[list[TokenIds], Field(min_length=1)], explained(_explain_text_or_tokens)]
ModelName = Annotated[Text, explained(lambda v: "must not be empty" if v == "" else None)]
OptionalModelName = Annotated[Text | None, explained(
    lambda v: "must not be empty (omit it for the served model)" if v == "" else None)]
TokenIdList = Annotated[list[TokenId], explained(_explain_token_ids)]
ChoiceCount = Annotated[integer(ge=1, le=MAX_N), explained(
    lambda v: f"must be an integer in [1, {MAX_N}], got {json.dumps(v, default=str)}")]
# sampling values: the ranges SamplingParams enforces, stated in the document (models using them are strict:
# false is not 0.0, "1" is not 1)
Temperature = Annotated[float, Field(ge=0)]
TopP = Annotated[float, Field(gt=0, le=1)]
Share = Annotated[float, Field(ge=0, le=1)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
Positive = Annotated[float, Field(gt=0)]
TopK = integer(ge=-1, le=2**31 - 1)  # beyond any vocabulary; larger would overflow the sampler's int
TokenCount = integer(ge=1)
MinTokens = integer(ge=0)
Seed = integer(ge=-(1 << 53), le=1 << 53)  # exact in every JSON parser, and taken by torch generators
LogprobCount = integer(ge=0, le=20)
Bias = Annotated[float, Field(ge=-100, le=100)]
_TOKEN_ID_KEY = r"^[0-9]{1,10}$"
LogitBias = Annotated[dict[Annotated[str, StringConstraints(pattern=_TOKEN_ID_KEY)], Bias], WithJsonSchema(
    {"type": "object", "patternProperties": {_TOKEN_ID_KEY: {"type": "number", "minimum": -100, "maximum": 100}},
     "additionalProperties": False})]
STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ---- requests and responses -------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = Field("response", description="The format's name")
    description: str | None = None
    json_schema: dict | bool | None = Field(None, alias="schema", description="The JSON schema the output must match")
    strict: bool | None = Field(None, description="Accepted; outputs always match the schema")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"] = Field(
        ..., description="text (free), json_object (any JSON object) or json_schema (match json_schema.schema)")
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's structured_outputs extra body: exactly one constraint."""
    model_config = ConfigDict(extra="forbid")
    json_schema: dict | bool | str | None = Field(None, alias="json", description="A JSON schema")
    regex: str | None = Field(None, description="A regular expression (Rust regex syntax) the output must match")
    choice: list[str] | None = Field(None, description="The output is exactly one of these strings")
    grammar: str | None = Field(None, description="A Lark or GBNF (EBNF) grammar")
    json_object: bool | None = Field(None, description="Any JSON object")
    whitespace_pattern: str | None = Field(None, description="Regex JSON whitespace must match")


class SelfConsistencyBody(BaseModel):
    """Self-consistency: sample n completions, extract each one's answer with answer_regex, answer the majority."""
    model_config = ConfigDict(extra="forbid", strict=True)
    answer_regex: Annotated[str, StringConstraints(min_length=1, max_length=1000)] = Field(
        ..., description="A Python regular expression finding the answer in a completion: its first capture group "
                         "if it has one, else the whole first match (stripped); completions without a match do not "
                         "vote")
    n: ChoiceCount | None = Field(None, description=f"Completions to vote over, 1..{MAX_N} (default: the request's "
                                                    "n when above 1, else 8); all are returned as choices")


class ScorerBody(BaseModel):
    """A judge ranks the candidates: each is scored by a served model given a prompt built from a template."""
    model_config = ConfigDict(extra="forbid", strict=True)
    model: OptionalModelName = Field(None, description="The judge: a served model's name (default: the request's "
                                                       "model)")
    prompt: Annotated[str, StringConstraints(min_length=1)] | None = Field(
        None, description="The judge's prompt template: {prompt} becomes the request's prompt (for chat, the last "
                          "user message) and {completion} a candidate's text (required). Default: a Yes/No "
                          "question (yes_logprob) or a 1-10 rating request (number)")
    method: Literal["yes_logprob", "number"] = Field(
        "yes_logprob", description="yes_logprob: the score is the log-probability that the judge's first token is "
                                   "the label (summed over the tokens that read as it, stripped and "
                                   "case-insensitive, among its 20 most likely first tokens; when none is there, "
                                   "the 20th's logprob, a bound from above). number: the first number in the "
                                   "judge's greedy reply (e.g. a rating); a reply without one ranks last")
    label: Annotated[str, StringConstraints(min_length=1)] = Field(
        "Yes", description="The answer yes_logprob scores the probability of")
    chat: bool | None = Field(None, description="Send the filled template as a user message through the judge's chat "
                                                "template (default: when the judge has one)")
    max_tokens: integer(ge=1, le=256) = Field(16, description="The judge's reply length for method number")


class _SamplingFields(BaseModel):
    """Sampling fields common to completions and chat (OpenAI's, then vLLM-style extras)."""
    model_config = STRICT

    model: OptionalModelName = Field(None, description="The served model's name (GET /v1/models); omitted = that "
                                                       "model")
    n: ChoiceCount = Field(1, description=f"Completions per prompt, 1..{MAX_N}")
    temperature: Temperature | None = Field(None, description="0 = greedy (default 1)")
    top_p: TopP | None = Field(None, description="Nucleus sampling mass in (0, 1] (default 1)")
    stop: str | list[str] | None = Field(None, description="Stop strings (not included in the output)")
    seed: Seed | None = Field(None, description="Per-request sampling seed (reproducible sampling)")
    presence_penalty: Penalty | None = Field(None, description="In [-2, 2]")
    frequency_penalty: Penalty | None = Field(None, description="In [-2, 2]")
    logit_bias: LogitBias | None = Field(None, description="Token id (as a string) -> bias in "
                                                                        "[-100, 100]")
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="Only with stream=true")
    # test-time compute (tokenloom/ttc.py): several candidates from one prefill, the best returned; not streamed
    best_of: ChoiceCount | None = Field(
        None, description=f"Generate best_of candidates (1..{MAX_N}, >= n; seeded as n candidates are) and return "
                          "the n best, best first: those of the highest mean token logprob, or with scorer those "
                          "the judge scores highest. usage counts every candidate's tokens. Above 1, not with stream")
    scorer: ScorerBody | None = Field(
        None, description="Rank the candidates (best_of of them, else n) by a judge's score instead; each choice "
                          "carries its score, and scorer_usage the judge's tokens. Not with stream")
    self_consistency: SelfConsistencyBody | None = Field(
        None, description="Answer by majority vote: the response's answer is the answer most completions give "
                          "(ties: the one whose completions have the highest total logprob), votes counts them, and "
                          "each choice carries its answer. One prompt; not with stream, best_of or scorer")
    user: str | None = None
    # vLLM-style extras
    top_k: TopK | None = Field(None, description="Top-k sampling (-1 or 0 = off)")
    min_p: Share | None = Field(None, description="Min-p sampling in [0, 1]")
    repetition_penalty: Positive | None = Field(None, description="> 0; 1 = off")
    min_tokens: MinTokens = Field(0, description="Generate at least this many tokens before EOS / stop can end the "
                                                 "output")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token")
    stop_token_ids: TokenIdList | None = Field(None, description="Token ids that end the output")
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # structured output
    response_format: ResponseFormat | None = Field(
        None, description="{'type': 'json_object'} or {'type': 'json_schema', 'json_schema': {'name', 'schema'}}")
    structured_outputs: StructuredOutputsBody | None = Field(
        None, description="vLLM-style constraint: one of json, regex, choice, grammar (Lark or GBNF), json_object")
    guided_json: dict | str | None = Field(None, description="Deprecated vLLM alias of structured_outputs.json")
    guided_regex: str | None = Field(None, description="Deprecated vLLM alias of structured_outputs.regex")
    guided_choice: list[str] | None = Field(None, description="Deprecated vLLM alias of structured_outputs.choice")
    guided_grammar: str | None = Field(None, description="Deprecated vLLM alias of structured_outputs.grammar")


def structured_outputs_of(req: _SamplingFields) -> StructuredOutputsParams | None:
    """The request's output constraint from response_format, structured_outputs or the guided_* aliases."""
    asked = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        asked.append(("response_format", dict(json_object=True)))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.json_schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        asked.append(("response_format", dict(json=rf.json_schema.json_schema)))
    if req.structured_outputs is not None:
        body = req.structured_outputs.model_dump(exclude_none=True, by_alias=True)
        asked.append(("structured_outputs", body))
    guided = dict(json=req.guided_json, regex=req.guided_regex, choice=req.guided_choice, grammar=req.guided_grammar)
    guided = {k: v for k, v in guided.items() if v is not None}
    if guided:
        asked.append((f"guided_{next(iter(guided))}", guided))
    if not asked:
        return None
    if len(asked) > 1:
        raise APIError(400, f"give one output constraint, not {' and '.join(p for p, _ in asked)}",
                       param=asked[1][0])
    param, fields = asked[0]
    try:
        return StructuredOutputsParams(**fields)
    except SamplingParamsError as exc:
        raise APIError(400, str(exc).replace("structured_outputs", param, 1), param=param) from None


def to_sampling_params(req: _SamplingFields, max_tokens: int | None, logprobs: int | None,
                       structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """SamplingParams of the request; structured_outputs, when given, replaces the request's own constraint
    (tool calling builds one)."""
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    structured_outputs = structured_outputs or structured_outputs_of(req)
    try:
        return SamplingParams(
            n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
            min_p=req.min_p or 0.0, repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
            stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
            logit_bias=req.logit_bias, skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, structured_outputs=structured_outputs,
            best_of=req.best_of,
        )
    except SamplingParamsError as exc:
        raise APIError(400, str(exc), param=exc.param) from None


class CompletionRequest(_SamplingFields):
    prompt: TextOrTokens = Field(
        ..., description="Text, a list of texts, a list of token ids, or a list of token-id lists (none empty)")
    max_tokens: MinTokens | None = Field(16, description="Tokens to generate (null = up to the context window; 0 "
                                                         "with echo: only the prompt back, as vLLM)")
    logprobs: LogprobCount | None = Field(None, description="Log probabilities of the top-N tokens per position "
                                                            "(0..20)")
    echo: bool = Field(False, description="Prepend the prompt to the completion")
    suffix: str | None = Field(None, description="Not supported (must be empty)", json_schema_extra={"maxLength": 0})


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class _Choice(BaseModel):
    """What every completion and chat choice carries."""
    index: int
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    stop_reason: int | str | None = None
    score: float | None = Field(None, description="With best_of above n or scorer: what the choice was ranked by "
                                                  "(its mean token logprob, or the judge's score; null: none)")
    answer: str | None = Field(None, description="With self_consistency: the answer found in this choice")


class CompletionChoice(_Choice):
    text: str
    logprobs: CompletionLogprobs | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


class _Response(BaseModel):
    """What every completion and chat response carries."""
    id: str
    created: int
    model: str
    system_fingerprint: str | None = None
    answer: str | None = Field(None, description="With self_consistency: the majority answer (null: no completion "
                                                 "had one)")
    votes: dict[str, int] | None = Field(None, description="With self_consistency: completions per answer, most "
                                                           "first")
    scorer_usage: Usage | None = Field(None, description="With scorer: the judge's tokens")


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", json_schema_extra={"required": ["type", "text"]})
    # other part types (image_url, input_audio) are answered with a 400 naming them
    type: str = Field(..., description="Only text parts are supported", json_schema_extra={"enum": ["text"]})
    text: str | None = Field(None, json_schema_extra={"type": "string"})  # other part types carry none


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1), explained(
        lambda v: "must not be empty" if v == [] else None)] = Field(
        ..., description="The conversation (at least one message), rendered with the model's chat template")
    max_tokens: TokenCount | None = Field(None, description="Deprecated alias of max_completion_tokens")
    max_completion_tokens: TokenCount | None = Field(None, description="Tokens to generate (null = up to the "
                                                                       "context window)")
    logprobs: bool = Field(False, description="Return log probabilities of the output tokens")
    top_logprobs: LogprobCount | None = Field(None, description="With logprobs: the top-N alternatives per token "
                                                                "(0..20)")
    tools: list[dict] | None = Field(None, description="Functions the model may call: [{'type': 'function', "
                                                        "'function': {'name', 'description', 'parameters'}}]")
    tool_choice: Literal["none", "auto", "required"] | dict | None = Field(
        None, description="none, auto (default with tools), required, or {'type': 'function', 'function': {'name'}}")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call")
    # vLLM-style extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(..., description="The arguments as a JSON object's text")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Choice):
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class EmbeddingRequest(BaseModel):
    model_config = STRICT
    model: OptionalModelName = Field(None, description="The served model's name; omitted = that model")
    input: TextOrTokens = Field(
        ..., description="Text, texts, token ids, or token-id lists (none empty, each at most the context window)")
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Integer | None = Field(None, description="Only the model's hidden size is supported")
    user: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenloom"
    max_model_len: int | None = None
    root: str | None = Field(None, description="The model it is a variant, copy or route of (vLLM's root)")
    parent: str | None = Field(None, description="The model it is derived from (a created model's base, a route's "
                                                 "first variant)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def stream_doc(what: str) -> dict:
    return {200: {"description": f"{what}; with stream=true, server-sent events (`data: {{chunk}}` frames ending "
                                 "in `data: [DONE]`)",
                  "content": {"text/event-stream": {"schema": _SSE_EVENT}}}}


# one server-sent event: its data is a JSON chunk (or an error body), the last one `[DONE]`
_SSE_EVENT = {"type": "object", "required": ["data"],
              "properties": {"data": {"type": "string", "description": "A JSON chunk, an error body, or [DONE]"},
                             "event": {"type": "string"}}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
