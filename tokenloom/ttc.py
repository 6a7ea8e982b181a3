"""Test-time compute: spend more generation on one prompt for a better answer. Three ways, each over N candidates
sampled from one prefill (the N completions of a prompt fork its KV blocks copy-on-write, as n > 1 always does):

    best_of(llm, prompt, 8)                              the candidate of the highest mean token logprob
                                                         (OpenAI's legacy best_of; SamplingParams.best_of)
    best_of(llm, prompt, 8, scorer=Scorer(), judge=j)    the candidate a judge model scores highest
    self_consistency(llm, prompt, 8, r"answer is (\\d+)") the majority answer the regex extracts (ties: the answer
                                                         whose candidates' total logprob is highest)
    score(judge, prompt, completions, Scorer(...))       a judge's score of each completion

The server offers the same on /v1/completions and /v1/chat/completions (`best_of`, `scorer`, `self_consistency`;
entrypoints/openai/serving_ttc.py), with the pieces below: Scorer (the judge's prompt, how its answer becomes a
score), rank, extract_answer and majority.

A judge's score is, by Scorer.method:
    yes_logprob  log P(the judge's first token is the label, "Yes" by default), over the tokens that read as the
                 label (stripped, case-insensitive) among its 20 most likely first tokens: the log of their summed
                 probability (when none is among them, the 20th's logprob, a bound from above). Higher = better.
    number       the first number in the judge's reply (greedy, max_tokens tokens), e.g. a 1-10 rating; None
                 (ranked last) when it gives none.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenloom.config import TokenloomError
from tokenloom.engine.outputs import CompletionOutput, RequestOutput
from tokenloom.sampling_params import SamplingParams

METHODS = ("yes_logprob", "number")
MAX_REGEX_CHARS = 1000
JUDGE_TOP_LOGPROBS = 20  # the most the engine returns per position
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")

DEFAULT_TEMPLATES = {
    "yes_logprob": ("Here is a request and a response to it.\n\nRequest:\n{prompt}\n\nResponse:\n{completion}\n\n"
                    "Is the response correct and helpful? Answer Yes or No.\nAnswer:"),
    "number": ("Here is a request and a response to it.\n\nRequest:\n{prompt}\n\nResponse:\n{completion}\n\n"
               "Rate the response from 1 (useless) to 10 (excellent). Reply with the number only.\nRating:"),
}


class TTCError(TokenloomError, ValueError):
    """A bad test-time-compute setting (the server answers it with a 400 naming param)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


# ---- the judge -----------------------------------------------------------------------------------------------
@dataclass
class Scorer:
    """How a judge scores a completion. template: the judge's prompt, where {prompt} and {completion} stand for
    the request's prompt (for chat, the last user message) and the candidate's text (None: DEFAULT_TEMPLATES of
    the method). method: yes_logprob or number (module docstring). label: the answer yes_logprob looks for.
    chat: send the filled template as a user message through the judge's chat template (None: when it has one).
    max_tokens: the judge's reply length for number."""
    template: str | None = None
    method: str = "yes_logprob"
    label: str = "Yes"
    chat: bool | None = None
    max_tokens: int = 16

    def __post_init__(self):
        if self.method not in METHODS:
            raise TTCError(f"scorer method must be one of {', '.join(METHODS)}, got {self.method!r}", "method")
        if self.template is None:
            self.template = DEFAULT_TEMPLATES[self.method]
        if not isinstance(self.template, str) or "{completion}" not in self.template:
            raise TTCError("the scorer's prompt template must contain {completion}", "prompt")
        if not isinstance(self.label, str) or not self.label.strip():
            raise TTCError("the scorer's label must be a non-empty string", "label")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise TTCError(f"the scorer's max_tokens must be an integer >= 1, got {self.max_tokens!r}",
                           "max_tokens")

    def render(self, prompt: str, completion: str) -> str:
        """The judge's prompt for one candidate (plain replacement: other braces in the template stay as they are,
        and a completion holding "{prompt}" is not expanded)."""
        return completion.join(part.replace("{prompt}", prompt) for part in self.template.split("{completion}"))

    def sampling_params(self) -> SamplingParams:
        """The judge's request: greedy; yes_logprob needs only its first token's distribution."""
        if self.method == "yes_logprob":
            return SamplingParams(temperature=0.0, max_tokens=1, logprobs=JUDGE_TOP_LOGPROBS)
        return SamplingParams(temperature=0.0, max_tokens=self.max_tokens)

    def score(self, reply: CompletionOutput, token_text: Callable[[int], str]) -> float | None:
        """The score of the judge's reply (token_text: a token id's text in the judge's vocabulary)."""
        if self.method == "number":
            return parse_number(reply.text)
        entry = reply.logprobs[0] if reply.logprobs else {}
        if not entry:
            return None
        label = self.label.strip().casefold()
        hits = [lp for t, lp in entry.items() if token_text(t).strip().casefold() == label]
        if not hits:
            return min(entry.values())  # every token outside the top 20 is at most this likely
        top = max(hits)
        return top + math.log(sum(math.exp(lp - top) for lp in hits))


