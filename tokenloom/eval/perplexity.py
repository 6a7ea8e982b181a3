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
