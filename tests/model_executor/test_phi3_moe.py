"""Phi-3 (LongRoPE), Qwen2-MoE and Qwen3-MoE against transformers: logits within 1e-4 in float32 at prefill and
16 decode steps, the same greedy tokens; LongRoPE's choice of factor set where transformers makes it (prompt
longer than original_max_position_embeddings, or a decode crossing it), whatever the scheduling; the same models
from llama.cpp-style GGUF files written here with the gguf package; MoE blocks quantized keep their routing and
shared expert."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from tokenloom import LLM, SamplingParams
from tests.model_executor.test_models_vs_hf import STEPS, hf_greedy, record_logits

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)
ORIGINAL = 32  # original_max_position_embeddings of the LongRoPE models: prompts of 21 + 16 steps cross it


def longrope(head_dim: int) -> dict:
    """Distinct short and long factors; transformers' default attention factor (max / original = 32: sqrt(2))."""
    return {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": ORIGINAL,
            "short_factor": [1.0 + 0.05 * i for i in range(head_dim // 2)],
            "long_factor": [1.5 + 0.5 * i for i in range(head_dim // 2)]}


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
CASES = {  # name: (arch, config overrides, prompt length)
    "phi3": ("phi3", {}, 21),
    "phi3-window": ("phi3", {"sliding_window": 24}, 21),
    # decode crosses original_max_position_embeddings: short factors for the prompt, long ones from position 32
    "phi3-longrope-decode": ("phi3", {"rope_parameters": longrope(16),
                                      "original_max_position_embeddings": ORIGINAL}, 21),
    # a prompt longer than it: the long factors at every position (head_dim 32: the fused rotary kernel's size)
    "phi3-longrope-prompt": ("phi3", {"rope_parameters": longrope(32), "original_max_position_embeddings": ORIGINAL,
                                      "num_attention_heads": 2, "num_key_value_heads": 1}, 40),
    "qwen2_moe": ("qwen2_moe", {**MOE, "shared_expert_intermediate_size": 96}, 21),
    "qwen2_moe-dense-norm": ("qwen2_moe", {**MOE, "shared_expert_intermediate_size": 96, "mlp_only_layers": [1],
                                           "norm_topk_prob": True}, 21),
    "qwen3_moe": ("qwen3_moe", {**MOE, "head_dim": 32}, 21),
    "qwen3_moe-norm": ("qwen3_moe", {**MOE, "head_dim": 32, "norm_topk_prob": True}, 21),  # as released models
    "qwen3_moe-sparse-step-norm": ("qwen3_moe", {**MOE, "head_dim": 32, "num_hidden_layers": 3,
                                                 "decoder_sparse_step": 2, "norm_topk_prob": True}, 21),
}


def make_tiny_model(arch: str, path, **overrides):
    """A random transformers model saved with save_pretrained: routers, shared-expert gates, biases and q/k norms
    away from their initial values, so every path they take is exercised."""
    import transformers as tf

    cfg_cls, model_cls = {"phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
                          "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
                          "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM)}[arch]
    kw = dict(TINY, **overrides)
    if arch == "phi3":
        kw = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)  # its defaults lie outside the tiny vocabulary
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.3)
            elif name.endswith(".bias"):
                p.normal_(0, 0.5)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def _prompt(length: int, seed: int = 7) -> list[int]:
    return torch.randint(0, TINY["vocab_size"], (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _check_greedy(llm: LLM, ref, prompt: list[int]) -> None:
    """Prefill and STEPS decode logits within 1e-4 of transformers', the same greedy tokens."""
    rec = record_logits(llm)
    out = llm.generate(prompt, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))[0]
    ref_tokens, ref_logits = hf_greedy(ref, prompt, STEPS)
    assert len(rec) == STEPS
    for step, (ours, theirs) in enumerate(zip(rec, ref_logits)):
        diff = (ours[0] - theirs).abs().max().item()
        assert diff < 1e-4, f"step {step}: logits differ by {diff}"
    assert out.outputs[0].token_ids == ref_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(case, tmp_path):
    arch, overrides, prompt_len = CASES[case]
    if "sliding_window" in overrides:
        overrides = dict(overrides, attn_implementation="eager")  # as the Mistral case of test_models_vs_hf
    ref = make_tiny_model(arch, tmp_path, **overrides)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4)
    _check_greedy(llm, ref, _prompt(prompt_len))
    runner = llm.engine.runner
    if arch == "phi3" and runner.fused is not None:  # decodes through the compiled stack and its rotary tables
        assert runner.steps_by_path["fused"] == STEPS - 1
    if "moe" in arch:
        assert runner.fused is None  # the compiled stack has no experts
        layers = llm.engine.model.layers
        cfg = llm.engine.model.config
        assert [type(layer.mlp).__name__ for layer in layers] == [
            "SparseMoE" if cfg.is_moe_layer(i) else "GatedMLP" for i in range(len(layers))]
    assert llm.engine.kv_cache_manager.num_used_blocks == 0


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layers"])
@pytest.mark.parametrize("prompt_len", [21, 40])
def test_longrope_chunked_prefill(prompt_len, fused, tmp_path, monkeypatch):
    """A prompt prefilled in chunks, mostly of one token (a step holds 4 tokens and three other requests
    decode), decoding through the compiled stack or layer by layer: transformers' rotation all the same, since
    each token's factor set follows its own prompt's length and its position, not how the step was cut."""
    if not fused:
        monkeypatch.setenv("TOKENLOOM_FUSED_DECODE", "0")
    ref = make_tiny_model("phi3", tmp_path, rope_parameters=longrope(16), original_max_position_embeddings=ORIGINAL)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=128, block_size=4, max_num_batched_tokens=4)
    if not fused:
        assert llm.engine.runner.fused is None
    prompts = [_prompt(3, seed=seed) for seed in (8, 9, 10)] + [_prompt(prompt_len)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True, logprobs=5))
    for prompt, out in zip(prompts, outs):  # per request: its greedy tokens and their top-5 log-probabilities
        ref_tokens, ref_logits = hf_greedy(ref, prompt, STEPS)
        assert out.outputs[0].token_ids == ref_tokens
        for ours, theirs in zip(out.outputs[0].logprobs, ref_logits):
            ref_lp = torch.log_softmax(theirs, -1)
            assert max(abs(getattr(v, "logprob", v) - ref_lp[t].item()) for t, v in ours.items()) < 1e-4


def test_longrope_factor_choice_is_transformers(tmp_path):
    """transformers' Phi-3 rotary embedding takes the long factors for a forward whose last position + 1 exceeds
    original_max_position_embeddings; ours gives each token the same cos/sin: a prompt of 32 tokens short, of 33
    long at every position; decode tokens by their own position, long from position 32 (vLLM's check,
    positions > original, switches one position later)."""
    import transformers as tf

    from tokenloom.config import ModelConfig
    from tokenloom.model_executor.forward_context import ForwardContext, set_forward_context
    from tokenloom.model_executor.layers.rotary import RotaryEmbedding

    ref = make_tiny_model("phi3", tmp_path, rope_parameters=longrope(16), original_max_position_embeddings=ORIGINAL)
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "config.json").read_text()))
    ours = RotaryEmbedding(cfg, 64)
    hf_rotary = ref.model.rotary_emb
    assert isinstance(hf_rotary, tf.models.phi3.modeling_phi3.Phi3RotaryEmbedding)
    x = torch.zeros(1)

    def same(positions: list[int], prompt_len: int) -> None:
        pos = torch.tensor(positions)
        hf_cos, hf_sin = hf_rotary(x, pos[None])
        with set_forward_context(ForwardContext(None, prompt_lens=torch.full_like(pos, prompt_len))):
            cos, sin = ours(pos, torch.float32)
        assert torch.equal(cos[:, 0], hf_cos[0]) and torch.equal(sin[:, 0], hf_sin[0])

    short_cos = hf_rotary(x, torch.arange(ORIGINAL)[None])[0][0]
    long_cos = hf_rotary(x, torch.arange(ORIGINAL + 1)[None])[0][0]
    assert not torch.equal(short_cos[1], long_cos[1])  # the two sets differ
    same(list(range(ORIGINAL)), ORIGINAL)  # a prompt of 32: short
    same(list(range(ORIGINAL + 1)), ORIGINAL + 1)  # of 33: long everywhere
    same([ORIGINAL - 1], 5)  # decoding position 31 (sequence 32): short
    same([ORIGINAL], 5)  # position 32 (sequence 33): long
    same([ORIGINAL + 5], 5)


