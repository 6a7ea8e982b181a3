"""Adapter rows on the compiled decode stack (model_executor/fused_decode.py adds the LoRA deltas itself): a batch
mixing base rows and two adapters gives what the layer-by-layer LoRA path gives (float32: to rounding; bfloat16:
within one bfloat16 step), base rows exactly what they give without adapter rows beside them, and the counters
say which path each ran. PEFT's merged model is the reference of the same path in test_lora.py (_check_logits
asserts that its decode steps ran on the stack)."""
from __future__ import annotations

import pytest
import torch

from tests.lora.test_lora import _greedy, _llm, _prompt, adapters  # noqa: F401  (a fixture)
from tokenloom.kernels import lora_ops
from tokenloom.model_executor import fused_decode

TOKENS = 12

CASES = [("float32", None), ("bfloat16", None), ("float32", "int4")]


def _lp(v):
    return getattr(v, "logprob", v)


@pytest.mark.parametrize("dtype,quant", CASES, ids=[f"{d}-{q}" for d, q in CASES])
def test_adapter_rows_on_the_stack_equal_the_layer_path(tiny_llama, adapters, dtype, quant,  # noqa: F811
                                                        kernel_calls):
    kernel_calls(fused_decode.EXTENSION, "the compiled decode stack")
    lora_calls = kernel_calls(lora_ops.EXTENSION, "the LoRA kernel")
    if dtype == "bfloat16" and not fused_decode.EXTENSION.load().has_bf16():
        pytest.skip("bfloat16 decode stack needs AVX512-BF16")
    path, _ = tiny_llama
    a, b = adapters["all"][0], adapters["rs"][0]
    # a's five rows fill the stack's blocks of one slot's rows (4 + 1) around base and b rows (eight rows: the
    # widest batch the stack takes on dense weights)
    loras = [None, a, b, a, a, b, a, a]
    prompts = [_prompt(60 + i, n=5 + 3 * i) for i in range(len(loras))]
    llm = _llm(path, dtype=dtype, quantization=quant, max_loras=2)
    runner = llm.engine.runner
    fused = runner.fused
    assert fused is not None, fused_decode.FusedDecoder.reason
    params = _greedy(TOKENS, logprobs=3)

    def run(on_stack: bool):
        fused.lora_enabled = on_stack
        llm.engine.reset_prefix_cache()
        steps, rows, calls = dict(runner.steps_by_path), fused.adapter_rows, lora_calls.get("lora_apply_", 0)
        outs = [o.outputs[0] for o in llm.generate(prompts, params, lora_request=loras)]
        counts = {k: runner.steps_by_path[k] - steps[k] for k in steps}
        return outs, counts, fused.adapter_rows - rows, lora_calls.get("lora_apply_", 0) - calls

    stacked, steps_s, rows_s, calls_s = run(True)
    layered, steps_l, rows_l, calls_l = run(False)
    fused.lora_enabled = True
    # which path ran: every decode row of the adapter requests on the stack, the LoRA layers' kernel only in
    # the prefill steps; then with the switch off, no adapter row on the stack and the kernel in every step
    assert rows_s == sum(x is not None for x in loras) * (TOKENS - 1) and steps_s["fused"] >= TOKENS - 1
    assert rows_l == 0 and steps_l["layers"] >= TOKENS
    n_lora = len(llm.engine.lora_manager.layers)
    assert calls_s <= steps_s["layers"] * n_lora and calls_l >= (TOKENS - 1) * n_lora
    tol = 1e-4 if dtype == "float32" else 0.05
    for i, (s, lay) in enumerate(zip(stacked, layered)):
        if loras[i] is None:  # base rows: untouched by their neighbours' adapters, to the bit
            assert s.token_ids == lay.token_ids and s.logprobs == lay.logprobs
            continue
        ts, tl = s.token_ids, lay.token_ids
        same = next((k for k, (x, y) in enumerate(zip(ts, tl)) if x != y), len(ts))
        for ls, ll in zip(s.logprobs[:same], lay.logprobs[:same]):
            common = set(ls) & set(ll)
            assert common and max(abs(_lp(ls[t]) - _lp(ll[t])) for t in common) < tol
        if same < len(ts):  # only where the layer path's top two are tied within bfloat16 rounding
            assert dtype == "bfloat16", (ts, tl)
            ref = lay.logprobs[same]
            assert ts[same] in ref and abs(_lp(ref[ts[same]]) - _lp(ref[tl[same]])) < tol, (ts, tl)
    # the adapters changed their rows (the deltas are not lost on either path)
    assert len({tuple(o.token_ids) for o in stacked[:3]}) == 3


def test_stack_checks_the_slots_it_is_given(tiny_llama, adapters):  # noqa: F811
    """A slot beyond the LoRA layers' slots is an error, not a read past the factors."""
    path, _ = tiny_llama
    llm = _llm(path, max_loras=2)
    fused = llm.engine.runner.fused
    if fused is None:
        pytest.skip(f"no compiled decode stack: {fused_decode.FusedDecoder.reason}")
    llm.generate(_prompt(1), _greedy(2), lora_request=adapters["all"][0])
    assert fused.takes_lora()
    ids, pos = torch.tensor([5]), torch.tensor([3])
    with pytest.raises(RuntimeError, match="LoRA slot"):
        fused.stack.forward(fused.model.embed_tokens(ids), pos, torch.tensor([3]), torch.tensor([[0]]), 4,
                            pos + 1, True, torch.empty(0, dtype=torch.long), torch.tensor([2]), -1)
