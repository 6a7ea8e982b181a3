"""`tokenloom` command line: pull, list, show, generate, run, serve, bench, quantize, eval."""
from __future__ import annotations

import argparse
import os
import sys

from tokenloom.config import TokenloomError
from tokenloom.loader.sources import DEFAULT_MODEL


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-model-len", type=int, default=0, help="context window (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--kv-cache-memory", type=_parse_size, default=None, help="KV cache budget, e.g. 2GiB")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--quantization", "-q", default=None, help="int8, int4, nf4 (quantize weights at load)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: one per core)")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    g.add_argument("--temperature", "-t", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)") from None


def make_llm(args):
    import torch

    from tokenloom.entrypoints.llm import LLM

    if args.threads:
        torch.set_num_threads(args.threads)

    return LLM(
        model=args.model, dtype=args.dtype, device=args.device, seed=args.seed, quantization=args.quantization,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def sampling_from_args(args):
    from tokenloom.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sample_seed, stop=args.stop,
    )


# ---- commands ------------------------------------------------------------------------------------------
def cmd_pull(args):
    from tokenloom.loader.sources import pull

    path = pull(args.model)
    print(f"{args.model}: {path} ({path.stat().st_size / 1e6:.1f} MB)")


def cmd_list(args):
    from tokenloom.loader.sources import CATALOGUE, list_models

    cached = {name: (path, size) for name, path, size in list_models()}
    print(f"{'NAME':<20} {'SIZE':>10}  {'STATUS':<12} DESCRIPTION")
    for name, entry in CATALOGUE.items():
        size = f"{cached[name][1] / 1e6:.1f} MB" if name in cached else "-"
        print(f"{name:<20} {size:>10}  {'downloaded' if name in cached else 'not pulled':<12} {entry.description}")


def cmd_show(args):
    from tokenloom.loader.inspect import describe_model

    for key, value in describe_model(args.model).items():
        if key == "chat template":
            print(f"{key}:\n{value}")
        else:
            print(f"{key:<18} {value}")


def cmd_generate(args):
    llm = make_llm(args)
    params = sampling_from_args(args)
    prompt = args.prompt
    if args.chat:
        prompt = llm.chat_prompt_ids([{"role": "user", "content": prompt}])
    printed = 0
    final = None
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[printed:])
        sys.stdout.flush()
        printed = len(text)
        final = out
    sys.stdout.write("\n")
    if args.verbose and final is not None:
        m = final.metrics
        n = len(final.outputs[0].token_ids)
        rate = final.decode_tokens_per_s
        print(f"[{n} tokens, finish: {final.outputs[0].finish_reason}, TTFT {m.ttft * 1000:.0f} ms"
              + (f", decode {rate:.1f} tok/s]" if rate else "]"), file=sys.stderr)


def cmd_run(args):
    from tokenloom.entrypoints.chat_repl import ChatSession

    ChatSession(make_llm(args), sampling_from_args(args), system=args.system).loop(sys.stdin, sys.stdout)


def cmd_serve(args):
    from tokenloom.entrypoints.server import serve

    serve(args)


def cmd_bench(args):
    from tokenloom.bench import run_bench

    run_bench(args)


def cmd_quantize(args):
    from tokenloom.quant.cli import quantize_command

    quantize_command(args)


def cmd_eval(args):
    from tokenloom.quant.evaluate import eval_command

    eval_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description="Run and serve open-weight language models.")
    parser.add_argument("--version", action="version", version="tokenloom 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a catalogue model into the cache")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="list catalogue models and what is cached")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="architecture, parameters, quantization, context length, template")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings")
    _add_engine_args(p)
    _add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="interactive chat in the terminal")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--system", default=None, help="system prompt")
    _add_engine_args(p)
    _add_sampling_args(p, max_tokens=None)
    p.set_defaults(func=cmd_run, temperature=0.8, top_k=40, top_p=0.9)  # Ollama's defaults

    p = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TOKENLOOM_API_KEY"))
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond which new ones get 503")
    p.add_argument("--served-model-name", default=None)
    _add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    from tokenloom.bench import add_bench_parser

    add_bench_parser(sub, _add_engine_args)
    from tokenloom.quant.cli import add_quant_parsers

    add_quant_parsers(sub, _add_engine_args)
    sub.choices["bench"].set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "generate" and not any(e.startswith("-") for e in extra):
        args.args += extra  # positionals after options: `generate MODEL --chat "prompt"`
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "generate":
        if len(args.args) > 2:
            parser.error("generate takes [MODEL] PROMPT (quote the prompt)")
        args.model, args.prompt = (args.args if len(args.args) == 2 else [DEFAULT_MODEL, args.args[0]])
    try:
        args.func(args)
    except TokenloomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
