"""Every supported architecture against transformers: logits at prefill and 16 decode steps, greedy tokens."""
from __future__ import annotations

import pytest
import torch

from tokenloom import LLM, SamplingParams
from tests.conftest import make_tiny

STEPS = 16


class _RecordingSampler:
    """Stands in for the runner's sampler and keeps a copy of every logits batch it is given: the logits of both
    decode paths (the compiled stack's and the layers'), as the sampler sees them."""

    def __init__(self, sampler, rec: list):
        self.sampler, self.rec = sampler, rec

    def __call__(self, logits, metadata, return_probs=False, choose=None):
        self.rec.append(logits.clone())
        return self.sampler(logits, metadata, return_probs, choose)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def record_logits(llm: LLM) -> list[torch.Tensor]:
    rec: list[torch.Tensor] = []
    runner = llm.engine.runner
    runner.sampler = _RecordingSampler(runner.sampler, rec)
    return rec


def stop_recording(llm: LLM) -> None:
    runner = llm.engine.runner
    if isinstance(runner.sampler, _RecordingSampler):
        runner.sampler = runner.sampler.sampler


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Independent reference: transformers' own prefill then cached decode, one token at a time."""
    out = model(torch.tensor([prompt]), use_cache=True)
    logits, tokens = [out.logits[0, -1].float()], []
    past = out.past_key_values
    for _ in range(steps):
        tok = int(logits[-1].argmax())
        tokens.append(tok)
        if len(tokens) == steps:
            break
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits[0, -1].float())
    return tokens, logits


CASES = {
    "llama": dict(),
    "llama-tied": dict(tie_word_embeddings=True),
    "llama-bias": dict(attention_bias=True),
    "llama-rope3": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64}),
    "qwen2": dict(),
    "mistral": dict(sliding_window=24),  # a window shorter than the sequence, so it matters
    "mixtral": dict(),
    "qwen3": dict(),  # q/k norm per head, head_dim 32 != hidden 64 / 4 heads (conftest.make_tiny)
    "qwen3-bias": dict(attention_bias=True),
}


def check_against_transformers(case: str, path) -> LLM:
    """Prefill and STEPS decode steps: logits within 1e-4 of transformers' (float32), the same greedy tokens."""
    arch = case.split("-")[0]
    overrides = dict(CASES[case])
    if arch == "mistral":
        overrides["attn_implementation"] = "eager"
    ref = make_tiny(arch, path, **overrides)
    llm = LLM(str(path), dtype="float32", num_blocks=64, block_size=4)  # small blocks: many per sequence
    rec = record_logits(llm)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, ref.config.vocab_size, (21,), generator=g).tolist()
    out = llm.generate(prompt, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))[0]
    ref_tokens, ref_logits = hf_greedy(ref, prompt, STEPS)
    assert len(rec) == STEPS
    for step, (ours, theirs) in enumerate(zip(rec, ref_logits)):
        diff = (ours[0] - theirs).abs().max().item()
        assert diff < 1e-4, f"{case}: step {step} logits differ by {diff}"
    assert out.outputs[0].token_ids == ref_tokens
    assert llm.engine.kv_cache_manager.num_used_blocks == 0
    return llm


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(case, tmp_path):
    check_against_transformers(case, tmp_path)


@pytest.mark.parametrize("kernels", [True, False])
def test_qwen3_qk_norm_on_kernel_and_torch_paths(kernels, tmp_path, monkeypatch, kernel_calls):
    """Qwen3's per-head q/k RMSNorm (rows of head_dim) and the rotary of q and k apart, through the fused CPU
    kernels where they are built and through torch's code: both match transformers. Layer by layer: the
    compiled decode stack (checked against transformers by test_logits_and_greedy_match_transformers) is off."""
    from tokenloom.kernels import cpu_ops

    monkeypatch.setenv("TOKENLOOM_FUSED_DECODE", "0")
    if kernels:
        calls = kernel_calls(cpu_ops.EXTENSION, "the fused CPU kernels")
    else:
        monkeypatch.setattr(cpu_ops.EXTENSION, "state", [None])
    llm = check_against_transformers("qwen3", tmp_path)
    if kernels:
        layers, forwards = llm.engine.model.config.num_layers, STEPS
        assert calls["rotary_"] == 2 * layers * forwards  # q and k rotated apart, every layer, every step
        assert calls["rms_norm"] == (4 * layers + 1) * forwards  # 2 hidden + q and k norms per layer, final


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    import json

    from tokenloom.config import TokenloomError

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(TokenloomError, match="unsupported architecture 'gpt2'"):
        LLM(str(tmp_path))


def test_linear_methods_compute_the_same_product():
    """The float and oneDNN methods of one Linear give F.linear's result; switching methods keeps the layer."""
    import torch.nn.functional as F

    from tokenloom.model_executor.layers.linear import Linear, OneDNNLinearMethod, UnquantizedLinearMethod, _onednn_works

    if not _onednn_works(torch.bfloat16):
        pytest.skip("oneDNN bf16 linear unavailable on this CPU")
    torch.manual_seed(0)
    layer = Linear(64, 96, bias=True, dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.weight)
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    ref = F.linear(x, layer.weight.detach().clone(), layer.bias.detach())
    assert isinstance(layer.method, UnquantizedLinearMethod) and layer.holds_float_weight
    assert torch.equal(layer(x), ref)
    layer.set_method(OneDNNLinearMethod())
    assert not layer.holds_float_weight and not hasattr(layer, "weight")
    assert torch.equal(layer(x), ref)
