"""Multiple-choice accuracy by choice log-likelihood, the way lm-evaluation-harness scores `multiple_choice`
tasks (ARC, MMLU, HellaSwag...): each choice is a continuation `target_delimiter + choice` of the question's
context; its score is the sum of its tokens' log-probabilities; `acc` takes the best sum, `acc_norm` the best
sum per character of the choice and `acc_bytes` per UTF-8 byte (lm-eval's names).

Items are JSONL, one per line: {"question": str, "choices": [str, ...], "answer": index or letter,
"subject": optional str}. Two prompt formats:
  cloze    "Question: {question}\\nAnswer:" + " " + choice text   (lm-eval's arc_easy / the brief's default)
  letters  MMLU's: the question, the choices as "A. ..." lines, "Answer:" + " A" / " B" ...
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from tokenloom.config import TokenloomError
from tokenloom.eval.jsonl import read_jsonl

FORMATS = ("cloze", "letters")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class MCItem:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""


@dataclass
class MCResult:
    acc: float
    acc_norm: float
    acc_bytes: float
    items: int
    acc_stderr: float
    seconds: float
    per_item: list[dict] = field(default_factory=list)

    def to_dict(self, with_items: bool = False) -> dict:
        out = dict(acc=self.acc, acc_stderr=self.acc_stderr, acc_norm=self.acc_norm, acc_bytes=self.acc_bytes,
                   items=self.items, seconds=self.seconds)
        if with_items:
            out["per_item"] = self.per_item
        return out


def _answer_index(raw, n_choices: int, where: str) -> int:
    if isinstance(raw, str) and len(raw) == 1 and raw.upper() in LETTERS:
        raw = LETTERS.index(raw.upper())
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < n_choices:
        raise TokenloomError(f"{where}: answer must be a choice index in [0, {n_choices}) or its letter, got {raw!r}")
    return raw


def parse_item(obj, where: str) -> MCItem:
    if not isinstance(obj, dict):
        raise TokenloomError(f"{where}: an item must be a JSON object")
    question, choices = obj.get("question"), obj.get("choices")
    if not isinstance(question, str) or not question.strip():
        raise TokenloomError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
        raise TokenloomError(f"{where}: 'choices' must be a list of at least 2 non-empty strings")
    if "answer" not in obj:
        raise TokenloomError(f"{where}: 'answer' is missing")
    return MCItem(question, tuple(choices), _answer_index(obj["answer"], len(choices), where),
                  str(obj.get("subject") or ""))


def load_items(path: str | Path) -> list[MCItem]:
    items = [parse_item(obj, where) for obj, where in read_jsonl(path, "items")]
    if not items:
        raise TokenloomError(f"no items in '{path}'")
    return items


def requests_of(item: MCItem, fmt: str = "cloze") -> tuple[str, list[str], list[str]]:
    """(context, continuations, the choice strings lengths are normalised by) of one item."""
    if fmt == "cloze":
        return f"Question: {item.question}\nAnswer:", [" " + c for c in item.choices], list(item.choices)
    if fmt == "letters":
        if len(item.choices) > len(LETTERS):
            raise TokenloomError(f"the letters format takes at most {len(LETTERS)} choices")
        subject = item.subject.replace("_", " ")
        head = f"The following are multiple choice questions (with answers) about {subject}.\n\n" if subject else ""
        lines = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(item.choices))
        letters = list(LETTERS[: len(item.choices)])
        return f"{head}{item.question.strip()}{lines}\nAnswer:", [" " + x for x in letters], letters
    raise TokenloomError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")


def encode_pair(tokenizer, context: str, continuation: str, add_bos: bool = False) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair: trailing spaces of the context move to the continuation; the whole
    text is encoded once and split where the context's own encoding ends (so merges across the boundary count
    for the continuation, as in lm-eval)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    ctx = tokenizer.encode(context, add_special_tokens=False)
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise TokenloomError("this model's tokenizer has no BOS token to add")
        whole, ctx = [tokenizer.bos_token_id] + whole, [tokenizer.bos_token_id] + ctx
    if not ctx:
        raise TokenloomError("an item's context encodes to no tokens")
    return ctx, whole[len(ctx):]


def continuation_logprobs(llm, pairs: list[tuple[list[int], list[int]]], progress: bool = False) -> list[float]:
    """Sum of each continuation's token log-probabilities after its context, from the engine's prompt logprobs
    (one prompt per pair, all batched)."""
    from tokenloom.sampling_params import SamplingParams

    for ctx, cont in pairs:
        if not cont:
            raise TokenloomError("a choice encodes to no tokens")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate([ctx + cont for ctx, cont in pairs], params, use_tqdm=progress)
    sums = []
    for (ctx, cont), out in zip(pairs, outputs):
        ids = ctx + cont
        sums.append(sum(out.prompt_logprobs[pos][ids[pos]] for pos in range(len(ctx), len(ids))))
    return sums


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima, as np.argmax


def evaluate_mc(llm, items: list[MCItem], fmt: str = "cloze", add_bos: bool = False,
                progress: bool = False) -> MCResult:
    """acc / acc_norm / acc_bytes of `llm` (an LLM) on the items, scored as lm-eval scores them."""
    if llm.tokenizer is None:
        raise TokenloomError("this model has no tokenizer: the multiple-choice eval needs one")
    start = time.perf_counter()
    pairs, spans, norms = [], [], []
    for item in items:
        context, continuations, shown = requests_of(item, fmt)
        spans.append((len(pairs), len(pairs) + len(continuations)))
        pairs.extend(encode_pair(llm.tokenizer, context, c, add_bos) for c in continuations)
        norms.append(shown)
    lls = continuation_logprobs(llm, pairs, progress)
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    per_item = []
    for item, (a, b), shown in zip(items, spans, norms):
        ll = lls[a:b]
        preds = {"acc": _argmax(ll), "acc_norm": _argmax([x / len(s) for x, s in zip(ll, shown)]),
                 "acc_bytes": _argmax([x / len(s.encode("utf-8")) for x, s in zip(ll, shown)])}
        for k, pred in preds.items():
            hits[k] += pred == item.answer
        per_item.append(dict(question=item.question, answer=item.answer, pred=preds["acc"],
                             pred_norm=preds["acc_norm"], loglikelihoods=ll))
    n = len(items)
    acc = hits["acc"] / n
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0  # lm-eval's sample stderr of a mean
    return MCResult(acc, hits["acc_norm"] / n, hits["acc_bytes"] / n, n, stderr, time.perf_counter() - start,
                    per_item)
