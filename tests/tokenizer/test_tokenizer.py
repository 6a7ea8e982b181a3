"""Tokenizer: GGUF-embedded vocabularies vs transformers and llama.cpp, chat templates, streaming decode."""
from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from tokenloom.config import TokenloomError
from tokenloom.tokenizer import IncrementalDetokenizer, Tokenizer

@pytest.fixture(scope="session")
def smollm_gguf(default_gguf) -> str:
    """The default model's GGUF (SmolLM2-135M-Instruct: byte-level BPE, pre='smollm', ChatML template)."""
    return str(default_gguf)


VOCAB_DIR = Path(__file__).parents[1] / "data" / "vocab"

TEXTS = [
    "Hello world! This is a simple ASCII sentence.",
    "café, señor, über, naïve, Ærøskøbing, İstanbul",
    "你好，世界。日本語のテキストです。한국어 문장.",
    "emoji: 😀🎉 👍🏽 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 🇫🇷",
    "def f(x):\n    if x:\n        return [i ** 2 for i in range(x)]\n\treturn None  # done\n",
    "   leading, two  spaces, tabs\t\tand\n\n\nnewlines \r\n trailing   ",
    "12345 3.14159 1,000,000 2024-01-01 0x1F",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "I've said 'RE you sure?' — don't, we'll, they'd",
    "",
    " ",
    "\n",
    (
        "The history of natural language processing generally started in the 1950s, although work can be found "
        "from earlier periods. In 1950, Alan Turing published an article titled \"Computing Machinery and "
        "Intelligence\" which proposed what is now called the Turing test as a criterion of intelligence. "
    ) * 8,
]

MESSAGES_MULTI = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3? Answer in français, s'il te plaît 🙂"},
]
MESSAGES_SINGLE = [{"role": "user", "content": "Hello there!"}]

STREAM_TEXTS = [
    "Emoji: 👨‍👩‍👧‍👦🏳️‍🌈😀 done",
    "CJK: 日本語の文章です。中文句子。한국어.",
    "mixed ñ é 🦙 llama 🐪 — end…",
]


# --------------------------------------------------------------------------------------------------------
# real model (SmolLM2 GGUF) vs transformers' GGUF tokenizer
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def smollm_meta(smollm_gguf):
    from tokenloom.gguf.reader import open_gguf, read_metadata

    return read_metadata(open_gguf(smollm_gguf))


@pytest.fixture(scope="session")
def smollm_tok(smollm_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm_meta)


@pytest.fixture(scope="session")
def hf_ref(smollm_gguf):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(smollm_gguf), gguf_file=os.path.basename(smollm_gguf)
    )


@pytest.mark.slow
def test_gguf_properties(smollm_tok, smollm_meta):
    tok = smollm_tok
    assert tok.vocab_size == len(smollm_meta["tokenizer.ggml.tokens"]) == 49152
    assert tok.bos_token_id == smollm_meta["tokenizer.ggml.bos_token_id"]
    assert tok.eos_token_ids[0] == smollm_meta["tokenizer.ggml.eos_token_id"]
    assert tok.id_to_token(tok.eos_token_ids[0]) == "<|im_end|>"
    assert tok.token_to_id("<|endoftext|>") in tok.eos_token_ids  # llama.cpp's end-of-generation set
    assert tok.add_bos is False  # tokenizer.ggml.add_bos_token = false
    assert tok.chat_template == smollm_meta["tokenizer.chat_template"]
    assert tok.is_special(tok.token_to_id("<|im_start|>"))
    assert not tok.is_special(tok.encode("hello")[0])


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_matches_transformers(smollm_tok, hf_ref, text):
    ids = smollm_tok.encode(text)
    assert ids == hf_ref.encode(text, add_special_tokens=True)
    assert smollm_tok.encode(text, add_special_tokens=False) == hf_ref.encode(text, add_special_tokens=False)
    assert smollm_tok.decode(ids) == text
    assert smollm_tok.decode(ids) == hf_ref.decode(ids)
    assert smollm_tok.decode(ids, skip_special_tokens=True) == hf_ref.decode(ids, skip_special_tokens=True)
    assert smollm_tok.convert_ids_to_tokens(ids) == hf_ref.convert_ids_to_tokens(ids)


