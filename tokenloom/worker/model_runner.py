"""Runs one scheduled step as one forward pass over the paged KV cache, then samples (and verifies draft tokens).

Input: the scheduler output (core/scheduler_output.py), read and never changed. Output: a ModelRunnerOutput with
the tokens each request keeps, and (speculative decoding) the drafts to verify next step. A request with draft
tokens gets one sampled row per position. Drafts whose distribution q is one-hot (n-gram, greedy drafts) are kept
while they equal the token sampled at their position, then the first sampled token that differs (or the bonus
token after them all) ends the run: this is rejection sampling for one-hot q (accept x with probability p(x),
else draw from p without x). Sampled model drafts go through the general rejection sampler
(sample/rejection_sampler.py). Either way every kept token is a draw from the model's own distribution given the
tokens before it, so greedy outputs are exactly those of decoding without drafts. A constrained request's rows
(structured output) take their rows of the step's grammar bitmask, which the scheduler started filling on a
background thread before the forward; p is masked at every draft position, so the above still holds.

LoRA: the step's adapters are put in slots and each forward is told which rows run which slot: the compiled
stack adds the adapters' deltas itself (when it can: FusedDecoder.takes_lora), the layers read the row groups
from the forward context, each adapter's requests side by side so that its rows are one run. Base requests take
the same path they would take without LoRA.
"""
from __future__ import annotations

import time

import torch

from tokenloom.config import CacheConfig, ModelConfig, TokenloomError
from tokenloom.model_executor.forward_context import ForwardContext, set_forward_context
from tokenloom.model_executor.fused_decode import FusedDecoder
from tokenloom.model_executor.layers.attention import build_attention_metadata
from tokenloom.model_executor.sequence_forward import SequenceForward
from tokenloom.sample import Sampler, SamplingMetadata, SamplingRow
from tokenloom.sample.ops import reportable_logprobs
from tokenloom.sample.rejection_sampler import rejection_sample
from tokenloom.worker.input_batch import InputBatch
from tokenloom.worker.kv_cache import KVCache, available_memory
from tokenloom.worker.outputs import ModelRunnerOutput


# Rows of one token run beyond which logits() goes layer by layer: the compiled stack's kernels are
# matrix-vector products, each row a pass over the weights.
FUSED_MAX_ROWS = 16
HOST = torch.device("cpu")


