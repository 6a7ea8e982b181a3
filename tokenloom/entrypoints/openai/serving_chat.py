"""/v1/chat/completions: messages rendered with the model's chat template, then completed; whole or streamed as
server-sent events. With tools, the reply's tool calls come back as message.tool_calls (tool-call deltas when
streamed), constrained by tool_choice (entrypoints/tool_calls.py)."""
from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenloom.config import TokenloomError
from tokenloom.entrypoints.openai.protocol import (
    ERROR_RESPONSES,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    stream_doc,
    structured_outputs_of,
    to_sampling_params,
    usage,
)
from tokenloom.entrypoints.tool_calls import (
    ToolCallStreamParser,
    ToolError,
    parse_tool_calls,
    prepare_messages,
    template_supports_tools,
    tool_constraint,
    validate_tools,
)
from tokenloom.entrypoints.openai.serving_ttc import plan_ttc
from tokenloom.entrypoints.created_models import apply_openai_defaults, with_messages
from tokenloom.entrypoints.app_state import get_state
from tokenloom.entrypoints.server_state import APIError, ServedModel, chat_logprobs
from tokenloom.ttc import last_user_text
from tokenloom.entrypoints.streaming import (
    DeltaTracker,
    aborted_chunks,
    final_outputs,
    merge_streams,
    sse_response,
    until_disconnected,
)

router = APIRouter(tags=["OpenAI"])


