"""Per-request generation settings, validated on construction (vLLM's SamplingParams semantics)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from tokenloom.config import TokenloomError

# Temperatures below this are greedy: dividing logits by them would overflow float32 (vLLM uses the same).
SAMPLING_EPS = 1e-5


class SamplingParamsError(TokenloomError, ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's StructuredOutputsParams): set exactly one of json (a JSON schema, as a
    dict or its JSON text), json_object (any JSON object), regex, choice (one of these strings) or grammar (Lark,
    or llama.cpp GBNF/EBNF). whitespace_pattern overrides the regex JSON whitespace must match; unset, whitespace
    between JSON tokens is bounded (a newline and indentation at most), so no schema can spin on blank space."""
    json: Any = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self):
        def bad(msg):
            raise SamplingParamsError(f"structured_outputs: {msg}", "structured_outputs")

        given = [k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            bad("set exactly one of json, json_object, regex, choice, grammar"
                + (f" (got {', '.join(given)})" if given else ""))
        if isinstance(self.json, str):
            try:
                self.json = json.loads(self.json)
            except ValueError as exc:
                bad(f"json is not a valid JSON schema: {exc}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            bad("json must be a JSON schema (an object)")
        for name in ("regex", "grammar", "whitespace_pattern"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or (name != "whitespace_pattern" and not v)):
                bad(f"{name} must be a non-empty string")
        if self.choice is not None and (not isinstance(self.choice, (list, tuple)) or not self.choice or not all(
                isinstance(c, str) and c for c in self.choice)):
            bad("choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        if self.json_object:
            return "json_object"
        return next(k for k in ("json", "regex", "choice", "grammar") if getattr(self, k) is not None)

    def key(self) -> tuple[str, str, str | None]:
        """(kind, canonical text, whitespace pattern): equal constraints share one compiled grammar."""
        kind = self.kind
        if kind == "json":  # key order kept: properties are generated in the schema's order
            value = json.dumps(self.json, separators=(",", ":"))
        elif kind == "choice":
            value = json.dumps(list(self.choice))
        else:
            value = "" if kind == "json_object" else getattr(self, kind)
        return kind, value, self.whitespace_pattern


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_k: int = -1  # -1 (or 0) = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context window
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N logprobs per generated token (0 = only the chosen token)
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None
    # OpenAI's legacy best_of: generate this many candidates (one prefill, seeds seed + i as with n), return the n
    # of the highest mean token logprob, best first (None = n)
    best_of: int | None = None

    def __post_init__(self):
        def bad(param, msg):
            raise SamplingParamsError(f"{param} {msg}", param)

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(param):  # a finite real number (ints accepted), stored as float
            v = getattr(self, param)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(param, f"must be a finite number, got {v!r}")
            setattr(self, param, float(v))
            return float(v)

        if not is_int(self.n) or self.n < 1:
            bad("n", f"must be an integer >= 1, got {self.n!r}")
        if self.best_of is not None and (not is_int(self.best_of) or self.best_of < self.n):
            bad("best_of", f"must be an integer >= n ({self.n}), got {self.best_of!r}")
        if number("temperature") < 0:
            bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature}")
        if not is_int(self.top_k) or not -1 <= self.top_k < 2**31:
            bad("top_k", f"must be -1 (off) or a positive integer below 2**31, got {self.top_k!r}")
        if self.top_k == 0:
            self.top_k = -1
        if not 0 < number("top_p") <= 1:
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= number("min_p") <= 1:
            bad("min_p", f"must be in [0, 1], got {self.min_p}")
        if number("repetition_penalty") <= 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        if not -2 <= number("presence_penalty") <= 2:
            bad("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= number("frequency_penalty") <= 2:
            bad("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None and (not is_int(self.max_tokens) or self.max_tokens < 1):
            bad("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not is_int(self.min_tokens) or self.min_tokens < 0 or (
                self.max_tokens is not None and self.min_tokens > self.max_tokens):
            bad("min_tokens", f"must be an integer in [0, max_tokens], got {self.min_tokens!r}")
        for param in ("logprobs", "prompt_logprobs"):
            v = getattr(self, param)
            if v is not None and (not is_int(v) or not 0 <= v <= 20):
                bad(param, f"must be an integer in [0, 20], got {v!r}")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", f"must be an integer, got {self.seed!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop or [], (list, tuple)) or not all(isinstance(s, str) for s in self.stop or []):
            bad("stop", f"must be a string or a list of strings, got {self.stop!r}")
        self.stop = [s for s in (self.stop or []) if s]
        if not isinstance(self.stop_token_ids or [], (list, tuple)) or not all(
                is_int(t) for t in self.stop_token_ids or []):
            bad("stop_token_ids", f"must be a list of token ids, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias:
            if not isinstance(self.logit_bias, dict):
                bad("logit_bias", "must map token ids to numbers")
            bias = {}
            for k, v in self.logit_bias.items():
                try:  # JSON object keys arrive as strings: "50256"
                    tid = k if is_int(k) else int(k) if isinstance(k, str) else None
                except ValueError:
                    tid = None
                if tid is None or isinstance(v, bool) or not isinstance(v, (int, float)):
                    bad("logit_bias", f"must map token ids to numbers, got {k!r}: {v!r}")
                if not -100 <= v <= 100:  # also rejects NaN
                    bad("logit_bias", f"values must be in [-100, 100], got {v}")
                bias[tid] = float(v)
            self.logit_bias = bias
        if isinstance(self.structured_outputs, dict):
            try:
                self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
            except TypeError as exc:
                bad("structured_outputs", f"has an unknown field: {exc}")
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            bad("structured_outputs", "must be a StructuredOutputsParams")

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    def check_vocab(self, vocab_size: int) -> None:
        """Errors that need the model: token ids outside the vocabulary."""
        for tid in list((self.logit_bias or {}).keys()) + list(self.stop_token_ids):
            if not 0 <= tid < vocab_size:
                param = "logit_bias" if tid in (self.logit_bias or {}) else "stop_token_ids"
                raise SamplingParamsError(
                    f"{param}: token id {tid} is not in the vocabulary (size {vocab_size})", param)
