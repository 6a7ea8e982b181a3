"""The decode step as one compiled call: every decoder layer and the LM head of a Llama-family model, for a batch
of sequences each adding one token, run by tokenloom/csrc/decode_stack.cpp.

Why: at batch 1 the layer-by-layer path spends most of a token in Python dispatch, not arithmetic. SmolLM2-135M
has 30 layers of ~15 torch calls each; at ~20 us a call that is ~9 ms a token, three times what streaming its
4-bit weights from memory takes. The compiled stack runs the same layers in one OpenMP region: the
matrix-vector products split over the threads by output rows, attention over (sequence, KV head, key range)
with the parts merged flash-decoding style, the per-row work (norms, rotary, residual adds) done by each thread
on its own copy of the residual stream; six barriers a layer, nothing allocated per layer, no Python.

It reads the model's own weights where they are (shared, not copied: quantized records, float matrices) and the
engine's paged KV cache, and writes each new token's K/V there, so the layer-by-layer path (prefill, wide
batches, prompt logprobs) and this one interleave freely. An int8 KV cache (--kv-cache-dtype int8) is read and
written as the layer path does: quantized per (token, head) with a float32 scale, dequantized to the model's
dtype as attention reads it. In a bfloat16 model, activations are rounded to bfloat16 wherever the
layer-by-layer path materialises a bfloat16 tensor, so the two compute the same function up to float32
summation order (tests/model_executor/test_fused_decode.py holds them to that).

What it covers: the Llama decoder and its Qwen2 (q/k/v bias), Qwen3 (q/k norms) and Phi-3 variants, sliding
windows; LongRoPE through the rotary tables by position, which give every token from the prompt's last on its
rotation (layers/rotary.py: only the earlier tokens of a long prompt differ, and those run layer by layer);
float32 / bfloat16 weights, the int8 (per channel), int4 / GGUF-block (affine, groups of 32 or more) and 5- to
8-bit affine records that the gemv kernels run.

Quantized weights (groups of 32: the ggml block formats, int4-g32; and int8 per channel) run four rows at a time
on integer dot products, as llama.cpp does, against the activations quantized per block of 32: to int16 by
default (vpdpwssd; their rounding is below bfloat16's, perplexity unchanged), or to int8 with
TOKENLOOM_DECODE_ACT_BITS=8 (vpdpbusd, llama.cpp's choice: ~5-10 % faster here, ~1 % higher perplexity on
SmolLM2). Block scales that are exact in float16 (all of the ggml formats') are read as float16: fewer bytes a
token. On a CPU with AMX (Sapphire Rapids on), 4- and 8-bit weights in groups of 32 meet the int16 activations on
the int8 tiles instead (csrc/amx_int8.h; TOKENLOOM_AMX_INT8=0 keeps the AVX-512 kernels): exact int32 block dots
for up to 12 rows per pass over the weights, so a sequence's speculative drafts cost ~0.14 of a one-token step
each (up to 4 rows; ~0.24 on average to 9) instead of ~0.4-0.5, and the one-token step itself is 6-9 % faster
(the weights are kept a second time, in the tiles' order: ~0.6 bytes per 4-bit weight more memory, made only
where it takes at most half of the free memory). Every integer row of every step takes them, so a draft row and
a one-token decode compute one function. `FusedDecoder.kernels` counts which kernel each weight
block takes. float32 models keep float activations.
Wide decode batches (TILE_ROWS rows or more, TILE_ROWS_INT8 with the int8 tiles; TOKENLOOM_TILE_ROWS sets it, 0
never) of a bfloat16 model on a CPU with AMX meet the quantized weights on its bfloat16 tiles instead
(csrc/amx_tiles.h): each weight row is dequantized to bfloat16 once per step, and the products summed in
float32, which is what the layer path computes in prefill.
Below that width a row's result does not depend on the batch (the integer kernels give every row the same
arithmetic); from it on, rows follow the tiles' arithmetic (`FusedDecoder.tile_rows`: the width in force, 0
without AMX), except a sequence's draft rows, which keep the integer kernels so that verifying drafts gives each
row its one-token decode's logits to the bit.
Batch-invariant engines (--batch-invariant: make_batch_invariant) give the stack every step, prefill included, and
choose each row's kernels by what the row is: a prompt row takes the AMX tiles where there are (token_logits puts
those rows first and tells the stack how many), every other row the integer kernels, whatever the batch.
Anything else (MoE, NF4, act-order GPTQ, raw Q2_K/Q3_K blocks, a CPU without AVX-512) keeps
the layer-by-layer path: `FusedDecoder.build` returns None and says why in `FusedDecoder.reason`.
TOKENLOOM_FUSED_DECODE=0 turns it off.

LoRA: rows of a step may run different adapters (multi-LoRA). The stack adds each row's adapter delta,
y += (x A^T) B^T, in every projection (qkv, o, gate_up, down) from the factors where the LoRA layers
(lora/layers.py) keep them, stacked per slot: shared, so the slot the LoRA manager loads for a step is what the
next call reads. The caller passes the step's LoRAMapping; base rows are computed as without LoRA, to the bit.
Without this a step's adapter rows would run layer by layer, at well under half the speed on quantized models.
`takes_lora()` says whether the stack can (every LoRA layer of the model is a projection it computes, in its
dtype); TOKENLOOM_FUSED_LORA=0 (or `lora_enabled = False`) keeps adapter rows on the layers.
"""
from __future__ import annotations

