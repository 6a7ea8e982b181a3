"""CUDA graphs for pure-decode steps: the layer-by-layer forward and the LM head, captured once per bucket and
replayed, as vLLM's and nano-vllm's model runners do.

A decode step of a small model on a GPU is mostly kernel launches from Python: hundreds of small kernels whose
launch costs more than their work. A CUDA graph records them once and replays them with one call. A graph
replays fixed shapes and fixed addresses, so a step runs in a bucket: its batch padded to the next of 1, 2, 4, 8,
..., up to the first power of two at or above max_num_seqs (at most MAX_BATCH), and its block tables padded to a
width of MIN_CONTEXT tokens doubled until they fit (at most the context window). Each bucket's inputs live in one
static int64 buffer (token ids, positions, context lengths, block table) that a step fills with one copy; the
attention metadata is made from it inside the graph (attention.build_decode_metadata: every sequence attends over
the bucket's width of keys, those past its context masked). Pad rows (token 0 at position 0, context 1) write
and read only a scratch block that the scheduler never hands out: the executor allocates one block more than it
reports, `pad_block`. Graphs are captured on a bucket's first use, all in one memory pool.

What is captured: steps whose every sequence decodes one token (the prompt's last or later), with no draft tokens
and no LoRA adapter, at most MAX_BATCH sequences, with block tables no wider than the context window. Everything
else (prefill and chunked prefill, mixed steps, prompt logprobs, draft verification, wider batches) runs the
layers eagerly, as on the CPU. The executor sets graphs up only on CUDA (off_reason), never for speculative
decoding, LoRA, MoE models (their routing reads expert counts on the host) or with TOKENLOOM_CUDA_GRAPHS=0 /
EngineConfig.enforce_eager. A capture that fails turns graphs off for the engine, with a warning.

Only CudaGraph touches CUDA. On any other device EagerGraph stands in for it (the "replay" runs the same forward
over the same static buffers), so the buckets, padding, buffers and fallbacks are tested on the CPU.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import numpy as np
import torch

from tokenloom.kernels.transfer import copy_from_host, to_device
from tokenloom.model_executor.forward_context import ForwardContext, set_forward_context
from tokenloom.model_executor.layers.attention import build_decode_metadata

log = logging.getLogger("tokenloom")

ENV = "TOKENLOOM_CUDA_GRAPHS"  # 0 / false / off: every step eager
MAX_BATCH = 256  # the widest batch bucket (a power of two)
MIN_CONTEXT = 256  # tokens of the narrowest block-table bucket

Bucket = tuple[int, int]  # (batch size, block-table width in blocks)


def off_reason(config, model_config, device: torch.device) -> str | None:
    """Why decode steps of this engine are not replayed from CUDA graphs (None: they are)."""
    if device.type != "cuda":
        return "not a CUDA device"
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV}=0"
    if getattr(config, "enforce_eager", False):
        return "enforce_eager"
    if config.speculative is not None:
        return "speculative decoding"
    if config.lora is not None:
        return "LoRA"
    if config.parallel.world_size > 1:
        return "tensor / pipeline parallel"
    if model_config.num_experts:
        return "mixture of experts (routing reads expert counts on the host)"
    return None


def batch_buckets(max_num_seqs: int, cap: int = MAX_BATCH) -> tuple[int, ...]:
    """Batch sizes captured: 1, 2, 4, ... up to the first power of two >= max_num_seqs, at most cap."""
    sizes = [1]
    while sizes[-1] < min(max_num_seqs, cap):
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


def smallest_fit(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest of sizes (ascending) >= n, None past the last."""
    return next((s for s in sizes if s >= n), None)


def width_bucket(blocks: int, min_blocks: int, max_blocks: int) -> int | None:
    """Block-table width for tables of up to `blocks` blocks: min_blocks doubled until it fits, at most
    max_blocks; None past max_blocks."""
    if blocks > max_blocks:
        return None
    width = min_blocks
    while width < blocks:
        width *= 2
    return min(width, max_blocks)


def is_plain_decode(item) -> bool:
    """A scheduled item a graph can run: one new token (the prompt's last or later), no drafts, no adapter."""
    req = item.request
    return (item.num_tokens == 1 and not item.spec_token_ids and req.lora_request is None
            and req.num_computed_tokens >= req.num_prompt_tokens - 1)


class StaticInputs:
    """One bucket's inputs on the device: views of one int64 buffer, so that a step's inputs are one copy."""

    def __init__(self, size: int, width: int, device: torch.device):
        self.size, self.width = size, width
        self.packed = torch.zeros(size * (3 + width), dtype=torch.long, device=device)
        self.input_ids, self.positions, self.context_lens, self.block_table = split_packed(self.packed, size, width)


def split_packed(packed: torch.Tensor, size: int, width: int) -> tuple[torch.Tensor, ...]:
    """(input_ids [B], positions [B], context_lens [B], block_table [B, W]) views of a packed buffer."""
    B = size
    return packed[:B], packed[B : 2 * B], packed[2 * B : 3 * B], packed[3 * B :].view(B, width)


