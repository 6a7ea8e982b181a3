"""/v1/completions: text or token-id prompts (OpenAI legacy completions), whole or streamed as server-sent events."""
from __future__ import annotations

import dataclasses
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenloom.config import TokenloomError
from tokenloom.engine.outputs import CompletionOutput
from tokenloom.entrypoints.openai.protocol import (
    ERROR_RESPONSES,
    CompletionRequest,
    CompletionResponse,
    stream_doc,
    to_sampling_params,
    usage,
)
from tokenloom.entrypoints.openai.serving_ttc import plan_ttc
from tokenloom.entrypoints.created_models import apply_openai_defaults
from tokenloom.entrypoints.app_state import get_state
from tokenloom.entrypoints.server_state import APIError, ServedModel
from tokenloom.entrypoints.streaming import (
    DeltaTracker,
    aborted_chunks,
    final_outputs,
    merge_streams,
    sse_response,
    until_disconnected,
)

router = APIRouter(tags=["OpenAI"])


def _completion_logprobs(state: ServedModel, o: CompletionOutput, t0: int, t1: int, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for k in range(t0, t1):
        tid = o.token_ids[k]
        entry = o.logprobs[k] if o.logprobs and k < len(o.logprobs) else {}
        text = state.token_text(tid)
        tokens.append(text)
        token_lps.append(entry.get(tid))
        tops.append({state.token_text(t): lp for t, lp in entry.items()} if entry else None)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _echoed_logprobs(state: ServedModel, out, completion: dict | None) -> dict:
    """echo with logprobs: the prompt's tokens with their logprobs (the first has none, as in OpenAI's legacy API),
    then the completion's; lm-eval's local-completions reads log-likelihoods from them."""
    ids = out.prompt_token_ids
    entries = out.prompt_logprobs or [None] * len(ids)
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for tid, entry in zip(ids, entries):
        text = state.token_text(tid)
        tokens.append(text)
        token_lps.append(entry.get(tid) if entry else None)
        tops.append({state.token_text(t): lp for t, lp in entry.items()} if entry else None)
        offsets.append(offset)
        offset += len(text)
    lp = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
    return {k: v + completion[k] for k, v in lp.items()} if completion else lp


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={**stream_doc("The completion"), **ERROR_RESPONSES})
async def create_completion(body: CompletionRequest, request: Request):
    """Complete text or token-id prompts (OpenAI legacy completions)."""
    model, created, state = await get_state(request).resolve(request, body.model, user=body.user)
    apply_openai_defaults(created, body, "max_tokens", "max_tokens" not in body.model_fields_set)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    echo_only = body.max_tokens == 0  # as vLLM: the prompt (with its logprobs) back, nothing generated
    if echo_only and not body.echo:
        raise APIError(400, "max_tokens 0 needs echo: it returns only the prompt", param="max_tokens")
    if body.stream and body.echo and (body.logprobs is not None or echo_only):
        raise APIError(400, "echo with logprobs or max_tokens 0 is not supported with stream", param="echo")
    prompts = _prompts(body.prompt)
    if any(isinstance(p, str) for p in prompts):
        state.require_tokenizer()
    plan = await plan_ttc(request, body, state, len(prompts))
    params = to_sampling_params(body, 1 if echo_only else body.max_tokens, body.logprobs)
    if body.echo and body.logprobs is not None:
        params = dataclasses.replace(params, prompt_logprobs=body.logprobs)
    await state.check_constraint(params, "response_format" if body.response_format else "structured_outputs")
    rid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await state.submit_all(prompts, plan.engine_params(params) if plan else params, rid)
    echo = [(p if isinstance(p, str) else (state.tokenizer.decode(p) if state.tokenizer else "")) if body.echo else ""
            for p in prompts]
    n = plan.n if plan else params.n
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(state, streams, _completion_chunks(state, streams, rid, created, model, n, echo,
                                                               include_usage, body.logprobs))

    async def run():
        finals = [out async for out in final_outputs(state, streams)]
        if plan is None:
            return finals, None
        texts = [p if isinstance(p, str) else state.tokenizer.decode(p) if state.tokenizer else "" for p in prompts]
        selected = await plan.select(finals, texts, rid)
        return selected.outputs, selected

    finals, selected = await until_disconnected(request, run())
    choices, n_prompt, n_out = [], 0, 0
    for i, out in enumerate(finals):
        n_prompt += len(out.prompt_token_ids)
        for k, o in enumerate(out.outputs):
            n_out += 0 if echo_only else len(o.token_ids)
            lp = (_completion_logprobs(state, o, 0, 0 if echo_only else len(o.token_ids), len(echo[i]))
                  if body.logprobs is not None else None)
            if body.echo and lp is not None:
                lp = _echoed_logprobs(state, out, lp)
            choices.append({"index": i * n + o.index, "text": echo[i] + ("" if echo_only else o.text), "logprobs": lp,
                            "finish_reason": o.finish_reason, "stop_reason": o.stop_reason,
                            **(selected.choice_fields[i][k] if selected else {})})
    response = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": usage(n_prompt, selected.completion_tokens if selected else n_out),
                "system_fingerprint": None}
    return JSONResponse({**response, **(selected.response_fields if selected else {})})


async def _completion_chunks(state: ServedModel, streams, rid, created, model, n, echo, include_usage, logprobs):
    tracker = DeltaTracker()
    n_prompt: dict[int, int] = {}
    n_out = 0
    base = {"id": rid, "object": "text_completion", "created": created, "model": model, "system_fingerprint": None}
    if include_usage:
        base["usage"] = None
    if any(echo):
        for i, e in enumerate(echo):
            for j in range(n):
                yield {**base, "choices": [{"index": i * n + j, "text": e, "logprobs": None,
                                            "finish_reason": None}]}
    try:
        async for i, out in merge_streams(streams):
            n_prompt[i] = len(out.prompt_token_ids)
            for o in out.outputs:
                key = i * n + o.index
                if key in tracker.done:
                    continue
                text, t0, t1 = tracker.delta(key, o)
                if not text and not o.finished and (logprobs is None or t0 == t1):
                    continue
                lp = (_completion_logprobs(state, o, t0, t1, tracker.text[key] - len(text) + len(echo[i]))
                      if logprobs is not None else None)
                choice = {"index": key, "text": text, "logprobs": lp, "finish_reason": o.finish_reason}
                if o.finished:
                    tracker.done.add(key)
                    n_out += len(o.token_ids)
                    choice["stop_reason"] = o.stop_reason
                yield {**base, "choices": [choice]}
            if out.finished:
                state.observe(out)
    except TokenloomError:  # ended by the engine (shutdown): each open choice says so, then the error event
        for chunk in aborted_chunks(base, set(range(len(echo) * n)) - tracker.done, {"text": ""}):
            yield chunk
        raise
    if include_usage:
        yield {**base, "choices": [], "usage": usage(sum(n_prompt.values()), n_out)}
