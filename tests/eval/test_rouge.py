"""ROUGE: our scores are rouge-score's (the package computes them), through the function and the CLI."""
from __future__ import annotations

import json
import math

import pytest

from tokenloom.config import TokenloomError
from tokenloom.eval.rouge import rouge, rouge_corpus

PAIRS = [
    ("The cat was found under the bed.", "The cat was under the bed."),
    ("A quick brown fox jumps over the lazy dog", "The quick brown fox jumped over the lazy dogs"),
    ("Running runners ran; they run!", "The runner runs and ran."),
    ("completely different words here", "nothing overlaps at all"),
    ("Numbers 42 and 7 matter, 42 twice.", "42 matters and 7 too"),
]


@pytest.mark.parametrize("stem", [False, True])
def test_rouge_equals_rouge_score(stem):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem)
    for pred, ref in PAIRS:
        ref_scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        ours = rouge(pred, ref, use_stemmer=stem)
        for k, s in ref_scores.items():
            assert ours[k] == {"precision": s.precision, "recall": s.recall, "f1": s.fmeasure}, (pred, k)
    corpus = rouge_corpus([p for p, _ in PAIRS], [r for _, r in PAIRS], use_stemmer=stem)
    for k in ("rouge1", "rouge2", "rougeL"):
        mean_f = sum(scorer.score(r, p)[k].fmeasure for p, r in PAIRS) / len(PAIRS)
        assert math.isclose(corpus[k]["f1"], mean_f)


def test_rouge_hand_computed_values():
    r = rouge("the cat was found under the bed", "the cat was under the bed")
    assert math.isclose(r["rouge1"]["precision"], 6 / 7) and r["rouge1"]["recall"] == 1.0
    assert math.isclose(r["rouge2"]["recall"], 4 / 5)  # the cat, cat was, under the, the bed
    assert rouge("a b", "c d")["rouge1"]["f1"] == 0.0
    assert rouge("x", "x", rouge_types=("rougeLsum",))["rougeLsum"]["f1"] == 1.0


def test_rouge_errors():
    with pytest.raises(TokenloomError):
        rouge_corpus(["a"], ["a", "b"])
    with pytest.raises(TokenloomError):
        rouge_corpus([], [])
    with pytest.raises(TokenloomError, match="ROUGE"):
        rouge("a", "a", rouge_types=("rouge9x",))


def test_cli_rouge_json(tmp_path, capsys):
    from rouge_score import rouge_scorer

    from tokenloom.cli.main import main

    pred, ref = tmp_path / "pred.txt", tmp_path / "ref.jsonl"
    pred.write_text("\n".join(p for p, _ in PAIRS) + "\n")
    ref.write_text("".join(json.dumps({"text": r}) + "\n" for _, r in PAIRS))
    assert main(["eval", "rouge", "--pred", str(pred), "--ref", str(ref), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert out["pairs"] == len(PAIRS)
    assert math.isclose(out["rougeL"]["f1"], sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in PAIRS) / len(PAIRS))
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    assert main(["eval", "rouge", "--pred", str(bad), "--ref", str(ref)]) == 1
    assert capsys.readouterr().err.startswith("error:")
