"""The backend interface of structured output: compile, fill a bitmask for the batch, accept tokens, roll back."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Literal

import torch

SpecKind = Literal["json", "json_object", "regex", "choice", "grammar"]


@dataclass(frozen=True)
class StructuredOutputSpec:
    """A request's constraint, hashable so compiled grammars are cached by it."""
    kind: SpecKind
    value: str  # the JSON schema (serialised), the regex, the choices (JSON list) or the grammar text

    def __post_init__(self):
        if self.kind not in ("json", "json_object", "regex", "choice", "grammar"):
            raise ValueError(f"unknown structured output kind '{self.kind}'")


def allocate_token_bitmask(batch_size: int, vocab_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The packed mask the backends fill: int32 [batch, ceil(vocab / 32)], bit i of word j allows token 32j + i
    (the layout xgrammar and llguidance use). All bits set = no constraint."""
    return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32, device=device)


class GrammarMatcher(abc.ABC):
    """The state of one request's constraint."""

    @abc.abstractmethod
    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the tokens allowed next into bitmask[row]."""

    @abc.abstractmethod
    def accept_tokens(self, token_ids: list[int]) -> bool:
        """Advance over accepted tokens; False if one is not allowed (the request then ends with an error)."""

    @abc.abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Undo the last num_tokens accepted tokens (rejected speculative tokens)."""

    @abc.abstractmethod
    def is_terminated(self) -> bool:
        """The grammar is complete: only EOS may follow."""


class StructuredOutputBackend(abc.ABC):
    """Compiles specs into matchers for one tokenizer's vocabulary."""

    @abc.abstractmethod
    def compile(self, spec: StructuredOutputSpec) -> GrammarMatcher:
        """A fresh matcher for the spec (compilation cached by spec; may be slow, so run off the engine loop)."""
