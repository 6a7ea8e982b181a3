"""`tokenloom generate [MODEL] PROMPT`: stream one completion to the terminal."""
from __future__ import annotations

import sys

from tokenloom.cli.args import sampling_from_args
from tokenloom.entrypoints.engine_args import make_llm


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