@pytest.mark.slow
def test_special_tokens_inline(smollm_tok):
    ids = smollm_tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == smollm_tok.token_to_id("<|im_start|>") == 1
    assert ids[-1] == smollm_tok.token_to_id("<|im_end|>") == 2
    assert smollm_tok.decode(ids, skip_special_tokens=True) == "user\nhi"


@pytest.mark.slow
def test_smollm_digits_split_individually(smollm_tok):
    ids = smollm_tok.encode("12345 3.14159")
    toks = smollm_tok.convert_ids_to_tokens(ids)
    assert toks == ["1", "2", "3", "4", "5", "Ġ", "3", ".", "1", "4", "1", "5", "9"]


@pytest.mark.slow
def test_smollm_whitespace_before_digits_follows_llama_cpp(smollm_tok, hf_ref):
    """transformers' GGUF converter gives pre='smollm' the plain GPT-2 ByteLevel pre-tokenizer (no digit split).
    With SmolLM's vocabulary that only shows on whitespace runs before a digit: llama.cpp (and SmolLM2's own
    tokenizer.json: Digits(individual) + ByteLevel) cut "  8" into "  " + "8" -> ["ĠĠ", "8"], while transformers'
    GGUF tokenizer gives ["Ġ", "Ġ", "8"]. We follow llama.cpp / the original tokenizer; check against a copy of
    transformers' tokenizer with the original pre-tokenizer put back."""
    import random

    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    orig = HFTokenizer.from_str(hf_ref.backend_tokenizer.to_str())
    orig.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    assert smollm_tok.convert_ids_to_tokens(smollm_tok.encode("  8")) == ["ĠĠ", "8"]
    rng = random.Random(1234)
    pool = list("ab Z 019\t\n\r'.,;:!?-_()<>|/\\#$%&*+=~éñßø你好世界한국🙂👍🏽‍🦙\u00a0\u3000ſK①²½٣") + [
        "'s", "'RE", "<|im_start|>", "<|im_end|>", "  ", "\n\n", "   7"]
    texts = ["  8", "\n\n42", "x  1", "\t\t3.5", "a \n 9"] + [
        "".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(300)]
    for text in texts:
        assert smollm_tok.encode(text) == orig.encode(text, add_special_tokens=False).ids, repr(text)
        assert smollm_tok.decode(smollm_tok.encode(text)) == text


@pytest.mark.slow
@pytest.mark.parametrize("messages", [MESSAGES_SINGLE, MESSAGES_MULTI, MESSAGES_MULTI[:3]], ids=["single", "multi", "ends-assistant"])
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_matches_transformers(smollm_tok, hf_ref, messages, gen):
    ours = smollm_tok.apply_chat_template(messages, add_generation_prompt=gen)
    ref = hf_ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    assert ours == ref
    assert smollm_tok.encode(ours, add_special_tokens=False) == hf_ref.apply_chat_template(
        messages, add_generation_prompt=gen, tokenize=True, return_dict=False
    )


CUSTOM_TEMPLATE = """{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
[{{ ns.n }}|{{ m.role }}] {{ m.content | trim }}{% generation %}{{ eos_token }}{% endgeneration %}
{% endfor %}
{% if tools %}TOOLS: {{ tools | tojson }}
{{ tools[0] | tojson(indent=2) }}{% endif %}
JSON: {{ messages[-1] | tojson }} | {{ {'a': '<b>&\\'é', 'z': [1, 2.5, none, true]} | tojson(sort_keys=True) }}
{% if add_generation_prompt %}<assistant>{% endif %}
{% if custom_flag is defined %}flag={{ custom_flag }}{% endif %}"""

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Météo <now>",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.slow
def test_custom_template_features_match_transformers(smollm_tok, hf_ref):
    messages = MESSAGES_MULTI + [{"role": "assistant", "content": None, "tool_calls": None}]
    for kw in ({}, {"tools": TOOLS}, {"custom_flag": "on"}):
        for gen in (True, False):
            ours = smollm_tok.apply_chat_template(messages, add_generation_prompt=gen, chat_template=CUSTOM_TEMPLATE, **kw)
            ref = hf_ref.apply_chat_template(messages, add_generation_prompt=gen, chat_template=CUSTOM_TEMPLATE,
                                             tokenize=False, **kw)
            assert ours == ref


