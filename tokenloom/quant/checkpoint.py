"""Quantized checkpoints: safetensors + config.json with a `quantization_config`, in the formats users download.

* GPTQ (AutoGPTQ / GPTQModel packing), used for int8, int4 and gptq:
    qweight [K * bits / 32, N] int32  q packed along the input dim, a little-endian bit stream (bits 2, 3, 4, 8)
    qzeros  [G, N * bits / 32] int32  zero points packed along the output dim; checkpoint_format "gptq" (v1)
                                       stores zero - 1, "gptq_v2" the zero itself
    scales  [G, N] float16;  g_idx [K] int32 (the group of each input column; act-order permutes it)
  w[n, k] = (q[k, n] - zero[g_idx[k], n]) * scales[g_idx[k], n]. INT8 is written as 8-bit, group_size -1,
  symmetric (zero 128) and loads back onto the int8 kernel.
* AWQ (AutoAWQ GEMM packing), used for awq:
    qweight [K, N / 8] int32  8 output columns per word in the order 0 2 4 6 1 3 5 7; qzeros [G, N / 8] the same;
    scales [G, N] float16;  w = (q - zero) * scale.
* tokenloom's own (quant_method "tokenloom") for nf4: `<module>.nf4_weight` uint8 [N, K / 2] (low nibble = even
  column), `.nf4_absmax` float32 [N, K / block] or the double-quantized `.nf4_absmax_q` / `_scale` / `_mean`.

Quantized linears are stored under transformers' names (q_proj / k_proj / v_proj, gate_proj / up_proj), float
tensors as float16. The LM head is kept in float in the file; `tokenloom_lm_head: "int8"` in the
quantization_config asks the loader to quantize it at load, which round-to-nearest does deterministically.
A model directory written here loads with `--model DIR` (see load_quantized, called by the model loader).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from tokenloom.config import ModelConfig, TokenloomError
from tokenloom.model_executor.models.registry import hf_architecture
from tokenloom.model_executor.models.weights import shard_view
from tokenloom.quant.nf4 import NF4Quant
from tokenloom.quant.records import AffineQuant, Int8Quant, cat_records

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # column of each 4-bit slot of an AWQ word
AWQ_REVERSE = [0, 4, 1, 5, 2, 6, 3, 7]  # slot of each column


# ---------------------------------------------------------------------------------------------------------
# bit streams


def pack_bits(v: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Pack non-negative integers < 2^bits along `dim` into int32 words, as one little-endian bit stream
    (value j of a run occupies bits [j*bits, (j+1)*bits)); 3-bit values cross word boundaries like AutoGPTQ's."""
    if bits in (2, 4, 8):  # whole values per byte: work in uint8, then reinterpret 4 bytes as one int32
        v = v.to(torch.uint8).movedim(dim, -1)
        per = 8 // bits
        if v.shape[-1] % (32 // bits):
            raise TokenloomError(f"cannot pack {v.shape[-1]} values of {bits} bits: need a multiple of {32 // bits}")
        v = v.reshape(*v.shape[:-1], -1, per)
        byte = v[..., 0].clone()
        for j in range(1, per):
            byte |= v[..., j] << (bits * j)
        return byte.contiguous().view(torch.int32).movedim(-1, dim).contiguous()
    v = v.to(torch.int64).movedim(dim, -1)
    n = v.shape[-1]
    per = 32 // math.gcd(32, bits)  # values per run of whole words
    words = per * bits // 32
    if n % per:
        raise TokenloomError(f"cannot pack {n} values of {bits} bits: need a multiple of {per}")
    v = v.reshape(*v.shape[:-1], n // per, per)
    out = torch.zeros(*v.shape[:-1], words, dtype=torch.int64)
    for j in range(per):
        bit = j * bits
        w, sh = divmod(bit, 32)
        out[..., w] |= (v[..., j] << sh) & 0xFFFFFFFF
        if sh + bits > 32:
            out[..., w + 1] |= v[..., j] >> (32 - sh)
    out = out.reshape(*out.shape[:-2], -1)
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_bits(p: torch.Tensor, bits: int, n: int, dim: int) -> torch.Tensor:
    """Inverse of pack_bits: `n` values along `dim` (uint8 for 2, 4 and 8 bits, else int64)."""
    if bits in (2, 4, 8):
        b = p.movedim(dim, -1).contiguous().view(torch.uint8)  # little-endian bytes of each word
        per = 8 // bits
        if per == 1:
            out = b
        else:
            mask = (1 << bits) - 1
            out = torch.stack([(b >> (bits * j)) & mask for j in range(per)], dim=-1).reshape(*b.shape[:-1], -1)
        return out[..., :n].movedim(-1, dim).contiguous()
    p = p.to(torch.int64).movedim(dim, -1) & 0xFFFFFFFF
    per = 32 // math.gcd(32, bits)
    words = per * bits // 32
    p = p.reshape(*p.shape[:-1], -1, words)
    out = torch.zeros(*p.shape[:-1], per, dtype=torch.int64)
    mask = (1 << bits) - 1
    for j in range(per):
        w, sh = divmod(j * bits, 32)
        val = p[..., w] >> sh
        if sh + bits > 32:
            val = val | (p[..., w + 1] << (32 - sh))
        out[..., j] = val & mask
    out = out.reshape(*out.shape[:-2], -1)[..., :n]
    return out.movedim(-1, dim).contiguous()


# ---------------------------------------------------------------------------------------------------------
# GPTQ


def _zeros_of(rec: AffineQuant) -> torch.Tensor:
    if rec.zero is None:
        raise TokenloomError("this quantized tensor has no integer zero points (cannot be written as GPTQ/AWQ)")
    return rec.zero.to(torch.int64)


def gptq_pack(rec: AffineQuant, fmt: str = "gptq") -> dict[str, torch.Tensor]:
    """An AffineQuant (or Int8Quant) as GPTQ tensors."""
    if isinstance(rec, Int8Quant):
        n, k = rec.shape
        rec = AffineQuant.from_zero((rec.q.to(torch.int16) + 128).to(torch.uint8), rec.scale[:, None],
                                    torch.full((n, 1), 128), 8, k)
    n, k = rec.shape
    zero = _zeros_of(rec)
    if fmt == "gptq":
        if int(zero.min()) < 1:
            raise TokenloomError("a zero point of 0 cannot be stored in GPTQ v1 format: use gptq_v2")
        zero = zero - 1
    g_idx = rec.group_index().to(torch.int32)
    return {
        "qweight": pack_bits(rec.q.t(), rec.bits, dim=0),
        "qzeros": pack_bits(zero.t(), rec.bits, dim=1),
        "scales": rec.scale.t().contiguous().to(torch.float16),
        "g_idx": g_idx,
    }


def gptq_unpack(t: dict[str, torch.Tensor], bits: int, group_size: int, fmt: str = "gptq") -> AffineQuant:
    scales = t["scales"].float()  # [G, N]
    groups, n = scales.shape
    k = t["qweight"].shape[0] * 32 // bits
    q = unpack_bits(t["qweight"], bits, k, dim=0).t()  # [N, K]
    zero = unpack_bits(t["qzeros"], bits, n, dim=1).t()  # [N, G]
    if fmt == "gptq":
        zero = (zero.to(torch.int16) + 1) & ((1 << bits) - 1)  # v1 stores zero - 1 (AutoGPTQ masks the same)
    g = group_size if group_size > 0 else k
    g_idx = t.get("g_idx")
    if g_idx is not None:
        g_idx = g_idx.to(torch.int64)
        if torch.equal(g_idx, torch.arange(k) // g):
            g_idx = None
    if int((g_idx if g_idx is not None else torch.arange(k) // g).max()) >= groups:
        raise TokenloomError("GPTQ tensors: g_idx points past the last group of scales")
    return AffineQuant.from_zero(q, scales.t().contiguous(), zero, bits, g, g_idx)


def as_int8(rec: AffineQuant):
    """An 8-bit per-row symmetric AffineQuant (zero 128) as the Int8Quant it is, else the record unchanged."""
    if rec.bits == 8 and rec.scale.shape[1] == 1 and rec.g_idx is None and rec.zero is not None \
            and bool((rec.zero == 128).all()) and int(rec.q.min()) >= 1:
        return Int8Quant((rec.q.to(torch.int16) - 128).to(torch.int8), rec.scale[:, 0].clone())
    return rec


# ---------------------------------------------------------------------------------------------------------
# AWQ


def awq_pack(rec: AffineQuant) -> dict[str, torch.Tensor]:
    if rec.bits != 4 or rec.g_idx is not None:
        raise TokenloomError("AWQ checkpoints hold 4-bit weights without act-order")
    order = torch.tensor(AWQ_ORDER)

    def pack(v: torch.Tensor) -> torch.Tensor:  # [R, N] -> [R, N / 8]
        r, n = v.shape
        v = v.to(torch.int64).reshape(r, n // 8, 8)[..., order]
        return pack_bits(v.reshape(r, n), 4, dim=1)

    return {"qweight": pack(rec.q.t()), "qzeros": pack(_zeros_of(rec).t()),
            "scales": rec.scale.t().contiguous().to(torch.float16)}


def awq_unpack(t: dict[str, torch.Tensor], group_size: int) -> AffineQuant:
    rev = torch.tensor(AWQ_REVERSE)

    def unpack(p: torch.Tensor) -> torch.Tensor:  # [R, N / 8] -> [R, N]
        r = p.shape[0]
        v = unpack_bits(p, 4, p.shape[1] * 8, dim=1).reshape(r, -1, 8)[..., rev]
        return v.reshape(r, -1)

    scales = t["scales"].float()
    q = unpack(t["qweight"]).t()
    zero = unpack(t["qzeros"]).t()
    k = q.shape[1]
    return AffineQuant.from_zero(q, scales.t().contiguous(), zero, 4, group_size if group_size > 0 else k)


# ---------------------------------------------------------------------------------------------------------
# NF4 (tokenloom format)


def nf4_pack(rec: NF4Quant) -> dict[str, torch.Tensor]:
    from tokenloom.quant.linear import _pack_nibbles

    out = {"nf4_weight": _pack_nibbles(rec.q)}
    if rec.absmax_q is not None:
        out.update(nf4_absmax_q=rec.absmax_q, nf4_absmax_scale=rec.absmax_scale.float(),
                   nf4_absmax_mean=rec.absmax_mean.float().reshape(1))
    else:
        out["nf4_absmax"] = rec.absmax.float()
    return out


def nf4_unpack(t: dict[str, torch.Tensor], block_size: int, in_features: int) -> NF4Quant:
    from tokenloom.quant.linear import _unpack_nibbles
    from tokenloom.quant.nf4 import dequantize_absmax

    q = _unpack_nibbles(t["nf4_weight"], in_features)
    n = q.shape[0]
    if "nf4_absmax_q" in t:
        absmax = dequantize_absmax(t["nf4_absmax_q"], t["nf4_absmax_scale"], t["nf4_absmax_mean"][0])
        return NF4Quant(q, absmax.reshape(n, -1), block_size, t["nf4_absmax_q"], t["nf4_absmax_scale"].float(),
                        t["nf4_absmax_mean"][0].float())
    return NF4Quant(q, t["nf4_absmax"].float(), block_size)


# ---------------------------------------------------------------------------------------------------------
# names


def hf_config(cfg: ModelConfig, dtype: str = "float16") -> dict:
    d = {
        "architectures": [hf_architecture(cfg.architecture)],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids) if len(cfg.eos_token_ids) != 1 else cfg.eos_token_ids[0],
        "torch_dtype": dtype,
    }
    d["use_sliding_window"] = cfg.sliding_window is not None
    if cfg.sliding_window is not None:
        d["sliding_window"] = cfg.sliding_window
    if cfg.num_experts:
        d["num_local_experts"] = cfg.num_experts
        d["num_experts_per_tok"] = cfg.num_experts_per_tok
        d.update(moe_intermediate_size=cfg.moe_intermediate_size, norm_topk_prob=cfg.norm_topk_prob,
                 shared_expert_intermediate_size=cfg.shared_expert_intermediate_size,
                 decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers))
    if (cfg.rope_scaling or {}).get("original_max_position_embeddings"):  # where Phi-3's config keeps it
        d["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    return d


def quantization_config(opts, records: dict) -> dict:
    """The quantization_config for the method's format."""
    m = opts.method
    extra = {"tokenloom_method": m, "tokenloom_lm_head": opts.lm_head}
    if m == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts.group_size, "zero_point": True,
                "version": "gemm", **extra}
    if m == "nf4":
        return {"quant_method": "tokenloom", "method": "nf4", "block_size": opts.block_size,
                "double_quant": opts.double_quant, **extra}
    if m == "int8":
        return {"quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": True,
                "checkpoint_format": "gptq", **extra}
    min_zero = min((int(r.zero.min()) for r in records.values() if isinstance(r, AffineQuant)), default=1)
    return {"quant_method": "gptq", "bits": opts.bits, "group_size": opts.group_size,
            "desc_act": bool(m == "gptq" and opts.act_order), "sym": opts.sym,
            "checkpoint_format": "gptq" if min_zero >= 1 else "gptq_v2", "damp_percent": opts.damp, **extra}


# ---------------------------------------------------------------------------------------------------------
# save


@torch.no_grad()
def save_quantized(model, result, out_dir: str | os.PathLike, tokenizer=None, float_dtype=torch.float16) -> Path:
    """Write `model` (quantized with quantize_model(..., lm_head="none", return_records=True)) to out_dir."""
    from safetensors.torch import save_file

    from tokenloom.quant.linear import QuantLinear

    opts = result.options
    cfg: ModelConfig = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    qc = quantization_config(opts, result.records)
    fmt = qc["quant_method"]
    tensors: dict[str, torch.Tensor] = {}
    quantized_modules = set()
    for name, rec in result.records.items():
        if name == "lm_head":
            continue  # recomputed at load (tokenloom_lm_head)
        quantized_modules.add(name)
        parts = model.checkpoint_parts(name)
        if fmt == "tokenloom":  # own format: fused modules as they are
            for key, t in nf4_pack(rec).items():
                tensors[f"model.{name}.{key}"] = t
            continue
        pieces = [rec] if len(parts) == 1 else rec.split([rows for _, rows in parts])
        for (hf, _), piece in zip(parts, pieces):
            packed = awq_pack(piece) if fmt == "awq" else gptq_pack(piece, qc["checkpoint_format"])
            for key, t in packed.items():
                tensors[f"{hf}.{key}"] = t
    # float tensors (and the biases of quantized modules), each checkpoint tensor the slice of ours it fills
    if isinstance(model.lm_head, QuantLinear):
        raise TokenloomError("save_quantized needs the float LM head: quantize with lm_head='none'")
    params = dict(model.named_parameters())
    for key, (name, shard) in model.checkpoint_keys().items():
        tensors[key] = shard_view(params[name].detach(), shard).to(float_dtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = hf_config(cfg, str(float_dtype).removeprefix("torch."))
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if fmt == "awq":  # AutoAWQ's own copy of the config
        (out / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": opts.group_size, "w_bit": 4, "version": "GEMM"}, indent=2) + "\n")
    if tokenizer is not None:
        save_tokenizer(tokenizer, out)
    return out


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.hf_tokenizer.save(str(out / "tokenizer.json"))
    tcfg = {"add_bos_token": bool(tokenizer.add_bos), "add_eos_token": bool(tokenizer.add_eos)}
    for key, value in tokenizer.special_tokens.items():
        tcfg[key] = value
    if tokenizer.bos_token_id is not None and "bos_token" not in tcfg:
        tcfg["bos_token"] = tokenizer.id_to_token(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None and "eos_token" not in tcfg:
        tcfg["eos_token"] = tokenizer.id_to_token(tokenizer.eos_token_id)
    tmpl = tokenizer.chat_templates if hasattr(tokenizer, "chat_templates") else {}
    if tmpl:
        tcfg["chat_template"] = tmpl["default"] if list(tmpl) == ["default"] else [
            {"name": k, "template": v} for k, v in tmpl.items()]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2, ensure_ascii=False) + "\n")
    gen = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# load


def _normalise(qc: dict) -> dict:
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        fmt = str(qc.get("checkpoint_format", "gptq")).lower()
        if fmt not in ("gptq", "gptq_v2"):
            raise TokenloomError(f"unsupported GPTQ checkpoint_format '{fmt}' (gptq, gptq_v2)")
        bits = int(qc.get("bits", 4))
        if bits not in (2, 3, 4, 8):
            raise TokenloomError(f"unsupported GPTQ bits {bits} (2, 3, 4, 8)")
        return dict(method="gptq", bits=bits, group_size=int(qc.get("group_size", 128)), fmt=fmt)
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise TokenloomError(f"unsupported AWQ version '{version}' (only GEMM packing)")
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        if bits != 4 or not qc.get("zero_point", True):
            raise TokenloomError("only 4-bit AWQ with zero points is supported")
        return dict(method="awq", bits=4, group_size=int(qc.get("group_size", qc.get("q_group_size", 128))))
    if method == "tokenloom":
        return dict(method=str(qc.get("method", "nf4")), block_size=int(qc.get("block_size", 64)))
    raise TokenloomError(f"unsupported quantization_config quant_method '{method}' (gptq, awq, tokenloom)")


class _Tensors:
    """Lazy name -> tensor access over a directory's safetensors files."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        from tokenloom.loader.safetensors import safetensors_files

        self.handles = []
        self.where: dict[str, object] = {}
        for f in safetensors_files(path):
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as exc:
                raise TokenloomError(f"cannot read '{f}': corrupt or truncated safetensors file ({exc})") from None
            self.handles.append(h)
            for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                self.where[k] = h

    def __contains__(self, key):
        return key in self.where

    def get(self, key) -> torch.Tensor:
        return self.where[key].get_tensor(key)

    def __iter__(self):
        return iter(self.where)


_QFIELDS = ("qweight", "qzeros", "scales", "g_idx", "nf4_weight", "nf4_absmax", "nf4_absmax_q", "nf4_absmax_scale",
            "nf4_absmax_mean")


def _read_record(ts: _Tensors, prefix: str, qc: dict, in_features: int):
    if qc["method"] in ("gptq", "awq"):
        if f"{prefix}.qweight" not in ts:
            return None
        fields = {f: ts.get(f"{prefix}.{f}") for f in ("qweight", "qzeros", "scales", "g_idx") if f"{prefix}.{f}" in ts}
        if qc["method"] == "awq":
            return awq_unpack(fields, qc["group_size"])
        return gptq_unpack(fields, qc["bits"], qc["group_size"], qc["fmt"])
    if f"{prefix}.nf4_weight" not in ts:
        return None
    fields = {f: ts.get(f"{prefix}.{f}") for f in _QFIELDS if f"{prefix}.{f}" in ts}
    return nf4_unpack(fields, qc["block_size"], in_features)


@torch.no_grad()
def load_quantized(model, path, quant_config: dict, dtype: torch.dtype) -> None:
    """Fill `model` (as built by the loader, weights not yet loaded) from a quantized checkpoint directory:
    quantized linears become quantized modules (their float weights are never materialised), every other tensor
    loads as usual through model.load_hf_weights."""
    from tokenloom.model_executor.layers.linear import Linear
    from tokenloom.quant.modules import get_module, quantize_lm_head, set_module
    from tokenloom.quant.options import QuantizeResult, QuantOptions
    from tokenloom.quant.kernels import kernel_act_dtype
    from tokenloom.quant.linear import build_linear
    from tokenloom.quant.moe import QuantSparseMoE

    qc = _normalise(quant_config)
    cfg: ModelConfig = model.config
    path = Path(path)
    ts = _Tensors(path)
    act = kernel_act_dtype(dtype, model.norm.weight.device)
    consumed: set[str] = set()

    def build(name: str, in_features: int, has_bias: bool):
        parts = model.checkpoint_parts(name)
        if qc["method"] in ("gptq", "awq"):
            recs = [_read_record(ts, hf, qc, in_features) for hf, _ in parts]
            prefixes = [hf for hf, _ in parts]
        else:
            recs = [_read_record(ts, f"model.{name}", qc, in_features)]
            prefixes = [f"model.{name}"]
        if any(r is None for r in recs):
            if any(r is not None for r in recs):
                raise TokenloomError(f"checkpoint quantizes only some of the tensors fused into '{name}'")
            return None  # left in float (modules_to_not_convert)
        for p in prefixes:
            consumed.update(f"{p}.{f}" for f in _QFIELDS)
        rec = recs[0] if len(recs) == 1 else cat_records(recs)
        if qc["method"] == "gptq":
            rec = as_int8(rec)
        if rec.shape[1] != in_features:
            raise TokenloomError(f"quantized '{name}' has {rec.shape[1]} input features, expected {in_features}")
        bias = torch.zeros(rec.shape[0]) if has_bias else None  # filled by load_hf_weights below
        return build_linear(rec, bias, act)

    for i, layer in enumerate(model.layers):
        for lname in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            name = f"layers.{i}.{lname}"
            try:
                old = get_module(model, name)
            except AttributeError:
                continue  # MoE layer
            if not (isinstance(old, Linear) and old.holds_float_weight):
                continue
            new = build(name, old.in_features, old.bias is not None)
            if new is not None:
                if new.out_features != old.out_features:
                    raise TokenloomError(f"quantized '{name}' has {new.out_features} outputs, "
                                         f"expected {old.out_features}")
                set_module(model, name, new)
        moe = layer.mlp
        if hasattr(moe, "experts_w13"):
            w13 = [build(f"layers.{i}.mlp.experts.{e}.w13", cfg.hidden_size, False) for e in range(moe.num_experts)]
            w2 = [build(f"layers.{i}.mlp.experts.{e}.w2", cfg.moe_intermediate_size, False)
                  for e in range(moe.num_experts)]
            if all(m is not None for m in w13 + w2):
                layer.mlp = QuantSparseMoE(moe, w13, w2)

    def floats():
        for key in ts:
            if key not in consumed:
                yield key, ts.get(key).to(dtype)

    model.load_hf_weights(floats())  # checks that every remaining parameter was in the file
    lm = quant_config.get("tokenloom_lm_head", "none")
    if lm == "int8":
        opts = QuantOptions(method="int8", lm_head="int8")
    elif lm == "same":
        method = quant_config.get("tokenloom_method", "int4")
        opts = QuantOptions(method="nf4" if method == "nf4" else "int4", lm_head="same", bits=qc.get("bits", 4),
                            group_size=qc.get("group_size", 128), block_size=qc.get("block_size", 64))
    else:
        return
    quantize_lm_head(model, opts, act, QuantizeResult(opts, 0.0))