def pack_inputs(input_ids: torch.Tensor, positions: torch.Tensor, context_lens: list[int],
                block_tables: list[list[int]], size: int, width: int, pad_block: int) -> torch.Tensor:
    """The host copy of a bucket's packed inputs: the batch's rows (tables padded with block 0, masked), then pad
    rows up to `size`: token 0 at position 0, context 1, every block `pad_block`."""
    n = len(context_lens)
    host = np.zeros(size * (3 + width), dtype=np.int64)
    host[:n] = input_ids.cpu().numpy()
    host[size : size + n] = positions.cpu().numpy()
    host[2 * size : 2 * size + n] = context_lens
    host[2 * size + n : 3 * size] = 1
    table = host[3 * size :].reshape(size, width)
    table[n:] = pad_block
    for i, blocks in enumerate(block_tables):
        table[i, : len(blocks)] = blocks
    return torch.from_numpy(host)


class EagerGraph:
    """Stands in for a CUDA graph off CUDA (tests): replay() runs the captured function again, over the same
    static buffers."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool=None):
        self.fn, self.pool = fn, None
        self.output = fn()

    def replay(self) -> torch.Tensor:
        self.output = self.fn()
        return self.output


class CudaGraph:
    """fn's kernels captured in a CUDA graph (after a warm-up run on a side stream, so lazy initialisations such as
    cuBLAS workspaces happen outside the capture); replay() reruns them and returns the same output tensor."""

    def __init__(self, fn: Callable[[], torch.Tensor], pool=None):
        self.pool = torch.cuda.graph_pool_handle() if pool is None else pool
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a server's other engine threads (other models) may launch work on the GPU meanwhile
        with torch.cuda.graph(self.graph, pool=self.pool, capture_error_mode="thread_local"):
            self.output = fn()
        torch.cuda.synchronize()

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.output


class DecodeGraphs:
    """The runner's decode graphs: plan() says whether a step runs in one (and which bucket), logits() replays it."""

    def __init__(self, model, block_size: int, pad_block: int, max_model_len: int, max_num_seqs: int,
                 device: torch.device, capture: Callable | None = None):
        cfg = model.config
        self.model, self.block_size, self.pad_block, self.device = model, block_size, pad_block, device
        self.group_size = cfg.num_heads // cfg.num_kv_heads
        self.sliding_window = cfg.sliding_window
        self.batch_sizes = batch_buckets(max_num_seqs)
        self.max_blocks = -(-max_model_len // block_size)
        self.min_blocks = min(self.max_blocks, -(-MIN_CONTEXT // block_size))
        self.capture = capture or (CudaGraph if device.type == "cuda" else EagerGraph)
        self.graphs: dict[Bucket, tuple[StaticInputs, object]] = {}
        self.pool = None  # the memory pool every graph shares (made by the first capture)
        self.disabled: str | None = None  # why graphs went off (a capture failed)
        self.replays = 0

    def plan(self, scheduled: list) -> Bucket | None:
        """The bucket a step of these scheduled items replays in, or None: it runs the layers eagerly."""
        if self.disabled is not None or not scheduled or not all(is_plain_decode(item) for item in scheduled):
            return None
        size = smallest_fit(len(scheduled), self.batch_sizes)
        width = width_bucket(max(len(item.request.block_table) for item in scheduled), self.min_blocks,
                             self.max_blocks)
        return None if size is None or width is None else (size, width)

    def logits(self, batch, bucket: Bucket) -> torch.Tensor | None:
        """float32 logits [sampled rows, V] of a pure-decode InputBatch (built on the host) by replaying its
        bucket's graph, captured first if new; None if the capture failed (the step runs eagerly)."""
        entry = self.graphs.get(bucket) or self._capture(bucket)
        if entry is None:
            return None
        inputs, graph = entry
        n = len(batch.query_lens)
        copy_from_host(inputs.packed, pack_inputs(batch.input_ids, batch.positions, batch.context_lens,
                                                  batch.block_tables, *bucket, self.pad_block))
        self.replays += 1
        logits = graph.replay()[:n]
        rows = batch.sample_rows
        if rows == list(range(n)):
            return logits
        return logits[to_device(torch.tensor(rows), logits.device)]  # forks of n > 1 share their parent's row

    def _capture(self, bucket: Bucket):
        size, width = bucket
        inputs = StaticInputs(size, width, self.device)
        empty = torch.zeros(0, dtype=torch.long)
        # every row a pad row: valid inputs for the warm-up and capture runs, which write only the scratch block
        copy_from_host(inputs.packed, pack_inputs(empty, empty, [], [], size, width, self.pad_block))
        try:
            graph = self.capture(lambda: self._forward(inputs), self.pool)
        except Exception as e:  # noqa: BLE001 - any failure leaves the eager path, which always works
            self.disabled = f"capturing batch {size} x {width} blocks failed: {type(e).__name__}: {e}"
            log.warning("CUDA graphs off, decode steps run eagerly: %s", self.disabled)
            return None
        self.pool = graph.pool
        self.graphs[bucket] = (inputs, graph)
        log.debug("captured a decode graph for batch %d x %d blocks", size, width)
        return self.graphs[bucket]

    def _forward(self, inputs: StaticInputs) -> torch.Tensor:
        """What a graph holds: the attention metadata from the static inputs, the layers, the LM head."""
        meta = build_decode_metadata(inputs.positions, inputs.context_lens, inputs.block_table, self.block_size,
                                     self.group_size, self.sliding_window)
        with set_forward_context(ForwardContext(meta)):
            hidden = self.model(inputs.input_ids, inputs.positions)
        return self.model.compute_logits(hidden)
