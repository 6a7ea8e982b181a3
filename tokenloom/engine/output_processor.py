"""Turns accepted tokens into what users see: incremental detokenization, stop strings, the n completions of one
prompt grouped into one RequestOutput, prompt logprobs and request metrics.

Token-level stops (EOS, stop token ids, max_tokens, the context) are the scheduler's; stop strings need the text,
so they are checked here and end the request through the scheduler.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

from tokenloom.core.request import Request
from tokenloom.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from tokenloom.sampling_params import SamplingParams


@dataclass
class RequestGroup:
    """One user request: n completions of one prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    requests: list[Request]
    metrics: RequestMetrics
    prompt_logprobs: list | None = None
    # best_of > n: the user's params; only the final output is returned, with the n best candidates
    best_of_params: SamplingParams | None = None


class OutputProcessor:
    def __init__(self, finish_request):
        self.groups: dict[str, RequestGroup] = {}
        self._finish_request = finish_request  # ends a request in the scheduler (a stop string matched)

    def add(self, group: RequestGroup) -> None:
        self.groups[group.request_id] = group

    def abort(self, request_id: str) -> RequestGroup | None:
        return self.groups.pop(request_id, None)

    def process(self, gained: list[tuple[Request, int]], prompt_logprobs: list) -> list[RequestOutput]:
        now = time.perf_counter()
        for req, start, entries in prompt_logprobs:
            group = self.groups.get(req.group_id)
            if group is not None:
                if group.prompt_logprobs is None:  # the first prompt token has no context to be predicted from
                    group.prompt_logprobs = [None] * req.num_prompt_tokens
                # Entry p + 1 is the logprob of prompt token p + 1 (a recompute after preemption overwrites).
                group.prompt_logprobs[start + 1 : start + 1 + len(entries)] = entries
        touched: dict[str, RequestGroup] = {}
        for req, n in gained:
            if req.first_token_time is None:
                req.first_token_time = now
            self._detokenize(req, req.output_token_ids[len(req.output_token_ids) - n :])
            group = self.groups.get(req.group_id)
            if group is not None:
                touched[group.request_id] = group
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                    group.metrics.num_cached_tokens = req.num_cached_tokens
        outputs = []
        for group in touched.values():
            finished = all(r.is_finished for r in group.requests)
            if finished:
                group.metrics.finished_time = now
                del self.groups[group.request_id]
            elif group.best_of_params is not None:
                continue  # best_of picks among finished candidates: nothing to show before
            outputs.append(make_output(group, finished))
        return outputs

    def _detokenize(self, req: Request, tokens: list[int]) -> None:
        """Add the new tokens to the request's text, token by token, checking stop strings after each."""
        detok, p = req.detokenizer, req.params
        if detok is None:
            return
        first_out = len(req.output_token_ids) - len(tokens)
        for i, token in enumerate(tokens):
            delta = detok.add([token])
            n_out = first_out + i + 1
            token_stopped = req.is_finished and i == len(tokens) - 1 and req.finish_reason == "stop"
            if p.stop and n_out >= p.min_tokens and delta and not token_stopped:
                hit = _find_stop(detok.text, delta, p.stop)
                if hit is not None:
                    idx, s = hit
                    req.text = detok.text[: idx + len(s)] if p.include_stop_str_in_output else detok.text[:idx]
                    req.finish_reason, req.stop_reason = "stop", s
                    del req.output_token_ids[n_out:], req.logprobs[n_out:]
                    if not req.is_finished:
                        self._finish_request(req)
                    return
        if req.is_finished:
            detok.flush()  # a reply cut mid-character still returns its bytes (as U+FFFD)
        req.text = detok.text


def _find_stop(text: str, delta: str, stops: list[str]) -> tuple[int, str] | None:
    """The earliest stop string that the newest delta completed, as (index in text, string)."""
    window_start = max(0, len(text) - len(delta) - max(len(s) for s in stops) + 1)
    hits = [(text.find(s, window_start), s) for s in stops]
    hits = [(i, s) for i, s in hits if i >= 0]
    return min(hits) if hits else None


def make_output(group: RequestGroup, finished: bool) -> RequestOutput:
    outs = []
    for r in group.requests:
        text = r.text
        if not r.is_finished and r.params.stop:
            # Hold back a tail that could still grow into a stop string, so it is never streamed.
            text = text[: max(0, len(text) - max(len(s) for s in r.params.stop) + 1)]
        outs.append(CompletionOutput(r.index, text, list(r.output_token_ids), r.finish_reason, r.stop_reason,
                                     r.logprobs if r.params.logprobs is not None else None))
    out = RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                        group.metrics, group.prompt_logprobs)
    return _best_of(out, group.best_of_params) if group.best_of_params is not None else out


def _best_of(out: RequestOutput, params: SamplingParams) -> RequestOutput:
    """OpenAI's best_of: the n candidates of the highest mean token logprob, best first (ties: lower index first),
    numbered 0..n-1; logprobs (taken for the ranking) kept only if asked for."""
    candidates = out.outputs
    if params.logprobs is None:
        candidates = [dataclasses.replace(o, logprobs=None) for o in candidates]
    order = sorted(range(len(candidates)), key=lambda i: -out.outputs[i].mean_logprob)
    out.outputs = [dataclasses.replace(candidates[i], index=k) for k, i in enumerate(order[: params.n])]
    out.candidates = candidates
    return out
