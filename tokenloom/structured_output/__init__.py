"""Structured output: constrain sampling to a grammar (JSON schema, regex, choice, EBNF/Lark).

A backend (llguidance or xgrammar, one file each) implements StructuredOutputBackend: it compiles a request's
constraint off the engine loop into a matcher; each step the matchers of the batch fill one packed token bitmask,
which sample.logits_processors.apply_token_bitmask applies to the logits before sampling; accepted tokens advance
the matchers and rejected speculative tokens roll them back.
"""
from tokenloom.structured_output.backend import (
    GrammarMatcher,
    StructuredOutputBackend,
    StructuredOutputSpec,
    allocate_token_bitmask,
)

__all__ = ["GrammarMatcher", "StructuredOutputBackend", "StructuredOutputSpec", "allocate_token_bitmask"]
