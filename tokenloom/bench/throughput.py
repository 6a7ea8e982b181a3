"""Offline throughput: N requests submitted at once; and the cost of mixed sampling settings."""
from __future__ import annotations

import time

import torch

from tokenloom.bench.common import (amx_tile_rows, batch_invariant, decode_path, hf_generate_timed,
                                    load_hf_reference, make_lengths, path_note, random_prompts, summary)
from tokenloom.bench.token_economics import section
from tokenloom.config import TokenloomError


def _run_all(llm, prompts, params_list):
    eng = llm.engine
    start = time.perf_counter()
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params_list)]
    done = {}
    while eng.has_unfinished():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return time.perf_counter() - start, [done[i] for i in ids]


def bench_throughput(args) -> dict:
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.sampling_params import SamplingParams

    llm = make_llm(args)
    eng = llm.engine
    lengths = make_lengths(args.num_prompts, args.input_len, args.output_len, args.dist, args.seed)
    prompts = random_prompts(lengths, eng.model_config.vocab_size, args.seed)
    params = [SamplingParams(max_tokens=lo, temperature=0, ignore_eos=True) for _, lo in lengths]
    _run_all(llm, [p[:8] for p in prompts[:4]], [SamplingParams(max_tokens=4, ignore_eos=True)] * 4)  # warm-up
    eng.reset_prefix_cache()
    elapsed, outs = _run_all(llm, prompts, params)
    n_in = sum(li for li, _ in lengths)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [o.metrics.ttft for o in outs]
    tpot = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
            for o in outs if len(o.outputs[0].token_ids) > 1]
    st = eng.stats()
    res = {"elapsed_s": elapsed, "req_s": len(outs) / elapsed, "out_tok_s": n_out / elapsed,
           "total_tok_s": (n_in + n_out) / elapsed, "decode_path": decode_path(eng),
           "amx_tile_rows": amx_tile_rows(eng), "batch_invariant": batch_invariant(eng)}
    print(f"model {eng.model_name}  dtype {str(eng.dtype).removeprefix('torch.')}  {args.num_prompts} requests  "
          f"dist {args.dist}  input {n_in} tokens  output {n_out} tokens  max_num_seqs {args.max_num_seqs}  "
          f"max_num_batched_tokens {args.max_num_batched_tokens}  decode path {res['decode_path']}{path_note(eng)}")
    print(f"tokenloom     {elapsed:7.2f} s  {res['req_s']:6.2f} req/s  {res['out_tok_s']:8.1f} output tok/s  "
          f"{res['total_tok_s']:8.1f} total tok/s")
    print(f"  TTFT ms   {summary(ttft)}")
    print(f"  TPOT ms   {summary(tpot)}")
    print(f"  KV waste  paged {st.kv_waste_paged * 100:.1f} %  vs contiguous {st.kv_waste_contiguous * 100:.1f} %   "
          f"preemptions {st.num_preemptions}  steps {st.steps}")
    if args.compare_hf:
        hf = load_hf_reference(eng, eng.dtype)
        max_in = max(li for li, _ in lengths)
        max_out = max(lo for _, lo in lengths)
        batch = torch.zeros(len(prompts), max_in, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for i, p in enumerate(prompts):  # left padding, as batched generate expects
            batch[i, max_in - len(p):] = torch.tensor(p)
            mask[i, max_in - len(p):] = 1
        hf_generate_timed(hf, batch[:2, -8:], mask[:2, -8:], 4)  # warm-up
        hf_elapsed = hf_generate_timed(hf, batch, mask, max_out)
        # Only the tokens each request asked for count, as for tokenloom.
        hf_rate = n_out / hf_elapsed
        print(f"transformers  {hf_elapsed:7.2f} s  {len(prompts) / hf_elapsed:6.2f} req/s  {hf_rate:8.1f} output tok/s"
              f"  (one batched generate, {max_out} new tokens each)")
        print(f"ratio         {res['out_tok_s'] / hf_rate:.2f}x output tok/s (>1 = tokenloom faster)")
        res.update(hf_out_tok_s=hf_rate)
    if getattr(args, "compare", None) == "llama.cpp":
        from tokenloom.bench import llamacpp

        if args.dist != "fixed":
            raise TokenloomError("--compare llama.cpp runs llama-batched-bench: use --dist fixed")
        ref = llamacpp.batched(llamacpp.gguf_file(eng), torch.get_num_threads(), args.input_len, args.output_len,
                               args.num_prompts, args.llama_cpp_bin)
        res["llama_cpp"] = ref
        res["ratio_out_tok_s"] = res["out_tok_s"] / ref["out_tok_s"]
        print(f"llama.cpp     {ref['elapsed_s']:7.2f} s  {'':13}{ref['out_tok_s']:8.1f} output tok/s  "
              f"{ref['total_tok_s']:8.1f} total tok/s   ({ref['via']}, same file)")
        print(f"ratio         output tok/s {res['ratio_out_tok_s']:.2f}x   (>1 = tokenloom faster)")
    batch = min(args.num_prompts, args.max_num_seqs)
    mean_in, mean_out = n_in // len(outs), n_out // len(outs)
    res["economics"] = section(eng, args, decode={"tok_s": batch / (sum(tpot) / len(tpot)) if tpot else 0.0,
                                                  "batch": batch, "ctx": mean_in + mean_out // 2},
                               cost_tok_s=res["out_tok_s"], cost_what="output tokens (whole run)")
    return res


def bench_sampling(args) -> dict:
    """The same batch decoded all-greedy, then with every row's own mix of sampling settings."""
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.sampling_params import SamplingParams

    llm = make_llm(args)
    eng = llm.engine
    lengths = make_lengths(args.batch, args.input_len, args.output_len, "fixed")
    prompts = random_prompts(lengths, eng.model_config.vocab_size, args.seed)
    greedy = [SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)] * args.batch
    mixes = [
        dict(temperature=0.8, top_p=0.9), dict(temperature=1.0, top_k=40), dict(temperature=0.7, min_p=0.05),
        dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1),
        dict(temperature=0.9, presence_penalty=0.5, frequency_penalty=0.5, seed=7), dict(temperature=0),
        dict(temperature=1.2, logprobs=5), dict(temperature=0.6, top_p=0.8, seed=3, logit_bias={100: 2.0}),
    ]
    mixed = [SamplingParams(max_tokens=args.output_len, ignore_eos=True, **mixes[i % len(mixes)])
             for i in range(args.batch)]
    _run_all(llm, [p[:8] for p in prompts[:4]], greedy[:4])  # warm-up
    rows = {}
    for name, params in (("all greedy", greedy), ("mixed sampling", mixed)):
        eng.reset_prefix_cache()
        elapsed, outs = _run_all(llm, prompts, params)
        decode = [(o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
                  for o in outs]
        step_s = sum(decode) / len(decode)
        rows[name] = (args.batch / step_s, step_s)
        print(f"{name:16} decode {args.batch / step_s:8.1f} tok/s   step {step_s * 1000:7.1f} ms")
    cost = rows["mixed sampling"][1] / rows["all greedy"][1] - 1
    print(f"sampling cost: {cost * 100:+.1f} % of a decode step (target < 10 %)")
    econ = section(eng, args, decode={"tok_s": rows["mixed sampling"][0], "batch": args.batch,
                                      "ctx": args.input_len + args.output_len // 2})
    return {"greedy_tok_s": rows["all greedy"][0], "mixed_tok_s": rows["mixed sampling"][0], "cost": cost,
            "economics": econ}
