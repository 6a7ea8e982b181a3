"""`tokenloom bench spec`: speculative decoding against none, in the same run, on the tasks where it should pay
(input-grounded: repeat or quote a passage, edit code, extract from a document, reformat JSON) and on
open-ended chat, at batch 1 and batch 8.

Every method's engine is loaded first; then rounds go over tasks and methods in turn, the methods' order reversed
every other round. A noisy machine only ever slows a run down, so each decode tok/s figure is its best round; a
speedup is the median over rounds of the method's rate over none's in the same round (run next to each other,
they share the machine's mood). Decode tok/s at batch 1 is per request, after its first token, the mean over
four requests of each task; at batch 8 it is the batch's output tokens over the time after the last first token.
Greedy decoding, so every method must produce the same text (checked: `identical`).
"""
from __future__ import annotations

import json
import random
import re
import statistics
import time

from tokenloom.bench.token_economics import section
from tokenloom.config import TokenloomError

METHODS = {
    "none": None,
    "ngram": {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4},
    "layer_skip": {"method": "layer_skip"},
    "self": {"method": "self", "draft_quantization": "int4"},
}

# requests per task at batch 1, run one after the other (one answer of a 135M model may copy its input or not)
SOLO_REQUESTS = 4

# Code to edit: (kind, source, renames). A 135M model asked to rename inside `summarize(records, key)` (the first
# version of this benchmark) rewrote it as a comprehension instead: an answer not grounded in its input.
CODE = [("function", '''def load_config(path):
    with open(path) as handle:
        lines = handle.read().splitlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, setting = line.partition("=")
        config[name.strip()] = setting.strip()
    return config
''', [("lines", "rows"), ("config", "settings"), ("handle", "f"), ("setting", "value")]),
        ("class", '''class Counter:
    def __init__(self):
        self.count = 0

    def increment(self, step=1):
        self.count += step
        return self.count

    def reset(self):
        self.count = 0
''', [("count", "total"), ("step", "amount"), ("Counter", "Tally"), ("increment", "add")])]


CHAT = ["Write a short story about a lighthouse keeper who finds a message in a bottle.",
        "What are three good habits for learning a new language? Explain each briefly.",
        "Describe a walk through a city market early in the morning.",
        "Why do leaves change colour in autumn? Answer for a curious ten-year-old.",
        "Give me ideas for a weekend trip to the mountains, with a packing list.",
        "Write a friendly email inviting my team to a Friday lunch.",
        "Explain how a bicycle stays upright when it moves.",
        "Tell me about the history of tea in a few paragraphs."]


# Where the Moby-Dick corpus cannot be fetched (no npm): its opening, cut into passages of `words` words.
OPENING = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, and "
           "nothing particular to interest me on shore, I thought I would sail about a little and see the watery part "
           "of the world. It is a way I have of driving off the spleen and regulating the circulation. Whenever I find "
           "myself growing grim about the mouth; whenever it is a damp, drizzly November in my soul; whenever I find "
           "myself involuntarily pausing before coffin warehouses, and bringing up the rear of every funeral I meet; "
           "and especially whenever my hypos get such an upper hand of me, that it requires a strong moral principle "
           "to prevent me from deliberately stepping into the street, and methodically knocking people's hats off, "
           "then, I account it high time to get to sea as soon as I can. This is my substitute for pistol and ball.")


def _passages(n: int, words: int, seed: int) -> list[str]:
    from tokenloom.quant.calib import corpus_text

    try:
        paras = [p.strip().replace("\n", " ") for p in corpus_text("moby-dick").split("\n\n")]
    except TokenloomError:
        w = OPENING.split()
        paras = [" ".join((w * 2)[i : i + words]) for i in range(0, len(w), 7)]
    paras = [p for p in paras if len(p.split()) >= words]
    rnd = random.Random(seed)
    return [" ".join(p.split()[:words]) for p in (rnd.sample(paras, n) if len(paras) >= n else rnd.choices(paras, k=n))]


