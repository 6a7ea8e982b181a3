"""GGUF dequantisation and loading: bit-exactness against the gguf package, llama.cpp's q/k permutation,
the real default model against transformers, and clear errors on bad files."""
from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from tokenloom.config import TokenloomError
from tokenloom.gguf.loader import config_from_metadata
from tokenloom.gguf.quants import SUPPORTED_QTYPES, dequantize
from tokenloom.model_executor.model_loader import load_gguf  # names mapped by the model class

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------------------------------------
# helpers

# byte offsets of the fp16 scale fields inside one block, per type
_F16_FIELDS = {
    Q.Q8_0: (0,), Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
}
# types gguf.quants.quantize can produce
_QUANTIZABLE = {Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1}
ROWS, COLS = 8, 512  # row length a multiple of 256 (QK_K)


def _random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Valid random bytes of a [rows, cols] tensor: random quants, sane finite fp16 scales."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == Q.BF16:
        return ref_quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.BF16)
    blocks = rng.integers(0, 256, (rows, cols // bs, ts), dtype=np.uint8)
    for off in _F16_FIELDS[qtype]:
        scale = (rng.standard_normal((rows, cols // bs)) * 0.05).astype(np.float16)
        blocks[..., off : off + 2] = scale.view(np.uint8).reshape(rows, cols // bs, 2)
    return blocks.reshape(rows, -1)


def _write_gguf(path: Path, arch: str, tensors: dict, kv: dict | None = None) -> Path:
    """tensors: name -> float array (F32) or (bytes_or_array, qtype)."""
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in (kv or {}).items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    for name, t in tensors.items():
        if isinstance(t, tuple):
            data, qtype = t
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _read_raw(path: Path) -> dict[str, tuple[torch.Tensor, Q, tuple[int, ...], np.ndarray]]:
    """name -> (raw uint8 torch tensor [rows, bytes_per_row], qtype, torch shape, reader's data)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        raw = np.array(t.data).view(np.uint8).reshape(shape[0] if len(shape) > 1 else 1, -1)
        out[t.name] = (torch.from_numpy(raw.copy()), Q(t.tensor_type), shape, np.array(t.data))
    return out


# ---------------------------------------------------------------------------------------------
# dequantisation


def test_supported_qtypes():
    for q in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        assert q in SUPPORTED_QTYPES


@pytest.mark.parametrize("qtype", sorted(SUPPORTED_QTYPES, key=lambda q: q.value), ids=lambda q: q.name)
def test_dequantize_matches_gguf_reference(qtype, tmp_path):
    """Random valid blocks written to a GGUF file; ours == the gguf package's numpy dequantiser, bit for bit."""
    rng = np.random.default_rng(int(qtype))
    data = _random_blocks(qtype, ROWS, COLS, rng)
    path = _write_gguf(tmp_path / "t.gguf", "llama", {"w": (data, qtype), "v": (data[:1].copy(), qtype)})
    for name, (raw, q, shape, stored) in _read_raw(path).items():
        assert q == qtype
        want = ref_dequantize(stored, q).reshape(shape)
        got = dequantize(raw, q, shape)
        assert got.dtype == torch.float32 and tuple(got.shape) == shape
        np.testing.assert_array_equal(got.numpy(), want)
    # also as a 3-D tensor (e.g. stacked MoE experts) with rows in the last dim
    got = dequantize(torch.from_numpy(data.copy()).view(2, ROWS // 2, -1), qtype, (2, ROWS // 2, COLS))
    np.testing.assert_array_equal(got.reshape(ROWS, COLS).numpy(), ref_dequantize(data, qtype))


# per-type bound of |x - dequant(quant(x))| relative to the block's absolute max (or range for _1 types)
_ERR = {Q.Q8_0: 0.5 / 127, Q.Q4_0: 1 / 8, Q.Q5_0: 1 / 16, Q.Q4_1: 0.5 / 15, Q.Q5_1: 0.5 / 31, Q.F16: 2**-11, Q.BF16: 2**-8}


@pytest.mark.parametrize("qtype", sorted(_QUANTIZABLE, key=lambda q: q.value), ids=lambda q: q.name)
def test_quantize_round_trip(qtype, tmp_path):
    """Quantise a random matrix with gguf.quants, write it to GGUF, dequantise with ours."""
    rng = np.random.default_rng(100 + int(qtype))
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    qdata = ref_quantize(x, qtype)
    tensor = x if qtype == Q.F32 else (qdata, qtype)
    path = _write_gguf(tmp_path / "q.gguf", "llama", {"w": tensor})
    raw, q, shape, stored = _read_raw(path)["w"]
    assert q == qtype and shape == (ROWS, COLS)
    got = dequantize(raw, q, shape).numpy()
    np.testing.assert_array_equal(got, ref_dequantize(stored, q).reshape(shape))
    if qtype == Q.F32:
        np.testing.assert_array_equal(got, x)
        return
    err = np.abs(got - x)
    if qtype in (Q.F16, Q.BF16):
        assert (err <= np.abs(x) * _ERR[qtype] * 1.001).all()
        return
    blocks = x.reshape(-1, 32)
    scale = (blocks.max(1) - blocks.min(1)) if qtype in (Q.Q4_1, Q.Q5_1) else np.abs(blocks).max(1)
    bound = scale * _ERR[qtype] * 1.01 + np.abs(blocks).max(1) * 2e-3  # + fp16 rounding of d / m
    assert (err.reshape(-1, 32).max(1) <= bound).all()


def test_dequantize_unsupported_type_names_it():
    with pytest.raises(TokenloomError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), Q.IQ2_XXS, (256,))


def test_dequantize_wrong_size():
    with pytest.raises(TokenloomError, match="bytes"):
        dequantize(torch.zeros(33, dtype=torch.uint8), Q.Q8_0, (32,))


# ---------------------------------------------------------------------------------------------
# a tiny transformers Llama written in llama.cpp's layout


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LLAMA_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str) -> str:
    if hf in _LLAMA_GGUF_NAMES:
        return _LLAMA_GGUF_NAMES[hf]
    parts = hf.split(".")  # model.layers.N.<module...>.weight|bias
    return f"blk.{parts[2]}.{_LAYER_GGUF_NAMES['.'.join(parts[3:-1])]}.{parts[-1]}"


def _tiny_hf(arch: str, tie: bool, bias: bool):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                  intermediate_size=128, tie_word_embeddings=tie, rms_norm_eps=1e-6, max_position_embeddings=256)
    if arch == "llama":
        cfg = transformers.LlamaConfig(attention_bias=bias, rope_theta=50000.0, **common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(rope_theta=50000.0, **common)
        model = transformers.Qwen2ForCausalLM(cfg)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if bias:  # freshly initialised biases are zero: make them distinguishable
        for k in sd:
            if k.endswith(".bias"):
                sd[k] = torch.randn_like(sd[k])
    if tie:
        sd.pop("lm_head.weight", None)
    return cfg, sd


def _tiny_kv(arch: str, n_layers: int = 2) -> dict:
    return {
        f"{arch}.block_count": n_layers, f"{arch}.context_length": 256, f"{arch}.embedding_length": 64,
        f"{arch}.feed_forward_length": 128, f"{arch}.attention.head_count": 4, f"{arch}.attention.head_count_kv": 2,
        f"{arch}.rope.freq_base": 50000.0, f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        f"{arch}.vocab_size": 96, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.eot_token_id": 5,
    }


def _write_tiny(path: Path, arch: str, sd: dict, permute: bool, quantize_q: bool = False, kv: dict | None = None):
    tensors = {}
    for k, v in sd.items():
        w = v.float().numpy()
        if permute and ".q_proj." in k:
            w = _permute(w, 4)
        elif permute and ".k_proj." in k:
            w = _permute(w, 2)
        if quantize_q and k.endswith("q_proj.weight"):
            tensors[_gguf_name(k)] = (ref_quantize(w, Q.Q8_0), Q.Q8_0)
        else:
            tensors[_gguf_name(k)] = w
    return _write_gguf(path, "llama" if arch == "llama" else arch, tensors, kv if kv is not None else _tiny_kv(arch))


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)], ids=["untied", "tied+bias"])
def test_tiny_llama_unpermutes_qk(tmp_path, tie, bias):
    hf_cfg, sd = _tiny_hf("llama", tie, bias)
    path = _write_tiny(tmp_path / "tiny.gguf", "llama", sd, permute=True)
    cfg, state, meta = load_gguf(str(path))
    assert cfg.architecture == "llama" and cfg.num_layers == 2 and cfg.hidden_size == 64
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size) == (4, 2, 16, 128)
    assert cfg.vocab_size == 96 and cfg.rope_theta == 50000.0 and cfg.max_position_embeddings == 256
    assert cfg.tie_word_embeddings == tie and cfg.attention_bias == bias
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2, 5)
    assert cfg.rms_norm_eps == 1e-6  # stored as float32; reported as the decimal it came from
    assert meta["general.architecture"] == "llama"
    assert set(state) == set(sd)
    for k, v in sd.items():
        assert state[k].dtype == torch.float32 and state[k].shape == v.shape, k
        assert torch.equal(state[k], v), k


def test_tiny_llama_quantized_q_and_dtype(tmp_path):
    """Q8_0 q_proj: the permutation is undone on raw block rows; result == numpy dequant + un-permute."""
    _, sd = _tiny_hf("llama", False, False)
    path = _write_tiny(tmp_path / "tinyq.gguf", "llama", sd, permute=True, quantize_q=True)
    _, state, _ = load_gguf(str(path))
    reader = gguf.GGUFReader(str(path))
    for t in reader.tensors:
        if t.name.endswith("attn_q.weight"):
            assert Q(t.tensor_type) == Q.Q8_0
            w = ref_dequantize(t.data, Q.Q8_0)
            want = w.reshape(4, 8, 2, 64).swapaxes(1, 2).reshape(64, 64)  # inverse of _permute
            key = f"model.layers.{t.name.split('.')[1]}.self_attn.q_proj.weight"
            np.testing.assert_array_equal(state[key].numpy(), want)
            assert (state[key] - sd[key]).abs().max() < 0.02
    _, state16, _ = load_gguf(str(path), dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in state16.values())
    assert torch.equal(state16["model.norm.weight"], sd["model.norm.weight"].to(torch.bfloat16))


def test_tiny_qwen2_not_permuted(tmp_path):
    _, sd = _tiny_hf("qwen2", False, True)
    path = _write_tiny(tmp_path / "qwen.gguf", "qwen2", sd, permute=False)
    cfg, state, _ = load_gguf(str(path))
    assert cfg.architecture == "qwen2" and cfg.attention_bias
    assert set(state) == set(sd)
    for k, v in sd.items():
        assert torch.equal(state[k], v), k


def test_moe_experts_split(tmp_path):
    """llama arch with expert_count > 0 -> mixtral; stacked *_exps tensors -> experts.{j}.w1/w2/w3."""
    rng = np.random.default_rng(1)
    E, H, F = 4, 64, 96
    kv = _tiny_kv("llama", n_layers=1) | {"llama.expert_count": E, "llama.expert_used_count": 2,
                                          "llama.feed_forward_length": F}
    r = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": r(96, H), "output_norm.weight": r(H), "output.weight": r(96, H),
         "blk.0.attn_norm.weight": r(H), "blk.0.attn_q.weight": r(H, H), "blk.0.attn_k.weight": r(32, H),
         "blk.0.attn_v.weight": r(32, H), "blk.0.attn_output.weight": r(H, H), "blk.0.ffn_norm.weight": r(H),
         "blk.0.ffn_gate_inp.weight": r(E, H), "blk.0.ffn_gate_exps.weight": r(E, F, H),
         "blk.0.ffn_up_exps.weight": r(E, F, H), "blk.0.ffn_down_exps.weight": r(E, H, F)}
    t["blk.0.ffn_up_exps.weight"] = (ref_quantize(t["blk.0.ffn_up_exps.weight"], Q.Q8_0), Q.Q8_0)
    cfg, state, _ = load_gguf(str(_write_gguf(tmp_path / "moe.gguf", "llama", t, kv)))
    assert cfg.architecture == "mixtral" and cfg.num_experts == E and cfg.num_experts_per_tok == 2
    assert cfg.intermediate_size == F
    assert torch.equal(state["model.layers.0.block_sparse_moe.gate.weight"], torch.from_numpy(t["blk.0.ffn_gate_inp.weight"]))
    up = ref_dequantize(t["blk.0.ffn_up_exps.weight"][0], Q.Q8_0)
    for j in range(E):
        p = f"model.layers.0.block_sparse_moe.experts.{j}"
        assert torch.equal(state[f"{p}.w1.weight"], torch.from_numpy(t["blk.0.ffn_gate_exps.weight"][j]))
        assert torch.equal(state[f"{p}.w2.weight"], torch.from_numpy(t["blk.0.ffn_down_exps.weight"][j]))
        assert torch.equal(state[f"{p}.w3.weight"], torch.from_numpy(up[j]))
        assert state[f"{p}.w2.weight"].shape == (H, F)
    assert not any(".mlp." in k for k in state)


