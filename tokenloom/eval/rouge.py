"""ROUGE-1/2/L (precision, recall, F1) of predictions against references, as the rouge-score package computes
them without stemming."""
from __future__ import annotations

import re
from collections import Counter

from tokenloom.config import TokenloomError


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: float, n_pred: int, n_ref: int) -> dict:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge(prediction: str, reference: str) -> dict[str, dict]:
    """ROUGE-1, ROUGE-2 and ROUGE-L (precision, recall, F1) on lower-cased alphanumeric tokens."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    out = {}
    for n in (1, 2):
        pn, rn = _ngrams(p, n), _ngrams(r, n)
        out[f"rouge{n}"] = _f1(sum((pn & rn).values()), sum(pn.values()), sum(rn.values()))
    out["rougeL"] = _f1(_lcs(p, r), len(p), len(r))
    return out


def rouge_corpus(predictions: list[str], references: list[str]) -> dict[str, dict]:
    """Mean of the per-pair scores."""
    if len(predictions) != len(references):
        raise TokenloomError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise TokenloomError("no texts to score")
    scores = [rouge(p, r) for p, r in zip(predictions, references)]
    return {k: {m: sum(s[k][m] for s in scores) / len(scores) for m in ("precision", "recall", "f1")}
            for k in scores[0]}


# ---------------------------------------------------------------------------------------------------------
# CLI