def _middle_word(passage: str) -> str:
    """A word of the passage to look for: the middle one of its words longer than five letters."""
    words = [w for w in re.findall(r"[A-Za-z]+", passage) if len(w) > 5] or passage.split()
    return words[len(words) // 2]


def tasks(n: int, seed: int = 0) -> dict[str, tuple[str, list[str]]]:
    """name -> (kind, n user messages)."""
    passages = _passages(3 * n, 90, seed)
    rnd = random.Random(seed)
    names = ["Ahab", "Ishmael", "Queequeg", "Starbuck", "Stubb", "Flask", "Tashtego", "Daggoo"]
    records = [[{"name": rnd.choice(names), "ship": rnd.choice(["Pequod", "Rachel", "Jeroboam"]),
                 "age": rnd.randint(18, 70), "role": rnd.choice(["harpooneer", "mate", "captain", "sailor"])}
                for _ in range(4)] for _ in range(n)]
    edits = [(kind, code, *renames[i]) for i in range(4) for kind, code, renames in CODE]  # function, class, ...
    # the prompts are ones the default model follows (its answer copies its input); asked to "quote" after the
    # passage, or to list the sentences "with the word 'the'", it revised the passage or counted the word instead
    return {
        "repeat": ("grounded", [f"Repeat the following passage exactly, word for word:\n\n{p}" for p in passages[:n]]),
        "quote": ("grounded", [f"Passage:\n\"{p}\"\n\nCopy the first two sentences of the passage, word for word."
                               for p in passages[n : 2 * n]]),
        "code_edit": ("grounded", [f"Rename `{a}` to `{b}` in this Python {kind} and print the whole {kind}:\n\n"
                                   f"```python\n{code}```" for kind, code, a, b in (edits * n)[:n]]),
        "extract": ("grounded", [f"Document:\n{p}\n\nCopy the sentence of the document that contains the word "
                                 f"'{_middle_word(p)}', exactly as written." for p in passages[2 * n :]]),
        "reformat_json": ("grounded", [f"Reformat this JSON with two-space indentation, keeping every field:\n"
                                       f"{json.dumps(r)}" for r in records]),
        "chat": ("open", (CHAT * n)[:n]),
    }


def _run(llm, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], int]:
    """(decode tok/s, outputs, output tokens)."""
    from tokenloom.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    end = time.perf_counter()
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if len(prompts) == 1:
        return outs[0].decode_tokens_per_s, tokens, len(tokens[0])
    first = max(o.metrics.first_token_time for o in outs)
    decoded = sum(max(len(t) - 1, 0) for t in tokens)
    return decoded / max(end - first, 1e-9), tokens, sum(len(t) for t in tokens)


def bench_spec(args) -> dict:
    import dataclasses

    from tokenloom.entrypoints.engine_args import EngineArgs

    k = args.num_speculative_tokens
    methods = {}
    for name in args.methods.split(","):
        name = name.strip()
        if name == "draft_model":
            if not args.draft_model:
                raise TokenloomError("--methods draft_model needs --draft-model")
            spec = {"model": args.draft_model}
        elif name in METHODS:
            spec = METHODS[name] and dict(METHODS[name])
        else:
            raise TokenloomError(f"unknown method '{name}' (none, ngram, layer_skip, self, draft_model)")
        if spec:
            spec["num_speculative_tokens"] = k
            if name == "layer_skip" and args.draft_layers:
                spec["draft_layers"] = args.draft_layers
        methods[name] = spec
    if "none" not in methods:
        methods = {"none": None, **methods}
    base = EngineArgs.from_namespace(args)
    llms = {name: dataclasses.replace(base, speculative_config=json.dumps(spec) if spec else None).create_llm()
            for name, spec in methods.items()}
    some = next(iter(llms.values()))
    batches = [int(b) for b in args.batch.split(",")]
    work = tasks(max(*batches, SOLO_REQUESTS), args.seed)
    if args.tasks:
        work = {t: work[t] for t in args.tasks.split(",")}
    prompts = {t: [some.chat_prompt_ids([{"role": "user", "content": m}]) for m in msgs]
               for t, (_, msgs) in work.items()}
    for llm in llms.values():  # warm-up: kernels, caches, the adaptive controller's first costs
        _run(llm, prompts[next(iter(prompts))][:1], 8)
    rates = {(m, t, b): [] for m in llms for t in work for b in batches}
    outputs = {}
    for rnd in range(args.rounds):
        for b in batches:
            for t in work:
                for m, llm in (list(llms.items()) if rnd % 2 == 0 else list(llms.items())[::-1]):
                    llm.engine.reset_prefix_cache()
                    before = llm.engine.stats()
                    if b == 1:  # requests one after the other, their mean
                        runs = [_run(llm, [p], args.output_len) for p in prompts[t][:SOLO_REQUESTS]]
                        rate = statistics.mean(r[0] for r in runs)
                        outs = [o for r in runs for o in r[1]]
                    else:
                        rate, outs, _ = _run(llm, prompts[t][:b], args.output_len)
                    rates[(m, t, b)].append(rate)
                    after = llm.engine.stats()
                    acc = outputs.setdefault((m, t, b), {"drafts": 0, "accepted": 0, "runs": 0})
                    acc["drafts"] += after.spec_draft_tokens - before.spec_draft_tokens
                    acc["accepted"] += after.spec_accepted_tokens - before.spec_accepted_tokens
                    acc["runs"] += after.spec_verify_runs - before.spec_verify_runs
                    acc["tokens"] = outs
    return _report(args, llms, work, batches, rates, outputs)