def test_config_from_metadata_rope_scaling_and_vocab_fallback():
    meta = {"general.architecture": "qwen2", **{k.replace("llama.", "qwen2."): v for k, v in _tiny_kv("llama").items()}}
    del meta["qwen2.vocab_size"]
    meta["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(77)]
    meta["qwen2.rope.scaling.type"] = "yarn"
    meta["qwen2.rope.scaling.factor"] = 4.0
    meta["qwen2.rope.scaling.original_context_length"] = 32768
    meta["qwen2.attention.key_length"] = 32
    meta["qwen2.rope.dimension_count"] = 32
    cfg = config_from_metadata(meta, {"blk.0.attn_q.bias", "output.weight"})
    assert cfg.architecture == "qwen2" and cfg.vocab_size == 77 and cfg.head_dim == 32
    assert cfg.attention_bias and not cfg.tie_word_embeddings
    assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_scaling["factor"] == 4.0
    assert cfg.rope_scaling["original_max_position_embeddings"] == 32768
    meta["qwen2.rope.dimension_count"] = 16
    with pytest.raises(TokenloomError, match="partial rotary"):
        config_from_metadata(meta, set())


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    rng = np.random.default_rng(2)
    sd = {}
    for k in ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in range(2) for m in _LAYER_GGUF_NAMES
    ]:
        shape = (96, 64) if "embed" in k else (64,) if "norm" in k else (64, 64)
        shape = (32, 64) if ("k_proj" in k or "v_proj" in k) else shape
        shape = (128, 64) if ("gate_proj" in k or "up_proj" in k) else (64, 128) if "down_proj" in k else shape
        sd[k] = torch.from_numpy(rng.standard_normal(shape).astype(np.float32))
    path = _write_tiny(tmp_path / "ok.gguf", "llama", sd, permute=True)
    load_gguf(str(path))  # sanity: the intact file loads
    return path


