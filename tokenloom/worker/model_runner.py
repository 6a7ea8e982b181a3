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

    @torch.inference_mode()
    def execute(self, sched) -> ModelRunnerOutput:
        """Run one step of the scheduler output `sched`."""
        if sched.blocks_to_copy:
            self.cache.copy_blocks(sched.blocks_to_copy)
        batch = InputBatch.from_scheduled(sched.scheduled, self.device)
        meta = build_attention_metadata(
            batch.query_lens, batch.context_lens, batch.block_tables, self.block_size,
            self.config.num_heads // self.config.num_kv_heads, self.config.sliding_window, self.device,
        )
        with set_forward_context(ForwardContext(meta)):
            hidden = self.model(batch.input_ids, batch.positions)
        out = ModelRunnerOutput()
        out.prompt_logprobs = [
            (req, start, self._prompt_logprobs(req, hidden[o : o + n], req.prompt_token_ids[start + 1 : start + n + 1]))
            for req, o, n, start in batch.prompt_logprob_spans
        ]
        if batch.samples:
            self._sample(batch, hidden, out)
        return out

    def _sample(self, batch: InputBatch, hidden: torch.Tensor, out: ModelRunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[batch.sample_rows])
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