def _mean_rate(results: list[dict], method: str, batch: int) -> float:
    return statistics.mean(r["decode_tok_s"] for r in results if r["method"] == method and r["batch"] == batch)


def _report(args, llms, work, batches, rates, outputs) -> dict:
    some = next(iter(llms.values()))
    eng = some.engine
    print(f"model {eng.model_name}  weights {eng.config.quantization or 'float'}  k {args.num_speculative_tokens}  "
          f"output {args.output_len}  rounds {args.rounds}  greedy")
    print(f"{'batch':>5} {'task':14}{'method':12}{'decode tok/s':>13}{'vs none':>9}{'accept':>8}{'mean len':>9}"
          f"{'identical':>10}")
    results = []
    for b in batches:
        for t, (kind, _) in work.items():
            base = rates[("none", t, b)]
            for m in llms:
                rate = rates[(m, t, b)]
                o = outputs[(m, t, b)]
                row = {"batch": b, "task": t, "kind": kind, "method": m, "decode_tok_s": max(rate),
                       "speedup": statistics.median(r / n for r, n in zip(rate, base)),
                       "acceptance_rate": o["accepted"] / o["drafts"] if o["drafts"] else 0.0,
                       "mean_accepted_length": 1 + o["accepted"] / o["runs"] if o["runs"] else 1.0,
                       "identical": o["tokens"] == outputs[("none", t, b)]["tokens"]}
                results.append(row)
                print(f"{b:5} {t:14}{m:12}{max(rate):13.1f}{row['speedup']:8.2f}x{row['acceptance_rate']:8.2f}"
                      f"{row['mean_accepted_length']:9.2f}{'yes' if row['identical'] else 'NO':>10}")
    summary = {}
    for m in llms:
        if m == "none":
            continue
        for b in batches:
            for kind in ("grounded", "open"):
                sp = [r["speedup"] for r in results if r["method"] == m and r["batch"] == b and r["kind"] == kind]
                if sp:
                    summary[f"{m}/batch{b}/{kind}"] = statistics.geometric_mean(sp)
    print("geometric mean speedup: " + "  ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    econ = {}
    for m in dict.fromkeys(("none", max(llms, key=lambda k: _mean_rate(results, k, batches[0])))):
        print(f"[{m}, batch {batches[0]}]")
        econ[m] = section(llms[m].engine, args, decode={"tok_s": _mean_rate(results, m, batches[0]),
                                                        "batch": batches[0], "ctx": args.output_len // 2 + 64})
    return {"economics": econ, "model": eng.model_name, "weights": eng.config.quantization or "float",
            "num_speculative_tokens": args.num_speculative_tokens, "output_len": args.output_len,
            "rounds": args.rounds, "results": results, "geomean_speedup": summary}
