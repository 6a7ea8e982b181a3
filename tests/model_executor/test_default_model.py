"""The real default model (SmolLM2-135M-Instruct Q4_1 GGUF) against transformers loading the same file."""
from __future__ import annotations

import pytest
import torch

from tokenloom import SamplingParams
from tests.model_executor.test_models_vs_hf import hf_greedy, record_logits, stop_recording

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "Les trois couleurs du drapeau français sont",
    "List three prime numbers greater than 100:",
    "日本の首都は",
]

# Both sides dequantize the same Q4_1/Q8_0 blocks to identical float32 weights (see test_gguf); what remains
# is float32 summation order in matmuls and attention over 30 layers. Logits are O(10); measured differences
# are ~1e-5..1e-4, so 2e-3 leaves an order of magnitude of headroom while catching any real error (a wrong
# rope, norm or permutation shows up as differences of O(1)).
LOGIT_TOL = 2e-3


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                dtype=torch.float32).eval()


def test_greedy_64_tokens_and_logits_match_transformers(default_llm, hf_model):
    llm = default_llm
    rec = record_logits(llm)
    try:
        for prompt in PROMPTS:
            ids = llm.tokenizer.encode(prompt)
            rec.clear()
            out = llm.generate(ids, SamplingParams(max_tokens=64, temperature=0, ignore_eos=True))[0]
            ref_tokens, ref_logits = hf_greedy(hf_model, ids, 64)
            assert out.outputs[0].token_ids == ref_tokens, prompt
            worst = max((ours[0] - theirs).abs().max().item() for ours, theirs in zip(rec, ref_logits))
            assert worst < LOGIT_TOL, f"{prompt!r}: logits differ by {worst}"
    finally:
        stop_recording(llm)


def test_chat_prompt_ids_match_transformers(default_llm, default_gguf):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi! What's 2+2?"}]
    ref = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert default_llm.render_chat(messages) == ref
    assert default_llm.chat_prompt_ids(messages) == tok(ref, add_special_tokens=False)["input_ids"]


def test_chat_answers_and_stops_at_end_of_turn(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(max_tokens=48, temperature=0))[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    assert out.metrics.ttft is not None and out.metrics.ttft > 0