@pytest.mark.slow
def test_continue_final_message_matches_transformers(smollm_tok, hf_ref):
    messages = MESSAGES_SINGLE + [{"role": "assistant", "content": "Sure, here is"}]
    ours = smollm_tok.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    ref = hf_ref.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert ours == ref
    assert ours.endswith("Sure, here is")


@pytest.mark.slow
def test_template_errors(smollm_tok):
    with pytest.raises(TokenloomError, match="boom"):
        smollm_tok.apply_chat_template(MESSAGES_SINGLE, chat_template="{{ raise_exception('boom') }}")
    with pytest.raises(TokenloomError, match="not valid Jinja"):
        smollm_tok.apply_chat_template(MESSAGES_SINGLE, chat_template="{% if %}")
    with pytest.raises(TokenloomError):  # the sandbox refuses attribute tricks
        smollm_tok.apply_chat_template(MESSAGES_SINGLE, chat_template="{{ ''.__class__.__mro__ }}")
    with pytest.raises(TokenloomError, match="empty"):
        smollm_tok.apply_chat_template([])


@pytest.mark.slow
@pytest.mark.parametrize("text", STREAM_TEXTS)
@pytest.mark.parametrize("with_prompt", [False, True])
def test_incremental_detokenizer_real(smollm_tok, text, with_prompt):
    tok = smollm_tok
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_ids[0]]
    assert any("\ufffd" in tok.decode([t]) for t in ids), "the text should split characters over tokens"
    prompt = tok.encode(tok.apply_chat_template(MESSAGES_SINGLE)) if with_prompt else None
    det = IncrementalDetokenizer(tok, prompt_ids=prompt)
    deltas = [det.add([t]) for t in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == det.text == tok.decode(ids, skip_special_tokens=True) == text
    assert det.flush() == ""
    # several tokens at a time, special tokens kept
    det = IncrementalDetokenizer(tok, skip_special_tokens=False)
    deltas = [det.add(ids[i:i + 3]) for i in range(0, len(ids), 3)]
    assert "".join(deltas) == tok.decode(ids) == text + "<|im_end|>"


@pytest.mark.slow
def test_hf_dir_roundtrip(smollm_tok, hf_ref, tmp_path):
    hf_ref.save_pretrained(tmp_path)
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    for text in TEXTS:
        assert tok.encode(text) == smollm_tok.encode(text)
    assert tok.vocab_size == smollm_tok.vocab_size
    assert tok.bos_token_id == smollm_tok.bos_token_id
    assert tok.eos_token_ids == [smollm_tok.eos_token_ids[0]]
    assert tok.add_bos is False
    for msgs in (MESSAGES_SINGLE, MESSAGES_MULTI):
        for gen in (True, False):
            assert tok.apply_chat_template(msgs, add_generation_prompt=gen) == hf_ref.apply_chat_template(
                msgs, add_generation_prompt=gen, tokenize=False)


@pytest.mark.slow
def test_hf_dir_config_variants(smollm_tok, hf_ref, tmp_path):
    """Template inside tokenizer_config.json, explicit add_bos_token, eos ids from generation_config.json."""
    hf_ref.save_pretrained(tmp_path / "src")
    d = tmp_path / "model"
    d.mkdir()
    shutil.copy(tmp_path / "src" / "tokenizer.json", d / "tokenizer.json")
    template = smollm_tok.chat_template
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<|im_start|>", "lstrip": False, "__type": "AddedToken"},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": template}, {"name": "tool_use", "template": "T{{ tools | length }}"}],
    }))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_hf_dir(str(d))
    assert tok.add_bos and tok.bos_token_id == 1
    assert tok.encode("hi") == [1] + smollm_tok.encode("hi")
    assert tok.encode("hi", add_special_tokens=False) == smollm_tok.encode("hi")
    assert tok.eos_token_ids == [2, 0]
    assert tok.chat_template == template
    assert tok.apply_chat_template(MESSAGES_SINGLE) == smollm_tok.apply_chat_template(MESSAGES_SINGLE)
    assert tok.apply_chat_template(MESSAGES_SINGLE, tools=TOOLS) == "T1"

    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (d / "generation_config.json").unlink()
    tok = Tokenizer.from_hf_dir(str(d))
    assert tok.chat_template is None
    with pytest.raises(TokenloomError, match="no chat template"):
        tok.apply_chat_template(MESSAGES_SINGLE)


