"""Structured output: constrain sampling to a grammar (JSON schema, regex, choice, Lark or GBNF).

    backend.py             the interface: compile a spec once, a matcher per request, one bitmask per batch
    llguidance_backend.py  the llguidance implementation
    manager.py             the engine's side: compiles off the engine loop (cached by spec), fills each step's
                           bitmask on a background thread while the forward pass runs

The scheduler asks for the step's bitmask (rows for every sampled position of a constrained request, draft
positions included) and advances the matchers over the tokens it accepts; the model runner hands the mask to the
sampler (sample.logits_processors.apply_token_bitmask), which applies it after every other logits processor.
"""
from tokenloom.structured_output.backend import (
    CompiledGrammar,
    GrammarMatcher,
    StructuredOutputBackend,
    StructuredOutputError,
    StructuredOutputSpec,
    allocate_token_bitmask,
)
from tokenloom.structured_output.manager import StructuredOutputManager

__all__ = ["CompiledGrammar", "GrammarMatcher", "StructuredOutputBackend", "StructuredOutputError",
           "StructuredOutputManager", "StructuredOutputSpec", "allocate_token_bitmask"]
