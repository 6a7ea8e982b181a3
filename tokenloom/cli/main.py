"""`tokenloom` command line: pull, list, show, create, cp, rm, generate, run, serve, bench, quantize, eval.

The only place that parses arguments: each command lives in a module of its own and gets the parsed namespace.
"""
from __future__ import annotations

import argparse
import os
import sys

from tokenloom.cli import models
from tokenloom.cli.args import add_engine_args, add_sampling_args, keep_alive, parse_size
from tokenloom.cli.bench import add_bench_parser
from tokenloom.cli.eval import add_eval_parser
from tokenloom.cli.plan import add_plan_parser
from tokenloom.cli.quantize import add_quantize_parser
from tokenloom.config import TokenloomError
from tokenloom.loader.sources import DEFAULT_MODEL
from tokenloom.version import __version__


def cmd_generate(args):
    from tokenloom.cli.generate import cmd_generate as run

    run(args)


def cmd_run(args):
    from tokenloom.cli.chat import cmd_run as run

    run(args)


def cmd_serve(args):
    from tokenloom.cli.serve import serve  # FastAPI loads only for this command

    serve(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenloom", description="Run and serve open-weight language models.")
    parser.add_argument("--version", action="version", version=f"tokenloom {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="download a catalogue model into the cache")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=models.cmd_pull)

    p = sub.add_parser("list", help="list catalogue models and what is cached")
    p.set_defaults(func=models.cmd_list)

    p = sub.add_parser("show", help="architecture, parameters, quantization, context length, template")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.set_defaults(func=models.cmd_show)

    p = sub.add_parser("create", help="create a model from a Modelfile (FROM, PARAMETER, SYSTEM, MESSAGE, ...)")
    p.add_argument("name")
    p.add_argument("--file", "-f", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    p.set_defaults(func=models.cmd_create)

    p = sub.add_parser("cp", help="copy a model under another name (a created model)")
    p.add_argument("source")
    p.add_argument("destination")
    p.set_defaults(func=models.cmd_cp)

    p = sub.add_parser("rm", help="remove created models or pulled catalogue models")
    p.add_argument("models", nargs="+", metavar="MODEL")
    p.set_defaults(func=models.cmd_rm)

    p = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat template")
    p.add_argument("--verbose", "-v", action="store_true", help="print timings")
    add_engine_args(p)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="interactive chat in the terminal")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--verbose", action="store_true", help="statistics after each reply (as /set verbose)")
    add_engine_args(p)
    add_sampling_args(p, max_tokens=None)
    p.set_defaults(func=cmd_run, temperature=0.8, top_k=40, top_p=0.9)  # Ollama's defaults

    p = sub.add_parser("serve", help="OpenAI- and Ollama-compatible HTTP server")
    p.add_argument("model", nargs="?", default=None,
                   help="serve this one model; without it, every model the server can load, on demand (Ollama's way)")
    g = p.add_argument_group("many models (serve without MODEL)")
    g.add_argument("--model", dest="models", action="append", default=[], metavar="NAME",
                   help="a model the server may load (a catalogue name, a .gguf file or a HF folder; repeatable); "
                        "pulled catalogue models always may")
    g.add_argument("--models-dir", dest="models_dirs", action="append", default=[], metavar="DIR",
                   help="a folder whose .gguf files and HF folders the server may load, by their names (repeatable)")
    g.add_argument("--keep-alive", type=keep_alive, default=300.0, metavar="DURATION",
                   help="how long a model stays loaded after its last request: seconds or 5m, 1h; 0 = unload at "
                        "once, -1 = keep (default 5m; requests may set keep_alive)")
    g.add_argument("--max-loaded-models", type=int, default=3,
                   help="models loaded at once; the least recently used idle one is unloaded first (default 3)")
    g.add_argument("--memory-budget", type=parse_size, default=0, metavar="SIZE",
                   help="memory the loaded models may hold (weights + KV in memory), e.g. 8GiB (default: none)")
    p.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                   help="LoRA adapters served under their own names (PEFT folders or GGUF adapters; needs "
                        "--enable-lora; more at run time with POST /v1/load_lora_adapter)")
    p.add_argument("--routes", default=None, metavar="FILE",
                   help='A/B routes, JSON: {"chat": {"smollm2-135m:bf16": 0.9, "smollm2-135m:int4": 0.1}}; '
                        "read again on SIGHUP or POST /admin/routes")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("TOKENLOOM_API_KEY"))
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests waiting beyond the free sequence slots past which new ones get 503 (Retry-After)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM, how long running requests may finish before they are stopped (default 30)")
    p.add_argument("--max-request-bytes", type=parse_size, default=32 << 20, metavar="SIZE",
                   help="request bodies larger than this get 413 (default 32M)")
    p.add_argument("--served-model-name", default=None)
    g = p.add_argument_group("scale-out (serve MODEL): engines in worker processes")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                   help="N independent engine replicas, each in its own process; a new request goes to the least "
                        "loaded (default 1: the engine runs in the server process)")
    g.add_argument("--prefill-workers", type=int, default=0, metavar="N",
                   help="prefill/decode disaggregation: N processes compute prompts and hand their KV blocks to "
                        "the decode workers (needs --decode-workers)")
    g.add_argument("--decode-workers", type=int, default=0, metavar="M",
                   help="M processes decode the requests the prefill workers started")
    add_engine_args(p)
    p.set_defaults(func=cmd_serve)

    add_bench_parser(sub)
    add_quantize_parser(sub)
    add_eval_parser(sub)
    add_plan_parser(sub)
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