import logging
import os

import torch

from tokenloom.config import TokenloomError
from tokenloom.kernels.build import CppExtension
from tokenloom.model_executor.forward_context import LoRAMapping
from tokenloom.model_executor.layers.linear import Linear

log = logging.getLogger("tokenloom")

EXTENSION = CppExtension("tokenloom_decode", "decode_stack.cpp", ["DecodeStack", "has_bf16"])

DENSE_F32, DENSE_BF16, U8, S8, U4 = range(5)
_EMPTY = torch.empty(0)


class Unsupported(Exception):
    """A part of the model the compiled stack does not run."""


def enabled() -> bool:
    return os.environ.get("TOKENLOOM_FUSED_DECODE", "1") not in ("0", "false", "no")


def int8_tiles_enabled() -> bool:
    """Integer rows on the AMX int8 tiles where the CPU has them (TOKENLOOM_AMX_INT8=0: the AVX-512 kernels)."""
    return os.environ.get("TOKENLOOM_AMX_INT8", "1") != "0"


def lora_enabled() -> bool:
    return os.environ.get("TOKENLOOM_FUSED_LORA", "1") not in ("0", "false", "no")


def _bias_parts(bias, sizes):
    if bias is None:
        return [_EMPTY] * len(sizes)
    return [b.detach().float().contiguous() for b in torch.split(bias, sizes)]


def linear_parts(module, model_dtype: torch.dtype) -> list[tuple]:
    """The (kind, q, scale, offset, group, bias) blocks of output rows the C++ stack reads for one linear layer,
    sharing the module's tensors. Raises Unsupported for formats it has no kernel for."""
    kernel = getattr(module, "kernel", None)
    if type(module).__name__ == "ConcatLinear":
        return [p for part in module.parts for p in linear_parts(part, model_dtype)]
    if isinstance(module, Linear):
        weight = getattr(module, "weight", None)
        if weight is None or weight.dtype not in (torch.float32, torch.bfloat16) or weight.dtype != model_dtype:
            raise Unsupported(f"linear weight of {type(module.method).__name__}")
        kind = DENSE_BF16 if weight.dtype == torch.bfloat16 else DENSE_F32
        bias = _bias_parts(module.bias, [module.out_features])[0]
        return [(kind, weight.detach().contiguous(), _EMPTY, _EMPTY, 0, bias)]
    name = type(module).__name__
    if kernel != "gemv" or getattr(module, "perm", None) is not None or module.act_dtype != model_dtype:
        raise Unsupported(f"{name} with kernel {kernel}")
    bias = _bias_parts(module.bias, [module.out_features])[0]
    if name == "Int8Linear":
        return [(S8, module.weight_int8.view(torch.uint8), module.scales, _EMPTY, module.in_features, bias)]
    if name == "Int4Linear":
        group = module.group_size if module.group_size > 0 else module.in_features
        kind = U4 if module.layout == "split32" else U8
        return [(kind, module.qweight, module.scale, module.offset, group, bias)]
    raise Unsupported(name)


