"""Structured output in the engine: compiles constraints off the engine loop (cached by spec), and fills the
step's grammar bitmask in the background while the forward pass runs.

    manager.grammar_async(params)  -> Future[CompiledGrammar]  (the server awaits it: errors become 400s)
    manager.matcher(params)        -> a request's GrammarMatcher (waits for a compile still running)
    manager.start_bitmask(n, rows) -> Future; .result() is the [n, ceil(V / 32)] mask, all bits set on rows no
                                      matcher constrains
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from tokenloom.config import StructuredOutputConfig
from tokenloom.sampling_params import StructuredOutputsParams
from tokenloom.structured_output.backend import (
    CompiledGrammar,
    GrammarMatcher,
    StructuredOutputBackend,
    StructuredOutputError,
    StructuredOutputSpec,
    allocate_token_bitmask,
)


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], config: StructuredOutputConfig):
        self.config = config
        self.vocab_size = vocab_size
        self._tokenizer = tokenizer
        self._eos = list(eos_token_ids)
        self._backend: Future | None = None  # built on first use (converting the vocabulary takes ~0.5 s)
        self._compile_pool = ThreadPoolExecutor(2, thread_name_prefix="tokenloom-grammar")
        self._mask_pool = ThreadPoolExecutor(1, thread_name_prefix="tokenloom-mask")
        self._lock = threading.Lock()
        self._cache: OrderedDict[StructuredOutputSpec, Future] = OrderedDict()
        self.num_compiles = 0
        self.compile_seconds = 0.0  # total over compiles
        self.num_mask_steps = 0
        self.mask_seconds = 0.0  # total time filling step bitmasks (on the mask thread)

    # ---- compile -------------------------------------------------------------------------------------
    def backend(self) -> StructuredOutputBackend:
        with self._lock:
            if self._backend is None:
                # not on the compile pool, whose threads may be waiting for it
                self._backend = self._mask_pool.submit(self._make_backend)
            fut = self._backend
        return fut.result()

    def _make_backend(self) -> StructuredOutputBackend:
        from tokenloom.structured_output.llguidance_backend import LLGuidanceBackend

        if self._tokenizer is None:
            raise StructuredOutputError("structured output needs the model's tokenizer")
        return LLGuidanceBackend(self._tokenizer.hf_tokenizer.to_str(), self.vocab_size, self._eos)

    @staticmethod
    def spec(params: StructuredOutputsParams) -> StructuredOutputSpec:
        return StructuredOutputSpec(*params.key())

    def grammar_async(self, params: StructuredOutputsParams) -> Future:
        """The compiled grammar of params, compiling it in the background unless it is cached or under way.
        A failed compile is not cached."""
        spec = self.spec(params)
        with self._lock:
            fut = self._cache.get(spec)
            if fut is not None and not (fut.done() and (fut.cancelled() or fut.exception() is not None)):
                self._cache.move_to_end(spec)
                return fut
            fut = self._compile_pool.submit(self._compile, spec)
            self._cache[spec] = fut
            while len(self._cache) > self.config.max_cached_grammars:
                self._cache.popitem(last=False)
        return fut

    def _compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        backend = self.backend()
        start = time.perf_counter()
        try:
            return backend.compile(spec)
        except StructuredOutputError:
            raise
        except Exception as exc:  # the grammar engine's own errors name the problem too
            raise StructuredOutputError(f"invalid {spec.kind} constraint: {exc}") from None
        finally:
            with self._lock:
                self.num_compiles += 1
                self.compile_seconds += time.perf_counter() - start

    def grammar(self, params: StructuredOutputsParams, timeout: float | None = None) -> CompiledGrammar:
        """Wait for the compiled grammar (at most the configured compile timeout)."""
        return self.result(self.grammar_async(params), timeout)

    def result(self, fut: Future, timeout: float | None = None) -> CompiledGrammar:
        """The compiled grammar of a grammar_async future, waiting at most timeout (default: the configured
        compile timeout) seconds."""
        try:
            return fut.result(self.config.compile_timeout_s if timeout is None else timeout)
        except FutureTimeout:
            raise StructuredOutputError(
                f"the constraint took longer than {self.config.compile_timeout_s:g} s to compile") from None

    def matcher(self, params: StructuredOutputsParams) -> GrammarMatcher:
        return self.grammar(params).matcher()

    # ---- masks ---------------------------------------------------------------------------------------
    def start_bitmask(self, num_rows: int, rows: list[tuple[GrammarMatcher, int, list[int]]]) -> Future:
        """Fill a [num_rows] bitmask for (matcher, first row, draft tokens) entries on the mask thread; the
        future's result is the mask."""
        backend = self.backend()
        bitmask = allocate_token_bitmask(num_rows, self.vocab_size)

        def fill() -> torch.Tensor:
            start = time.perf_counter()
            backend.fill_bitmask(bitmask, rows)
            self.mask_seconds += time.perf_counter() - start
            self.num_mask_steps += 1
            return bitmask

        return self._mask_pool.submit(fill)

    def shutdown(self) -> None:
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)
