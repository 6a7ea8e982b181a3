"""The backend interface of structured output: compile a constraint once, make a matcher per request, fill one
packed bitmask for the batch, advance matchers over accepted tokens and roll back rejected ones."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal, get_args

import torch

from tokenloom.sampling_params import SamplingParamsError

SpecKind = Literal["json", "json_object", "regex", "choice", "grammar"]
SPEC_KINDS = get_args(SpecKind)

# Where JSON allows whitespace: at most one line break and some indentation, so that a model drawn to blank space
# cannot spin there until max_tokens (vLLM #38696), while pretty-printed JSON stays possible.
BOUNDED_JSON_WHITESPACE = r"(?:\r?\n)?[\x20\x09]{0,32}"


class StructuredOutputError(SamplingParamsError):
    """An invalid constraint (bad schema, regex or grammar), or one that took too long to compile."""

    def __init__(self, message: str, param: str = "structured_outputs"):
        super().__init__(message, param)


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A request's constraint, hashable so compiled grammars are cached by it (StructuredOutputsParams.key())."""
    kind: SpecKind
    value: str  # the JSON schema (serialised), the regex, the choices (JSON list) or the grammar text
    whitespace_pattern: str | None = None  # JSON only; None = BOUNDED_JSON_WHITESPACE

    def __post_init__(self):
        if self.kind not in SPEC_KINDS:
            raise ValueError(f"unknown structured output kind '{self.kind}'")


def allocate_token_bitmask(batch_size: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The packed mask the backends fill: int32 [batch, ceil(vocab / 32)], bit i of word j allows token 32j + i
    (the layout xgrammar and llguidance use). All bits set = no constraint."""
    return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32, device=device)


class GrammarMatcher(abc.ABC):
    """The state of one request's constraint."""

    @abc.abstractmethod
    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over accepted tokens; False if one is not allowed (the matcher is then in error)."""

    @abc.abstractmethod
    def validate_tokens(self, token_ids: list[int]) -> int:
        """How many of token_ids, in order, the grammar allows from here (nothing is advanced)."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete and allows nothing more: only EOS may follow."""

    @abc.abstractmethod
    def error(self) -> str | None:
        """Why the matcher failed (a token it did not allow, a resource limit), or None."""


class CompiledGrammar(abc.ABC):
    """A constraint compiled for one vocabulary: shared by every request with the same spec."""

    @abc.abstractmethod
    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the grammar (cheap)."""


class StructuredOutputBackend(abc.ABC):
    """Compiles specs into grammars for one tokenizer's vocabulary and fills batch bitmasks."""

    @abc.abstractmethod
    def compile(self, spec: StructuredOutputSpec) -> CompiledGrammar:
        """Compile a spec (may be slow: the manager runs it off the engine loop and caches it by spec). Raises
        StructuredOutputError naming the problem for an invalid spec."""

    @abc.abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, rows: list[tuple[GrammarMatcher, int, list[int]]]) -> None:
        """For each (matcher, row, draft tokens): write the tokens allowed next into bitmask[row], and, for draft
        token i, those allowed after it into bitmask[row + 1 + i], as long as the drafts before it are allowed
        (rows after the first draft the grammar rejects are left as they were). Matchers end where they began."""
