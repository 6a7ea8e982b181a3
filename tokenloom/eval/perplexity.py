"""Sliding-window perplexity: over the model forward directly, or through the engine (chunked prefill, paging and
the KV-cache dtype all apply)."""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenloom.config import TokenloomError
from tokenloom.model_executor.sequence_forward import SequenceRunners


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    windows: int
    seconds: float

    def to_dict(self):
        return dict(ppl=self.ppl, nll=self.nll, tokens=self.tokens, windows=self.windows, seconds=self.seconds)


def _windows(n: int, window: int, stride: int | None) -> tuple[int, list[tuple[int, int, int]]]:
    """Sliding windows over n tokens: (begin, end, first scored index) for each window that scores anything.
    Each token is scored once, in the first window where it is not among the first `window - stride`
    (context-only) positions, so every scored token after the first window sees at least `window - stride`
    tokens of context."""
    if n < 2:
        raise TokenloomError("perplexity needs at least 2 tokens")
    window = min(window, n)
    # windows overlap by at least one token: a window's first token has no context inside it, so it can only
    # be scored by the window before
    stride = min(stride or window // 2, window - 1)
    if stride < 1:
        raise TokenloomError("stride must be >= 1")
    starts = list(range(0, max(n - window, 0) + 1, stride))
    if starts[-1] + window < n:
        starts.append(n - window)
    spans, prev_end = [], 0
    for begin in starts:
        end = min(begin + window, n)
        first_scored = max(prev_end, begin + 1)  # absolute index of the first target scored in this window
        if first_scored < end:
            spans.append((begin, end, first_scored))
            prev_end = end
    return window, spans


@torch.inference_mode()
def perplexity(model, token_ids: list[int] | torch.Tensor, window: int = 1024, stride: int | None = None,
               progress: bool = False) -> PerplexityResult:
    """Sliding-window perplexity of a CausalLM, one plain causal forward per window (see _windows)."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    window, spans = _windows(ids.numel(), window, stride)
    nll_sum, count = 0.0, 0
    start_t = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(spans), desc="perplexity", unit="window", file=sys.stderr)
    runners = SequenceRunners(model)
    for begin, end, first_scored in spans:
        chunk = ids[begin:end]
        hidden = runners[chunk.numel()].hidden(chunk)
        rows = torch.arange(first_scored - 1 - begin, end - 1 - begin)  # predicting tokens first_scored..end-1
        logits = model.compute_logits(hidden[rows])
        nll_sum += float(F.cross_entropy(logits.float(), chunk[rows + 1], reduction="sum"))
        count += rows.numel()
        if bar:
            bar.update(1)
    if bar:
        bar.close()
    mean = nll_sum / count
    return PerplexityResult(math.exp(mean), mean, count, len(spans), time.perf_counter() - start_t)


def engine_perplexity(llm, token_ids: list[int], window: int = 1024, stride: int | None = None,
                      progress: bool = False) -> PerplexityResult:
    """The same windows scored through the engine's prompt logprobs, so everything the engine does to a prompt
    applies: chunked prefill, paged attention and the KV cache dtype. With prefill chunks shorter than the
    window, most keys each token attends to are read back from the (possibly int8) cache, as in decode."""
    from tokenloom.sampling_params import SamplingParams

    ids = [int(t) for t in token_ids]
    window, spans = _windows(len(ids), window, stride)
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    start_t = time.perf_counter()
    outputs = llm.generate([ids[b:e] for b, e, _ in spans], params, use_tqdm=progress)
    nll_sum, count = 0.0, 0
    for (begin, end, first_scored), out in zip(spans, outputs):
        for pos in range(first_scored, end):  # prompt_logprobs[i] holds the logprob of token i of the window
            nll_sum -= out.prompt_logprobs[pos - begin][ids[pos]]
            count += 1
    mean = nll_sum / count
    return PerplexityResult(math.exp(mean), mean, count, len(spans), time.perf_counter() - start_t)


# ---------------------------------------------------------------------------------------------------------
# ROUGE


# ---- llama.cpp's llama-perplexity -------------------------------------------------------------------------
@dataclass
class LlamaCppPerplexityResult:
    """What llama-perplexity prints: the final estimate with its standard error, and the running estimate after
    each chunk (its `[1]27.34,[2]40.58,...` line)."""
    ppl: float
    ppl_stderr: float
    nll: float
    tokens: int  # scored tokens: n_ctx - n_ctx/2 - 1 per chunk
    chunks: int
    n_ctx: int
    running_ppl: list[float]
    seconds: float

    def to_dict(self):
        return dict(ppl=self.ppl, ppl_stderr=self.ppl_stderr, nll=self.nll, tokens=self.tokens,
                    chunks=self.chunks, n_ctx=self.n_ctx, running_ppl=self.running_ppl, seconds=self.seconds)


def llamacpp_text(raw: str) -> str:
    """The text llama-perplexity scores from a file read with -f: it drops one trailing newline."""
    return raw[:-1] if raw.endswith("\n") else raw


def llamacpp_chunks(token_ids: list[int], n_ctx: int, bos_token_id: int | None,
                    max_chunks: int = -1) -> list[list[int]]:
    """llama-perplexity's chunks: the text's tokens (BOS already added by the tokenizer when the model adds one)
    cut into floor(len / n_ctx) chunks of n_ctx tokens (the rest is dropped); when the model adds BOS, each
    chunk's first token is replaced by BOS. It refuses texts under 2 * n_ctx tokens."""
    if n_ctx < 4:
        raise TokenloomError(f"--ctx must be >= 4, got {n_ctx}")
    if len(token_ids) < 2 * n_ctx:
        raise TokenloomError(f"llama.cpp-compatible perplexity needs at least {2 * n_ctx} tokens for a context of "
                             f"{n_ctx}; the text has {len(token_ids)}")
    n_chunks = len(token_ids) // n_ctx
    if max_chunks >= 0:
        n_chunks = min(n_chunks, max_chunks)
    chunks = [list(token_ids[i * n_ctx:(i + 1) * n_ctx]) for i in range(n_chunks)]
    if bos_token_id is not None:
        for chunk in chunks:
            chunk[0] = bos_token_id
    return chunks


@torch.inference_mode()
def llamacpp_perplexity(model, token_ids: list[int], n_ctx: int = 512, bos_token_id: int | None = None,
                        max_chunks: int = -1, llm=None, progress: bool = False) -> LlamaCppPerplexityResult:
    """Perplexity exactly as llama.cpp's llama-perplexity computes it (tools/perplexity/perplexity.cpp,
    `perplexity()` without --ppl-stride): each chunk is one fresh context, and only the tokens after its first
    half are scored (positions n_ctx/2 + 1 .. n_ctx - 1, predicted from all the chunk's tokens before them).
    bos_token_id: the model's BOS when its tokenizer adds one (then also each chunk's first token). With `llm`,
    chunks go through the engine's prompt logprobs (chunked prefill, paged KV cache and its dtype apply)."""
    chunks = llamacpp_chunks(token_ids, n_ctx, bos_token_id, max_chunks)
    first = n_ctx // 2
    start_t = time.perf_counter()
    nlls = _engine_chunk_nlls(llm, chunks, first, progress) if llm is not None else \
        _direct_chunk_nlls(model, chunks, first, progress)
    nll_sum = nll2_sum = 0.0
    count, running = 0, []
    for chunk_nll in nlls:
        nll_sum += float(chunk_nll.sum())
        nll2_sum += float((chunk_nll * chunk_nll).sum())
        count += chunk_nll.numel()
        running.append(math.exp(nll_sum / count))
    mean = nll_sum / count
    ppl = math.exp(mean)
    var = nll2_sum / count - mean * mean
    stderr = math.sqrt(var / (count - 1)) * ppl if var > 0 and count > 1 else 0.0
    return LlamaCppPerplexityResult(ppl, stderr, mean, count, len(chunks), n_ctx, running,
                                    time.perf_counter() - start_t)


def _direct_chunk_nlls(model, chunks: list[list[int]], first: int, progress: bool) -> list[torch.Tensor]:
    runners = SequenceRunners(model)
    out = []
    for chunk in _progress(chunks, progress):
        ids = torch.tensor(chunk, dtype=torch.long)
        hidden = runners[ids.numel()].hidden(ids)
        rows = torch.arange(first, ids.numel() - 1)  # logits at first..n-2 predict tokens first+1..n-1
        logits = model.compute_logits(hidden[rows]).double()
        out.append(F.cross_entropy(logits, ids[rows + 1], reduction="none"))
    return out


def _engine_chunk_nlls(llm, chunks: list[list[int]], first: int, progress: bool) -> list[torch.Tensor]:
    from tokenloom.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(chunks, params, use_tqdm=progress)
    return [torch.tensor([-out.prompt_logprobs[pos][chunk[pos]] for pos in range(first + 1, len(chunk))],
                         dtype=torch.float64) for chunk, out in zip(chunks, outputs)]


def _progress(items, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc="perplexity", unit="chunk", file=sys.stderr)
