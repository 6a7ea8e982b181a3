"""Structured output through the engine on the real default model: greedy constrained decoding equals
transformers' greedy decoding under the same grammar's mask (built here, straight from llguidance); speculative
decoding keeps constrained outputs; constrained and free requests share batches, forks and aborts."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tokenloom import SamplingParams
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured_output.backend import BOUNDED_JSON_WHITESPACE

pytestmark = pytest.mark.slow

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0, "maximum": 130},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "pets"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{2,8} (is|was) [0-9]{1,3} years old\."


@pytest.fixture(scope="module")
def hf_model(default_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(default_gguf.parent), gguf_file=default_gguf.name)
    return model, tok


def _hf_constrained_greedy(model, tok, prompt: list[int], grammar: str, eos: list[int], steps: int) -> list[int]:
    """The reference: transformers' forward one token at a time, argmax over the tokens an llguidance matcher
    (made here from the HF tokenizer) allows, until the grammar is complete or EOS is chosen."""
    import llguidance
    import llguidance.hf
    import llguidance.torch as llgt

    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tok, n_vocab=model.config.vocab_size, eos_token=eos),
                                   grammar)
    mask = llgt.allocate_token_bitmask(1, model.config.vocab_size)
    out, past, ids, tokens = None, None, torch.tensor([prompt]), []
    for _ in range(steps):
        with torch.no_grad():
            out = model(ids, past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1:].float()
        llgt.fill_next_token_bitmask(matcher, mask, 0)
        llgt.apply_token_bitmask_inplace(logits, mask)
        token = int(logits.argmax())
        tokens.append(token)
        if token in eos:
            break
        assert matcher.consume_token(token), matcher.get_error()
        if matcher.is_stopped():
            break
        ids = torch.tensor([[token]])
    return tokens


def test_greedy_constrained_decoding_matches_transformers(default_llm, hf_model):
    import llguidance

    model, tok = hf_model
    llm = default_llm
    eos = list(llm.engine.model_config.eos_token_ids)
    json_grammar = llguidance.LLMatcher.grammar_from_json_schema(
        SCHEMA, overrides={"whitespace_pattern": BOUNDED_JSON_WHITESPACE})
    cases = [
        ("Describe a person as JSON:", StructuredOutputsParams(json=SCHEMA), json_grammar),
        ("Tell me about someone:", StructuredOutputsParams(regex=REGEX), llguidance.LLMatcher.grammar_from_regex(REGEX)),
    ]
    for prompt, so, grammar in cases:
        ids = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
        out = llm.generate(ids, SamplingParams(temperature=0, max_tokens=120, structured_outputs=so))[0].outputs[0]
        ref = _hf_constrained_greedy(model, tok, ids, grammar, eos, 120)
        ref = [t for t in ref if t not in eos]
        assert out.token_ids == ref, (out.text, tok.decode(ref))
        assert out.finish_reason == "stop"
    assert llm.engine.stats().grammar_mask_steps > 0


def test_speculative_decoding_keeps_constrained_outputs(default_llm):
    """n-gram drafts are verified under the grammar's mask at every draft position: greedy outputs are those of
    decoding without drafts, sampled ones still match the schema."""
    from tokenloom import LLM

    spec = LLM("smollm2-135m", dtype="float32", max_model_len=2048, kv_cache_memory=256 << 20,
               speculative_config={"method": "ngram", "num_speculative_tokens": 4, "adaptive": False})
    example = json.dumps({"name": "Ada", "age": 36, "pets": ["cat", "dog"]})
    prompts = [spec.chat_prompt_ids([{"role": "user", "content": f"Copy this JSON exactly: {example} {k}"}])
               for k in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=80, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    ours = [o.outputs[0] for o in spec.generate(prompts, greedy)]
    plain = [o.outputs[0] for o in default_llm.generate(prompts, greedy)]
    assert [o.token_ids for o in ours] == [o.token_ids for o in plain]
    st = spec.engine.stats()
    assert st.spec_draft_tokens > 0 and st.spec_accepted_tokens > 0
    sampled = SamplingParams(temperature=0.9, max_tokens=150, seed=4,
                             structured_outputs=StructuredOutputsParams(json=SCHEMA))
    for o in spec.generate(prompts, sampled):
        if o.outputs[0].finish_reason == "stop":
            jsonschema.validate(json.loads(o.outputs[0].text), SCHEMA)
    assert spec.engine.stats().num_blocks_used == 0


def test_mixed_batches_forks_and_aborts(default_llm):
    llm = default_llm
    eng = llm.engine
    free = SamplingParams(temperature=0.8, max_tokens=20, seed=1)
    choice = SamplingParams(temperature=1.0, max_tokens=10, n=4, seed=2,
                            structured_outputs=StructuredOutputsParams(choice=["alpha", "beta", "gamma"]))
    regex = SamplingParams(temperature=0.7, max_tokens=30, seed=3, structured_outputs=StructuredOutputsParams(
        regex=r"[0-9]{2}:[0-9]{2}"))
    outs = llm.generate(["Once upon a time", "Pick a word:", "The time is", "Hello"], [free, choice, regex, free])
    assert all(o.text in ("alpha", "beta", "gamma") and o.finish_reason == "stop" for o in outs[1].outputs)
    assert re.fullmatch(r"[0-9]{2}:[0-9]{2}", outs[2].outputs[0].text)
    assert len(outs[0].outputs[0].token_ids) == 20 or outs[0].outputs[0].finish_reason == "stop"
    rid = eng.add_request("Describe a person as JSON:", SamplingParams(
        temperature=0.8, max_tokens=100, structured_outputs=StructuredOutputsParams(json=SCHEMA)))
    for _ in range(5):
        eng.step()
    eng.abort_request(rid)
    while eng.has_unfinished():
        eng.step()
    assert eng.stats().num_blocks_used == 0
