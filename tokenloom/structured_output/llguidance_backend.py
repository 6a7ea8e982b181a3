"""The llguidance backend (Microsoft's grammar engine, no dependencies): JSON schema, regex, choice and Lark or
GBNF grammars, with masks computed in Rust outside the GIL."""
from __future__ import annotations

import json

import llguidance
import torch

from tokenloom.structured_output.backend import (
    BOUNDED_JSON_WHITESPACE,
    CompiledGrammar,
    GrammarMatcher,
    StructuredOutputBackend,
    StructuredOutputError,
    StructuredOutputSpec,
)


# Integers with no bound in the schema stay within I-JSON's interoperable range (RFC 7493: |n| <= 2^53 - 1), so a
# model cannot spin out digits until max_tokens either.
SAFE_INTEGER = 2**53 - 1
_DATA_KEYWORDS = ("const", "enum", "default", "examples")  # values, not schemas


def bound_integers(node):
    """A copy of a JSON schema in which every integer type without an upper (lower) bound gets SAFE_INTEGER
    (-SAFE_INTEGER)."""
    if isinstance(node, list):
        return [bound_integers(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _DATA_KEYWORDS else bound_integers(v) for k, v in node.items()}
    types = out.get("type")
    if types == "integer" or (isinstance(types, list) and "integer" in types):
        if "maximum" not in out and "exclusiveMaximum" not in out:
            out["maximum"] = SAFE_INTEGER
        if "minimum" not in out and "exclusiveMinimum" not in out:
            out["minimum"] = -SAFE_INTEGER
    return out


def grammar_text(spec: StructuredOutputSpec) -> str:
    """The spec as an llguidance grammar (no tokenizer needed)."""
    if spec.kind in ("json", "json_object"):
        schema = bound_integers(json.loads(spec.value)) if spec.kind == "json" else {"type": "object"}
        ws = BOUNDED_JSON_WHITESPACE if spec.whitespace_pattern is None else spec.whitespace_pattern
        options = {"whitespace_pattern": ws} if ws else {"whitespace_flexible": False}  # "": compact JSON
        try:
            return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as exc:
            raise StructuredOutputError(f"invalid JSON schema: {exc}") from None
    if spec.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.value)
    if spec.kind == "choice":
        choices = json.loads(spec.value)
        return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))
    try:  # a Lark grammar, or llama.cpp's GBNF (converted)
        return llguidance.grammar_from("grammar", spec.value)
    except ValueError as exc:
        raise StructuredOutputError(f"invalid grammar: {exc}") from None


class _Matcher(GrammarMatcher):
    def __init__(self, matcher: llguidance.LLMatcher, eos_token_ids: frozenset[int]):
        self.m = matcher
        self.eos = eos_token_ids

    def _trailing_eos(self, token_ids) -> bool:
        # llguidance refuses EOS once the grammar is complete, though its mask allows it there: EOS is a no-op
        return bool(token_ids) and self.m.is_stopped() and not self.m.is_error() and all(
            t in self.eos for t in token_ids)

    def accept_tokens(self, token_ids):
        return True if self._trailing_eos(token_ids) else self.m.consume_tokens(list(token_ids))

    def validate_tokens(self, token_ids):
        return len(token_ids) if self._trailing_eos(token_ids) else self.m.validate_tokens(list(token_ids))

    def rollback(self, num_tokens):
        if num_tokens:
            self.m.rollback(num_tokens)

    def is_terminated(self):
        return self.m.is_stopped()

    def error(self):
        return self.m.get_error() or None if self.m.is_error() else None


class _Grammar(CompiledGrammar):
    def __init__(self, template: llguidance.LLMatcher, eos_token_ids: frozenset[int]):
        self.template = template
        self.eos = eos_token_ids

    def matcher(self):
        return _Matcher(self.template.deep_copy(), self.eos)


class LLGuidanceBackend(StructuredOutputBackend):
    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        """tokenizer_json: the HF tokenizers serialisation of the model's tokenizer; vocab_size: the logits'
        width (the mask's); eos_token_ids: what ends the output where the grammar may end."""
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos_token_ids))
        self.eos = frozenset(eos_token_ids)
        self.executor = llguidance.LLExecutor()
        # Bound each step's work so one pathological grammar cannot stall the batch.
        self.limits = llguidance.LLParserLimits(verbose_errors=False)

    def compile(self, spec):
        grammar = grammar_text(spec)
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if template.is_error():
            raise StructuredOutputError(_first_line(template.get_error()))
        return _Grammar(template, self.eos)

    def fill_bitmask(self, bitmask, rows):
        if not rows:
            return
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        # the executor's own calls (llguidance.torch wraps the same; importing it would load torch.compile)
        ptr, row_bytes, n = bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        plain = [(m.m, r) for m, r, drafts in rows if not drafts]
        drafted = [(m.m, r, list(drafts)) for m, r, drafts in rows if drafts]
        if plain:
            self.executor.unsafe_compute_mask_ptr(plain, ptr, row_bytes, n)
        if drafted:
            self.executor.unsafe_compute_mask_ptr_with_draft_token(drafted, ptr, row_bytes, n)


def _first_line(error: str) -> str:
    """llguidance's errors carry a caret diagram after the message: an API error keeps the message and the
    lines that say what is wrong."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid grammar"
    return "; ".join([lines[0]] + [line for line in lines[1:] if line.lower().startswith("error")])
