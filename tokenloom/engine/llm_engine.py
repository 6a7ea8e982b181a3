"""The engine: add_request / step (schedule, run, postprocess) / abort_request, with streamed outputs."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from tokenloom.config import EngineConfig, TokenloomError, resolve_dtype
from tokenloom.core.block_pool import BlockManager
from tokenloom.worker.model_runner import ModelRunner, kv_bytes_per_block
from tokenloom.core.scheduler import Scheduler
from tokenloom.core.request import Request, RequestStatus
from tokenloom.worker.model_loading import load_model
from tokenloom.loader.sources import resolve_model
from tokenloom.sampling_params import SamplingParams

log = logging.getLogger("tokenloom")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: str | int | None = None
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, chosen token first

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Output tokens after the first, over the time they took (per completion, averaged)."""
        m = self.metrics
        n = max(len(o.token_ids) for o in self.outputs)
        if m.first_token_time is None or m.finished_time is None or n < 2:
            return None
        return (n - 1) / max(m.finished_time - m.first_token_time, 1e-9)


@dataclass
class _Group:
    """One user request: n completions of one prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    requests: list[Request]
    metrics: RequestMetrics
    prompt_logprobs: list | None = None


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int
    kv_cache_usage: float
    prefix_cache_hit_rate: float
    prompt_tokens_computed: int
    prompt_tokens_reused: int
    tokens_computed: int
    num_preemptions: int
    kv_waste_paged: float  # step-averaged share of allocated KV slots holding no token
    kv_waste_contiguous: float  # same, had each request reserved its maximum length up front
    steps: int
    extra: dict = field(default_factory=dict)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device.type)
        source = resolve_model(config.model)
        self.model_name = source.name
        self.model_source = source
        load_start = time.perf_counter()
        self.model, self.tokenizer = load_model(source, self.dtype, self.device)
        self.model_config = cfg = self.model.config
        self.load_time = time.perf_counter() - load_start
        if config.quantization:
            from tokenloom.quant import quantize_model

            quantize_model(self.model, config.quantization, tokenizer=self.tokenizer,
                           gguf_path=source.path if source.kind == "gguf" else None)
        if self.device.type == "cpu":
            from tokenloom.kernels import cpu_ops
            from tokenloom.model_executor.layers.linear import pack_linear_layers

            pack_linear_layers(self.model)
            cpu_ops.EXTENSION.load()  # build or load the fused kernels now, not inside the first request's TTFT

        cache_cfg, sched_cfg = config.cache, config.scheduler
        max_model_len = min(sched_cfg.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        block_bytes = kv_bytes_per_block(cfg, cache_cfg.block_size, self.dtype, cache_cfg.kv_cache_dtype)
        if cache_cfg.num_blocks:
            num_blocks = cache_cfg.num_blocks
        else:
            budget = cache_cfg.kv_cache_memory or min(
                int(_available_memory() * 0.25),
                # no point reserving more than every sequence at full length needs
                sched_cfg.max_num_seqs * max_model_len * block_bytes // cache_cfg.block_size,
            )
            num_blocks = max(1, budget // block_bytes)
        if num_blocks * cache_cfg.block_size < max_model_len:
            if sched_cfg.max_model_len:
                raise TokenloomError(
                    f"KV cache holds {num_blocks * cache_cfg.block_size} tokens, less than max_model_len "
                    f"{max_model_len}: raise --kv-cache-memory or lower --max-model-len"
                )
            max_model_len = num_blocks * cache_cfg.block_size
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, cache_cfg.block_size, cache_cfg.enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, self.block_manager)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.runner = ModelRunner(self.model, cache_cfg, num_blocks, self.device, self.generator)
        self.groups: dict[str, _Group] = {}
        self.last_step_num_seqs = 0
        self._ids = itertools.count()
        self._counters = dict(steps=0, tokens_computed=0, prompt_tokens_computed=0,
                              slots_used=0, slots_alloc=0, slots_contig=0)

    # ---- requests ------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        params.check_vocab(self.model_config.vocab_size)
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
        if request_id in self.groups:
            raise TokenloomError(f"request id '{request_id}' is already in use")
        reqs = [self._new_request(request_id, i, token_ids, params, max_tokens) for i in range(params.n)]
        parent = reqs[0]
        parent.forks = reqs[1:]
        for child in parent.forks:
            child.fork_of = parent
        metrics = RequestMetrics(arrival_time=parent.arrival_time)
        self.groups[request_id] = _Group(request_id, prompt_text, token_ids, reqs, metrics)
        self.scheduler.add_request(parent)
        return request_id

    def _new_request(self, request_id, index, token_ids, params, max_tokens) -> Request:
        req = Request(f"{request_id}#{index}", token_ids, params, max_tokens, index=index)
        req.group_id = request_id
        if params.seed is not None:
            req.generator = torch.Generator().manual_seed(params.seed + index)
        if self.tokenizer is not None:
            from tokenloom.tokenizer import IncrementalDetokenizer

            req.detokenizer = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
        return req

    def abort_request(self, request_id: str) -> None:
        group = self.groups.pop(request_id, None)
        if group is None:
            return
        for req in group.requests:
            if not req.is_finished:
                self.scheduler.finish(req)
                req.finish_reason = "abort"

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
        sample_reqs, samples, prompt_logprobs = self.runner.execute(sched)
        return self._postprocess(sched, sample_reqs, samples, prompt_logprobs)

    def _postprocess(self, sched, sample_reqs, samples, prompt_logprobs) -> list[RequestOutput]:
        now = time.perf_counter()
        c = self._counters
        c["steps"] += 1
        for req, n in sched.scheduled:
            before = req.num_computed_tokens
            req.num_computed_tokens += n
            c["tokens_computed"] += n
            if before < req.num_prompt_tokens:
                c["prompt_tokens_computed"] += min(req.num_computed_tokens, req.num_prompt_tokens) - before
            self.block_manager.cache_full_blocks(req)
        self._account_kv_usage()
        for req, start, entries in prompt_logprobs:
            group = self.groups.get(req.group_id)
            if group is not None:
                if group.prompt_logprobs is None:  # the first prompt token has no context to be predicted from
                    group.prompt_logprobs = [None] * req.num_prompt_tokens
                # Entry p + 1 is the logprob of prompt token p + 1 (a recompute after preemption overwrites).
                group.prompt_logprobs[start + 1 : start + 1 + len(entries)] = entries

        for req in sample_reqs:  # attach forks before any parent can finish and free the shared blocks
            if req.fork_of is not None and req.status == RequestStatus.WAITING:
                self._attach_fork(req)
        for req in sample_reqs:
            req.forks = []
        touched: dict[str, _Group] = {}
        for k, req in enumerate(sample_reqs):
            if req.is_finished:  # aborted while in flight
                continue
            token = samples.token_ids[k]
            req.output_token_ids.append(token)
            if samples.logprobs[k] is not None:
                req.logprobs.append(dict(samples.logprobs[k]))
            if req.first_token_time is None:
                req.first_token_time = now
            self._check_stop(req, token)
            group = self.groups.get(req.group_id)
            if group is not None:
                touched[group.request_id] = group
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                    group.metrics.num_cached_tokens = req.num_cached_tokens
        outputs = []
        for group in touched.values():
            finished = all(r.is_finished for r in group.requests)
            if finished:
                group.metrics.finished_time = now
                del self.groups[group.request_id]
            outputs.append(self._make_output(group, finished))
        return outputs

    def _attach_fork(self, child: Request) -> None:
        parent = child.fork_of
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.status = RequestStatus.RUNNING
        self.scheduler.running.append(child)

    def _check_stop(self, req: Request, token: int) -> None:
        p = req.params
        detok = req.detokenizer
        delta = detok.add([token]) if detok is not None else ""
        n_out = len(req.output_token_ids)
        reason = stop_reason = None
        if not p.ignore_eos and token in self.model_config.eos_token_ids and n_out >= p.min_tokens:
            reason = "stop"
        elif token in p.stop_token_ids and n_out >= p.min_tokens:
            reason, stop_reason = "stop", token
        elif p.stop and n_out >= p.min_tokens and delta:
            text = detok.text
            window_start = max(0, len(text) - len(delta) - max(len(s) for s in p.stop) + 1)
            hits = [(text.find(s, window_start), s) for s in p.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                idx, s = min(hits)
                req.text = text[: idx + len(s)] if p.include_stop_str_in_output else text[:idx]
                reason, stop_reason = "stop", s
        if reason is None and (n_out >= req.max_tokens or req.num_tokens >= self.max_model_len):
            reason = "length"
        if reason is not None:
            if not isinstance(stop_reason, str) and detok is not None:
                detok.flush()  # a reply cut mid-character still returns its bytes (as U+FFFD)
                req.text = detok.text
            req.finish_reason, req.stop_reason = reason, stop_reason
            self.scheduler.finish(req)
        elif detok is not None:
            req.text = detok.text

    def _make_output(self, group: _Group, finished: bool) -> RequestOutput:
        outs = []
        for r in group.requests:
            text = r.text
            if not r.is_finished and r.params.stop:
                # Hold back a tail that could still grow into a stop string, so it is never streamed.
                text = text[: max(0, len(text) - max(len(s) for s in r.params.stop) + 1)]
            outs.append(CompletionOutput(r.index, text, list(r.output_token_ids), r.finish_reason, r.stop_reason,
                                         r.logprobs if r.params.logprobs is not None else None))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                             group.metrics, group.prompt_logprobs)

    def embed(self, prompts: list[list[int]]) -> list[list[float]]:
        """Embedding per prompt: mean of the final-norm hidden states over its tokens, L2-normalised."""
        out = []
        for ids in prompts:
            if not ids or len(ids) > self.max_model_len:
                raise TokenloomError(f"embedding input must have 1..{self.max_model_len} tokens, got {len(ids)}")
            hidden = self.runner.hidden_states(ids)
            out.append(torch.nn.functional.normalize(hidden.float().mean(0), dim=0).tolist())
        return out

    # ---- statistics ----------------------------------------------------------------------------------
    def _account_kv_usage(self) -> None:
        c, bs = self._counters, self.block_manager.block_size
        fill: dict[int, int] = {}
        contig = 0
        for req in self.scheduler.running:
            for i, b in enumerate(req.block_table):
                fill[b] = max(fill.get(b, 0), min(bs, req.num_computed_tokens - i * bs))
            contig += req.num_prompt_tokens + req.max_tokens
        used = sum(max(f, 0) for f in fill.values())
        c["slots_used"] += used
        c["slots_alloc"] += len(fill) * bs
        c["slots_contig"] += contig

    def stats(self) -> EngineStats:
        bm, c = self.block_manager, self._counters
        queries = bm.prefix_queries
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_total=bm.num_blocks,
            num_blocks_used=bm.num_used_blocks,
            num_blocks_free=bm.num_free_blocks,
            kv_cache_usage=bm.num_used_blocks / bm.num_blocks,
            prefix_cache_hit_rate=(bm.prefix_hits / queries) if queries else 0.0,
            prompt_tokens_computed=c["prompt_tokens_computed"],
            prompt_tokens_reused=self.scheduler.num_reused_tokens,
            tokens_computed=c["tokens_computed"],
            num_preemptions=self.scheduler.num_preemptions,
            kv_waste_paged=1 - c["slots_used"] / c["slots_alloc"] if c["slots_alloc"] else 0.0,
            kv_waste_contiguous=1 - c["slots_used"] / c["slots_contig"] if c["slots_contig"] else 0.0,
            steps=c["steps"],
        )
