"""Test-time compute on /v1/completions and /v1/chat/completions (tokenloom/ttc.py): `best_of`, `scorer` and
`self_consistency`. A request's candidates are the n completions of its prompt in one engine request (one
prefill, the prompt's KV blocks shared copy-on-write); what comes back is chosen among them once all have finished,
so none of these can be streamed (OpenAI rejects best_of with stream too).

    best_of            the engine ranks (SamplingParams.best_of): the n candidates of the highest mean token logprob
    scorer             a judge model (this one or another served model) scores every candidate; the n best are
                       returned, best first
    self_consistency   every candidate is returned, with the answer the regex finds in it; the response's answer is
                       the majority one

usage counts every candidate's tokens (OpenAI's best_of does); the judge's tokens are in scorer_usage.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from dataclasses import dataclass, field

from fastapi import Request

from tokenloom.engine.outputs import CompletionOutput, RequestOutput
from tokenloom.entrypoints.app_state import get_state
from tokenloom.entrypoints.openai.protocol import usage
from tokenloom.entrypoints.server_state import APIError, ServedModel
from tokenloom.entrypoints.streaming import final_outputs
from tokenloom.sampling_params import SamplingParams
from tokenloom.ttc import Scorer, TTCError, compile_answer_regex, extract_answer, majority, rank

DEFAULT_VOTES = 8  # self_consistency.n when neither it nor the request's n says how many


@dataclass
class Selection:
    """The chosen completions of each prompt (numbered 0..n-1) and what the response adds for them."""
    outputs: list[RequestOutput]
    choice_fields: list[list[dict]]  # per prompt, per chosen completion: score / answer
    completion_tokens: int  # every candidate's
    response_fields: dict = field(default_factory=dict)  # answer and votes, or scorer_usage


@dataclass
class TTCPlan:
    n: int  # completions returned per prompt
    best_of: int | None = None  # candidates generated (None: n)
    scorer: Scorer | None = None
    judge: ServedModel | None = None
    answer_regex: re.Pattern | None = None

    def engine_params(self, params: SamplingParams) -> SamplingParams:
        """The engine request: every candidate in one request; logprobs taken for ranking and tie-breaking (the
        response shows them only when asked)."""
        logprobs = 0 if params.logprobs is None else params.logprobs
        if self.answer_regex is not None:
            return dataclasses.replace(params, n=self.n, best_of=None, logprobs=logprobs)
        if self.scorer is not None:
            return dataclasses.replace(params, n=self.best_of or self.n, best_of=None)
        return dataclasses.replace(params, best_of=self.best_of, logprobs=logprobs)

    async def select(self, outs: list[RequestOutput], prompt_texts: list[str], request_id: str) -> Selection:
        """Choose among each prompt's finished candidates."""
        if self.answer_regex is not None:
            return self._vote(outs)
        if self.scorer is not None:
            return await self._judged(outs, prompt_texts, request_id)
        return Selection(outs, [[{"score": _finite(o.mean_logprob)} for o in out.outputs] for out in outs],
                         sum(len(o.token_ids) for out in outs for o in (out.candidates or out.outputs)))

    def _vote(self, outs: list[RequestOutput]) -> Selection:
        (out,) = outs
        answers = [extract_answer(o.text, self.answer_regex) for o in out.outputs]
        answer, votes = majority(answers, [o.cumulative_logprob for o in out.outputs])
        return Selection(outs, [[{"answer": a} for a in answers]], sum(len(o.token_ids) for o in out.outputs),
                         {"answer": answer, "votes": votes})

    async def _judged(self, outs: list[RequestOutput], prompt_texts: list[str], request_id: str) -> Selection:
        scorer, judge = self.scorer, self.judge
        jobs = [(i, o) for i, out in enumerate(outs) for o in out.outputs]
        texts = [scorer.render(prompt_texts[i], o.text) for i, o in jobs]
        chat = scorer.chat if scorer.chat is not None else judge.tokenizer.chat_template is not None
        prompts = (await asyncio.gather(*(judge.chat_prompt_ids([{"role": "user", "content": t}]) for t in texts))
                   if chat else texts)
        streams = await judge.submit_all(prompts, scorer.sampling_params(), f"{request_id}-judge")
        replies = [r async for r in final_outputs(judge, streams)]
        scores = [_finite(scorer.score(r.outputs[0], judge.token_text)) for r in replies]
        chosen, fields, k = [], [], 0
        for out in outs:
            mine = scores[k : k + len(out.outputs)]
            k += len(out.outputs)
            order = rank(mine)[: self.n]
            chosen.append(dataclasses.replace(out, outputs=[_renumber(out.outputs[j], r) for r, j in enumerate(order)],
                                              candidates=out.outputs))
            fields.append([{"score": mine[j]} for j in order])
        judge_usage = usage(sum(len(r.prompt_token_ids) for r in replies),
                            sum(len(r.outputs[0].token_ids) for r in replies))
        return Selection(chosen, fields, sum(len(o.token_ids) for _, o in jobs), {"scorer_usage": judge_usage})


