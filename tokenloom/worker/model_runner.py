"""Runs one scheduled step as one forward pass over the paged KV cache, then samples."""
from __future__ import annotations

import math

import numpy as np
import torch

from tokenloom.config import CacheConfig, ModelConfig
from tokenloom.core.scheduler import SchedulerOutput
from tokenloom.core.request import Request
from tokenloom.model_executor.layers.attention import LayerKVCache, build_attention_metadata
from tokenloom.sample.sampler import Sampler, SamplerOutput, SamplingRow
from tokenloom.model_executor.models.llama import CausalLM


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    slots = cfg.num_layers * 2 * block_size * cfg.num_kv_heads
    if kv_cache_dtype == "int8":  # one byte per element plus a float32 scale per slot and head
        return slots * (cfg.head_dim + 4)
    return slots * cfg.head_dim * torch.finfo(dtype).bits // 8


def zeros_lazily(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor whose pages the OS supplies on first touch (calloc), so a large KV pool costs nothing
    up front. Slots never written must read as zeros: padded attention keys may point at them."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * (torch.finfo(dtype).bits if dtype.is_floating_point else torch.iinfo(dtype).bits) // 8
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


class ModelRunner:
    def __init__(self, model: CausalLM, cache_config: CacheConfig, num_blocks: int, device: torch.device,
                 generator: torch.Generator):
        self.model = model
        self.config: ModelConfig = model.config
        self.block_size = cache_config.block_size
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        cfg = self.config
        self.num_blocks = num_blocks
        # One tensor for the whole cache: [layer, k/v, slot, kv_head, head_dim].
        shape = (cfg.num_layers, 2, num_blocks * self.block_size, cfg.num_kv_heads, cfg.head_dim)
        quantized = cache_config.kv_cache_dtype == "int8"
        self.kv_cache = zeros_lazily(shape, torch.int8 if quantized else self.dtype, device)
        self.kv_scales = zeros_lazily(shape[:-1], torch.float32, device) if quantized else None
        self.layer_caches = [
            LayerKVCache(self.kv_cache[i, 0], self.kv_cache[i, 1],
                         *((self.kv_scales[i, 0], self.kv_scales[i, 1]) if quantized else ()))
            for i in range(cfg.num_layers)
        ]
        self.sampler = Sampler(generator)

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for src, dst in copies:
            for t in (self.kv_cache, self.kv_scales) if self.kv_scales is not None else (self.kv_cache,):
                t[:, :, dst * bs : (dst + 1) * bs] = t[:, :, src * bs : (src + 1) * bs]

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[Request], SamplerOutput | None, list]:
        """Run the step; returns the requests that produced a next token (a fork shares its parent's row),
        their samples, and prompt logprobs computed this step [(request, first position, [{token: logprob}])]."""
        if sched.blocks_to_copy:
            self.copy_blocks(sched.blocks_to_copy)
        input_ids, positions, query_lens, context_lens, tables = [], [], [], [], []
        sample_rows: list[int] = []  # index into the flat batch of each row to sample
        sample_reqs: list[Request] = []
        prompt_lp: list[tuple[Request, int, int, int]] = []  # (request, first flat row, rows, first position)
        offset = 0
        for req, n in sched.scheduled:
            start = req.num_computed_tokens
            end = start + n
            if n == 1 and req.output_token_ids:  # decode: only the last token is new
                input_ids.append(req.output_token_ids[-1])
            else:
                input_ids.extend(req.all_token_ids[start:end])
            positions.append((start, end))
            query_lens.append(n)
            context_lens.append(end)
            tables.append(req.block_table)
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                # Row p predicts prompt token p + 1.
                prompt_lp.append((req, offset, min(end, req.num_prompt_tokens - 1) - start, start))
            offset += n
            if end == req.num_tokens:  # caught up: this step yields the request's next token
                family = [req] + req.forks  # n > 1: every completion draws its first token from this row
                sample_rows += [offset - 1] * len(family)
                sample_reqs += family
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(s, e) for s, e in positions]).to(self.device)
        meta = build_attention_metadata(
            query_lens, context_lens, tables, self.block_size,
            self.config.num_heads // self.config.num_kv_heads, self.config.sliding_window, self.device,
        )
        hidden = self.model(ids, pos, self.layer_caches, meta)
        prompt_logprobs = [
            (req, start, self._prompt_logprobs(req, hidden[o : o + n], req.prompt_token_ids[start + 1 : start + n + 1]))
            for req, o, n, start in prompt_lp
        ]
        if not sample_reqs:
            return [], None, prompt_logprobs
        logits = self.model.compute_logits(hidden[sample_rows])
        rows = [
            SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, self.config.eos_token_ids)
            for r in sample_reqs
        ]
        return sample_reqs, self.sampler(logits, rows), prompt_logprobs

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        """Final-norm hidden states [n, hidden] of one causal forward over a scratch cache: the engine's own
        cache and requests are untouched (used for embeddings)."""
        n, cfg = len(token_ids), self.config
        # Every layer writes its K/V and reads them back before the next layer runs: one scratch pair serves all.
        k = torch.zeros(n, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype, device=self.device)
        cache = LayerKVCache(k, torch.zeros_like(k))
        meta = build_attention_metadata([n], [n], [list(range(n))], 1, cfg.num_heads // cfg.num_kv_heads,
                                        cfg.sliding_window, self.device)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return self.model(ids, torch.arange(n, device=self.device), [cache] * cfg.num_layers, meta)

    def _prompt_logprobs(self, req: Request, hidden: torch.Tensor, next_tokens: list[int]) -> list[dict]:
        logprobs = torch.log_softmax(self.model.compute_logits(hidden), dim=-1)
        next_ids = torch.tensor(next_tokens, device=logprobs.device)
        chosen = logprobs.gather(1, next_ids[:, None])[:, 0].tolist()
        top_n = req.params.prompt_logprobs
        top_vals, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
        out = []
        for i, tok in enumerate(next_tokens):
            entry = {tok: chosen[i]}
            if top_n:
                entry.update({t: v for t, v in zip(top_ids[i].tolist(), top_vals[i].tolist()) if t not in entry})
            out.append(entry)
        return out
