"""`tokenloom bench structured`: concurrent JSON-schema-constrained requests against the same requests without
a constraint, in the same run.

Each round decodes the same batch of chat prompts (asking for JSON) twice, constrained and free, the order
swapped every other round. The figure that matters is the decode rate at full concurrency: output tokens per
second over the same first decode steps on both sides, as many as the constrained batch kept all its requests
(a constrained request ends when its JSON closes, a free one runs on, so whole-run rates would compare
different batch sizes and context lengths). Also reported: the grammar mask time
per step (filled on a background thread while the forward pass runs), compile time, and the share of
constrained outputs that validate against their schema (jsonschema when installed, else they must parse).
"""
from __future__ import annotations

import json
import statistics
import time

from tokenloom.bench.token_economics import section

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z0-9.]{1,20}@[a-z0-9]{1,15}\\.[a-z]{2,4}$"},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 5}},
     "required": ["name", "age", "email", "hobbies"], "additionalProperties": False},
    {"type": "object", "properties": {
        "products": {"type": "array", "minItems": 2, "maxItems": 4, "items": {
            "type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                             "price": {"type": "number", "minimum": 0},
                                             "in_stock": {"type": "boolean"}},
            "required": ["title", "price", "in_stock"], "additionalProperties": False}}},
     "required": ["products"], "additionalProperties": False},
    {"type": "object", "properties": {
        "event": {"type": "string", "maxLength": 60}, "date": {"type": "string", "pattern": "^\\d{4}-\\d{2}-\\d{2}$"},
        "city": {"type": "string", "maxLength": 30}, "attendees": {"type": "integer", "minimum": 1},
        "category": {"enum": ["music", "sport", "science", "art", "business"]}},
     "required": ["event", "date", "city", "attendees", "category"], "additionalProperties": False},
    {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 60}, "ingredients": {"type": "array", "minItems": 2, "maxItems": 6,
                                                                      "items": {"type": "string", "maxLength": 30}},
        "minutes": {"type": "integer", "minimum": 1, "maximum": 600}, "vegetarian": {"type": "boolean"}},
     "required": ["title", "ingredients", "minutes", "vegetarian"], "additionalProperties": False},
]
ASKS = ["Describe a person as JSON.", "List some products in a shop as JSON.", "Describe an upcoming event as JSON.",
        "Give me a recipe as JSON."]
TOPICS = ["in Paris", "for children", "in the mountains", "by the sea", "in winter", "for a student", "in Tokyo",
          "from the 1990s"]


def _validator():
    try:
        import jsonschema
    except ImportError:
        return lambda text, schema: _parses(text)
    return lambda text, schema: _parses(text) and jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def _decode_run(llm, prompts, params) -> dict:
    """Step the engine by hand, timing each step in which every request was decoding."""
    eng = llm.engine
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    full_steps, outs = [], {}
    mask_before = eng.stats()
    start = time.perf_counter()
    while eng.has_unfinished():
        computed = eng.stats().prompt_tokens_computed
        t0 = time.perf_counter()
        for out in eng.step():
            if out.finished:
                outs[out.request_id] = out
        dt = time.perf_counter() - t0
        if eng.stats().prompt_tokens_computed == computed and eng.last_step_num_seqs == len(prompts):
            full_steps.append(dt)
    elapsed = time.perf_counter() - start
    st = eng.stats()
    return {"full_steps": full_steps, "tok_s": sum(len(outs[i].outputs[0].token_ids) for i in ids) / elapsed,
            "texts": [outs[i].outputs[0].text for i in ids],
            "finished": [outs[i].outputs[0].finish_reason == "stop" for i in ids],
            "mask_s": st.grammar_mask_seconds - mask_before.grammar_mask_seconds,
            "mask_steps": st.grammar_mask_steps - mask_before.grammar_mask_steps}


def _full_rate(run: dict, steps: int, n: int) -> float:
    """Decode tok/s over the run's first `steps` full-concurrency steps (equal context lengths on both sides)."""
    times = run["full_steps"][:steps]
    return n * len(times) / sum(times) if times else float("nan")


