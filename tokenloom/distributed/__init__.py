"""torch.distributed process groups for the ranks of one model (tensor / pipeline parallel).

Each engine builds its own group (a gloo group on the CPU, NCCL on CUDA) on its own TCP store instead of
torch.distributed's one global default group, so one process can hold several parallel models (a server with
many models) and the engine's process can be rank 0 of its model's group.
"""
from tokenloom.distributed.group import ParallelGroup, RankInfo, free_port

__all__ = ["ParallelGroup", "RankInfo", "free_port"]