class ModelRunner:
    def __init__(self, model, cache_config: CacheConfig, num_blocks: int, device: torch.device,
                 generator: torch.Generator, layer_caches: list | None = None, compiled_decode: bool = True,
                 batch_invariant: bool = False):
        """layer_caches: run on these layers' caches (a layer-skip draft shares its target's) instead of
        allocating a KV cache of num_blocks blocks. compiled_decode False: every step layer by layer (a rank of a
        parallel model, whose layers meet their peers' in collectives the compiled stack does not make).
        batch_invariant: every token row (prefill too) through the compiled stack's row-wise kernels, so that a
        request's output never depends on what else is in the step (see _split)."""
        self.model = model
        self.config: ModelConfig = model.config
        self.block_size = cache_config.block_size
        self.device = device
        self.dtype = model.embed_tokens.weight.dtype
        cfg = self.config
        self.num_blocks = num_blocks
        self.cache = KVCache(cfg, cache_config, num_blocks, self.dtype, device, getattr(model, "pipeline_layers", None)
                             ) if layer_caches is None else None
        self.layer_caches = self.cache.layers if layer_caches is None else layer_caches
        self.kv_cache = self.cache.tensor if self.cache else None  # [layer, k/v, slot, kv_head, head_dim]
        model.bind_kv_caches(self.layer_caches)  # each attention layer keeps its view of the cache
        self.sampler = Sampler(generator)
        # decode batches up to this many sequences run as one compiled call (None: layer by layer only)
        self.fused = (FusedDecoder.build(model, self.layer_caches, self.block_size, available_memory(device))
                      if device.type == "cpu" and compiled_decode else None)
        self.batch_invariant = batch_invariant
        if batch_invariant:
            if self.fused is None:
                raise TokenloomError("--batch-invariant runs every step on the compiled CPU stack, which this model "
                                     f"cannot take ({FusedDecoder.reason or device.type + ' device'})")
            self.fused.make_batch_invariant()
        self.steps_by_path = {"fused": 0, "layers": 0, "graph": 0}  # which path each forward took (tests, benches)
        self.graphs = None  # worker.cuda_graphs.DecodeGraphs, set by the executor on CUDA: decodes replayed
        self.speculator = None  # spec_decode.Speculator, set by the executor when speculative decoding is on
        self.lora = None  # lora.LoRAManager, set by the executor when LoRA is enabled
        self.microbatches = 1  # pipeline parallel: a step's sequences go through the stages in this many groups
        self._grammar = None  # the step's core.GrammarOutput (structured output), while it runs

    @torch.inference_mode()
    def execute(self, sched) -> ModelRunnerOutput:
        """Run one step of the scheduler output `sched`: its decodes (with any drafts to verify) through the
        compiled stack when there is one, the rest (prefill chunks, prompt logprobs) layer by layer (on CUDA, a
        step of plain decodes replays a CUDA graph of the layers); then, when speculating, the next drafts."""
        start = time.perf_counter()
        spec = self.speculator
        if spec is not None:
            spec.drop(sched.freed_request_ids)
        if sched.blocks_to_copy:
            self.cache.copy_blocks(sched.blocks_to_copy)
        out = ModelRunnerOutput()
        self._grammar = sched.grammar
        fused, layers = self._split(sched.scheduled)
        if fused:
            self._run_fused(InputBatch.from_scheduled(fused, self.device), out)
        if layers and (self.graphs is None or not self._run_graph(layers, out)):
            if self.lora is not None:  # each adapter's requests side by side: its rows are one run
                layers = sorted(layers, key=lambda item: item.request.lora_int_id)
            self._run_layers(InputBatch.from_scheduled(layers, self.device), out)
        if spec is not None:
            spec.after_step(sched, out, time.perf_counter() - start)
        return out

    def _split(self, scheduled: list) -> tuple[list, list]:
        """(items for the compiled stack, items for the layers). The stack takes decodes (one token, the prompt's
        last or later, plus the drafts to verify), up to its batch limit in rows; so a request's decode runs the
        same kernels whatever else is in the step, which keeps its output independent of the batch and of
        speculation."""
        if self.fused is None:
            return [], scheduled
        if self.batch_invariant:
            return self._split_invariant(scheduled)
        fused, drafted, layers = [], [], []
        for item in scheduled:
            req = item.request
            # a one-token chunk inside a prompt stays on the layers, which see its prompt length (LongRoPE)
            decode = item.num_tokens == 1 + len(item.spec_token_ids) and (
                req.lora_request is None or self.fused.takes_lora()) and (
                req.num_computed_tokens >= req.num_prompt_tokens - 1)
            (layers if not decode else drafted if item.spec_token_ids else fused).append(item)
        if len(fused) > self.fused.max_batch:
            return [], scheduled
        rows = len(fused)
        for item in drafted:
            if rows + item.num_tokens <= self.fused.max_batch:
                fused.append(item)
                rows += item.num_tokens
            else:
                layers.append(item)
        return fused, layers

    def _split_invariant(self, scheduled: list) -> tuple[list, list]:
        """Batch-invariant steps: every item on the stack, whose kernels give each row the same arithmetic
        whatever the batch (weights row by row, kernels chosen by the row's kind: FusedDecoder.make_batch_invariant;
        attention cut at fixed key offsets). Only what the stack cannot compute stays on the layers: adapter rows
        it cannot take, and the prompt of a LongRoPE model longer than its original context (long factors below it)."""
        long_from = getattr(self.model.rotary, "long_from", 0)
        fused, layers = [], []
        for item in scheduled:
            req = item.request
            on_stack = (req.lora_request is None or self.fused.takes_lora()) and not (
                long_from and req.num_prompt_tokens > long_from and req.num_computed_tokens < req.num_prompt_tokens)
            (fused if on_stack else layers).append(item)
        return fused, layers

    def _run_fused(self, batch: InputBatch, out: ModelRunnerOutput) -> None:
        self.steps_by_path["fused"] += 1
        rows = batch.sample_rows
        spans = batch.prompt_logprob_spans  # batch-invariant steps: prompts run here too
        heads = sorted(set(rows).union(*(range(o, o + n) for _, o, n, _ in spans)))
        heads = heads or [len(batch.input_ids) - 1]  # forks of n > 1 share their parent's row
        head_rows = None if len(heads) == len(batch.input_ids) else torch.tensor(heads)
        lora = self.lora.mapping(batch.lora_ids, batch.query_lens) if self.lora is not None else None
        logits = self.fused.token_logits(batch.input_ids, batch.positions, batch.block_tables, batch.query_lens,
                                         head_rows, lora, batch.prompt_lens)
        at = {r: i for i, r in enumerate(heads)}
        out.prompt_logprobs = [
            (req, start, self._prompt_logprobs(req, logits[at[o] : at[o] + n],
                                               req.prompt_token_ids[start + 1 : start + n + 1]))
            for req, o, n, start in spans]
        if rows:
            self._sample(batch, logits if rows == heads else logits[[at[r] for r in rows]], out)

    def _run_graph(self, scheduled: list, out: ModelRunnerOutput) -> bool:
        """A pure-decode step replayed from a CUDA graph (worker/cuda_graphs.py); False: not this step (a prefill,
        drafts, an adapter, too wide) or the capture failed, and the caller runs the layers."""
        bucket = self.graphs.plan(scheduled)
        if bucket is None:
            return False
        batch = InputBatch.from_scheduled(scheduled, HOST)  # packed into the graph's buffer with one copy
        logits = self.graphs.logits(batch, bucket)
        if logits is None:
            return False
        self.steps_by_path["graph"] += 1
        self._sample(batch, logits, out)
        return True

    def _layers_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor, query_lens: list[int],
                       context_lens: list[int], block_tables: list[list[int]],
                       lora_ids: list[int] | None = None, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states of a flat batch, layer by layer over the paged cache; lora_ids: each sequence's
        adapter (0 or None: the base model)."""
        self.steps_by_path["layers"] += 1
        if self.microbatches > 1 and len(query_lens) > 1:
            return self._pipelined_hidden(input_ids, positions, query_lens, context_lens, block_tables, prompt_lens)
        meta = self._attention_metadata(query_lens, context_lens, block_tables)
        lora = self.lora.mapping(lora_ids, query_lens) if self.lora is not None and lora_ids else None
        with set_forward_context(ForwardContext(meta, lora, prompt_lens)):
            return self.model(input_ids, positions)

    def _attention_metadata(self, query_lens, context_lens, block_tables):
        cfg = self.config
        return build_attention_metadata(query_lens, context_lens, block_tables, self.block_size,
                                        cfg.num_heads // cfg.num_kv_heads, cfg.sliding_window, self.device)

    def _pipelined_hidden(self, input_ids, positions, query_lens, context_lens, block_tables, prompt_lens):
        """Pipeline parallel: the step's sequences in up to `microbatches` groups of about equal tokens, handed to
        the stages one after another so that they work on different groups at once."""
        bounds = _split_tokens(query_lens, self.microbatches)
        parts, rows = [], 0
        for a, b in zip(bounds, bounds[1:]):
            n = sum(query_lens[a:b])
            meta = self._attention_metadata(query_lens[a:b], context_lens[a:b], block_tables[a:b])
            ctx = ForwardContext(meta, None, None if prompt_lens is None else prompt_lens[rows : rows + n])
            parts.append((input_ids[rows : rows + n], positions[rows : rows + n], ctx))
            rows += n
        return self.model.forward_microbatches(parts)

    def _run_layers(self, batch: InputBatch, out: ModelRunnerOutput) -> None:
        hidden = self._layers_hidden(batch.input_ids, batch.positions, batch.query_lens, batch.context_lens,
                                     batch.block_tables, batch.lora_ids, batch.prompt_lens)
        out.prompt_logprobs += [
            (req, start, self._prompt_logprobs(req, self.model.compute_logits(hidden[o : o + n]),
                                               req.prompt_token_ids[start + 1 : start + n + 1]))
            for req, o, n, start in batch.prompt_logprob_spans
        ]
        if batch.samples:
            self._sample(batch, self.model.compute_logits(hidden[batch.sample_rows]), out)

    def _sample(self, batch: InputBatch, logits: torch.Tensor, out: ModelRunnerOutput) -> None:
        rows = []
        for g in batch.samples:
            r = g.request
            for j in range(len(g.rows)):  # row j sees the drafts before it as output already
                history = r.output_token_ids + g.draft_token_ids[:j] if j else r.output_token_ids
                rows.append(SamplingRow(r.params, r.prompt_token_ids, history, r.generator, self.config.eos_token_ids))
        bitmask, bitmask_rows = self._grammar_rows(batch)
        metadata = SamplingMetadata.from_rows(rows, logits.device, bitmask, bitmask_rows)
        samples = self.sampler(logits, metadata, choose=self._rejection_sampler(batch))
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

    def _grammar_rows(self, batch: InputBatch) -> tuple[torch.Tensor | None, list[int] | None]:
        """(the step's grammar bitmask rows for this batch's sampled rows, those sampled rows), or (None, None)
        when no request here is constrained. Waits for the mask thread, which has run alongside the forward."""
        grammar = self._grammar
        if grammar is None:
            return None, None
        picked, sample_rows, row = [], [], 0
        for g in batch.samples:
            first = grammar.rows.get(g.request.request_id)
            if first is not None:
                picked += range(first, first + len(g.rows))
                sample_rows += range(row, row + len(g.rows))
            row += len(g.rows)
        if not picked:
            return None, None
        return grammar.bitmask()[picked], sample_rows

    def _rejection_sampler(self, batch: InputBatch):
        """The sampler's choose() for the requests whose drafts were sampled from a draft distribution q: their
        rows' tokens become the rejection sampler's (accepted drafts, then the residual or bonus token)."""
        spec = self.speculator
        if spec is None or not spec.draft_probs:
            return None
        checks, row = [], 0
        for g in batch.samples:
            q = spec.draft_probs.get(g.request.request_id) if g.draft_token_ids else None
            if q is not None:
                checks.append((row, g, q[: len(g.draft_token_ids)]))
            row += len(g.rows)
        if not checks:
            return None

        def choose(tokens: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
            tokens = tokens.clone()
            for row, g, q in checks:
                kept = rejection_sample(probs[row : row + len(g.rows)], g.draft_token_ids, q,
                                        g.request.generator or self.sampler.generator)
                tokens[row : row + len(kept)] = torch.tensor(kept, device=tokens.device)
            return tokens

        return choose

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int]) -> torch.Tensor:
        """Final-norm hidden states [n, hidden] of one causal forward over a scratch cache: the engine's own
        cache and requests are untouched (used for embeddings)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        return SequenceForward(self.model, len(token_ids)).hidden(ids)

    @torch.inference_mode()
    def logits(self, input_ids: list[int], starts: list[int], query_lens: list[int], block_tables: list[list[int]],
               rows: list[int]) -> torch.Tensor:
        """float32 logits of the flat rows `rows` (ascending) of a batch of token runs, run i continuing its
        sequence at position starts[i] over block_tables[i], its K/V written into the cache: through the compiled
        stack for a few rows, else layer by layer (a draft model catching up)."""
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, query_lens)]).to(self.device)
        if self.fused is not None and len(input_ids) <= min(self.fused.max_batch, FUSED_MAX_ROWS):
            self.steps_by_path["fused"] += 1
            return self.fused.token_logits(ids, pos, block_tables, query_lens, torch.tensor(rows))
        hidden = self._layers_hidden(ids, pos, query_lens, [s + n for s, n in zip(starts, query_lens)], block_tables)
        return self.model.compute_logits(hidden[rows])

    def _prompt_logprobs(self, req, logits: torch.Tensor, next_tokens: list[int]) -> list[dict]:
        logprobs = torch.log_softmax(logits, dim=-1)
        next_ids = torch.tensor(next_tokens, device=logprobs.device)
        chosen = reportable_logprobs(logprobs.gather(1, next_ids[:, None])[:, 0]).tolist()
        top_n = req.params.prompt_logprobs
        top_vals, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (None, None)
        top_vals = reportable_logprobs(top_vals) if top_n else None
        out = []
        for i, tok in enumerate(next_tokens):
            entry = {tok: chosen[i]}
            if top_n:
                entry.update({t: v for t, v in zip(top_ids[i].tolist(), top_vals[i].tolist()) if t not in entry})
            out.append(entry)
        return out


def _split_tokens(query_lens: list[int], parts: int) -> list[int]:
    """Sequence boundaries [0, ..., len] cutting the run into at most `parts` groups of about equal tokens."""
    total, bounds, acc = sum(query_lens), [0], 0
    for i, n in enumerate(query_lens[:-1]):
        acc += n
        if len(bounds) < parts and acc >= total * len(bounds) / parts:
            bounds.append(i + 1)
    return bounds + [len(query_lens)]