def test_config_from_hf_longrope_and_moe_fields():
    from tokenloom.config import ModelConfig, TokenloomError
    from tokenloom.model_executor.model_loader import config_from_hf

    base = dict(model_type="phi3", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=131072)
    legacy = dict(base, rope_scaling={"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    # an early Phi-3 config: "su", no original length anywhere: transformers' Phi3Config default, 4096
    scaling = config_from_hf(legacy).rope_scaling
    assert scaling["rope_type"] == "longrope" and scaling["original_max_position_embeddings"] == 4096
    # config.json's top-level value wins over the rope dict's (as transformers)
    nested = dict(legacy, original_max_position_embeddings=8192,
                  rope_scaling={**legacy["rope_scaling"], "original_max_position_embeddings": 16})
    assert config_from_hf(nested).rope_scaling["original_max_position_embeddings"] == 8192
    with pytest.raises(TokenloomError, match="partial rotary"):
        ModelConfig.from_hf(dict(base, partial_rotary_factor=0.75))
    qwen = config_from_hf(dict(base, model_type="qwen2_moe", num_experts=8, num_experts_per_tok=2,
                               mlp_only_layers=[0]))
    assert qwen.attention_bias and not qwen.norm_topk_prob  # Qwen2MoeConfig's defaults: qkv_bias, no renorm
    assert (qwen.moe_intermediate_size, qwen.shared_expert_intermediate_size) == (1408, 5632)
    assert [qwen.is_moe_layer(i) for i in range(2)] == [False, True]
    with pytest.raises(TokenloomError, match="num_experts_per_tok"):
        config_from_hf(dict(base, model_type="qwen3_moe", num_experts=2, num_experts_per_tok=3))


# ---------------------------------------------------------------------------------------------------------
# GGUF: the tiny models in llama.cpp's layout (convert_hf_to_gguf.py's names and metadata)

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
          "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
          "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
          "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
          "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
          "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp"}
_EXPERT = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}


