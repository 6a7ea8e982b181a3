"""Interactive multi-turn chat in the terminal, as Ollama's `run`: streaming replies and slash commands."""
from __future__ import annotations

import dataclasses
import shlex
import time

from tokenloom.config import TokenloomError
from tokenloom.sampling_params import SamplingParams

HELP = """Available commands:
  /set parameter NAME VALUE   set a sampling parameter (temperature, top_k, top_p, min_p, seed,
                              max_tokens, repetition_penalty, presence_penalty, frequency_penalty)
  /set system TEXT            set the system prompt (clears the conversation)
  /set verbose, /set quiet    show (or stop showing) statistics after each reply
  /show parameters            show the sampling parameters
  /show system                show the system prompt
  /clear                      clear the conversation
  /bye                        exit
  /?, /help                   this help"""

_PARAM_TYPES = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "seed": int,
                "max_tokens": int, "repetition_penalty": float, "presence_penalty": float,
                "frequency_penalty": float, "min_tokens": int}
_ALIASES = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}


def duration(seconds: float) -> str:
    """A duration as Ollama (Go) prints one: 1.234567s, 345.678ms, 12.3µs."""
    if seconds >= 1:
        return f"{seconds:.6f}".rstrip("0").rstrip(".") + "s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.6f}".rstrip("0").rstrip(".") + "ms"
    return f"{seconds * 1e6:.3f}".rstrip("0").rstrip(".") + "µs"


def reply_stats(out, start: float, end: float) -> str:
    """Ollama's `--verbose` block for one reply (RequestOutput out; start: when the reply was asked for)."""
    m = out.metrics
    first = m.first_token_time or end
    finished = m.finished_time or end
    n_prompt, n_eval = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
    prompt_s, eval_s = max(first - m.arrival_time, 1e-9), max(finished - first, 1e-9)
    rows = [("total duration", duration(end - start)), ("load duration", duration(max(m.arrival_time - start, 0))),
            ("prompt eval count", f"{n_prompt} token(s)"), ("prompt eval duration", duration(prompt_s)),
            ("prompt eval rate", f"{n_prompt / prompt_s:.2f} tokens/s"), ("eval count", f"{n_eval} token(s)"),
            ("eval duration", duration(eval_s)), ("eval rate", f"{max(n_eval - 1, 0) / eval_s:.2f} tokens/s")]
    return "".join(f"{name + ':':<22}{value}\n" for name, value in rows)


class ChatSession:
    def __init__(self, llm, params: SamplingParams, system: str | None = None, verbose: bool = False):
        self.llm, self.params, self.system, self.verbose = llm, params, system, verbose
        self.messages: list[dict] = []

    def conversation(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages

    def command(self, line: str, out) -> bool:
        """Handle a slash command; False means exit."""
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        cmd = words[0].lower()
        if cmd in ("/bye", "/exit", "/quit"):
            return False
        if cmd == "/clear":
            self.messages = []
            out.write("Cleared session context\n")
        elif cmd in ("/?", "/help"):
            out.write(HELP + "\n")
        elif cmd == "/set" and len(words) == 2 and words[1] in ("verbose", "quiet"):
            self.verbose = words[1] == "verbose"
            out.write(f"Set '{words[1]}' mode.\n")
        elif cmd == "/set" and len(words) >= 3 and words[1] == "system":
            self.system = line.split("system", 1)[1].strip().strip('"')
            self.messages = []
            out.write("Set system message.\n")
        elif cmd == "/set" and len(words) == 4 and words[1] == "parameter":
            name = _ALIASES.get(words[2], words[2])
            if name not in _PARAM_TYPES:
                out.write(f"Unknown parameter '{words[2]}' (known: {', '.join(_PARAM_TYPES)})\n")
                return True
            try:
                value = _PARAM_TYPES[name](words[3])
                self.params = dataclasses.replace(self.params, **{name: value})
                out.write(f"Set parameter '{name}' to '{value}'\n")
            except (ValueError, TokenloomError) as exc:
                out.write(f"Invalid value for '{name}': {exc}\n")
        elif cmd == "/show" and len(words) == 2 and words[1] == "parameters":
            for name in _PARAM_TYPES:
                out.write(f"{name:<20} {getattr(self.params, name)}\n")
        elif cmd == "/show" and len(words) == 2 and words[1] == "system":
            out.write(f"{self.system or '(none)'}\n")
        else:
            out.write(f"Unknown command '{line}'. Type /? for help\n")
        return True

    def reply(self, user_text: str, out) -> str:
        self.messages.append({"role": "user", "content": user_text})
        start = time.perf_counter()
        try:
            prompt = self.llm.chat_prompt_ids(self.conversation())
            printed = 0
            text, last = "", None
            for last in self.llm.stream(prompt, self.params):
                text = last.outputs[0].text
                out.write(text[printed:])
                out.flush()
                printed = len(text)
        except TokenloomError:
            self.messages.pop()
            raise
        out.write("\n\n")
        if self.verbose and last is not None:
            out.write(reply_stats(last, start, time.perf_counter()) + "\n")
        self.messages.append({"role": "assistant", "content": text})
        return text

    def loop(self, inp, out) -> None:
        interactive = hasattr(inp, "isatty") and inp.isatty()
        while True:
            if interactive:
                out.write(">>> ")
                out.flush()
            line = inp.readline()
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if not self.command(line, out):
                    break
                continue
            try:
                self.reply(line, out)
            except TokenloomError as exc:  # e.g. the conversation outgrew the context window
                out.write(f"error: {exc}\n")


def cmd_run(args) -> None:
    import sys

    from tokenloom.cli.args import sampling_from_args
    from tokenloom.entrypoints.engine_args import make_llm

    session = ChatSession(make_llm(args), sampling_from_args(args), system=args.system, verbose=args.verbose)
    session.loop(sys.stdin, sys.stdout)
