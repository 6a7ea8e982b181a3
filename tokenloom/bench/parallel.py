"""`tokenloom bench parallel`: the same model on one rank and split over ranks (tensor and pipeline parallel),
side by side in one run: what each rank holds (weights, KV cache for the same number of blocks), load time,
single-stream decode tok/s and the output tok/s of a batch of requests.

On one machine the ranks share its cores and memory bandwidth, so splitting cannot make a model that fits in
one process faster here; the figures show what the split costs (messages and all-reduces per layer) and what it
saves per rank (memory), the point of tensor parallelism when a model outgrows one device."""
from __future__ import annotations

import time

import torch

from tokenloom.bench.common import random_prompts
from tokenloom.bench.token_economics import print_section, section


def _layouts(args) -> list[dict]:
    out = [{}]
    for tp in args.tp:
        out.append({"tensor_parallel_size": tp})
    for pp in args.pp:
        out.append({"pipeline_parallel_size": pp})
    return out


def _run(llm, prompts, max_tokens: int) -> tuple[float, int]:
    from tokenloom.sampling_params import SamplingParams

    eng = llm.engine
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    for p in prompts:
        eng.add_request(p, params)
    n = 0
    while eng.has_unfinished():
        n += sum(1 for o in eng.step() if o.outputs and o.finished) * max_tokens
    return time.perf_counter() - start, n


def _measure(args, layout: dict) -> dict:
    from tokenloom.entrypoints.engine_args import EngineArgs

    engine_args = EngineArgs.from_namespace(args)
    t0 = time.perf_counter()
    llm = _make(engine_args, layout, args.num_blocks)
    load_s = time.perf_counter() - t0
    try:
        eng = llm.engine
        ranks = eng.executor.rank_memory()
        vocab = eng.model_config.vocab_size
        _run(llm, random_prompts([(8, 0)], vocab, 99), 4)  # warm-up
        single, batch = [], []
        for r in range(args.rounds):
            prompt = random_prompts([(args.input_len, 0)], vocab, r)
            eng.reset_prefix_cache()
            elapsed, n = _run(llm, prompt, args.output_len)
            single.append(n / elapsed)
            prompts = random_prompts([(args.input_len, 0)] * args.batch, vocab, 100 + r)
            eng.reset_prefix_cache()
            elapsed, n = _run(llm, prompts, args.output_len)
            batch.append(n / elapsed)
        # every rank's weights are read each step, against the roofs of all the ranks' threads together
        threads = torch.get_num_threads()
        torch.set_num_threads(threads * len(ranks))
        try:
            econ = section(eng, args, decode={"tok_s": max(batch), "batch": args.batch,
                                              "ctx": args.input_len + args.output_len // 2},
                           step_bytes=float(sum(w for w, _ in ranks)), show=False)
        finally:
            torch.set_num_threads(threads)
    finally:
        llm.engine.shutdown()
    name = ", ".join(f"{k.split('_')[0][0]}p={v}" for k, v in layout.items()) or "one rank"
    return {"layout": name, **layout, "load_s": load_s,
            "ranks": [{"weight_bytes": w, "kv_bytes": kv} for w, kv in ranks],
            "single_tok_s": max(single), "batch_out_tok_s": max(batch), "economics": econ, "dtype": str(eng.dtype)}


def _make(engine_args, layout: dict, num_blocks: int):
    import dataclasses

    from tokenloom.entrypoints.llm import LLM

    kwargs = dataclasses.asdict(engine_args)
    kwargs.pop("threads")
    kwargs.update(layout, num_blocks=num_blocks)
    return LLM(**kwargs)


def bench_parallel(args) -> dict:
    rows = [_measure(args, layout) for layout in _layouts(args)]
    base = rows[0]
    print(f"model {args.model}  {args.num_blocks} KV blocks per rank  prompt {args.input_len}  "
          f"output {args.output_len}  batch {args.batch}  best of {args.rounds} rounds")
    print(f"{'layout':<10} {'ranks':>5} {'weights/rank MiB':>18} {'KV/rank MiB':>14} {'load s':>7} "
          f"{'1-stream tok/s':>15} {'batch tok/s':>12} {'vs one rank':>12}")
    for row in rows:
        ranks = row["ranks"]
        weights = "/".join(f"{r['weight_bytes'] / 2**20:.1f}" for r in ranks)
        kv = "/".join(f"{r['kv_bytes'] / 2**20:.1f}" for r in ranks)
        row["batch_vs_one_rank"] = row["batch_out_tok_s"] / base["batch_out_tok_s"]
        row["single_vs_one_rank"] = row["single_tok_s"] / base["single_tok_s"]
        print(f"{row['layout']:<10} {len(ranks):>5} {weights:>18} {kv:>14} {row['load_s']:>7.1f} "
              f"{row['single_tok_s']:>15.1f} {row['batch_out_tok_s']:>12.1f} {row['batch_vs_one_rank']:>11.2f}x")
    for row in rows:
        print(f"{row['layout']}:")
        print_section(row["economics"], row.pop("dtype").removeprefix("torch."))
    return {"model": args.model, "input_len": args.input_len, "output_len": args.output_len, "batch": args.batch,
            "layouts": rows}