def test_hf_dir_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenloomError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(str(tmp_path))


# --------------------------------------------------------------------------------------------------------
# llama.cpp's own tokenizer tests (vendor/llama.cpp/models/ggml-vocab-*.gguf + .inp/.out, from the
# llama-cpp-python 0.3.36 sdist; the GGUF tokenizer metadata is stored as gzipped JSON, see README there)
# --------------------------------------------------------------------------------------------------------
GOLDEN = ["gpt-2", "llama-bpe", "llama-spm", "qwen2", "starcoder"]
_golden_cache: dict[str, Tokenizer] = {}


def golden_tokenizer(name: str) -> Tokenizer:
    if name not in _golden_cache:
        with gzip.open(VOCAB_DIR / f"ggml-vocab-{name}.json.gz", "rt", encoding="utf-8") as f:
            _golden_cache[name] = Tokenizer.from_gguf_metadata(json.load(f))
    return _golden_cache[name]


def golden_cases(name: str) -> list[tuple[str, list[int]]]:
    raw = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    sep = "\n__ggml_vocab_test__\n"
    inputs, pos = [], 0
    while pos < len(raw):  # same splitting as llama.cpp's tests/test-tokenizer-0.cpp
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    lines = (VOCAB_DIR / f"ggml-vocab-{name}.gguf.out").read_bytes().decode("utf-8").split("\n")
    assert len(lines) >= len(inputs)
    return [(s, [int(x) for x in line.split()]) for s, line in zip(inputs, lines)]


@pytest.mark.parametrize("name", GOLDEN)
def test_llama_cpp_golden_vocab(name):
    tok = golden_tokenizer(name)
    cases = golden_cases(name)
    assert len(cases) > 30
    bad = [(s, tok.encode(s, add_special_tokens=False), exp) for s, exp in cases
           if tok.encode(s, add_special_tokens=False) != exp]
    assert not bad, "\n".join(f"{s!r}: got {got} expected {exp}" for s, got, exp in bad[:5])
    for s, _ in cases:
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == s


def test_golden_vocab_properties():
    spm = golden_tokenizer("llama-spm")
    assert spm.add_bos and spm.bos_token_id == 1 and spm.eos_token_ids == [2]
    assert spm.encode("Hello world") == [1, 15043, 3186]
    assert spm.encode("") == [1]
    llama3 = golden_tokenizer("llama-bpe")
    assert llama3.add_bos and llama3.encode("Hi")[0] == 128000
    assert llama3.token_to_id("<|eot_id|>") in llama3.eos_token_ids
    qwen = golden_tokenizer("qwen2")
    assert not qwen.add_bos
    assert qwen.encode("<|im_start|>user") == [qwen.token_to_id("<|im_start|>"), qwen.token_to_id("user")]
    assert qwen.token_to_id("<|im_end|>") in qwen.eos_token_ids
    gpt2 = golden_tokenizer("gpt-2")
    assert gpt2.encode("<|endoftext|>") == [50256] and gpt2.chat_template is None
    with pytest.raises(TokenloomError, match="no chat template"):
        gpt2.apply_chat_template(MESSAGES_SINGLE)