def test_missing_file(tmp_path):
    with pytest.raises(TokenloomError, match="not found"):
        load_gguf(str(tmp_path / "nope.gguf"))


def test_random_bytes(tmp_path):
    p = tmp_path / "random.gguf"
    p.write_bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TokenloomError, match="not a GGUF file"):
        load_gguf(str(p))
    p.write_bytes(b"GGUF" + np.random.default_rng(4).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(TokenloomError, match="corrupt|truncated"):
        load_gguf(str(p))
    p.write_bytes(b"")
    with pytest.raises(TokenloomError, match="empty"):
        load_gguf(str(p))


@pytest.mark.parametrize("keep", [100, 0.5, -1])
def test_truncated_tiny(tiny_gguf, tmp_path, keep):
    data = tiny_gguf.read_bytes()
    n = keep if isinstance(keep, int) and keep > 0 else int(len(data) * keep) if keep > 0 else len(data) - 1
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[:n])
    with pytest.raises(TokenloomError, match="truncated") as e:
        load_gguf(str(p))
    assert str(p) in str(e.value)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_unsupported_architecture(tmp_path, arch):
    p = _write_gguf(tmp_path / f"{arch}.gguf", arch, {"token_embd.weight": np.zeros((8, 32), np.float32)},
                    {f"{arch}.block_count": 1, f"{arch}.embedding_length": 32})
    with pytest.raises(TokenloomError, match=f"unsupported architecture '{arch}'"):
        load_gguf(str(p))