def _gguf_tensors(path) -> dict[str, np.ndarray]:
    """The saved checkpoint's tensors under llama.cpp's names, each layer's experts stacked [E, out, in]."""
    from safetensors.torch import load_file

    tensors: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for name, t in load_file(str(path / "model.safetensors")).items():
        module, suffix = name.rsplit(".", 1)
        w = t.float().numpy()
        if module in _GLOBAL:
            tensors[f"{_GLOBAL[module]}.{suffix}"] = w
            continue
        layer, rest = module.removeprefix("model.layers.").split(".", 1)
        if rest.startswith("mlp.experts."):
            j, part = rest.removeprefix("mlp.experts.").split(".")
            experts.setdefault(f"blk.{layer}.{_EXPERT[part]}.weight", {})[int(j)] = w
        elif rest == "mlp.shared_expert_gate":
            tensors[f"blk.{layer}.ffn_gate_inp_shexp.{suffix}"] = w.reshape(-1)  # llama.cpp keeps a vector
        else:
            tensors[f"blk.{layer}.{_LAYER[rest]}.{suffix}"] = w
    for name, by_j in experts.items():
        tensors[name] = np.stack([by_j[j] for j in sorted(by_j)])
    return tensors


def _gguf_metadata(gguf_arch: str, hf: dict) -> dict:
    k = lambda key: f"{gguf_arch}.{key}"  # noqa: E731
    kv = {k("block_count"): hf["num_hidden_layers"], k("context_length"): hf["max_position_embeddings"],
          k("embedding_length"): hf["hidden_size"], k("feed_forward_length"): hf["intermediate_size"],
          k("attention.head_count"): hf["num_attention_heads"], k("attention.head_count_kv"): hf["num_key_value_heads"],
          k("attention.layer_norm_rms_epsilon"): float(hf["rms_norm_eps"]), k("rope.freq_base"): 10000.0,
          k("vocab_size"): hf["vocab_size"]}
    if hf.get("head_dim"):
        kv[k("attention.key_length")] = kv[k("attention.value_length")] = hf["head_dim"]
    if "num_experts_per_tok" in hf:
        kv[k("expert_count")] = hf.get("num_experts") or hf["num_local_experts"]
        kv[k("expert_used_count")] = hf["num_experts_per_tok"]
        kv[k("expert_feed_forward_length")] = hf["moe_intermediate_size"]
        if hf.get("shared_expert_intermediate_size"):
            kv[k("expert_shared_feed_forward_length")] = hf["shared_expert_intermediate_size"]
    if gguf_arch == "phi3":
        original = hf["original_max_position_embeddings"]
        scale = hf["max_position_embeddings"] / original
        kv[k("rope.scaling.original_context_length")] = original
        kv[k("rope.scaling.attn_factor")] = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        kv[k("attention.sliding_window")] = 0  # what convert_hf_to_gguf.py writes for "no window"
        kv[k("rope.dimension_count")] = hf["hidden_size"] // hf["num_attention_heads"]
    return kv


