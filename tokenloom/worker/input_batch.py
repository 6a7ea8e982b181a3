"""The step's inputs, flattened: every scheduled request's new tokens in one batch, with what attention needs to
find each sequence's context and which rows are sampled.

The worker reads the scheduler output's requests (prompt and output tokens, num_computed_tokens, block table,
sampling params, forks, draft tokens) and never changes them: the scheduler alone updates requests.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenloom.kernels.transfer import to_device


@dataclass
class SampleGroup:
    """The rows sampled for one request: its next token, and before it one row per draft token verified."""
    request: object
    rows: list[int]  # flat rows, in position order (the first predicts what follows the last accepted token)
    draft_token_ids: list[int] = field(default_factory=list)


@dataclass
class InputBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    samples: list[SampleGroup]
    prompt_logprob_spans: list[tuple[object, int, int, int]]  # (request, first flat row, rows, first position)
    lora_ids: list[int] = field(default_factory=list)  # per sequence: its adapter's id (0: the base model)
    prompt_lens: torch.Tensor | None = None  # [T] prompt length of each token's sequence (LongRoPE reads it)

    @classmethod
    def from_scheduled(cls, scheduled, device: torch.device) -> "InputBatch":
        input_ids, positions, query_lens, context_lens, tables, prompt_lens = [], [], [], [], [], []
        samples, prompt_lp = [], []
        offset = 0
        for item in scheduled:
            req, n, drafts = item.request, item.num_tokens, item.spec_token_ids
            start = req.num_computed_tokens
            end = start + n
            if n == 1 and req.output_token_ids:  # decode: only the last token is new
                input_ids.append(req.output_token_ids[-1])
            else:
                input_ids.extend(req.all_token_ids[start : end - len(drafts)])
            input_ids.extend(drafts)
            positions.append((start, end))
            query_lens.append(n)
            prompt_lens += [req.num_prompt_tokens] * n
            context_lens.append(end)
            tables.append(req.block_table)
            if req.params.prompt_logprobs is not None and start < req.num_prompt_tokens - 1:
                # Row p predicts prompt token p + 1.
                prompt_lp.append((req, offset, min(end, req.num_prompt_tokens - 1) - start, start))
            offset += n
            if end - len(drafts) == req.num_tokens:  # caught up: this step yields the request's next token(s)
                rows = list(range(offset - 1 - len(drafts), offset))
                samples.append(SampleGroup(req, rows, list(drafts)))
                # n > 1: every completion draws its first token from its parent's row
                samples += [SampleGroup(fork, rows[-1:]) for fork in req.forks]
        ids = to_device(torch.tensor(input_ids, dtype=torch.long), device)
        pos = to_device(torch.cat([torch.arange(s, e) for s, e in positions]), device)
        lora_ids = [item.request.lora_int_id for item in scheduled]
        return cls(ids, pos, query_lens, context_lens, tables, samples, prompt_lp, lora_ids,
                   to_device(torch.tensor(prompt_lens), device))

    @property
    def sample_rows(self) -> list[int]:
        return [r for g in self.samples for r in g.rows]
