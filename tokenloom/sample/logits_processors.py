"""Logits processors: batched, in-place edits of the logits before the sampler's truncation and draw.

A processor's `apply(logits, metadata)` edits the [rows, V] float32 logits in place for the whole batch at once. The
built-ins run in this order (`default_processors()`):

  logit_bias -> repetition / presence / frequency penalties -> min_tokens EOS/stop ban
  -> per-request processors (SamplingRow.logits_processors) -> structured-output grammar bitmask

The first three are sparse: they write only at the positions `touched(metadata)` names (a handful of ids per row),
so the sampler can edit the caller's float32 logits in place and put those positions back afterwards. Dense
processors (sparse = False) make the sampler work on a copy. The grammar mask comes last so that nothing after it
can re-allow a token it forbids.
"""
from __future__ import annotations

import torch

from tokenloom.kernels.cpu_ops import ops_for
from tokenloom.sample.metadata import SamplingMetadata

NEG_INF = float("-inf")


class LogitsProcessor:
    """The interface: a batched, in-place edit of the logits."""

    sparse = False  # True: writes only at touched(metadata), so the edit can be undone by putting those back

    def active(self, metadata: SamplingMetadata) -> bool:
        """Whether this batch needs the processor at all."""
        return True

    def touched(self, metadata: SamplingMetadata) -> tuple[torch.Tensor, ...]:
        """Sparse processors: an index (as for logits[index]) covering every position apply may write."""
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, metadata: SamplingMetadata) -> None:
        raise NotImplementedError


class LogitBias(LogitsProcessor):
    """SamplingParams.logit_bias: added to the logits of the given token ids."""

    sparse = True

    def active(self, metadata):
        return metadata.logit_bias is not None

    def touched(self, metadata):
        return metadata.logit_bias[:2]

    def apply(self, logits, metadata):
        rows, cols, values = metadata.logit_bias
        logits.index_put_((rows, cols), logits[rows, cols] + values)


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
    """Repetition (transformers/CTRL: over prompt and output), then presence and frequency (OpenAI: over the
    output), in place. Only the logits of tokens a row has seen are touched: gathered, adjusted, scattered."""
    pen = metadata.penalties
    if pen is None:
        return logits
    vals = logits[pen.rows, pen.tokens]
    rep = pen.repetition.to(vals.dtype)
    vals = torch.where(vals > 0, vals / rep, vals * rep)
    # a penalty that is 0 in float32 sends logits to +inf (and a banned -inf to NaN): keep the row sampleable
    vals = vals.nan_to_num(nan=NEG_INF, posinf=torch.finfo(vals.dtype).max / 4, neginf=NEG_INF)
    if pen.counts is not None:
        c = pen.counts.to(vals.dtype)
        vals = vals - pen.frequency.to(vals.dtype) * c - pen.presence.to(vals.dtype) * (c > 0).to(vals.dtype)
    logits[pen.rows, pen.tokens] = vals
    return logits


class Penalties(LogitsProcessor):
    sparse = True

    def active(self, metadata):
        return metadata.penalties is not None

    def touched(self, metadata):
        return metadata.penalties.rows, metadata.penalties.tokens

    def apply(self, logits, metadata):
        apply_penalties(logits, metadata)


class MinTokensBan(LogitsProcessor):
    """Until a row has min_tokens output tokens, its EOS and stop_token_ids are banned (-inf)."""

    sparse = True

    def active(self, metadata):
        return metadata.banned is not None

    def touched(self, metadata):
        return metadata.banned

    def apply(self, logits, metadata):
        logits.index_put_(metadata.banned, torch.tensor(NEG_INF, dtype=logits.dtype, device=logits.device))


class RequestProcessors(LogitsProcessor):
    """The extension point for per-request processors: each row's SamplingRow.logits_processors, in order, each
    called as proc(output_token_ids, logits_row) -> the new row."""

    def active(self, metadata):
        return bool(metadata.request_processors)

    def apply(self, logits, metadata):
        for i, output_ids, procs in metadata.request_processors:
            row = logits[i]
            for proc in procs:
                row = proc(output_ids, row)
            logits[i] = row


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """In place: -inf wherever a packed grammar bitmask forbids a token. bitmask: int32 [n, ceil(V / 32)], bit b of
    word w (least significant first) set = token 32 * w + b allowed (xgrammar's / llguidance's layout); its row k
    applies to logits row rows[k] (every row in order when rows is None). Tokens past 32 x the bitmask's width
    (a padded vocabulary) are left as they are, as xgrammar does. float32 logits on the CPU take the compiled
    kernel (one pass over the packed words; the torch ops below expand every bit and cost ~15 ms at 32 x 49k)."""
    ops = ops_for(logits) if logits.dtype == torch.float32 else None
    if ops is not None and logits.stride(1) == 1:
        index = torch.empty(0, dtype=torch.long, device=logits.device) if rows is None else rows.to(dtype=torch.long)
        ops.apply_token_bitmask_(logits, bitmask.to(dtype=torch.int32).contiguous(), index.contiguous())
        return
    n = min(logits.shape[1], bitmask.shape[1] * 32)
    shifts = torch.arange(32, dtype=torch.int32, device=logits.device)
    bits = (bitmask.to(device=logits.device, dtype=torch.int32)[:, :, None] >> shifts) & 1
    forbidden = (bits == 0).flatten(1)[:, :n]
    if rows is None:
        logits[:, :n].masked_fill_(forbidden, NEG_INF)
    else:
        logits[rows, :n] = logits[rows, :n].masked_fill_(forbidden, NEG_INF)


class GrammarBitmask(LogitsProcessor):
    """The grammar-mask hook: structured output's packed bitmask (SamplingMetadata.token_bitmask)."""

    def active(self, metadata):
        return metadata.token_bitmask is not None

    def apply(self, logits, metadata):
        apply_token_bitmask(logits, metadata.token_bitmask, metadata.bitmask_rows)


def default_processors() -> list[LogitsProcessor]:
    return [LogitBias(), Penalties(), MinTokensBan(), RequestProcessors(), GrammarBitmask()]