def bench_structured(args) -> dict:
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.sampling_params import SamplingParams, StructuredOutputsParams

    llm = make_llm(args)
    n = args.concurrency
    which = [i % len(SCHEMAS) for i in range(n)]
    prompts = [llm.chat_prompt_ids([{"role": "user", "content": f"{ASKS[w]} Make it about something "
                                                               f"{TOPICS[(i // len(SCHEMAS)) % len(TOPICS)]}."}])
               for i, w in enumerate(which)]
    base = dict(max_tokens=args.output_len, temperature=args.temperature, seed=args.seed)
    free = [SamplingParams(**base, ignore_eos=True) for _ in which]
    bound = [SamplingParams(**base, structured_outputs=StructuredOutputsParams(json=SCHEMAS[w])) for w in which]
    compile_start = time.perf_counter()
    for p in bound:
        llm.engine.structured_output.grammar(p.structured_outputs)
    compile_s = time.perf_counter() - compile_start
    _decode_run(llm, prompts[:4], [SamplingParams(**{**base, "max_tokens": 8})] * 4)  # warm-up
    _decode_run(llm, prompts[:4], [SamplingParams(**{**p.__dict__, "max_tokens": 8}) for p in bound[:4]])
    valid = _validator()
    runs = {"free": [], "schema": []}
    for rnd in range(args.rounds):
        order = [("free", free), ("schema", bound)]
        for name, params in (order if rnd % 2 == 0 else order[::-1]):
            llm.engine.reset_prefix_cache()
            runs[name].append(_decode_run(llm, prompts, params))
    # the same decode steps on both sides: as many as the constrained run kept all its requests
    steps = [min(len(f["full_steps"]), len(s["full_steps"])) for f, s in zip(runs["free"], runs["schema"])]
    free_rates = [_full_rate(r, k, n) for r, k in zip(runs["free"], steps)]
    schema_rates = [_full_rate(r, k, n) for r, k in zip(runs["schema"], steps)]
    ratios = [s / f for f, s in zip(free_rates, schema_rates)]
    last = runs["schema"][-1]
    n_valid = sum(valid(t, SCHEMAS[w]) for r in runs["schema"] for t, w, f in zip(r["texts"], which, r["finished"])
                  if f)
    n_finished = sum(sum(r["finished"]) for r in runs["schema"])
    mask_steps = sum(r["mask_steps"] for r in runs["schema"])
    result = {
        "concurrency": n, "output_len": args.output_len, "rounds": args.rounds,
        "free_full_tok_s": max(free_rates), "schema_full_tok_s": max(schema_rates), "full_steps": steps,
        "ratio": statistics.median(ratios), "ratios": ratios,
        "free_tok_s": max(r["tok_s"] for r in runs["free"]), "schema_tok_s": max(r["tok_s"] for r in runs["schema"]),
        "mask_ms_per_step": 1000 * sum(r["mask_s"] for r in runs["schema"]) / max(1, mask_steps),
        "compile_s": compile_s, "valid": n_valid, "finished": n_finished, "outputs": n * args.rounds,
        "example": last["texts"][0],
    }
    print(f"{n} concurrent requests, {args.output_len} tokens max, temperature {args.temperature}, "
          f"{args.rounds} rounds (tok/s: best round; ratio: median of same-round ratios)")
    print(f"decode over the first {min(steps)}-{max(steps)} steps, all {n} requests decoding:")
    print(f"                             free {result['free_full_tok_s']:7.1f} tok/s   "
          f"schema {result['schema_full_tok_s']:7.1f} tok/s   ratio {result['ratio']:.3f} "
          f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})")
    print(f"whole runs                   free {result['free_tok_s']:7.1f} tok/s   "
          f"schema {result['schema_tok_s']:7.1f} tok/s")
    print(f"grammar mask {result['mask_ms_per_step']:.2f} ms per step (in the background), compile of "
          f"{len(SCHEMAS)} schemas {compile_s * 1000:.0f} ms (with the vocabulary's conversion)")
    print(f"constrained outputs: {n_finished}/{n * args.rounds} closed their JSON before max_tokens, "
          f"{n_valid} of those validate against their schema")
    result["economics"] = section(llm.engine, args, decode={"tok_s": result["schema_full_tok_s"], "batch": n,
                                                            "ctx": 64 + args.output_len // 2})
    return result
