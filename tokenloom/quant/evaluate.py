"""Quality evaluation: sliding-window perplexity (over the model forward directly, or through the engine), and ROUGE.

`tokenloom eval perplexity MODEL --text FILE` and `tokenloom eval rouge --pred FILE --ref FILE` (or with a MODEL
and `--prompts FILE`, generating the predictions greedily first).
"""
from __future__ import annotations

import json
import math
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenloom.config import TokenloomError
from tokenloom.layers.attention import LayerKVCache, build_attention_metadata

# ---------------------------------------------------------------------------------------------------------
# single-sequence causal forward (no engine, no paged cache bookkeeping)


class SequenceForward:
    """Runs a CausalLM (or one decoder layer) over one sequence of tokens starting at position 0, with a scratch
    KV cache sized for it: the plain causal path of paged_attention (no gather)."""

    BLOCK = 16

    def __init__(self, model, length: int):
        cfg = model.config
        self.model, self.length = model, length
        self.dtype = model.norm.weight.dtype
        device = model.norm.weight.device
        n_blocks = math.ceil(length / self.BLOCK)
        self.meta = build_attention_metadata([length], [length], [list(range(n_blocks))], self.BLOCK,
                                             cfg.num_heads // cfg.num_kv_heads, cfg.sliding_window, device)
        self.positions = torch.arange(length, device=device)
        self.cache = torch.zeros(2, n_blocks * self.BLOCK, cfg.num_kv_heads, cfg.head_dim, dtype=self.dtype,
                                 device=device)
        self.kv = LayerKVCache(self.cache[0], self.cache[1])
        self._rope = None

    def rope(self):
        if self._rope is None:
            self._rope = self.model.rotary(self.positions, self.dtype)
        return self._rope

    @torch.no_grad()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    @torch.no_grad()
    def layer(self, layer, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope()
        return layer(x, cos, sin, self.kv, self.meta)

    @torch.no_grad()
    def attention(self, layer, x_normed: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope()
        return layer.self_attn(x_normed, cos, sin, self.kv, self.meta)

    @torch.no_grad()
    def hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Final normed hidden states [T, hidden]."""
        kv = [self.kv] * len(self.model.layers)  # layers run one after another: one scratch cache serves all
        return self.model(ids, self.positions, kv, self.meta)


class SequenceRunners(dict):
    """runners[length]: a SequenceForward for sequences of that length, made on first use and then reused."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __missing__(self, length: int) -> SequenceForward:
        self[length] = runner = SequenceForward(self.model, length)
        return runner


def capture_input(module, fn):
    """Run fn() and return the first positional input `module` saw (the last call's)."""
    box = []
    handle = module.register_forward_pre_hook(lambda mod, args: box.append(args[0]))
    try:
        fn()
    finally:
        handle.remove()
    return box[-1]


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


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: float, n_pred: int, n_ref: int) -> dict:
    p = overlap / n_pred if n_pred else 0.0
    r = overlap / n_ref if n_ref else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": p, "recall": r, "f1": f}


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge(prediction: str, reference: str) -> dict[str, dict]:
    """ROUGE-1, ROUGE-2 and ROUGE-L (precision, recall, F1) on lower-cased alphanumeric tokens."""
    p, r = _rouge_tokens(prediction), _rouge_tokens(reference)
    out = {}
    for n in (1, 2):
        pn, rn = _ngrams(p, n), _ngrams(r, n)
        out[f"rouge{n}"] = _f1(sum((pn & rn).values()), sum(pn.values()), sum(rn.values()))
    out["rougeL"] = _f1(_lcs(p, r), len(p), len(r))
    return out


def rouge_corpus(predictions: list[str], references: list[str]) -> dict[str, dict]:
    """Mean of the per-pair scores."""
    if len(predictions) != len(references):
        raise TokenloomError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise TokenloomError("no texts to score")
    scores = [rouge(p, r) for p, r in zip(predictions, references)]
    return {k: {m: sum(s[k][m] for s in scores) / len(scores) for m in ("precision", "recall", "f1")}
            for k in scores[0]}


# ---------------------------------------------------------------------------------------------------------
# CLI


def _read_texts(path: str) -> list[str]:
    """One text per line of a .txt file, or a JSON list of strings / JSONL of {"text": ...}."""
    p = Path(path)
    if not p.is_file():
        raise TokenloomError(f"file not found: '{path}'")
    raw = p.read_text(encoding="utf-8")
    if p.suffix == ".json":
        data = json.loads(raw)
        return [d if isinstance(d, str) else d["text"] for d in data]
    if p.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    return [line for line in raw.splitlines() if line.strip()]


def add_eval_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("eval", help="perplexity of a model on a text; ROUGE of generations against references")
    esub = p.add_subparsers(dest="eval", required=True)
    e = esub.add_parser("perplexity", help="sliding-window perplexity on a text file (or the held-out corpus)")
    e.add_argument("model", nargs="?", default="smollm2-135m")
    e.add_argument("--text", default=None,
                   help="UTF-8 text file (default: the evaluation part of the Moby-Dick corpus, see --corpus)")
    e.add_argument("--corpus", default="moby-dick", help="moby-dick or sotu, when --text is not given")
    e.add_argument("--window", type=int, default=1024, help="tokens per forward window")
    e.add_argument("--stride", type=int, default=512, help="tokens between window starts")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0 = all)")
    e.add_argument("--chunk-size", type=int, default=None,
                   help="score through the engine in prefill chunks of N tokens, so attention reads earlier tokens "
                        "back from the KV cache as decode does (default: 64 with --kv-cache-dtype int8; otherwise "
                        "one plain forward per window)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_args(e)
    e = esub.add_parser("rouge", help="ROUGE-1/2/L F1 of predictions against references")
    e.add_argument("model", nargs="?", default=None, help="model to generate predictions with (needs --prompts)")
    e.add_argument("--ref", required=True, help="references: one per line (.txt), JSON list or JSONL {text}")
    e.add_argument("--pred", default=None, help="predictions in the same format (skips generation)")
    e.add_argument("--prompts", default=None, help="prompts to complete greedily with MODEL, one per reference")
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    e.add_argument("--json", action="store_true")
    add_engine_args(e)


def eval_command(args) -> None:
    if args.eval == "perplexity":
        _eval_perplexity(args)
    else:
        _eval_rouge(args)


def _eval_perplexity(args) -> None:
    from tokenloom.entrypoints.cli import make_llm

    chunk = args.chunk_size if args.chunk_size is not None else (64 if args.kv_cache_dtype == "int8" else 0)
    if chunk < 0:
        raise TokenloomError("--chunk-size must be >= 0")
    if chunk:
        args.max_num_batched_tokens = chunk
    llm = make_llm(args)
    tok = llm.tokenizer
    if tok is None:
        raise TokenloomError("this model has no tokenizer: perplexity needs one to encode the text")
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise TokenloomError(f"text file not found: '{args.text}'")
        ids = tok.encode(path.read_text(encoding="utf-8"))
        source = str(path)
    else:
        from tokenloom.quant.calib import evaluation_tokens

        ids = evaluation_tokens(tok, args.max_tokens or 4096, corpus=args.corpus)
        source = f"{args.corpus} (held-out part)"
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    if chunk:
        res = engine_perplexity(llm, ids, args.window, args.stride, progress=not args.json)
    else:
        res = perplexity(llm.engine.model, ids, args.window, args.stride, progress=not args.json)
    how = dict(kv_cache_dtype=args.kv_cache_dtype, chunk_size=chunk or None)
    if args.json:
        print(json.dumps({"model": llm.engine.model_name, "text": source, **how, **res.to_dict()}))
    else:
        print(f"model {llm.engine.model_name}  text {source}  window {args.window}  stride {args.stride}  "
              f"kv cache {args.kv_cache_dtype}" + (f"  engine chunks of {chunk}" if chunk else ""))
        print(f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.4f} nats over {res.tokens} tokens, "
              f"{res.windows} windows, {res.seconds:.1f} s)")


def _eval_rouge(args) -> None:
    refs = _read_texts(args.ref)
    if args.pred:
        preds = _read_texts(args.pred)
    else:
        if not args.model or not args.prompts:
            raise TokenloomError("eval rouge needs --pred FILE, or a MODEL and --prompts FILE to generate them")
        from tokenloom.entrypoints.cli import make_llm
        from tokenloom.sampling_params import SamplingParams

        llm = make_llm(args)
        prompts = _read_texts(args.prompts)
        if args.chat:
            prompts = [llm.chat_prompt_ids([{"role": "user", "content": p}]) for p in prompts]
        outs = llm.generate(prompts, SamplingParams(max_tokens=args.max_tokens, temperature=0.0))
        preds = [o.outputs[0].text for o in outs]
    scores = rouge_corpus(preds, refs)
    if args.json:
        print(json.dumps({"pairs": len(refs), **scores}))
        return
    print(f"{len(refs)} pairs")
    print(f"{'':8}{'precision':>10}{'recall':>10}{'F1':>10}")
    for k, v in scores.items():
        print(f"{k:8}{v['precision']:10.4f}{v['recall']:10.4f}{v['f1']:10.4f}")
