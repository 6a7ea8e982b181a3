"""Argument groups shared by several commands, and their conversion to engine and sampling settings."""
from __future__ import annotations

import argparse


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (default: auto)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--max-model-len", type=int, default=0, help="context window (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--kv-cache-memory", type=parse_size, default=None, help="KV cache budget, e.g. 2GiB")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8"])
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--kv-release-interval", dest="kv_release_interval_s", type=float, default=2.0, metavar="SECONDS",
                   help="return the memory of KV blocks free this long to the OS (0 = never; default 2)")
    g.add_argument("--kv-keep-cached", dest="kv_keep_cached_bytes", type=parse_size, default=32 << 20,
                   metavar="BYTES", help="prefix-cache blocks kept resident when memory is returned (default 32MiB)")
    g.add_argument("--quantization", "-q", default=None,
                   help="int8, int4, nf4, gptq, awq (quantize weights at load); gguf (a GGUF file's own blocks: "
                        "the default for GGUF files unless --dtype is given); none (dequantize to --dtype)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: run every step eagerly, no CUDA graphs for decode steps (or TOKENLOOM_CUDA_GRAPHS=0)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="each request's output independent of what else runs with it (every token row on the "
                        "compiled CPU stack's row-wise kernels; prefill slower)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads for PyTorch (default: one per core)")
    g.add_argument("--speculative-config", type=speculative_config, default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\', '
                        '\'{"model": "DRAFT"}\', \'{"method": "self"}\', \'{"method": "layer_skip", "draft_layers": 8}\'')
    g.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters (PEFT directories, GGUF files)")
    g.add_argument("--max-loras", type=int, default=1, help="LoRA adapters that run in one step (default 1)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="the largest adapter rank accepted (default 16)")
    g.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters whose weights stay in memory (default: --max-loras)")
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every weight matrix over this many ranks (worker processes or Ray actors)")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages, one rank each")
    g.add_argument("--distributed-executor-backend", choices=["mp", "ray"], default=None,
                   help="where ranks beyond the first run: local processes (mp, the default) or Ray actors on a "
                        "Ray cluster (ray; start it with `ray start --head`, join with `ray start --address`)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None = 256) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", "-n", type=int, default=max_tokens)
    g.add_argument("--temperature", "-t", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g = p.add_argument_group("structured output (one of)")
    g.add_argument("--format", default=None, metavar="json|SCHEMA",
                   help="'json' (a JSON object), or a JSON schema the output must match: inline or @FILE")
    g.add_argument("--regex", default=None, help="a regular expression the output must match")
    g.add_argument("--grammar", default=None, metavar="GRAMMAR",
                   help="a Lark or GBNF grammar the output must match: inline or @FILE")


def speculative_config(text: str) -> str:
    """Validated here, so a bad value is one argparse line; the engine parses it again."""
    from tokenloom.config import SpeculativeConfig, TokenloomError

    try:
        SpeculativeConfig.parse(text)
    except TokenloomError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(float(t))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MiB, 2GiB)") from None


def keep_alive(text: str) -> float:
    """A duration in seconds (300, 5m, 1h30m; negative = forever)."""
    from tokenloom.config import TokenloomError, parse_duration

    try:
        return parse_duration(text)
    except TokenloomError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _text_or_file(value: str) -> str:
    from tokenloom.config import TokenloomError

    if not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise TokenloomError(f"cannot read {value[1:]}: {exc.strerror}") from None


def structured_outputs_from_args(args):
    """--format / --regex / --grammar as StructuredOutputsParams (None when none is given)."""
    from tokenloom.sampling_params import StructuredOutputsParams

    fmt, regex, grammar = getattr(args, "format", None), getattr(args, "regex", None), getattr(args, "grammar", None)
    given = [name for name, v in (("--format", fmt), ("--regex", regex), ("--grammar", grammar)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        from tokenloom.config import TokenloomError

        raise TokenloomError(f"give one of --format, --regex, --grammar (got {' and '.join(given)})")
    if fmt is not None and fmt.strip().lower() == "json":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(json=_text_or_file(fmt) if fmt is not None else None, regex=regex,
                                   grammar=_text_or_file(grammar) if grammar is not None else None)


def sampling_from_args(args):
    from tokenloom.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.sample_seed, stop=args.stop,
        structured_outputs=structured_outputs_from_args(args),
    )
