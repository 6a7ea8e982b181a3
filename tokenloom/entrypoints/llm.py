"""Offline Python API in the style of vLLM: LLM(model=...).generate(prompts, SamplingParams(...))."""
from __future__ import annotations

from typing import Iterator, Sequence

from tokenloom.config import (CacheConfig, EngineConfig, LoRAConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig,
                              TokenloomError)
from tokenloom.engine.llm_engine import LLMEngine
from tokenloom.engine.outputs import RequestOutput
from tokenloom.loader.sources import DEFAULT_MODEL
from tokenloom.lora import LoRAInfo, LoRARequest
from tokenloom.sampling_params import SamplingParams

Message = dict  # {"role": ..., "content": ...}


class LLM:
    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        dtype: str = "auto",
        device: str = "cpu",
        seed: int = 0,
        quantization: str | None = None,
        max_model_len: int = 0,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        num_blocks: int | None = None,
        enable_prefix_caching: bool = True,
        kv_cache_dtype: str = "auto",
        speculative_config: dict | str | None = None,
        kv_release_interval_s: float = 2.0,
        kv_keep_cached_bytes: int = 32 << 20,
        enable_lora: bool = False,
        max_loras: int = 1,
        max_lora_rank: int = 16,
        max_cpu_loras: int | None = None,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        distributed_executor_backend: str | None = None,
        pipeline_microbatches: int | None = None,
        enforce_eager: bool = False,
        batch_invariant: bool = False,
    ):
        """speculative_config: speculative decoding under vLLM's names, e.g. {"method": "ngram",
        "num_speculative_tokens": 4}; see config.SpeculativeConfig. kv_release_interval_s: free KV blocks
        unused this long return their memory to the OS, but for kv_keep_cached_bytes of recent prefix cache.
        enable_lora: serve LoRA adapters (generate(..., lora_request=LoRARequest(name, id, path))), up to
        max_loras of them in one step, of rank up to max_lora_rank; max_cpu_loras kept in memory (config.LoRAConfig).
        tensor_parallel_size / pipeline_parallel_size: split the model over that many ranks, run as worker processes
        ("mp", the default) or Ray actors ("ray") by distributed_executor_backend (config.ParallelConfig).
        enforce_eager: on CUDA, no CUDA graphs for decode steps (worker/cuda_graphs.py); nothing changes elsewhere.
        batch_invariant: each request's output independent of the others in its steps (prefill slower)."""
        self.engine = LLMEngine(
            EngineConfig(
                model=model, dtype=dtype, device=device, seed=seed, quantization=quantization,
                cache=CacheConfig(block_size, kv_cache_memory, num_blocks, enable_prefix_caching, kv_cache_dtype,
                                  kv_release_interval_s, kv_keep_cached_bytes),
                scheduler=SchedulerConfig(max_num_seqs, max_num_batched_tokens, max_model_len),
                speculative=SpeculativeConfig.parse(speculative_config),
                lora=LoRAConfig(max_loras, max_lora_rank, max_cpu_loras) if enable_lora else None,
                parallel=ParallelConfig(tensor_parallel_size, pipeline_parallel_size, distributed_executor_backend,
                                        pipeline_microbatches=pipeline_microbatches),
                enforce_eager=enforce_eager,
                batch_invariant=batch_invariant,
            )
        )
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion, batched; outputs in prompt order. lora_request: the adapter of every
        prompt, or one per prompt (None: the base model)."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise TokenloomError(f"got {len(prompts)} prompts but {len(params)} sampling params")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise TokenloomError(f"got {len(prompts)} prompts but {len(loras)} LoRA requests")
        ids = self._add_all(prompts, params, loras)
        finished: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(ids), desc="generating", unit="req")
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        if bar:
                            bar.update(1)
        except BaseException:
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        finally:
            if bar:
                bar.close()
        return [finished[rid] for rid in ids]

    def _add_all(self, prompts, params, loras) -> list[str]:
        ids: list[str] = []
        for p in params:  # distinct output constraints compile side by side, each once
            if p.structured_outputs is not None:
                self.engine.structured_output.grammar_async(p.structured_outputs)
        try:
            for prompt, p, lora in zip(prompts, params, loras):
                ids.append(self.engine.add_request(prompt, p, lora_request=lora))
        except BaseException:  # one bad prompt rejects the batch before anything runs
            for rid in ids:
                self.engine.abort_request(rid)
            raise
        return ids

    def stream(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
               lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Yield cumulative outputs of one request as its tokens arrive."""
        rid = self.engine.add_request(prompt, sampling_params or SamplingParams(), lora_request=lora_request)
        try:
            done = False
            while not done:
                for out in self.engine.step():
                    if out.request_id == rid:
                        done = out.finished
                        yield out
        finally:
            self.engine.abort_request(rid)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.tokenizer is None:
            raise TokenloomError("this model has no tokenizer, so it cannot render chat messages")
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
        lora_request: LoRARequest | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.chat_prompt_ids(conv) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    # ---- LoRA adapters at run time (vLLM's names); lora.LoRAError when LoRA is off or an adapter does not fit --
    def add_lora(self, lora_request: LoRARequest) -> LoRAInfo:
        return self.engine.add_lora(lora_request)

    def remove_lora(self, name_or_id: str | int) -> bool:
        return self.engine.remove_lora(name_or_id)

    def list_loras(self) -> list[LoRAInfo]:
        return self.engine.list_loras()

    def chat_prompt_ids(self, messages: list[Message]) -> list[int]:
        """The rendered template already holds any BOS the template wants: do not add special tokens again."""
        return self.tokenizer.encode(self.render_chat(messages), add_special_tokens=False)
