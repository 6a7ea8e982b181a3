"""Multiple choice by log-likelihood: lm-eval's tokenization of (context, continuation) pairs, continuation
log-probabilities against a transformers forward, and the items file. (That the accuracy equals lm-eval's own,
through the server, is tests/eval/test_lm_eval_server.py.)"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tokenloom.config import TokenloomError
from tokenloom.eval.multiple_choice import (
    MCItem,
    continuation_logprobs,
    encode_pair,
    load_items,
    requests_of,
)

ITEMS = Path(__file__).parent / "data" / "mc_items.jsonl"


def test_shipped_items_are_valid():
    items = load_items(ITEMS)
    assert 20 <= len(items) <= 40
    assert all(len(i.choices) == 4 and 0 <= i.answer < 4 for i in items)
    assert len({i.answer for i in items}) == 4  # the right answer is not always in the same place


def test_requests_follow_lm_eval_templates():
    item = MCItem("What is 2 + 2?", ("3", "4"), 1, "elementary_mathematics")
    assert requests_of(item, "cloze") == ("Question: What is 2 + 2?\nAnswer:", [" 3", " 4"], ["3", "4"])
    ctx, conts, shown = requests_of(item, "letters")  # lm-eval's mmlu default template
    assert ctx == ("The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
                   "What is 2 + 2?\nA. 3\nB. 4\nAnswer:")
    assert conts == [" A", " B"] and shown == ["A", "B"]
    with pytest.raises(TokenloomError):
        requests_of(item, "nope")


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "answer"),
    ('{"question": "", "choices": ["a", "b"], "answer": 0}', "question"),
    ('{"question": "q", "choices": ["a", "b"]}', "answer"),
    ('not json', "not JSON"),
])
def test_bad_items_are_refused(tmp_path, line, message):
    path = tmp_path / "items.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(TokenloomError, match=message):
        load_items(path)


def test_letter_answers(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b", "c"], "answer": "c"}) + "\n")
    assert load_items(path)[0].answer == 2


def test_cli_bad_items_is_one_line(tmp_path, capsys):
    from tokenloom.cli.main import main

    assert main(["eval", "mc", "--items", str(tmp_path / "missing.jsonl")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: items file not found") and err.count("\n") == 1


def test_continuation_logprobs_match_transformers(tiny_llama):
    """Sum of the continuation's token logprobs from the engine's prompt logprobs = a transformers forward."""
    from tokenloom import LLM

    path, hf = tiny_llama
    g = torch.Generator().manual_seed(3)
    pairs = [(torch.randint(0, 320, (n,), generator=g).tolist(), torch.randint(0, 320, (m,), generator=g).tolist())
             for n, m in [(1, 1), (5, 3), (17, 1), (40, 9)]]
    llm = LLM(str(path), dtype="float32")
    ours = continuation_logprobs(llm, pairs)
    for (ctx, cont), got in zip(pairs, ours):
        ids = torch.tensor(ctx + cont)
        with torch.no_grad():
            logp = torch.log_softmax(hf(ids[None]).logits[0].double(), -1)
        ref = sum(logp[p - 1, ids[p]].item() for p in range(len(ctx), len(ids)))
        assert got == pytest.approx(ref, abs=1e-4)
    with pytest.raises(TokenloomError):
        continuation_logprobs(llm, [([1, 2], [])])


@pytest.mark.slow
def test_encode_pair_is_lm_evals(default_gguf):
    """Our split of context and continuation tokens is lm-eval's TemplateLM._encode_pair (trailing spaces move to
    the continuation; the whole text is encoded once)."""
    from lm_eval.api.model import TemplateLM

    from tokenloom.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(str(default_gguf))
    lm = SimpleNamespace(backend="causal", tok_encode=lambda s, **kw: tok.encode(s, add_special_tokens=False))
    for ctx, cont in [("Question: What is 7 + 5?\nAnswer:", " 12"), ("The sky is ", "blue"),
                      ("Answer:", " the Earth"), ("x  ", " y"), ("Héllo wörld,", " ünïcode")]:
        assert encode_pair(tok, ctx, cont) == tuple(TemplateLM._encode_pair(lm, ctx, cont)), (ctx, cont)
    ctx, cont = encode_pair(tok, "Answer:", " 12", add_bos=True)
    assert ctx[0] == tok.bos_token_id and cont == encode_pair(tok, "Answer:", " 12")[1]


@pytest.mark.slow
def test_exported_tokenizer_encodes_as_ours(default_gguf, tmp_path, capsys, monkeypatch):
    """`tokenloom eval export-tokenizer`: a folder transformers loads offline that encodes as tokenloom does (what
    lm-eval's local-completions needs to send the server token ids it scores)."""
    from transformers import AutoTokenizer

    from tokenloom.cli.main import main
    from tokenloom.tokenizer import Tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["eval", "export-tokenizer", str(default_gguf), "--out", str(tmp_path / "tok")]) == 0
    hf = AutoTokenizer.from_pretrained(capsys.readouterr().out.strip())
    ours = Tokenizer.from_gguf(str(default_gguf))
    for text in ["Question: What is 7 + 5?\nAnswer: 12", "  spaces\tand\nnewlines  ", "ünïcode — dashes",
                 "<|im_start|>user\nhi<|im_end|>", "def f(x):\n    return x ** 2\n"]:
        assert hf(text, add_special_tokens=False).input_ids == ours.encode(text, add_special_tokens=False), text
        assert hf.decode(ours.encode(text)) == ours.decode(ours.encode(text))
