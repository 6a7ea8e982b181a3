"""Gemma 2 and Gemma 3 against transformers on tiny random models: logits at prefill and 16 decode steps within 1e-4
(float32) and the same greedy tokens, from safetensors and from a GGUF file written the way llama.cpp writes
Gemma's (norms + 1, q/k not permuted), which transformers reads too; batched, chunked and sliding-window steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY
from tests.model_executor.test_models_vs_hf import STEPS, hf_greedy, record_logits
from tokenloom import LLM, SamplingParams

WINDOW = 8  # shorter than the prompts, so sliding layers see less than global ones

CASES = {
    # two rope bases (linear scaling on the global layers only), head_dim 32 != 64 / 4, a scale of its own
    "gemma3": dict(),
    # final soft-capping low enough to bite; transformers ignores attn_logit_softcapping for Gemma 3, as must we
    "gemma3-softcap": dict(final_logit_softcapping=3.0, attn_logit_softcapping=1.0),
    "gemma2": dict(attn_logit_softcapping=2.0, final_logit_softcapping=3.0),  # both caps low enough to bite
    "gemma2-untied": dict(tie_word_embeddings=False),
}


def make_tiny_gemma(case: str, path=None, **overrides):
    """A random transformers Gemma model (saved with save_pretrained when `path` is given), its norm weights moved
    away from their zero init so that the (1 + weight) scale is exercised."""
    import transformers as tf

    arch = case.split("-")[0]
    kw = dict(TINY, num_hidden_layers=4, head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=24,
              attn_implementation="eager")
    kw["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    if arch == "gemma3":
        kw["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0}}
        cfg_cls, model_cls = tf.Gemma3TextConfig, tf.Gemma3ForCausalLM
    else:
        cfg_cls, model_cls = tf.Gemma2Config, tf.Gemma2ForCausalLM
    kw.update(CASES[case], **overrides)
    torch.manual_seed(1234)
    model = model_cls(cfg_cls(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    if path is not None:
        model.save_pretrained(path)
    return model


def check(llm: LLM, ref, prompt_len: int = 21):
    rec = record_logits(llm)
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(0, ref.config.vocab_size, (prompt_len,), generator=g).tolist()
    out = llm.generate(prompt, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))[0]
    ref_tokens, ref_logits = hf_greedy(ref, prompt, STEPS)
    assert len(rec) == STEPS
    for step, (ours, theirs) in enumerate(zip(rec, ref_logits)):
        diff = (ours[0] - theirs).abs().max().item()
        assert diff < 1e-4, f"step {step} logits differ by {diff}"
    assert out.outputs[0].token_ids == ref_tokens


@pytest.mark.parametrize("case", list(CASES))
def test_safetensors_logits_and_greedy_match_transformers(case, tmp_path):
    ref = make_tiny_gemma(case, tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4)  # small blocks: many per sequence
    assert llm.engine.runner.fused is None  # Gemma runs layer by layer, never through the compiled Llama stack
    check(llm, ref)


def test_batched_and_chunked_steps_match_transformers(tmp_path):
    """Several sequences at once, their prompts prefilled in chunks beside the others' decodes: every step mixes
    sliding-window and global layers over decode and prefill batches; each sequence's greedy tokens are
    transformers' alone."""
    ref = make_tiny_gemma("gemma3", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=128, block_size=4, max_num_batched_tokens=12,
              max_num_seqs=4)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, ref.config.vocab_size, (n,), generator=g).tolist() for n in (5, 30, 13, 21)]
    outs = llm.generate(prompts, SamplingParams(max_tokens=STEPS, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(ref, prompt, STEPS)[0]


def test_long_prompt_with_sliding_window_and_softcap(tmp_path):
    """A prompt far past the window in one prefill (no lone causal fast path for the sliding layers), through
    Gemma 2's soft-capped attention."""
    ref = make_tiny_gemma("gemma2", tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", num_blocks=64, block_size=4)
    check(llm, ref, prompt_len=40)


def test_config_from_older_gemma3_config_json():
    """A config.json of transformers 4 (sliding_window_pattern, rope_theta and rope_local_base_freq at the top)
    gives the layer kinds and rope bases transformers 5 derives from it."""
    import transformers as tf

    from tokenloom.model_executor.model_loader import config_from_hf

    raw = dict(TINY, model_type="gemma3_text", num_hidden_layers=7, sliding_window=16, sliding_window_pattern=3,
               rope_theta=123456.0, rope_local_base_freq=777.0, head_dim=32)
    cfg = config_from_hf(raw)
    theirs = tf.Gemma3TextConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    assert list(cfg.layer_types) == theirs.layer_types
    assert cfg.rope_theta == theirs.rope_parameters["full_attention"]["rope_theta"]
    assert cfg.local_rope_theta == theirs.rope_parameters["sliding_attention"]["rope_theta"]
    assert cfg.attention_scale == theirs.query_pre_attn_scalar**-0.5
    assert cfg.tie_word_embeddings == theirs.tie_word_embeddings


# ---- GGUF ----------------------------------------------------------------------------------------------------

GGUF_LAYERS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def write_gemma_gguf(path, arch: str, model, n_vocab: int) -> None:
    """The model as llama.cpp's convert_hf_to_gguf.py writes a Gemma checkpoint: norm weights + 1, q/k rows as
    they are, the window and the soft-capping in the metadata, and a small SentencePiece-style vocabulary."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in [("block_count", cfg.num_hidden_layers), ("context_length", cfg.max_position_embeddings),
                       ("embedding_length", cfg.hidden_size), ("feed_forward_length", cfg.intermediate_size),
                       ("attention.head_count", cfg.num_attention_heads),
                       ("attention.head_count_kv", cfg.num_key_value_heads), ("attention.key_length", cfg.head_dim),
                       ("attention.value_length", cfg.head_dim), ("attention.sliding_window", cfg.sliding_window)]:
        w.add_uint32(f"{arch}.{key}", value)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", 1e6 if arch == "gemma3" else 10000.0)  # Gemma 3: global != local
    if arch == "gemma2":
        w.add_float32(f"{arch}.attn_logit_softcapping", cfg.attn_logit_softcapping)
        w.add_float32(f"{arch}.final_logit_softcapping", cfg.final_logit_softcapping)
    w.add_tokenizer_model("llama")
    w.add_token_list(["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(n_vocab - 4)])
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([3, 3, 3, 2] + [1] * (n_vocab - 4))
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        data = t.float().numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}[name]
        else:
            parts = name.split(".")
            gname = f"blk.{parts[2]}.{GGUF_LAYERS['.'.join(parts[3:-1])]}.{parts[-1]}"
        w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["gemma3", "gemma2"])
def test_gguf_matches_transformers_reading_it(arch, tmp_path):
    """A tiny Gemma GGUF in llama.cpp's layout (its fixed sliding-window pattern and local rope base): the same
    logits and greedy tokens as transformers' from_pretrained(gguf_file=...) of that file."""
    import transformers as tf

    pattern = 6 if arch == "gemma3" else 2  # llama.cpp's, which transformers' config defaults reproduce
    kinds = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(7)]
    # Where transformers' GGUF loading takes Gemma2Config's / Gemma3TextConfig's defaults, the file holds them:
    # head_dim 256 (llama.cpp's scale is head_dim ** -0.5, transformers' query_pre_attn_scalar 256 ** -0.5) and
    # Gemma 2's soft-capping (transformers reads none of it from the file)
    caps = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0) if arch == "gemma2" else {}
    src = make_tiny_gemma(arch, num_hidden_layers=7, layer_types=kinds, head_dim=256, query_pre_attn_scalar=256,
                          rope_parameters=None, **caps)
    write_gemma_gguf(tmp_path / "tiny.gguf", arch, src, src.config.vocab_size)
    ref = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32).eval()
    assert ref.config.layer_types == kinds
    llm = LLM(str(tmp_path / "tiny.gguf"), dtype="float32", num_blocks=64, block_size=4)
    assert llm.engine.model.config.layer_types == tuple(kinds)
    check(llm, ref)