def _renumber(o: CompletionOutput, index: int) -> CompletionOutput:
    return dataclasses.replace(o, index=index)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


async def plan_ttc(request: Request, body, state: ServedModel, num_prompts: int) -> TTCPlan | None:
    """The request's test-time-compute plan (None: a plain request); a 400 for what cannot be combined."""
    best_of, vote, scorer = body.best_of, body.self_consistency, body.scorer
    if best_of is not None and best_of < body.n:
        raise APIError(400, f"best_of must be >= n ({body.n}), got {best_of}", param="best_of")
    asked = [name for name, on in (("best_of", best_of is not None and best_of > 1), ("scorer", scorer is not None),
                                   ("self_consistency", vote is not None)) if on]
    if body.stream and asked:
        raise APIError(400, f"{asked[0]} cannot be used with stream: the best candidates are known only once all "
                            "have finished", param=asked[0])
    if vote is not None:
        return _vote_plan(body, vote, num_prompts)
    if scorer is not None:
        return TTCPlan(body.n, best_of, *await _judge(request, body, scorer, state))
    if best_of is not None and best_of > body.n:
        return TTCPlan(body.n, best_of)
    return None


def _vote_plan(body, vote, num_prompts: int) -> TTCPlan:
    if body.scorer is not None or body.best_of not in (None, 1):
        raise APIError(400, "self_consistency cannot be combined with best_of or scorer", param="self_consistency")
    if num_prompts != 1:
        raise APIError(400, "self_consistency takes one prompt (it answers with one majority answer)",
                       param="prompt")
    n = vote.n or (body.n if body.n > 1 else DEFAULT_VOTES)
    if body.n != 1 and body.n != n:
        raise APIError(400, f"n ({body.n}) and self_consistency.n ({n}) differ: every sampled completion is "
                            "returned, so give one of them", param="n")
    try:
        return TTCPlan(n, answer_regex=compile_answer_regex(vote.answer_regex))
    except TTCError as exc:
        raise APIError(400, f"self_consistency: {exc}", param="self_consistency") from None


async def _judge(request: Request, body, scorer_body, state: ServedModel) -> tuple[Scorer, ServedModel]:
    """The scorer and the served model that judges (resolved, and leased, like the request's own model)."""
    try:
        scorer = Scorer(template=scorer_body.prompt, method=scorer_body.method, label=scorer_body.label,
                        chat=scorer_body.chat, max_tokens=scorer_body.max_tokens)
    except TTCError as exc:
        raise APIError(400, f"scorer: {exc}", param="scorer") from None
    judge = state
    if scorer_body.model is not None:
        _, _, judge = await get_state(request).resolve(request, scorer_body.model, user=body.user)
    if judge.tokenizer is None:
        raise APIError(400, "scorer: the judge model has no tokenizer, so it cannot read the candidates",
                       param="scorer")
    if scorer.chat and judge.tokenizer.chat_template is None:
        raise APIError(400, "scorer: chat is true, but the judge model has no chat template", param="scorer")
    return scorer, judge