def parse_number(text: str) -> float | None:
    """The first number in text (1, -2.5, .5), or None."""
    m = _NUMBER.search(text)
    if m is None:
        return None
    value = float(m.group())
    return value if math.isfinite(value) else None


def rank(scores: Sequence[float | None]) -> list[int]:
    """Indices by score, highest first; None last; equal scores keep index order."""
    return sorted(range(len(scores)), key=lambda i: (scores[i] is None, -(scores[i] or 0.0)))


# ---- self-consistency ------------------------------------------------------------------------------------------
def compile_answer_regex(pattern: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise TTCError("answer_regex must be a non-empty string", "answer_regex")
    if len(pattern) > MAX_REGEX_CHARS:
        raise TTCError(f"answer_regex is longer than {MAX_REGEX_CHARS} characters", "answer_regex")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise TTCError(f"answer_regex is not a valid regular expression: {exc}", "answer_regex") from None


def extract_answer(text: str, pattern: re.Pattern) -> str | None:
    """The answer in a completion: the first match's first capture group if the regex has one, else the whole
    match; stripped. None when nothing matches (or the answer is empty): that candidate does not vote."""
    m = pattern.search(text)
    if m is None:
        return None
    answer = m.group(1) if pattern.groups else m.group(0)
    answer = (answer or "").strip()
    return answer or None


def majority(answers: Sequence[str | None], total_logprobs: Sequence[float | None]
             ) -> tuple[str | None, dict[str, int]]:
    """(the answer with the most votes, votes per answer, most first); a tie goes to the answer whose candidates
    have the highest summed total logprob, then to the answer seen first. (None, {}) when no candidate answered."""
    votes: dict[str, int] = {}
    weight: dict[str, float] = {}
    for a, lp in zip(answers, total_logprobs):
        if a is not None:
            votes[a] = votes.get(a, 0) + 1
            weight[a] = weight.get(a, 0.0) + (lp or 0.0)
    if not votes:
        return None, {}
    order = sorted(votes, key=lambda a: (-votes[a], -weight[a]))  # stable: first seen wins a full tie
    return order[0], {a: votes[a] for a in order}


def last_user_text(messages: Sequence[dict]) -> str:
    """What {prompt} stands for in a judge's template for a chat request: the last user message's text."""
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts
                return "\n".join(p.get("text") or "" for p in content if isinstance(p, dict))
            return content or ""
    return ""


# ---- the Python API over tokenloom.LLM ----------------------------------------------------------------------
@dataclass
class Ranked:
    """best_of's result: the kept candidates, best first, with their scores (mean token logprob, or the judge's),
    and every candidate in index order with its score."""
    outputs: list[CompletionOutput]
    scores: list[float | None]
    candidates: list[CompletionOutput]
    candidate_scores: list[float | None]
    output: RequestOutput  # the engine's output (prompt, metrics)

    @property
    def best(self) -> CompletionOutput:
        return self.outputs[0]


@dataclass
class Vote:
    """self_consistency's result: the majority answer, the votes, and each candidate's answer."""
    answer: str | None
    votes: dict[str, int]
    answers: list[str | None]
    outputs: list[CompletionOutput]
    output: RequestOutput
    winners: list[CompletionOutput] = field(default_factory=list)  # the candidates that gave the answer


def _prompt_of(llm, prompt) -> tuple[str | list[int], str]:
    """(what to generate from, the text {prompt} stands for): a text, token ids, or chat messages."""
    if isinstance(prompt, str):
        return prompt, prompt
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
        return llm.chat_prompt_ids(list(prompt)), last_user_text(prompt)
    ids = [int(t) for t in prompt]
    return ids, llm.tokenizer.decode(ids) if llm.tokenizer is not None else ""


def _candidates_params(params: SamplingParams | None, n: int) -> SamplingParams:
    params = params or SamplingParams()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise TTCError(f"n must be an integer >= 1, got {n!r}", "n")
    return dataclasses.replace(params, n=n, best_of=None, logprobs=0 if params.logprobs is None else params.logprobs)


def best_of(llm, prompt, n: int, params: SamplingParams | None = None, *, keep: int = 1,
            scorer: Scorer | None = None, judge=None) -> Ranked:
    """Sample n candidates of prompt (text, token ids or chat messages) and keep the `keep` best: by mean token
    logprob (SamplingParams.best_of, so exactly what n candidates with the same seed give), or, with a scorer,
    by the judge's score (judge: another LLM, default llm itself)."""
    run = _candidates_params(params, n)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise TTCError(f"keep must be an integer in [1, n], got {keep!r}", "keep")
    source, text = _prompt_of(llm, prompt)
    if scorer is None:
        out = llm.generate(source, dataclasses.replace(run, n=keep, best_of=n))[0]
        cands = out.candidates or out.outputs
        return Ranked(out.outputs, [o.mean_logprob for o in out.outputs], cands,
                      [o.mean_logprob for o in cands], out)
    out = llm.generate(source, run)[0]
    scores = score(judge or llm, text, [o.text for o in out.outputs], scorer)
    order = rank(scores)[:keep]
    return Ranked([out.outputs[i] for i in order], [scores[i] for i in order], out.outputs, scores, out)


def self_consistency(llm, prompt, n: int, answer_regex: str, params: SamplingParams | None = None) -> Vote:
    """Sample n candidates of prompt and return the majority of the answers answer_regex extracts from them."""
    pattern = compile_answer_regex(answer_regex)
    source, _ = _prompt_of(llm, prompt)
    out = llm.generate(source, _candidates_params(params, n))[0]
    answers = [extract_answer(o.text, pattern) for o in out.outputs]
    answer, votes = majority(answers, [o.cumulative_logprob for o in out.outputs])
    winners = [o for o, a in zip(out.outputs, answers) if a is not None and a == answer]
    return Vote(answer, votes, answers, out.outputs, out, winners)


def judge_prompts(judge, prompt: str, completions: Sequence[str], scorer: Scorer) -> list[str | list[int]]:
    """The judge's prompt for each completion: the filled template, through the judge's chat template when
    scorer.chat says so (None: when the judge has one)."""
    tok = judge.tokenizer
    chat = scorer.chat if scorer.chat is not None else tok is not None and tok.chat_template is not None
    texts = [scorer.render(prompt, c) for c in completions]
    if not chat:
        return list(texts)
    return [judge.chat_prompt_ids([{"role": "user", "content": t}]) for t in texts]


def score(judge, prompt: str, completions: Sequence[str], scorer: Scorer | None = None) -> list[float | None]:
    """The judge's (an LLM's) score of each completion of prompt (higher = better; None: no score)."""
    scorer = scorer or Scorer()
    if not completions:
        return []
    replies = judge.generate(judge_prompts(judge, prompt, completions, scorer), scorer.sampling_params())
    decode = judge.tokenizer.decode if judge.tokenizer is not None else (lambda ids: "")
    return [scorer.score(r.outputs[0], lambda t: decode([t])) for r in replies]


judge = score  # the same, by the name a reader may look for
