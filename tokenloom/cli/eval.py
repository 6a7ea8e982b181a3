"""`tokenloom eval perplexity|rouge`: quality numbers for a model or its generations."""
from __future__ import annotations

import json
from pathlib import Path

from tokenloom.cli.args import add_engine_args
from tokenloom.config import TokenloomError
from tokenloom.entrypoints.engine_args import make_llm
from tokenloom.eval.perplexity import engine_perplexity, perplexity
from tokenloom.eval.rouge import rouge_corpus


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


def add_eval_parser(sub) -> None:
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
    p.set_defaults(func=eval_command)


def eval_command(args) -> None:
    if args.eval == "perplexity":
        _eval_perplexity(args)
    else:
        _eval_rouge(args)


def _eval_perplexity(args) -> None:
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
