"""`tokenloom bench ...`: the parser of the benchmark commands and their dispatch."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys

from tokenloom.cli.args import add_engine_args, parse_size


def add_bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: latency, throughput, sampling, spec, structured, lora, serve, ab, "
                                     "quant, roofline, disagg, parallel")
    p.set_defaults(func=run_bench)
    bsub = p.add_subparsers(dest="bench", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print the results as one JSON object on stdout (the table goes to stderr)")
    common.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                        help="the machine's price, $/h: the report adds $ per 1M tokens")
    common.add_argument("--instance", default=None, metavar="NAME",
                        help="price the run at a cloud instance's on-demand list price (e.g. c7i.8xlarge, "
                             "g6.xlarge, p5.48xlarge; `tokenloom plan --list` shows them)")

    b = bsub.add_parser("latency", parents=[common], help="batch-1 TTFT and decode tokens/s")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--num-iters", type=int, default=3)
    b.add_argument("--compare-hf", action="store_true", help="measure transformers on the same weights")
    _add_llamacpp_args(b)
    add_engine_args(b)

    b = bsub.add_parser("parallel", parents=[common],
                        help="one rank vs tensor / pipeline parallel: memory per rank, decode tok/s")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--tp", type=int, nargs="*", default=[2], help="tensor-parallel sizes to compare (default 2)")
    b.add_argument("--pp", type=int, nargs="*", default=[2], help="pipeline-parallel sizes to compare (default 2)")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=64)
    b.add_argument("--batch", type=int, default=16)
    b.add_argument("--num-blocks", type=int, default=256, help="KV blocks per rank (the same for every layout)")
    b.add_argument("--rounds", type=int, default=2)
    add_engine_args(b)

    b = bsub.add_parser("throughput", parents=[common], help="N requests submitted at once")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--num-prompts", type=int, default=32)
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--dist", choices=["fixed", "uniform", "sharegpt"], default="fixed",
                   help="length distribution: fixed, uniform in [len/2, 3len/2], or a ShareGPT-like lognormal mix")
    b.add_argument("--compare-hf", action="store_true", help="also run transformers' batched generate")
    _add_llamacpp_args(b)
    add_engine_args(b)

    b = bsub.add_parser("sampling", parents=[common], help="decode tokens/s of a mixed-sampling batch vs all-greedy")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--batch", type=int, default=32)
    b.add_argument("--input-len", type=int, default=64)
    b.add_argument("--output-len", type=int, default=64)
    add_engine_args(b)

    b = bsub.add_parser("spec", parents=[common], help="speculative decoding vs none: decode tok/s, acceptance")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--methods", default="none,ngram,layer_skip,self",
                   help="comma list of none, ngram, layer_skip, self, draft_model")
    b.add_argument("--draft-model", default=None, help="the draft of method draft_model")
    b.add_argument("--draft-layers", type=int, default=0, help="layers of the layer_skip draft (default: a quarter)")
    b.add_argument("--num-speculative-tokens", "-k", type=int, default=8,
                   help="most drafts a step verifies (adaptive k picks fewer where they do not pay)")
    b.add_argument("--tasks", default=None, help="comma list (default: repeat, quote, code_edit, extract, "
                                                 "reformat_json, chat)")
    b.add_argument("--batch", default="1,8", help="comma list of batch sizes")
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--rounds", type=int, default=3, help="rounds (tok/s: the best round; speedup: the median of same-round ratios)")
    add_engine_args(b)

    b = bsub.add_parser("structured", parents=[common],
                        help="JSON-schema-constrained requests vs the same requests free: decode tok/s, mask time")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--concurrency", type=int, default=32, help="requests decoded together")
    b.add_argument("--output-len", type=int, default=256, help="max tokens per request")
    b.add_argument("--temperature", type=float, default=0.7)
    b.add_argument("--rounds", type=int, default=5, help="rounds (tok/s: the best round; ratio: the median of "
                                                       "same-round ratios)")
    add_engine_args(b)

    b = bsub.add_parser("lora", parents=[common],
                        help="decode tok/s of a batch spread over LoRA adapters vs the base model alone")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--batch", type=int, default=32, help="sequences decoded together")
    b.add_argument("--num-adapters", type=int, default=4, help="adapters the batch is spread over (round robin)")
    b.add_argument("--rank", type=int, default=16, help="rank of the (random) adapters, on every linear layer")
    b.add_argument("--input-len", type=int, default=64)
    b.add_argument("--output-len", type=int, default=64)
    b.add_argument("--rounds", type=int, default=3, help="rounds (tok/s: the best round; ratio: the median of "
                                                       "same-round ratios)")
    add_engine_args(b)

    b = bsub.add_parser("roofline", parents=[common],
                        help="this machine's memory bandwidth and GEMM throughput, and the model's share of them")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=64)
    b.add_argument("--batch", type=int, default=16, help="the wider decode batch measured beside batch 1")
    b.add_argument("--num-iters", type=int, default=2, help="rounds (the best is kept)")
    b.add_argument("--buffer", type=parse_size, default=None, metavar="SIZE",
                   help="bandwidth buffers (default: 4x the last-level cache, at least 1GiB)")
    add_engine_args(b)

    b = bsub.add_parser("serve", parents=[common], help="load test a running server (OpenAI API)")
    b.add_argument("--base-url", default="http://127.0.0.1:8000")
    b.add_argument("--model", default=None)
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (Poisson); inf = all at once")
    b.add_argument("--concurrency", default="0", metavar="N[,N...]",
                   help="max in-flight requests (0 = unbounded); a comma list runs the load at each (e.g. 1,4,16)")
    b.add_argument("--plot", default=None, metavar="DIR",
                   help="write PNG charts here: TTFT/TPOT distributions, throughput vs concurrency")
    b.add_argument("--input-len", type=int, default=128)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--dist", choices=["fixed", "uniform", "sharegpt"], default="fixed")
    b.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    b.add_argument("--slo-tpot-ms", type=float, default=200.0)
    b.add_argument("--api-key", default=None)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--chaos", action="store_true", help="the reliability load: valid requests of every kind, "
                   "disconnects and malformed bodies; reports 4xx by kind, 5xx, hangs, KV blocks and RSS at rest")
    b.add_argument("--malformed", type=float, default=0.05, help="--chaos: share of malformed bodies")
    b.add_argument("--disconnect", type=float, default=0.10, help="--chaos: share of clients that go away early")
    b.add_argument("--hang-timeout", type=float, default=120.0, help="--chaos: seconds without an answer = a hang")
    b.add_argument("--rest-timeout", type=float, default=60.0,
                   help="--chaos: seconds to wait for the server to come to rest before and after the load")

    b = bsub.add_parser("ab", parents=[common], help="a chat load on an A/B route: the variants side by side")
    b.add_argument("--variants", default=None, metavar="A,B",
                   help="start a server here with route 'ab' over these (e.g. smollm2-135m:bf16,smollm2-135m:int4)")
    b.add_argument("--weights", default=None, metavar="WA,WB", help="--variants: their weights (default: even)")
    b.add_argument("--base-url", default="http://127.0.0.1:8000", help="a running server (without --variants)")
    b.add_argument("--route", default="ab", help="the route to load (without --variants)")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument("--concurrency", type=int, default=8)
    b.add_argument("--output-len", type=int, default=32)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--sticky-users", type=int, default=0, help="send `user` from this many users (0: none)")
    b.add_argument("--api-key", default=None)
    add_engine_args(b)

    b = bsub.add_parser("disagg", parents=[common], help="prefill/decode disaggregation vs one colocated engine: "
                                                         "chats' inter-token latency while long prompts arrive")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--num-chats", type=int, default=8, help="short chats decoding throughout")
    b.add_argument("--chat-len", type=int, default=64, help="prompt tokens of a chat")
    b.add_argument("--output-len", type=int, default=128, help="tokens each chat generates")
    b.add_argument("--num-long", type=int, default=3, help="long prompts arriving while the chats decode")
    b.add_argument("--long-len", type=int, default=1536, help="prompt tokens of a long prompt")
    b.add_argument("--long-output-len", type=int, default=16, help="tokens each long prompt generates")
    b.add_argument("--long-every", type=float, default=1.0, metavar="SECONDS", help="long prompts' spacing")
    b.add_argument("--rounds", type=int, default=2, help="rounds, alternating which setup goes first")
    b.add_argument("--colocated-threads", type=int, default=0,
                   help="torch threads of the colocated engine (default: every core)")
    add_engine_args(b)

    b = bsub.add_parser("quant", parents=[common], help="weight bytes, RSS, perplexity and speed for every quantization method")
    b.add_argument("model", nargs="?", default="smollm2-135m")
    b.add_argument("--methods", default="int8,int4,gptq,awq,nf4,gguf")
    b.add_argument("--eval-tokens", type=int, default=4096)
    b.add_argument("--out", default="bench_out",
                   help="folder for the table and the PNG charts (bars; Δ perplexity vs decode tok/s)")
    b.add_argument("--input-len", type=int, default=128, help="prompt tokens of the speed runs")
    b.add_argument("--output-len", type=int, default=64, help="new tokens of the speed runs")
    b.add_argument("--rounds", type=int, default=5, help="round-robin speed rounds; the best of each is kept")
    b.add_argument("--window", type=int, default=1024, help="perplexity window (stride: half of it)")
    b.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128], help="4-bit group size")
    b.add_argument("--calib-samples", type=int, default=64, help="GPTQ/AWQ calibration sequences")
    b.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration sequence")
    b.add_argument("--corpus", default="moby-dick", choices=["moby-dick", "sotu"],
                   help="calibration (first half) and evaluation (second half) text")
    b.add_argument("--requantize", action="store_true", help="ignore quantized checkpoints cached in OUT")
    add_engine_args(b)


def _add_llamacpp_args(b) -> None:
    b.add_argument("--compare", choices=["llama.cpp"], default=None,
                   help="also run llama.cpp on the same GGUF file, same threads, and print the ratio")
    b.add_argument("--llama-cpp-bin", default=None, metavar="DIR",
                   help="folder holding llama-bench / llama-batched-bench (default: $TOKENLOOM_LLAMA_CPP_BIN, PATH, "
                        "~/.cache/llamacpp/bin; else the llama-cpp-python package)")


def run_bench(args: argparse.Namespace) -> None:
    from tokenloom.bench.hardware import price_from_args

    price_from_args(args)  # a bad --instance or --price-per-hour fails before the run, not after it
    if args.bench == "latency":
        from tokenloom.bench.latency import bench_latency as fn
    elif args.bench == "throughput":
        from tokenloom.bench.throughput import bench_throughput as fn
    elif args.bench == "sampling":
        from tokenloom.bench.throughput import bench_sampling as fn
    elif args.bench == "spec":
        from tokenloom.bench.spec import bench_spec as fn
    elif args.bench == "structured":
        from tokenloom.bench.structured import bench_structured as fn
    elif args.bench == "lora":
        from tokenloom.bench.lora import bench_lora as fn
    elif args.bench == "serve":
        from tokenloom.bench.serve import bench_serve as fn
    elif args.bench == "roofline":
        from tokenloom.bench.token_economics import bench_roofline as fn
    elif args.bench == "ab":
        from tokenloom.bench.ab import bench_ab as fn
    elif args.bench == "disagg":
        from tokenloom.bench.disagg import bench_disagg as fn
    elif args.bench == "parallel":
        from tokenloom.bench.parallel import bench_parallel as fn
    else:
        from tokenloom.bench.quant import bench_quant as fn
    if not args.json:
        fn(args)
        return
    with contextlib.redirect_stdout(sys.stderr):  # the table goes to stderr, stdout holds one JSON object
        result = fn(args)
    print(json.dumps(result, default=str))
