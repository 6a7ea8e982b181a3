"""The "ray" backend: ranks 1..N-1 as Ray actors, one per bundle of a placement group over the Ray cluster's
nodes (the engine's process joins the cluster it finds: `ray start --head` then `ray start --address ...` on each
machine). TOKENLOOM_RAY_PLACEMENT: the group's strategy, PACK by default (fill one node first); SPREAD or
STRICT_SPREAD put ranks on different nodes. The engine's rank 0 is reached at this node's IP address."""
from __future__ import annotations

import os

from tokenloom.config import TokenloomError
from tokenloom.distributed import RankInfo


def _ray():
    try:
        import ray
    except ImportError:
        raise TokenloomError("distributed_executor_backend 'ray' needs Ray: pip install 'tokenloom[ray]'") from None
    return ray


class RayWorkers:
    def __init__(self):
        self.ray = _ray()
        if not self.ray.is_initialized():
            self.ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), log_to_driver=False)
        self.actors: dict[int, object] = {}
        self.runs: dict[int, object] = {}
        self.placement = None
        self._dead: dict[int, str] = {}
        self._node_ids: dict[int, str] = {}

    def master_addr(self, addr: str) -> str:
        return self.ray.util.get_node_ip_address() if addr in ("127.0.0.1", "localhost") else addr

    def start(self, config, source, dtype, rank0: RankInfo, host: str, port: int) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        n = rank0.world_size - 1
        strategy = os.environ.get("TOKENLOOM_RAY_PLACEMENT", "PACK")
        self.placement = ray.util.placement_group([{"CPU": 1}] * n, strategy=strategy)
        try:
            ray.get(self.placement.ready(), timeout=config.parallel.worker_start_timeout_s)
        except Exception as exc:
            raise TokenloomError(f"the Ray cluster has no room for {n} worker(s) ({strategy}): {exc}") from None
        actor_cls = ray.remote(num_cpus=1)(_RankActor)
        for r in range(1, rank0.world_size):
            actor = actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.placement, placement_group_bundle_index=r - 1)).remote()
            self.actors[r] = actor
        # asked before run() starts: an actor runs one method at a time and run() lasts as long as the model
        self._node_ids = dict(zip(self.actors, ray.get(
            [a.node_id.remote() for a in self.actors.values()], timeout=config.parallel.worker_start_timeout_s)))
        for r, actor in self.actors.items():
            info = RankInfo(r, rank0.tensor_parallel_size, rank0.pipeline_parallel_size)
            self.runs[r] = actor.run.remote(config, source, dtype, info, host, port)

    def node_ids(self) -> dict[int, str]:
        """The Ray node each rank > 0 runs on."""
        return dict(self._node_ids)

    def dead(self) -> int | None:
        if self._dead:
            return next(iter(self._dead))
        finished, _ = self.ray.wait(list(self.runs.values()), timeout=0, num_returns=len(self.runs)) \
            if self.runs else ([], [])
        for r, ref in self.runs.items():
            if ref in finished:
                try:
                    self.ray.get(ref)
                    self._dead[r] = "returned"
                except Exception as exc:  # noqa: BLE001 - the actor's error is the reason
                    self._dead[r] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                return r
        return None

    def exit_reason(self, rank: int | None) -> str:
        return self._dead.get(rank, "still running")

    def stop(self) -> None:
        for actor in self.actors.values():
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if self.placement is not None:
            try:
                self.ray.util.remove_placement_group(self.placement)
            except Exception:  # noqa: BLE001
                pass
        self.actors.clear()
        self.runs.clear()


class _RankActor:
    def run(self, config, source, dtype, rank, host, port) -> None:
        from tokenloom.worker.parallel_worker import follow

        follow(config, source, dtype, rank, host, port)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()
