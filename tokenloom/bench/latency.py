"""Batch-1 latency: time to first token and decode tokens/s, next to transformers on the same weights."""
from __future__ import annotations

import statistics

import torch

from tokenloom.bench.common import (batch_invariant, decode_path, hf_generate_timed, load_hf_reference, path_note,
                                    random_prompts)
from tokenloom.bench.token_economics import section


def bench_latency(args) -> dict:
    from tokenloom.entrypoints.engine_args import make_llm
    from tokenloom.sampling_params import SamplingParams

    llm = make_llm(args)
    eng = llm.engine
    prompt = random_prompts([(args.input_len, args.output_len)], eng.model_config.vocab_size, args.seed)[0]
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    llm.generate(prompt[:16], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))  # warm-up
    ttfts, rates = [], []
    for _ in range(args.num_iters):
        eng.reset_prefix_cache()  # measure a cold prefill every time
        out = llm.generate(prompt, params)[0]
        ttfts.append(out.metrics.ttft)
        rates.append(out.decode_tokens_per_s)
    res = {"ttft_s": statistics.median(ttfts), "prefill_tok_s": args.input_len / statistics.median(ttfts),
           "decode_tok_s": statistics.median(rates), "weights": eng.config.quantization or "float",
           "decode_path": decode_path(eng), "batch_invariant": batch_invariant(eng)}
    print(f"model {eng.model_name}  dtype {str(eng.dtype).removeprefix('torch.')}  weights {res['weights']}  "
          f"decode path {res['decode_path']}{path_note(eng)}  threads {torch.get_num_threads()}"
          f"  prompt {args.input_len}  output {args.output_len}  batch 1")
    print(f"{'':14}{'TTFT ms':>10}{'prefill tok/s':>15}{'decode tok/s':>14}")
    print(f"{'tokenloom':14}{res['ttft_s'] * 1000:10.1f}{args.input_len / res['ttft_s']:15.1f}{res['decode_tok_s']:14.1f}")
    if args.compare_hf:
        hf = load_hf_reference(eng, eng.dtype)
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        hf_generate_timed(hf, ids[:, :16], mask[:, :16], 4)  # warm-up
        t_first = statistics.median(hf_generate_timed(hf, ids, mask, 1) for _ in range(args.num_iters))
        t_all = statistics.median(hf_generate_timed(hf, ids, mask, args.output_len) for _ in range(args.num_iters))
        hf_rate = (args.output_len - 1) / (t_all - t_first)
        print(f"{'transformers':14}{t_first * 1000:10.1f}{args.input_len / t_first:15.1f}{hf_rate:14.1f}")
        print(f"{'ratio':14}{t_first / res['ttft_s']:9.2f}x{'':15}{res['decode_tok_s'] / hf_rate:13.2f}x"
              "   (>1 = tokenloom faster)")
        res.update(hf_ttft_s=t_first, hf_decode_tok_s=hf_rate)
    if getattr(args, "compare", None) == "llama.cpp":
        from tokenloom.bench import llamacpp

        ref = llamacpp.latency(llamacpp.gguf_file(eng), torch.get_num_threads(), args.input_len, args.output_len,
                               args.num_iters, args.llama_cpp_bin)
        print(f"{'llama.cpp':14}{args.input_len / ref['prefill_tok_s'] * 1000:10.1f}{ref['prefill_tok_s']:15.1f}"
              f"{ref['decode_tok_s']:14.1f}   ({ref['via']}, same file)")
        res["llama_cpp"] = ref
        res["ratio_prefill"] = res["prefill_tok_s"] / ref["prefill_tok_s"]
        res["ratio_decode"] = res["decode_tok_s"] / ref["decode_tok_s"]
        print(f"{'ratio':14}{'':10}{res['ratio_prefill']:14.2f}x{res['ratio_decode']:13.2f}x   (>1 = tokenloom faster)")
    res["economics"] = section(eng, args, prefill={"tok_s": res["prefill_tok_s"], "prompt_len": args.input_len},
                               decode={"tok_s": res["decode_tok_s"], "batch": 1,
                                       "ctx": args.input_len + args.output_len // 2})
    return res
