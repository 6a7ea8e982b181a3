"""Runs one scheduled step as one forward pass over the paged KV cache, then samples (and verifies draft tokens).

Input: the scheduler output (core/scheduler_output.py), read and never changed. Output: a ModelRunnerOutput with
the tokens each request keeps. A request with draft tokens gets one sampled row per position; the drafts are kept
while they equal the token sampled at their position, then the first sampled token that differs (or the bonus
token after them all) ends the run: every kept token is a draw from the model's own distribution given the
tokens before it, so outputs are exactly those of decoding without drafts.
"""
from __future__ import annotations

import torch

from tokenloom.config import CacheConfig, ModelConfig
from tokenloom.model_executor.forward_context import ForwardContext, set_forward_context
from tokenloom.model_executor.fused_decode import FusedDecoder
from tokenloom.model_executor.layers.attention import build_attention_metadata
from tokenloom.model_executor.sequence_forward import SequenceForward
from tokenloom.sample import Sampler, SamplingMetadata, SamplingRow
from tokenloom.worker.input_batch import InputBatch
from tokenloom.worker.kv_cache import KVCache
from tokenloom.worker.outputs import ModelRunnerOutput


class ModelRunner:
    def __init__(self, model, cache_config: CacheConfig, num_blocks: int, device: torch.device,
                 generator: torch.Generator):
        self.model = model
        self.config: ModelConfig = model.config
        self.block_size = cache_config.block_size
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        cfg = self.config
        self.num_blocks = num_blocks
        self.cache = KVCache(cfg, cache_config, num_blocks, self.dtype, device)
        self.kv_cache, self.kv_scales = self.cache.tensor, self.cache.scales
        self.layer_caches = self.cache.layers
        model.bind_kv_caches(self.layer_caches)  # each attention layer keeps its view of the cache
        self.sampler = Sampler(generator)
        # decode batches up to this many sequences run as one compiled call (None: layer by layer only)
        self.fused = FusedDecoder.build(model, self.layer_caches, self.block_size) if device.type == "cpu" else None
        self.steps_by_path = {"fused": 0, "layers": 0}  # which path each forward took (tests and benchmarks)

    @torch.inference_mode()
    def execute(self, sched) -> ModelRunnerOutput:
        """Run one step of the scheduler output `sched`: its one-token requests (decodes) through the compiled
        stack when there is one, the rest (prefill chunks, drafts, prompt logprobs) layer by layer."""
        if sched.blocks_to_copy:
            self.cache.copy_blocks(sched.blocks_to_copy)
        out = ModelRunnerOutput()
        fused, layers = self._split(sched.scheduled)
        if fused:
            self._run_fused(InputBatch.from_scheduled(fused, self.device), out)
        if layers:
            self._run_layers(InputBatch.from_scheduled(layers, self.device), out)
        return out

    def _split(self, scheduled: list) -> tuple[list, list]:
        """(items for the compiled stack, items for the layers). The stack takes one-token items without prompt
        logprobs, up to its batch limit; so a request's decode runs the same kernels whatever else is in the
        step, which keeps its output independent of the batch."""
        if self.fused is None:
            return [], scheduled
        fused, layers = [], []
        for item in scheduled:
            req = item.request
            one = item.num_tokens == 1 and not item.spec_token_ids and (
                req.params.prompt_logprobs is None or req.num_computed_tokens >= req.num_prompt_tokens - 1)
            (fused if one else layers).append(item)
        if len(fused) > self.fused.max_batch:
            return [], scheduled
        return fused, layers

    def _run_fused(self, batch: InputBatch, out: ModelRunnerOutput) -> None:
        self.steps_by_path["fused"] += 1
        logits = self._fused_logits(batch)
        if batch.samples:
            rows = batch.sample_rows
            self._sample(batch, logits if rows == list(range(len(logits))) else logits[rows], out)

    def _run_layers(self, batch: InputBatch, out: ModelRunnerOutput) -> None:
        self.steps_by_path["layers"] += 1
        meta = build_attention_metadata(
            batch.query_lens, batch.context_lens, batch.block_tables, self.block_size,
            self.config.num_heads // self.config.num_kv_heads, self.config.sliding_window, self.device,
        )
        with set_forward_context(ForwardContext(meta)):
            hidden = self.model(batch.input_ids, batch.positions)
        out.prompt_logprobs = [
            (req, start, self._prompt_logprobs(req, hidden[o : o + n], req.prompt_token_ids[start + 1 : start + n + 1]))
            for req, o, n, start in batch.prompt_logprob_spans
        ]
        if batch.samples:
            self._sample(batch, self.model.compute_logits(hidden[batch.sample_rows]), out)

    def _fused_logits(self, batch: InputBatch) -> torch.Tensor:
        bs = self.block_size
        width = max(len(t) for t in batch.block_tables)
        table = torch.tensor([t + [0] * (width - len(t)) for t in batch.block_tables], dtype=torch.long)
        lens = torch.tensor(batch.context_lens, dtype=torch.long)
        pos = lens - 1
        slots = table.gather(1, (pos // bs)[:, None])[:, 0] * bs + pos % bs
        return self.fused.logits(batch.input_ids, pos, slots, table, lens)

    def _sample(self, batch: InputBatch, logits: torch.Tensor, out: ModelRunnerOutput) -> None:
        rows = []
        for g in batch.samples:
            r = g.request
            for j in range(len(g.rows)):  # row j sees the drafts before it as output already
                history = r.output_token_ids + g.draft_token_ids[:j] if j else r.output_token_ids
                rows.append(SamplingRow(r.params, r.prompt_token_ids, history, r.generator, self.config.eos_token_ids))
        samples = self.sampler(logits, SamplingMetadata.from_rows(rows, logits.device))
        row = 0
        for g in batch.samples:
            tokens = samples.token_ids[row : row + len(g.rows)]
            kept = len(g.rows)
            for j, draft in enumerate(g.draft_token_ids):
                if tokens[j] != draft:
                    kept = j + 1
                    break
            out.requests.append(g.request)
            out.sampled_token_ids.append(tokens[:kept])
            out.logprobs.append(samples.logprobs[row : row + kept] if g.request.params.logprobs is not None else None)
            row += len(g.rows)

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        """Final-norm hidden states [n, hidden] of one causal forward over a scratch cache: the engine's own
        cache and requests are untouched (used for embeddings)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return SequenceForward(self.model, len(token_ids)).hidden(ids)

    def _prompt_logprobs(self, req, hidden: torch.Tensor, next_tokens: list[int]) -> list[dict]:
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