def test_spm_special_tokens_and_byte_fallback():
    tok = golden_tokenizer("llama-spm")
    ids = tok.encode("a</s>b 🦙")
    toks = tok.convert_ids_to_tokens(ids)
    assert ids[0] == 1 and 2 in ids  # "</s>" written in the text is the EOS token
    assert toks[-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # 🦙 is not in the vocab: byte fallback
    assert tok.decode(ids, skip_special_tokens=True) == "a b 🦙"  # llama.cpp: a space is prepended after specials


@pytest.mark.parametrize("name", ["llama-spm", "qwen2"])
def test_incremental_detokenizer_byte_tokens(name):
    tok = golden_tokenizer(name)
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        det = IncrementalDetokenizer(tok)
        deltas = [det.add(t) for t in ids]
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == det.text == tok.decode(ids, skip_special_tokens=True) == text
    if name == "llama-spm":  # with prompt context, the first word keeps its space (continuation of the prompt)
        det = IncrementalDetokenizer(tok, prompt_ids=tok.encode("Q: hi A:"))
        assert det.add(tok.encode("yes", add_special_tokens=False)) == " yes"


def test_incremental_detokenizer_flush_and_window():
    tok = golden_tokenizer("qwen2")
    ids = tok.encode("ok 🦙", add_special_tokens=False)
    det = IncrementalDetokenizer(tok)
    out = "".join(det.add(t) for t in ids[:-1])  # stop in the middle of the emoji's bytes
    assert out == "ok"
    tail = det.flush()
    assert tail.startswith(" ") and tail.endswith("\ufffd")
    assert det.text == tok.decode(ids[:-1])

    # each step decodes a bounded window, not the whole output
    ids = tok.encode("word " * 400, add_special_tokens=False)
    seen = []
    orig = tok.decode

    class Spy:
        def decode(self, x, skip_special_tokens=False):
            seen.append(len(x))
            return orig(x, skip_special_tokens=skip_special_tokens)

    det = IncrementalDetokenizer(tok)
    det._tok = Spy()
    for t in ids:
        det.add(t)
    assert det.text == "word " * 400
    assert max(seen) <= 4


# --------------------------------------------------------------------------------------------------------
# pre-tokenizer selection on a synthetic byte-level vocabulary
# --------------------------------------------------------------------------------------------------------
def _byte_level_meta(pre: str | None, extra: list[str], merges: list[str]) -> dict:
    from tokenloom.tokenizer import _bytes_to_unicode

    tokens = ["<|endoftext|>"] + sorted(set(_bytes_to_unicode().values())) + extra
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3] + [1] * (len(tokens) - 1),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": 0,
    }
    if pre is not None:
        meta["tokenizer.ggml.pre"] = pre
    return meta


def test_pre_tokenizer_digits():
    meta = _byte_level_meta("smollm", ["12", "123", "Ġ1", "ab"], ["1 2", "12 3", "Ġ 1", "a b", "b c"])
    smol = Tokenizer.from_gguf_metadata(meta)
    assert smol.convert_ids_to_tokens(smol.encode("123 ab 1")) == ["1", "2", "3", "Ġ", "ab", "Ġ", "1"]
    gpt2 = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "gpt-2"}))
    assert gpt2.convert_ids_to_tokens(gpt2.encode("123 ab 1")) == ["123", "Ġ", "ab", "Ġ1"]
    assert gpt2.decode(gpt2.encode("123 ab 1")) == "123 ab 1"
    # llama3 splits numbers in groups of up to three digits, and the space stays apart from them
    llama3 = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "llama-bpe"}))
    assert llama3.convert_ids_to_tokens(llama3.encode("1231 1", add_special_tokens=False)) == ["123", "1", "Ġ", "1"]
    qwen = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "qwen2"}))
    assert qwen.convert_ids_to_tokens(qwen.encode("123")) == ["1", "2", "3"]


def test_pre_tokenizer_llama3_ignore_merges():
    # "xyz" is a vocabulary word no merge can build: llama3 (ignore_merges) takes the whole word as one token
    meta = _byte_level_meta("llama-bpe", ["xy", "xyz"], ["x y"])
    llama3 = Tokenizer.from_gguf_metadata(meta)
    assert llama3.convert_ids_to_tokens(llama3.encode("xyz", add_special_tokens=False)) == ["xyz"]
    gpt2 = Tokenizer.from_gguf_metadata(dict(meta, **{"tokenizer.ggml.pre": "gpt2"}))
    assert gpt2.convert_ids_to_tokens(gpt2.encode("xyz")) == ["xy", "z"]


def test_unknown_pre_tokenizer_warns(caplog):
    meta = _byte_level_meta("no-such-pre", ["12"], ["1 2"])
    with caplog.at_level(logging.WARNING, logger="tokenloom.tokenizer"):
        tok = Tokenizer.from_gguf_metadata(meta)
    assert "no-such-pre" in caplog.text
    assert tok.convert_ids_to_tokens(tok.encode("12")) == ["12"]  # GPT-2 regex


def test_bad_gguf_tokenizer():
    with pytest.raises(TokenloomError, match="no embedded tokenizer"):
        Tokenizer.from_gguf_metadata({})
    with pytest.raises(TokenloomError, match="unsupported GGUF tokenizer"):
        Tokenizer.from_gguf_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
