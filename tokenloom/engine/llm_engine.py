"""The engine: add_request / step / abort_request, with streamed outputs.

One step is: schedule (core.Scheduler), run (the executor's model runner), update (the scheduler accepts the
sampled tokens), then the output processor turns them into RequestOutputs.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from tokenloom.config import EngineConfig, TokenloomError, resolve_dtype
from tokenloom.core.kv_cache_manager import KVCacheManager
from tokenloom.core.request import Request
from tokenloom.core.scheduler import Scheduler
from tokenloom.engine.output_processor import OutputProcessor, RequestGroup
from tokenloom.engine.outputs import EngineStats, RequestMetrics, RequestOutput
from tokenloom.loader.sources import resolve_model
from tokenloom.lora import LoRAError, LoRAInfo, LoRAManager, LoRARequest
from tokenloom.sampling_params import SamplingParams
from tokenloom.structured_output import StructuredOutputManager
from tokenloom.worker.executor import Executor, UniProcExecutor

log = logging.getLogger("tokenloom")


def default_quantization(config: EngineConfig, source_kind: str) -> str | None:
    """The weights' run-time form: what was asked for ("none": dequantized floats); unasked, a GGUF file runs on
    its own quantized blocks on the CPU, as llama.cpp and Ollama do, unless a float dtype was chosen."""
    q = config.quantization
    if q is not None:
        return None if q.strip().lower() == "none" else q
    if source_kind == "gguf" and config.dtype == "auto" and config.device == "cpu":
        return "gguf"
    return None


def make_executor(config: EngineConfig, source: ModelSource, dtype: torch.dtype, generator: torch.Generator):
    """The executor the config asks for: one process, or ranks in worker processes / Ray actors."""
    if config.parallel.world_size > 1:
        from tokenloom.worker.multiproc_executor import ParallelExecutor

        return ParallelExecutor(config, source, dtype, generator)
    return UniProcExecutor(config, source, dtype, generator)


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device.type)
        source = resolve_model(config.model)
        self.config = config = dataclasses.replace(config, quantization=default_quantization(config, source.kind))
        self.model_name = source.name
        self.model_source = source
        self.generator = torch.Generator().manual_seed(config.seed)
        load_start = time.perf_counter()
        self.executor = executor or make_executor(config, source, self.dtype, self.generator)
        self.load_time = time.perf_counter() - load_start
        self.tokenizer = self.executor.tokenizer
        self.model_config = cfg = self.executor.model_config
        self.max_model_len = self.executor.max_model_len
        cache_cfg = config.cache
        self.kv_cache_manager = KVCacheManager(self.executor.num_blocks, cache_cfg.block_size,
                                               cache_cfg.enable_prefix_caching)
        self.structured_output = StructuredOutputManager(self.tokenizer, cfg.vocab_size, list(cfg.eos_token_ids),
                                                         config.structured_output)
        # LoRA adapters by name (lora.LoRAManager: add / remove / list), None unless LoRA is enabled
        self.lora_manager = getattr(self.executor, "lora_manager", None)
        if self.lora_manager is not None:
            self.lora_manager.in_use = self._adapters_in_use
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len, cfg.eos_token_ids,
                                   getattr(self.executor, "num_lookahead_tokens", 0), self.structured_output,
                                   config.lora.max_loras if config.lora is not None else 0)
        self.output_processor = OutputProcessor(self.scheduler.finish)
        self.last_step_num_seqs = 0
        self._ids = itertools.count()
        self._counters = dict(steps=0, tokens_computed=0, prompt_tokens_computed=0,
                              slots_used=0, slots_alloc=0, slots_contig=0, kv_released_bytes=0)
        self._last_kv_release = time.monotonic()

    @property
    def model(self):  # the model of an in-process executor (tests, perplexity, calibration)
        return self.executor.model

    @property
    def runner(self):
        return self.executor.runner

    def reset_prefix_cache(self) -> None:
        """Forget every cached block no request holds (benchmarks measure cold prefills this way)."""
        self.kv_cache_manager.reset_prefix_cache()

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, lora_request: LoRARequest | None = None) -> str:
        """Queue a prompt; lora_request: run it with that adapter (added first if the engine does not know it;
        a LoRAError, before anything is queued, if it does not fit the model)."""
        params = params or SamplingParams()
        params.check_vocab(self.model_config.vocab_size)
        prompt_text, token_ids = self._tokenize(prompt)
        n_prompt = len(token_ids)
        if n_prompt >= self.max_model_len:
            raise TokenloomError(
                f"prompt is {n_prompt} tokens, but the context window is {self.max_model_len} tokens "
                "(prompt plus at least one generated token must fit)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - n_prompt
        if n_prompt + max_tokens > self.max_model_len:
            raise TokenloomError(
                f"prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds the context window "
                f"of {self.max_model_len} tokens"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.output_processor.groups:
            raise TokenloomError(f"request id '{request_id}' is already in use")
        # compiled off the engine loop when the caller awaited grammar_async first (the server does)
        grammar = self.structured_output.grammar(params.structured_outputs) if params.structured_outputs else None
        lora_seed = self._prepare_lora(lora_request)
        # best_of > n: best_of candidates, forked alike (seeds seed + i), ranked by mean logprob at the end
        best_of = params.best_of if params.best_of is not None and params.best_of > params.n else None
        run = dataclasses.replace(params, logprobs=0) if best_of and params.logprobs is None else params
        reqs = [self._new_request(request_id, i, token_ids, run, max_tokens) for i in range(best_of or params.n)]
        for req in reqs if lora_request is not None else ():
            req.lora_request, req.lora_hash_seed = lora_request, lora_seed
        for req in reqs if grammar is not None else ():
            req.grammar = grammar.matcher()
        parent = reqs[0]
        parent.forks = reqs[1:]
        for child in parent.forks:
            child.fork_of = parent
        metrics = RequestMetrics(arrival_time=parent.arrival_time)
        self.output_processor.add(RequestGroup(request_id, prompt_text, token_ids, reqs, metrics,
                                               best_of_params=params if best_of else None))
        self.scheduler.add_request(parent)
        return request_id

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise TokenloomError("this model has no tokenizer: pass prompts as token ids")
            prompt_text, token_ids = prompt, self.tokenizer.encode(prompt)
        else:
            prompt_text, token_ids = None, [int(t) for t in prompt]
        if not token_ids:
            raise TokenloomError("prompt is empty")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise TokenloomError(f"prompt token ids must be in [0, {vocab})")
        return prompt_text, token_ids

    def _new_request(self, request_id, index, token_ids, params, max_tokens) -> Request:
        req = Request(f"{request_id}#{index}", token_ids, params, max_tokens, index=index)
        req.group_id = request_id
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed + index)
        if self.tokenizer is not None:
            from tokenloom.tokenizer import IncrementalDetokenizer

            req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        return req

    # ---- LoRA adapters -------------------------------------------------------------------------------
    def _lora(self) -> LoRAManager:
        if self.lora_manager is None:
            raise LoRAError("LoRA is not enabled: start the engine with enable_lora=True")
        return self.lora_manager

    def _prepare_lora(self, lora_request: LoRARequest | None):
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise LoRAError(f"lora_request must be a LoRARequest, not {type(lora_request).__name__}")
        return self._lora().prepare(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> LoRAInfo:
        """Read, check and register an adapter (LoRAError if it does not fit: rank, target modules, base model,
        a name or id taken by another adapter)."""
        return self._lora().add(lora_request)

    def remove_lora(self, name_or_id: str | int) -> bool:
        """Forget an adapter; False if unknown; LoRAError while queued or running requests use it."""
        return self._lora().remove(name_or_id)

    def list_loras(self) -> list[LoRAInfo]:
        return self._lora().list() if self.lora_manager is not None else []

    def _adapters_in_use(self) -> set[int]:
        sched = self.scheduler
        return {r.lora_int_id for r in [*sched.running, *sched.waiting]} - {0}

    def abort_request(self, request_id: str) -> None:
        group = self.output_processor.abort(request_id)
        if group is None:
            return
        for req in group.requests:
            if not req.is_finished:
                self.scheduler.finish(req)
                req.finish_reason = "abort"

    def shutdown(self) -> None:
        """Stop the executor's workers (parallel ranks); the engine cannot step afterwards."""
        self.executor.shutdown()

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        self.last_step_num_seqs = len(sched.scheduled)
        if not sched.scheduled:
            if self.scheduler.waiting and not self.scheduler.running:
                raise TokenloomError("scheduler is stuck: the waiting request does not fit in the KV cache")
            return []
        self._account_tokens(sched)
        result = self.executor.execute_model(sched)
        gained = self.scheduler.update_from_output(sched, result)
        self._account_kv_usage()
        outputs = self.output_processor.process(gained, result.prompt_logprobs)
        self.release_free_memory()
        return outputs

    def release_free_memory(self, force: bool = False) -> int:
        """Give the memory of KV blocks unused since the previous call back to the OS (and, with no request
        left, the C heap's free pages), at most once per kv_release_interval_s unless forced. Called after each
        step and by the serving loop while idle. Returns the KV bytes released."""
        cache_cfg, now = self.config.cache, time.monotonic()
        interval = cache_cfg.kv_release_interval_s
        if not force and (not interval or now - self._last_kv_release < interval):
            return 0
        self._last_kv_release = now
        block_bytes = self.executor.kv_block_bytes
        num_released, blocks = self.kv_cache_manager.trim(cache_cfg.kv_keep_cached_bytes // block_bytes,
                                                          self.executor.kv_blocks_per_page)
        self.executor.release_memory(blocks, idle=not self.has_unfinished())
        released = num_released * block_bytes
        self._counters["kv_released_bytes"] += released
        return released

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Embedding per prompt: mean of the final-norm hidden states over its tokens, L2-normalised."""
        out = []
        for ids in prompts:
            if not ids or len(ids) > self.max_model_len:
                raise TokenloomError(f"embedding input must have 1..{self.max_model_len} tokens, got {len(ids)}")
            hidden = self.executor.hidden_states(ids)
            out.append(torch.nn.functional.normalize(hidden.float().mean(0), dim=0).tolist())
        return out

    # ---- statistics ----------------------------------------------------------------------------------
    def _account_tokens(self, sched) -> None:
        c = self._counters
        c["steps"] += 1
        for item in sched.scheduled:
            req, n = item.request, item.num_tokens
            before = req.num_computed_tokens
            c["tokens_computed"] += n
            if before < req.num_prompt_tokens:
                c["prompt_tokens_computed"] += min(before + n, req.num_prompt_tokens) - before

    def _account_kv_usage(self) -> None:
        c, bs = self._counters, self.kv_cache_manager.block_size
        fill: dict[int, int] = {}
        contig = 0
        for req in self.scheduler.running:
            for i, b in enumerate(req.block_table):
                fill[b] = max(fill.get(b, 0), min(bs, req.num_computed_tokens - i * bs))
            contig += req.num_prompt_tokens + req.max_tokens
        c["slots_used"] += sum(max(f, 0) for f in fill.values())
        c["slots_alloc"] += len(fill) * bs
        c["slots_contig"] += contig

    def stats(self) -> EngineStats:
        kv, c, so = self.kv_cache_manager, self._counters, self.structured_output
        queries = kv.prefix_queries
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_total=kv.num_blocks,
            num_blocks_used=kv.num_used_blocks,
            num_blocks_free=kv.num_free_blocks,
            kv_cache_usage=kv.num_used_blocks / kv.num_blocks,
            prefix_cache_hit_rate=(kv.prefix_hits / queries) if queries else 0.0,
            prompt_tokens_computed=c["prompt_tokens_computed"],
            prompt_tokens_reused=self.scheduler.num_reused_tokens,
            tokens_computed=c["tokens_computed"],
            num_preemptions=self.scheduler.num_preemptions,
            kv_waste_paged=1 - c["slots_used"] / c["slots_alloc"] if c["slots_alloc"] else 0.0,
            kv_waste_contiguous=1 - c["slots_used"] / c["slots_contig"] if c["slots_contig"] else 0.0,
            steps=c["steps"],
            spec_draft_tokens=self.scheduler.num_draft_tokens,
            spec_accepted_tokens=self.scheduler.num_accepted_tokens,
            spec_verify_runs=self.scheduler.num_spec_steps,
            grammar_compiles=so.num_compiles,
            grammar_compile_seconds=so.compile_seconds,
            grammar_mask_steps=so.num_mask_steps,
            grammar_mask_seconds=so.mask_seconds,
            kv_cache_bytes=kv.num_blocks * self.executor.kv_block_bytes,
            kv_resident_bytes=kv.num_resident_blocks * self.executor.kv_block_bytes,
            kv_released_bytes=c["kv_released_bytes"],
        )
