"""The ranks beyond the engine's own (tensor / pipeline parallel), and how rank 0 leads them.

Rank 0 runs in the engine's process with the full model runner: it schedules nothing itself but holds the
requests, samples, verifies drafts and fills grammar masks, exactly as one process does. Its model is wrapped in
a `LeaderModel`: before each forward pass (and each LM-head call under tensor parallelism) it broadcasts the
call's inputs (token ids, positions and the step's forward context) to the other ranks, which make the same call
on their share of the model, so every collective inside the layers meets its peers. The other ranks keep no
request state at all; a step costs them one small message.

A rank runs `follow(...)` as a local process ("mp") or inside a Ray actor ("ray"): it joins the group, loads its
share of the model, sizes its KV cache as rank 0 says, then answers messages until told to stop. When rank 0
goes away its next receive fails and it exits.
"""
from __future__ import annotations

import logging
import os

import torch

from tokenloom.distributed import ParallelGroup, RankInfo
from tokenloom.model_executor.forward_context import get_forward_context, set_forward_context
from tokenloom.model_executor.sequence_forward import SequenceForward
from tokenloom.worker.executor import model_bytes
from tokenloom.worker.model_loading import load_worker_model
from tokenloom.worker.model_runner import ModelRunner

log = logging.getLogger("tokenloom")

FORWARD, LOGITS, HIDDEN, COPY_BLOCKS, RELEASE, MEMORY, INIT, STOP = (
    "forward", "logits", "hidden", "copy", "release", "memory", "init", "stop")


class LeaderModel:
    """Rank 0's model: each call is first announced to the other ranks (see the module's docstring)."""

    def __init__(self, model, group: ParallelGroup, tensor_parallel: bool):
        self.model, self.group, self.tensor_parallel = model, group, tensor_parallel

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.group.broadcast_object((FORWARD, input_ids, positions, get_forward_context(), False))
        hidden = self.model(input_ids, positions)
        self.group.wait_sends()
        return hidden

    def forward_microbatches(self, parts: list) -> torch.Tensor:
        """Pipeline parallel: [(input_ids, positions, ForwardContext)] of one step, each part sent down the stages
        as soon as this rank's layers are done with it, so the stages overlap; the final hidden states of all
        parts, in order."""
        tail = self.model.pipeline_tail
        tail.deferred = True
        try:
            for i, (input_ids, positions, context) in enumerate(parts):
                self.group.broadcast_object((FORWARD, input_ids, positions, context, i > 0))
                with set_forward_context(context):
                    self.model(input_ids, positions)
            outs = []
            for input_ids, _, _ in parts:
                x = torch.empty(len(input_ids), self.model.config.hidden_size, dtype=self.model.norm.weight.dtype)
                outs.append(self.model.norm(tail.group.recv(x, tail.peer)))
        finally:
            tail.deferred = False
        self.group.wait_sends()
        return torch.cat(outs)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.tensor_parallel:  # the vocabulary-parallel head gathers every rank's share
            self.group.broadcast_object((LOGITS, hidden))
        return self.model.compute_logits(hidden)

    def __getattr__(self, name):
        return getattr(self.model, name)


def hidden_states(model, token_ids: list[int]) -> torch.Tensor:
    """One sequence's final hidden states over a scratch cache (embeddings), on any rank."""
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.norm.weight.device)
    return SequenceForward(model, len(token_ids)).hidden(ids)


def memory_of(runner: ModelRunner, group: ParallelGroup) -> list[tuple[int, int]]:
    """(weight bytes, KV cache bytes) of every rank, in rank order (a collective: every rank calls it)."""
    model = runner.model.model if isinstance(runner.model, LeaderModel) else runner.model
    mine = torch.tensor([model_bytes(model), runner.cache.nbytes], dtype=torch.long)
    return [tuple(t.tolist()) for t in group.all_gather(mine)]


def _threads_per_rank(world_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // world_size)


@torch.inference_mode()
def follow(config, source, dtype: torch.dtype, rank: RankInfo, host: str, port: int) -> None:
    """Rank `rank.rank` > 0: join, load, then run what rank 0 broadcasts until STOP (or rank 0 is gone)."""
    device = torch.device(config.device)
    if device.type == "cpu":
        torch.set_num_threads(_threads_per_rank(rank.world_size))
    group = ParallelGroup(rank, host, port, device, config.parallel.worker_start_timeout_s)
    model, _ = load_worker_model(source, dtype, device, config.quantization, rank, group)
    kind, num_blocks = group.broadcast_object()
    assert kind == INIT
    runner = ModelRunner(model, config.cache, num_blocks, device, torch.Generator(device), compiled_decode=False)
    if device.type == "cpu":
        from tokenloom.model_executor.layers.linear import pack_linear_layers

        pack_linear_layers(model)
    group.barrier()  # ready
    while True:
        try:
            op, *args = group.broadcast_object()
        except RuntimeError as exc:  # rank 0 went away
            log.info("tokenloom rank %d: leaving (%s)", rank.rank, exc)
            return
        if not (op == FORWARD and args[-1]):  # a later micro-batch of the step: earlier sends may be in flight
            group.wait_sends()
        if op == STOP:
            return
        if op == MEMORY:
            memory_of(runner, group)
        else:
            _apply(runner, op, args)  # an error here ends this rank with its traceback; rank 0 reports it


def _apply(runner: ModelRunner, op: str, args: list) -> None:
    model = runner.model
    if op == FORWARD:
        input_ids, positions, context, _ = args
        with set_forward_context(context):
            model(input_ids, positions)
    elif op == LOGITS:
        model.compute_logits(args[0])
    elif op == HIDDEN:
        hidden_states(model, args[0])
    elif op == COPY_BLOCKS:
        runner.cache.copy_blocks(args[0])
    elif op == RELEASE:
        runner.cache.release_blocks(args[0])
    else:
        raise RuntimeError(f"unknown message {op!r} from rank 0")
