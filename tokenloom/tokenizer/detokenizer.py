"""Streaming detokenization: generated token ids -> text deltas as they arrive."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:
    from tokenloom.tokenizer.hf import Tokenizer

_PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET)


class IncrementalDetokenizer:
    """Turns generated token ids into text deltas as they arrive (vLLM's prefix/read-offset scheme).

    `add(ids)` returns only the newly completed text; text is held back while the decoded tail ends in
    U+FFFD (a multi-byte character split across byte tokens). Each step decodes only the few tokens since
    the last emitted boundary, so the cost per token is O(1) amortized.

    Without `prompt_ids` the concatenated deltas equal ``tokenizer.decode(generated, skip_special_tokens)``.
    With `prompt_ids`, the last few prompt tokens are decoding context, so the first token is rendered as a
    continuation of the prompt (for SentencePiece models a leading ``'▁'`` then stays a space instead of being
    stripped as at the start of a sequence); for byte-level BPE the result is the same.
    Call `flush()` at the end to get text still held back (only when generation stopped mid-character).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] | None = None,
                 skip_special_tokens: bool = True):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self._pieces: list[str] = []
        self._text_cache: str | None = ""
        self._num_generated = 0
        if prompt_ids:
            ctx = list(prompt_ids[-_PROMPT_CONTEXT:])
            ctx_text = self._decode(ctx)
            # a prompt ending mid-character would make the first delta ambiguous: decode without context then
            if not ctx_text.endswith("\ufffd"):
                self._ids = ctx
                self._read = len(ctx)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Append generated token id(s); return the text they completed ('' while a character is pending)."""
        try:
            new = [int(t) for t in token_ids]
        except TypeError:  # a single id (int, numpy/torch scalar)
            new = [int(token_ids)]
        if not new:
            return ""
        self._ids.extend(new)
        self._num_generated += len(new)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix = self._read
        self._read = len(self._ids)
        self._pieces.append(delta)
        self._text_cache = None
        return delta

    def flush(self) -> str:
        """Emit whatever is still held back (a trailing incomplete character decodes to U+FFFD)."""
        if self._read >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._prefix = self._read
        self._read = len(self._ids)
        if len(new_text) <= len(prefix_text):
            return ""
        delta = new_text[len(prefix_text):]
        self._pieces.append(delta)
        self._text_cache = None
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if self._text_cache is None:
            self._text_cache = "".join(self._pieces)
            self._pieces = [self._text_cache]
        return self._text_cache

    @property
    def num_tokens(self) -> int:
        """Generated tokens seen so far."""
        return self._num_generated