# How many one-token sequences a step may give the stack. Its kernels are matrix-vector products (each weight row
# unpacked once per activation row), which beat oneDNN's bfloat16 GEMM only for a few rows; quantized weights
# have no better GEMM here (the layers dequantize them per call), so the stack takes every decode batch.
DENSE_MAX_BATCH = 8
QUANTIZED_MAX_BATCH = 1 << 16
# Decode batches of this many rows or more meet quantized weights on AMX tiles where the CPU has them (bfloat16
# models): each weight row dequantized once per step instead of a float epilogue per block and activation row.
TILE_ROWS = 8
# With the AMX int8 tiles taking the narrower batches, the bfloat16 tiles pay from about this width (measured on
# SmolLM2-135M Q4_1: equal at ~18 rows, the int8 tiles 16 % faster at 8 rows, the bfloat16 ones 25 % at 32)
TILE_ROWS_INT8 = 18


def int8_tile_copy_bytes(model, dtype: torch.dtype) -> int:
    """Bytes of the AMX int8 tiles' copy of a model's weights (csrc/amx_int8.h): its 4- and 8-bit parts in groups
    of 32, with float16 scales and offsets per block."""
    total = 0
    modules = [m for layer in model.layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                     layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    for module in modules + [model.lm_head]:
        for kind, q, scale, _, group, _ in linear_parts(module, dtype):
            if kind in (U4, U8) and group == 32:
                total += q.numel() * q.element_size() + 4 * scale.numel()
    return total


def _copy_fits(model, dtype: torch.dtype, spare_bytes: int | None) -> bool:
    if spare_bytes is None:
        return True
    need = int8_tile_copy_bytes(model, dtype)
    if need <= spare_bytes // 2:
        return True
    log.info("tokenloom: no AMX int8 copy of the weights (%.0f MiB, with %.0f MiB free): the AVX-512 kernels decode",
             need / 2**20, spare_bytes / 2**20)
    return False


class FusedDecoder:
    """A model's decode step through the compiled stack (see the module docstring)."""

    reason: str | None = None  # why the last build() gave None

    def __init__(self, stack, model, block_size: int, has_dense: bool, int8_tiles: bool = False):
        self.stack, self.model, self.block_size = stack, model, block_size
        limit = os.environ.get("TOKENLOOM_FUSED_MAX_BATCH")
        self.max_batch = int(limit) if limit else DENSE_MAX_BATCH if has_dense else QUANTIZED_MAX_BATCH
        self.lora_enabled = lora_enabled()  # adapter rows may take the stack (when takes_lora() finds it can)
        self._lora_ready: bool | None = None  # the LoRA factors were handed to the stack (None: not tried yet)
        self.lora_reason: str | None = None  # why the stack cannot take adapter rows
        self.adapter_rows = 0  # rows run with an adapter so far (tests and benchmarks)
        rows = os.environ.get("TOKENLOOM_TILE_ROWS")
        if rows and not rows.isdigit():
            raise TokenloomError(f"TOKENLOOM_TILE_ROWS must be a number of rows (0: never), not {rows!r}")
        self.int8_tiles = int8_tiles  # integer rows on the AMX int8 tiles
        default = TILE_ROWS_INT8 if int8_tiles else TILE_ROWS
        self.tile_rows = stack.set_tile_rows(int(rows) if rows else default)  # 0: no AMX tiles here
        if self.tile_rows > self.max_batch:  # dense weights: wide batches go to oneDNN, never to the stack
            self.tile_rows = stack.set_tile_rows(0)
        self.invariant = False  # make_batch_invariant() was called
        self.prompt_tiles = False  # batch-invariant: prompt rows take the AMX tiles

    def make_batch_invariant(self) -> None:
        """Every step's rows here, each computed by kernels chosen by what the row is, never by the batch: prompt
        rows on the AMX tiles where the CPU has them (prefill at GEMM speed), the others (decodes, drafts, a
        preempted request's outputs computed again) on the integer kernels, as are all rows without AMX. Dense
        weights stay here too, whatever the batch width."""
        self.invariant = True
        self.prompt_tiles = self.tile_rows > 0
        self.tile_rows = 0  # no decode batch switches to the tiles
        self.max_batch = QUANTIZED_MAX_BATCH

    @classmethod
    def build(cls, model, layer_caches, block_size: int, spare_bytes: int | None = None) -> "FusedDecoder | None":
        """The model's compiled decode step, or None (cls.reason says why). spare_bytes: host memory free for the
        int8 tiles' copy of the weights (None: no limit); it is made only where it takes at most half of it."""
        cls.reason = None
        try:
            stack, has_dense, int8_tiles = cls._build_stack(model, layer_caches, spare_bytes)
            return cls(stack, model, block_size, has_dense, int8_tiles)
        except Unsupported as exc:
            cls.reason = str(exc)
            log.info("tokenloom: decode runs layer by layer (%s)", exc)
            return None

    @staticmethod
    def _build_stack(model, layer_caches, spare_bytes: int | None = None):
        if not enabled():
            raise Unsupported("disabled by TOKENLOOM_FUSED_DECODE=0")
        cfg = model.config
        dtype = model.norm.weight.dtype
        if model.norm.weight.device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
            raise Unsupported(f"{model.norm.weight.device.type} {dtype} model")
        if cfg.num_experts:
            raise Unsupported("mixture-of-experts layers")
        if cfg.head_dim % 16 or cfg.hidden_size % 16 or cfg.intermediate_size % 16:
            raise Unsupported("head, hidden or MLP size not a multiple of 16")
        if any(c is None for c in layer_caches):
            raise Unsupported("no KV cache")
        # The stack computes these models' layers; subclasses of theirs that are models of their own (Gemma's extra
        # norms, GeGLU, soft-capping, per-layer windows) run layer by layer.
        known = {"CausalLM", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Phi3ForCausalLM"}
        if type(model).__name__ not in known:
            raise Unsupported(f"architecture {type(model).__name__}")
        mod = EXTENSION.load()
        if mod is None:
            raise Unsupported(EXTENSION.reason or "no compiled kernels")
        if dtype == torch.bfloat16 and not mod.has_bf16():
            raise Unsupported("bfloat16 model on a CPU without AVX512-BF16")
        stack = mod.DecodeStack(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                cfg.intermediate_size, cfg.rms_norm_eps, cfg.sliding_window or 0,
                                dtype == torch.bfloat16, model.rotary.cos, model.rotary.sin)
        if bits := os.environ.get("TOKENLOOM_DECODE_ACT_BITS"):
            if bits not in ("0", "8", "16"):
                raise TokenloomError(f"TOKENLOOM_DECODE_ACT_BITS must be 0, 8 or 16, not {bits!r}")
            stack.set_activation_bits(int(bits))
        int8_tiles = stack.set_int8_tiles(int8_tiles_enabled() and _copy_fits(model, dtype, spare_bytes))
        kinds = set()

        def parts(module):
            found = linear_parts(module, dtype)
            kinds.update(p[0] for p in found)
            return found

        for layer, cache in zip(model.layers, layer_caches, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            q_norm = getattr(attn, "q_norm", None)
            k_norm = getattr(attn, "k_norm", None)
            stack.add_layer(
                layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                _EMPTY if q_norm is None else q_norm.weight.detach(),
                _EMPTY if k_norm is None else k_norm.weight.detach(),
                parts(attn.qkv_proj), parts(attn.o_proj), parts(mlp.gate_up_proj), parts(mlp.down_proj),
                cache.k, cache.v, _EMPTY if cache.k_scale is None else cache.k_scale,
                _EMPTY if cache.v_scale is None else cache.v_scale)
        stack.set_head(model.norm.weight.detach(), linear_parts(model.lm_head, dtype))
        return stack, bool(kinds & {DENSE_F32, DENSE_BF16}), int8_tiles

    def takes_lora(self) -> bool:
        """Whether rows with a LoRA adapter may run here. The LoRA layers wrap the model after the stack is built,
        so their factors are handed over on the first call; from then on the stack reads them where they are."""
        if not self.lora_enabled:
            return False
        if self._lora_ready is None:
            self._lora_ready = self._attach_lora()
        return self._lora_ready

    def _attach_lora(self) -> bool:
        dtype = self.model.norm.weight.dtype
        for i, layer in enumerate(self.model.layers):
            projections = (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                           layer.mlp.down_proj)
            # a LoRA layer (lora.layers.LoRALinear, known by its stacked factors: this layer may not import it)
            wrapped = [m for m in layer.modules() if hasattr(m, "lora_a") and hasattr(m, "slices")]
            if not all(any(m is p for p in projections) for m in wrapped):
                self.lora_reason = f"layer {i} has a LoRA layer the compiled stack does not compute"
                return False
            if any(m.lora_a.dtype != dtype or m.lora_a.device.type != "cpu" for m in wrapped):
                self.lora_reason = "LoRA factors not in the model's dtype on the CPU"
                return False
            for proj, module in enumerate(projections):
                if hasattr(module, "lora_a") and hasattr(module, "slices"):
                    self.stack.set_lora(i, proj, module.lora_a, module.lora_b, module.slices)
        return True

    @property
    def kernels(self) -> dict[str, int]:
        """How many weight blocks take each kernel: "u4-amx8+f16" (AMX int8 tiles), "u4-i16+f16", "u8-i8",
        "s8-i16" (AVX-512 integer kernels), "u4-bf16", "row"; "+f16": the block scales read as float16."""
        return dict(self.stack.kernel_counts())

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               block_table: torch.Tensor, context_lens: torch.Tensor,
               head_rows: torch.Tensor | None = None, lora: LoRAMapping | None = None,
               tiled_rows: int = -1) -> torch.Tensor:
        """float32 logits [rows, vocab] of a batch of token rows, each with its position, slot, block table row
        and context length (a sequence may take consecutive rows: its drafts). Each row writes its K/V into its
        slot before any row attends, so a later row of a sequence sees the earlier ones. head_rows (ascending):
        the rows whose logits are wanted (default all). lora: which rows run which adapter slot (the LoRA
        manager's mapping of the step, its slots loaded); None: every row the base model. tiled_rows: the leading
        rows that take the AMX tiles, where there are (-1: the stack's choice by batch width)."""
        return self._forward(input_ids, positions, slot_mapping, block_table, context_lens, head_rows,
                             self._lora_slots(lora, len(input_ids)), tiled_rows)

    def _forward(self, input_ids, positions, slot_mapping, block_table, context_lens, head_rows, lora_slots,
                 tiled_rows: int) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rows = _EMPTY.long() if head_rows is None else head_rows
        return self.stack.forward(x, positions, slot_mapping, block_table, self.block_size, context_lens, True, rows,
                                  lora_slots, tiled_rows)

    def _lora_slots(self, lora: LoRAMapping | None, rows: int) -> torch.Tensor:
        """Each row's adapter slot (-1: the base model), or an empty tensor when no row has one."""
        if lora is None or not lora.runs.numel():
            return _EMPTY.long()
        if not self.takes_lora():
            raise TokenloomError(f"adapter rows cannot run on the compiled decode stack: {self.lora_reason}")
        slots = torch.full((rows,), -1, dtype=torch.long)
        for slot, start, end in lora.runs.tolist():
            slots[start:end] = slot
        self.adapter_rows += int((slots >= 0).sum())
        return slots

    @torch.inference_mode()
    def token_logits(self, input_ids: torch.Tensor, positions: torch.Tensor, block_tables: list[list[int]],
                     query_lens: list[int], head_rows: torch.Tensor | None = None,
                     lora: LoRAMapping | None = None, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
        """logits() for a flat batch as InputBatch lays it out: sequence i's query_lens[i] tokens at consecutive
        positions, all attending causally over its block table. prompt_lens (batch-invariant steps): each row's
        prompt length, which tells its prompt rows from the rest."""
        bs = self.block_size
        width = max(len(t) for t in block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long)
        if len(query_lens) != len(input_ids):
            table = table.repeat_interleave(torch.tensor(query_lens), dim=0)
        pos = positions.long()
        slots = table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        if not self.invariant:
            return self.logits(input_ids, pos, slots, table, pos + 1, head_rows, lora)
        prompt = pos < prompt_lens if self.prompt_tiles else torch.zeros_like(pos, dtype=torch.bool)
        tiled = int(prompt.sum())
        if tiled in (0, len(pos)):
            return self.logits(input_ids, pos, slots, table, pos + 1, head_rows, lora, tiled)
        # prompt rows first (rows are independent: every row's K/V is written before any row attends)
        order = torch.cat([prompt.nonzero()[:, 0], (~prompt).nonzero()[:, 0]])
        at = torch.empty_like(order)
        at[order] = torch.arange(len(order))
        wanted = torch.arange(len(pos)) if head_rows is None else head_rows
        heads, back = at[wanted].sort()
        lora_slots = self._lora_slots(lora, len(pos))
        logits = self._forward(input_ids[order], pos[order], slots[order], table[order], pos[order] + 1, heads,
                               lora_slots[order] if lora_slots.numel() else lora_slots, tiled)
        return logits[back.argsort()]
