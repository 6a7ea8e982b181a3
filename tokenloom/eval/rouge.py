"""ROUGE-1/2/L (precision, recall, F1) of predictions against references, computed by Google's `rouge-score`
package (the implementation papers and HF `evaluate` report), so our numbers are theirs."""
from __future__ import annotations

import re
from functools import lru_cache

from tokenloom.config import TokenloomError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
METRICS = ("precision", "recall", "f1")


@lru_cache(maxsize=8)
def _scorer(rouge_types: tuple[str, ...], use_stemmer: bool):
    from rouge_score import rouge_scorer

    bad = [t for t in rouge_types if not re.fullmatch(r"rouge([1-9][0-9]*|L|Lsum)", t)]
    if bad or not rouge_types:  # rouge-score would only say so when scoring
        raise TokenloomError(f"ROUGE: unknown rouge types {bad} (rouge1, rouge2, ..., rougeL, rougeLsum)")
    return rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)


def rouge(prediction: str, reference: str, rouge_types: tuple[str, ...] = ROUGE_TYPES,
          use_stemmer: bool = False) -> dict[str, dict]:
    """{rouge type: {precision, recall, f1}} of one prediction against its reference (rouge-score's default
    tokenizer: lower-cased alphanumeric tokens; `use_stemmer` applies its Porter stemmer; "rougeLsum" splits
    summaries on newlines)."""
    scores = _scorer(tuple(rouge_types), use_stemmer).score(reference, prediction)  # (target, prediction)
    return {k: {"precision": s.precision, "recall": s.recall, "f1": s.fmeasure} for k, s in scores.items()}


def rouge_corpus(predictions: list[str], references: list[str], rouge_types: tuple[str, ...] = ROUGE_TYPES,
                 use_stemmer: bool = False) -> dict[str, dict]:
    """Mean of the per-pair scores (what HF `evaluate`'s rouge reports with use_aggregator=False, averaged)."""
    if len(predictions) != len(references):
        raise TokenloomError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise TokenloomError("no texts to score")
    scores = [rouge(p, r, rouge_types, use_stemmer) for p, r in zip(predictions, references)]
    return {k: {m: sum(s[k][m] for s in scores) / len(scores) for m in METRICS} for k in scores[0]}