def write_gguf(path, gguf_arch: str, tensors: dict, kv: dict, quantized: tuple[str, ...] = ()):
    """tensors as F32, but those whose name contains one of `quantized`: Q8_0."""
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), gguf_arch)
    for key, v in kv.items():
        (w.add_uint32 if isinstance(v, int) else w.add_float32)(key, v)
    for name, t in tensors.items():
        if any(q in name for q in quantized):
            w.add_tensor(name, quantize(t, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_to_gguf(case: str, tmp_path, quantized: tuple[str, ...] = ()):
    arch, overrides, prompt_len = CASES[case]
    hf_dir = tmp_path / "hf"
    ref = make_tiny_model(arch, hf_dir, **overrides)
    hf = json.loads((hf_dir / "config.json").read_text())
    tensors = _gguf_tensors(hf_dir)
    gguf_arch = arch.replace("_", "")
    if arch == "phi3":  # the factor sets travel as tensors
        tensors["rope_factors_long.weight"] = np.array(hf["rope_parameters"]["long_factor"], np.float32)
        tensors["rope_factors_short.weight"] = np.array(hf["rope_parameters"]["short_factor"], np.float32)
    path = write_gguf(tmp_path / f"{case}.gguf", gguf_arch, tensors, _gguf_metadata(gguf_arch, hf), quantized)
    return ref, hf_dir, path, prompt_len


# llama.cpp renormalises Qwen3-MoE's expert weights always, Qwen2-MoE's never (as the released models' configs)
@pytest.mark.parametrize("case", ["phi3-longrope-prompt", "qwen2_moe", "qwen3_moe-norm"])
def test_gguf_matches_transformers(case, tmp_path):
    """The GGUF file loads into the configuration config.json gives, and its prefill logits (every position) are
    transformers' within 1e-4."""
    from tokenloom.model_executor.model_loader import build_model, config_from_hf, load_gguf
    from tokenloom.model_executor.sequence_forward import SequenceForward

    ref, hf_dir, path, prompt_len = _hf_to_gguf(case, tmp_path)
    cfg, state, _ = load_gguf(str(path))
    want = config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    for field in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "attention_bias",
                  "num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                  "norm_topk_prob", "sliding_window"):
        assert getattr(cfg, field) == getattr(want, field), field
    if want.rope_scaling:
        for key in ("short_factor", "long_factor"):
            assert torch.equal(torch.tensor(cfg.rope_scaling[key]), torch.tensor(want.rope_scaling[key]))
        assert cfg.rope_scaling["original_max_position_embeddings"] == ORIGINAL
    model = build_model(cfg, torch.float32, torch.device("cpu"), 64)
    model.load_hf_weights(state.items())
    ids = _prompt(prompt_len)
    with torch.inference_mode():
        ours = model.compute_logits(SequenceForward(model, prompt_len).hidden(torch.tensor(ids)))
        theirs = ref(torch.tensor([ids])).logits[0].float()
    assert (ours - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("case,quantized", [("qwen2_moe", ("attn_q.", "attn_output", "_shexp.weight")),
                                            ("phi3-longrope-prompt", ("attn_qkv", "ffn_up"))])
def test_gguf_blocks(case, quantized, tmp_path):
    """Q8_0 linears, their blocks kept (quantization "gguf"): Phi-3's fused attn_qkv / ffn_up become quantized
    modules; Qwen2-MoE's shared expert is not among the deferred blocks (no quantized module replaces it), so it
    is loaded. The model's logits stay those of the dequantized file."""
    from tokenloom.model_executor.layers.linear import Linear
    from tokenloom.model_executor.model_loader import build_model, load_gguf
    from tokenloom.model_executor.sequence_forward import SequenceForward
    from tokenloom.quant import quantize_model

    _, _, path, n = _hf_to_gguf(case, tmp_path, quantized=quantized)
    logits = []
    for keep in (False, True):
        cfg, state, meta = load_gguf(str(path), keep_blocks=keep)
        deferred = meta.pop("tokenloom.deferred")
        assert not any("expert" in name for name in deferred) and (bool(deferred) == keep)
        model = build_model(cfg, torch.float32, torch.device("cpu"), 64)
        model.load_hf_weights(state.items(), deferred)
        if keep:
            quantize_model(model, "gguf", gguf_path=path)
            attn = model.layers[0].self_attn
            assert not isinstance(attn.qkv_proj if case.startswith("phi3") else attn.o_proj, Linear)
        with torch.inference_mode():
            logits.append(model.compute_logits(SequenceForward(model, n).hidden(torch.tensor(_prompt(n)))))
    assert (logits[0] - logits[1]).abs().max().item() < 1e-2 * logits[0].abs().max().item()


@pytest.mark.parametrize("case", ["qwen2_moe", "qwen3_moe-sparse-step-norm"])
def test_quantized_experts_keep_routing_and_shared_expert(case, tmp_path):
    """int8 experts: the quantized block keeps the router's renormalisation choice and the (float) shared expert,
    its output near the float model's; saved and loaded again, the same model."""
    from tokenloom.loader.sources import resolve_model
    from tokenloom.model_executor.sequence_forward import SequenceForward
    from tokenloom.quant import quantize_model
    from tokenloom.quant.checkpoint import save_quantized
    from tokenloom.quant.moe import QuantSparseMoE
    from tokenloom.quant.options import QuantOptions
    from tokenloom.worker.model_loading import load_model

    arch, overrides, _ = CASES[case]
    make_tiny_model(arch, tmp_path / "hf", **overrides)
    model, _ = load_model(resolve_model(str(tmp_path / "hf")), torch.float32, torch.device("cpu"))
    moe_layers = [i for i in range(model.config.num_layers) if model.config.is_moe_layer(i)]
    ids = torch.tensor(_prompt(32))
    h0 = SequenceForward(model, 32).hidden(ids)
    res = quantize_model(model, QuantOptions(method="int8", lm_head="none"), return_records=True)
    for i in moe_layers:
        mlp = model.layers[i].mlp
        assert isinstance(mlp, QuantSparseMoE) and mlp.normalize == model.config.norm_topk_prob
        assert (mlp.shared_expert is not None) == (arch == "qwen2_moe")
    h1 = SequenceForward(model, 32).hidden(ids)
    assert (h1 - h0).norm() / h0.norm() < 0.03
    out = save_quantized(model, res, tmp_path / "int8")
    loaded, _ = load_model(resolve_model(str(out)), torch.float32, torch.device("cpu"))
    assert loaded.config.norm_topk_prob == model.config.norm_topk_prob
    assert all(isinstance(loaded.layers[i].mlp, QuantSparseMoE) for i in moe_layers)
    with torch.no_grad():  # the file holds the float tensors (router, shared expert, norms) as float16
        for p in model.parameters():
            p.copy_(p.half().float())
    assert torch.equal(SequenceForward(loaded, 32).hidden(ids), SequenceForward(model, 32).hidden(ids))