def _messages(msgs: list[ChatMessage]) -> list[dict]:
    out = []
    for k, m in enumerate(msgs):
        d = m.model_dump(exclude_none=True)
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text":
                    raise APIError(400, f"messages[{k}]: content parts of type '{part.type}' are not supported "
                                        "(text only)", param="messages")
                if part.text is None:
                    raise APIError(400, f"messages[{k}]: a text part needs its text", param="messages")
                texts.append(part.text)
            d["content"] = "\n".join(texts)
        d.setdefault("content", "")  # null content (an assistant turn with tool calls): templates expect a string
        if d.get("role") == "developer":  # OpenAI's newer name for the system role; templates know "system"
            d["role"] = "system"
        out.append(d)
    return out


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={**stream_doc("The chat completion"), **ERROR_RESPONSES})
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    """Chat: the messages are rendered with the model's chat template, then completed."""
    model, created, state = await get_state(request).resolve(request, body.model, user=body.user)
    apply_openai_defaults(created, body, "max_completion_tokens",
                          body.max_completion_tokens is None and body.max_tokens is None)
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
    if body.top_logprobs is not None and not 0 <= body.top_logprobs <= 20:
        raise APIError(400, f"top_logprobs must be in [0, 20], got {body.top_logprobs}", param="top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    top_n = body.top_logprobs or 0
    messages = with_messages(created, _messages(body.messages))
    messages, template_tools, constraint, tool_names = _tools(state, body, messages)
    plan = await plan_ttc(request, body, state, 1)
    params = to_sampling_params(body, max_tokens, top_n if body.logprobs else None, constraint)
    await state.check_constraint(params, "tools" if constraint else
                                 "response_format" if body.response_format else "structured_outputs")
    prompt_ids = await state.chat_prompt_ids(messages, tools=template_tools,
                                       add_generation_prompt=body.add_generation_prompt,
                                       continue_final_message=body.continue_final_message,
                                       template_kwargs=body.chat_template_kwargs)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await state.submit_all([prompt_ids], plan.engine_params(params) if plan else params, rid)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(state, streams, _chat_chunks(state, streams, rid, created, model, params.n,
                                                         include_usage, top_n if body.logprobs else None, tool_names))

    async def run():
        finals = [out async for out in final_outputs(state, streams)]
        if plan is None:
            return finals, None
        selected = await plan.select(finals, [last_user_text(messages)], rid)
        return selected.outputs, selected

    (out,), selected = await until_disconnected(request, run())
    choices, n_out = [], 0
    for k, o in enumerate(out.outputs):
        n_out += len(o.token_ids)
        lp = {"content": chat_logprobs(state, o, 0, len(o.token_ids), top_n), "refusal": None} if body.logprobs else None
        message, finish = {"role": "assistant", "content": o.text}, o.finish_reason
        if tool_names is not None:
            content, calls = parse_tool_calls(o.text, tool_names)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish = "tool_calls" if finish == "stop" else finish
        choices.append({"index": o.index, "message": message, "logprobs": lp, "finish_reason": finish,
                        "stop_reason": o.stop_reason, **(selected.choice_fields[0][k] if selected else {})})
    response = {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage(len(out.prompt_token_ids), selected.completion_tokens if selected else n_out),
                "system_fingerprint": None}
    return JSONResponse({**response, **(selected.response_fields if selected else {})})


def _tools(state: ServedModel, body: ChatCompletionRequest, messages: list[dict]):
    """(messages, tools for the template, the tool-choice constraint, the tool names to parse calls of; None when
    the reply is not parsed for tool calls)."""
    try:
        tools = validate_tools(body.tools)
        native = template_supports_tools(state.require_tokenizer().chat_template)
        messages, template_tools = prepare_messages(messages, tools, native)
        choice = body.tool_choice
        if not tools and choice not in (None, "none", "auto"):
            raise ToolError("tool_choice 'required' or a named function needs tools", param="tool_choice")
        if not tools or choice == "none":
            return messages, template_tools, None, None
        if structured_outputs_of(body) is not None:  # the asked response format wins over tool calls
            if choice not in (None, "auto"):
                raise ToolError("tool_choice 'required' or a named function cannot be combined with a response "
                                "format", param="tool_choice")
            return messages, template_tools, None, None
        constraint = tool_constraint(tools, choice, parallel=body.parallel_tool_calls is not False)
    except ToolError as exc:
        raise APIError(400, str(exc), param=exc.param) from None
    return messages, template_tools, constraint, [t["function"]["name"] for t in tools]


async def _chat_chunks(state: ServedModel, streams, rid, created, model, n, include_usage, top_n, tool_names):
    tracker = DeltaTracker()
    parsers = {j: ToolCallStreamParser(tool_names) for j in range(n)} if tool_names is not None else {}
    n_prompt = n_out = 0
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    for j in range(n):
        yield {**base, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
    try:
        async for _, out in merge_streams(streams):
            n_prompt = len(out.prompt_token_ids)
            for o in out.outputs:
                if o.index in tracker.done:
                    continue
                text, t0, t1 = tracker.delta(o.index, o)
                delta, finish = _delta(parsers.get(o.index), text, o.finished), o.finish_reason
                if not delta and not o.finished and (top_n is None or t0 == t1):
                    continue
                if o.index in parsers and parsers[o.index].n_calls and finish == "stop":
                    finish = "tool_calls"
                lp = {"content": chat_logprobs(state, o, t0, t1, top_n)} if top_n is not None else None
                choice = {"index": o.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
                if o.finished:
                    tracker.done.add(o.index)
                    n_out += len(o.token_ids)
                    choice["stop_reason"] = o.stop_reason
                yield {**base, "choices": [choice]}
            if out.finished:
                state.observe(out)
    except TokenloomError:  # ended by the engine (shutdown): each open choice says so, then the error event
        for chunk in aborted_chunks(base, set(range(n)) - tracker.done, {"delta": {}}):
            yield chunk
        raise
    if include_usage:
        yield {**base, "choices": [], "usage": usage(n_prompt, n_out)}


def _delta(parser: ToolCallStreamParser | None, text: str, finished: bool) -> dict:
    """The chunk's delta: the new text, or with tools what of it is content plus the tool calls completed."""
    if parser is None:
        return {"content": text} if text else {}
    content, calls = parser.feed(text)
    if finished:
        rest, more = parser.finish()
        content, calls = content + rest, calls + more
    delta: dict = {"content": content} if content else {}
    if calls:
        delta["tool_calls"] = calls
    return delta