def test_missing_required_tensor(tmp_path):
    _, sd = _tiny_hf("llama", True, False)
    del sd["model.layers.1.mlp.down_proj.weight"]
    p = _write_tiny(tmp_path / "missing.gguf", "llama", sd, permute=True)
    with pytest.raises(TokenloomError, match=r"missing required tensor.*blk\.1\.ffn_down\.weight"):
        load_gguf(str(p))


def test_unsupported_tensor_type(tmp_path):
    _, sd = _tiny_hf("llama", True, False)
    tensors = {_gguf_name(k): v.numpy() for k, v in sd.items()}
    # IQ2_XXS: 256 elements per 66-byte block (the type is rejected before the shape is looked at)
    tensors["blk.0.ffn_up.weight"] = (np.zeros((128, 66), np.uint8), Q.IQ2_XXS)
    p = _write_gguf(tmp_path / "iq.gguf", "llama", tensors, _tiny_kv("llama"))
    with pytest.raises(TokenloomError, match="IQ2_XXS"):
        load_gguf(str(p))


# ---------------------------------------------------------------------------------------------
# the real default model (slow)


@pytest.fixture(scope="module")
def loaded_default(default_gguf):
    return load_gguf(str(default_gguf))


@pytest.mark.slow
def test_default_model_config(loaded_default):
    cfg, state, meta = loaded_default
    assert cfg.architecture == "llama"
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.head_dim == 64 and cfg.intermediate_size == 1536
    assert cfg.tie_word_embeddings and "lm_head.weight" not in state
    assert cfg.rope_theta == 100000.0 and cfg.max_position_embeddings == 8192
    assert cfg.bos_token_id == 1 and 2 in cfg.eos_token_ids
    assert cfg.rms_norm_eps == 1e-5
    assert state["model.embed_tokens.weight"].shape == (49152, 576)
    assert state["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert state["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert state["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert len(state) == 2 + 30 * 9
    assert meta["general.architecture"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == 49152


def _transformers_state_dict(path: Path, cfg) -> dict[str, torch.Tensor]:
    """What transformers makes of the same file (gguf's numpy dequantisers + its own q/k un-permute)."""
    transformers = pytest.importorskip("transformers")
    try:
        import accelerate  # noqa: F401  (transformers requires it for from_pretrained(gguf_file=...))
    except ImportError:
        # Same weight path as from_pretrained, without the model wrapper: map names via a meta-device model.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        hf_cfg = transformers.LlamaConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, tie_word_embeddings=cfg.tie_word_embeddings,
        )
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(hf_cfg)
        return load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


@pytest.mark.slow
def test_default_model_matches_transformers(default_gguf, loaded_default):
    cfg, state, _ = loaded_default
    ref = _transformers_state_dict(default_gguf, cfg)
    if cfg.tie_word_embeddings:
        ref.pop("lm_head.weight", None)
    assert set(ref) == set(state)
    for k, v in state.items():
        assert v.shape == ref[k].shape, k
        torch.testing.assert_close(v, ref[k].float(), rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("cut", ["head1000", "half"])
def test_default_model_truncated(default_gguf, tmp_path, cut):
    p = tmp_path / "cut.gguf"
    with open(default_gguf, "rb") as f:
        p.write_bytes(f.read(1000 if cut == "head1000" else os.path.getsize(default_gguf) // 2))
    with pytest.raises(TokenloomError, match="truncated") as e:
        load_gguf(str(p))
    assert "cut.gguf" in str(e.value)


@pytest.mark.slow
def test_gguf_blocks_load_without_a_float_copy(default_gguf, monkeypatch):
    """keep_gguf_blocks: the quantized linear and embedding weights are never dequantized (their names come back
    as deferred, and no dequantization of them runs), and the model, once its modules are built from the blocks,
    is the same as one loaded in float first."""
    import tokenloom.gguf.loader as loader
    from tokenloom.loader.sources import resolve_model
    from tokenloom.quant import quantize_model
    from tokenloom.worker.model_loading import load_model

    source = resolve_model(str(default_gguf))
    dequantized_rows = []
    real = loader._dequantize_rows
    monkeypatch.setattr(loader, "_dequantize_rows", lambda raw, *a: dequantized_rows.append(raw.shape[0]) or real(raw, *a))
    direct, _ = load_model(source, torch.bfloat16, torch.device("cpu"), keep_gguf_blocks=True)
    cfg = direct.config
    assert max(dequantized_rows) < cfg.hidden_size  # norms only: no [out, in] matrix was dequantized
    monkeypatch.setattr(loader, "_dequantize_rows", real)
    full, _ = load_model(source, torch.bfloat16, torch.device("cpu"))
    for model in (direct, full):
        quantize_model(model, "gguf", gguf_path=source.path)
    ids = torch.tensor([1, 502, 9017, 314, 260, 1789])
    from tokenloom.model_executor.sequence_forward import SequenceForward

    outs = [SequenceForward(m, len(ids)).hidden(ids) for m in (direct, full)]
    assert torch.equal(outs[0], outs[1])


def test_a_reopened_file_is_read_afresh_when_it_changed_and_its_metadata_is_the_callers(tmp_path):
    """open_gguf keeps the last parsed headers (a model load opens its file three times); a file rewritten in place
    with the same size and timestamp must still be read as it now is, and one caller's additions to the metadata
    must not reach the next."""
    from tokenloom.gguf.reader import open_gguf

    path = tmp_path / "m.gguf"
    t = np.ones((2, 32), dtype=np.float32)
    _write_gguf(path, "llama", {"w": t}, {"general.name": "first"})
    stamp = os.stat(path).st_mtime_ns
    a = open_gguf(path)
    assert a.metadata["general.name"] == "first"
    a.metadata["tokenloom.added"] = 1
    assert "tokenloom.added" not in open_gguf(path).metadata
    _write_gguf(path, "llama", {"w": t}, {"general.name": "other"})  # same length: same size
    os.utime(path, ns=(stamp, stamp))
    assert os.stat(path).st_mtime_ns == stamp
    assert open_gguf(path).metadata["general.name"] == "other"
