"""`tokenloom plan`: how to serve a model at a target load within latency SLOs, and what it costs, from
roofline bounds (bench/economics.py) on an accelerator of the table (bench/hardware.py) or on this machine
(`--cpu`: its measured roofs, bench/roofline.py).

Per layout (tensor parallel tp x pipeline stages pp, replicated), with R = tp x pp ranks, B the sequences a
pipeline stage decodes together, P the prompt and O the output length:

- weights per rank = weight bytes / R; KV per token per rank = layers/pp x 2 x ceil(kv_heads/tp) x head_dim x
  bytes (KV heads replicate once tp passes their number); free = memory x utilisation - weights - reserve; the KV
  tokens that fit, and the sequences (P + O tokens each) a replica holds at once.
- a decode step of one stage: max(memory time, compute time) + all-reduces, where memory time = (weights read at
  batch B + B x KV read at context P + O/2) / R / (bandwidth x decode efficiency), compute time = B x FLOPs per
  token / R / (GEMM peak x prefill efficiency), and each of a stage's layers all-reduces twice (attention and MLP
  outputs, B x hidden x 2 bytes, ring: 2 (tp - 1)/tp of it over the link, plus a fixed latency). A token passes
  every stage: TPOT(B) = pp x stage step + (pp - 1) hand-offs; pp micro-batches of B are in flight.
- prefill of a prompt: max(FLOPs / (tp x peak x efficiency), weights / tp / bandwidth) + its all-reduces.
- a replica serving q requests/s spends rho = q x prefill of its time on prompts; decoding then runs at
  TPOT_eff = TPOT(B) / (1 - rho), TTFT = prefill / (1 - rho) + TPOT(B) (an M/D/1-like queue on prefill plus the
  step a new prompt waits for), and Little's law needs q x O x TPOT_eff <= pp x B. Per layout the plan takes the
  batch B (up to what KV and --max-num-seqs allow) that gives the most q meeting both SLOs, then the replicas
  that carry --target-qps, their $/h and $ per 1M tokens, and picks the cheapest layout meeting the SLOs.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from tokenloom.bench import economics as E
from tokenloom.bench.hardware import Accelerator
from tokenloom.config import ModelConfig, TokenloomError

# Typical shares of the roofs real serving reaches (the user may override them): decode streams weights at ~70 %
# of HBM bandwidth in vLLM / TensorRT-LLM at small batch, large prefill GEMMs reach ~50-60 % MFU. On CPUs, as
# measured with tokenloom's default model on its 2-core development VM: decode reaches about half of a big-buffer
# read bandwidth, prefill 10-15 % of the bf16 GEMM peak (GGUF weights are dequantized per call, prompts are short).
GPU_EFFICIENCY = (0.7, 0.55)
CPU_EFFICIENCY = (0.5, 0.15)


@dataclass
class PlanInputs:
    target_qps: float = 1.0
    prompt_len: int = 1024
    output_len: int = 256
    slo_ttft_ms: float = 1000.0
    slo_tpot_ms: float = 100.0
    max_num_seqs: int = 256
    memory_utilization: float = 0.9
    reserve_gb: float = 2.0  # per rank: activations, CUDA graphs, the runtime
    decode_efficiency: float = GPU_EFFICIENCY[0]
    prefill_efficiency: float = GPU_EFFICIENCY[1]
    price_per_hour: float | None = None  # $ per device-hour (CPU: per machine-hour)
    max_tp: int = 8
    max_pp: int = 8

    def __post_init__(self):
        if self.target_qps <= 0:
            raise TokenloomError(f"--target-qps must be > 0, not {self.target_qps:g}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise TokenloomError("--prompt-len and --output-len must be >= 1")
        if self.slo_ttft_ms <= 0 or self.slo_tpot_ms <= 0:
            raise TokenloomError("--slo-ttft-ms and --slo-tpot-ms must be > 0")
        for name in ("decode_efficiency", "prefill_efficiency", "memory_utilization"):
            if not 0 < getattr(self, name) <= 1:
                raise TokenloomError(f"{name.replace('_', '-')} must be in (0, 1]")


@dataclass
class PlanModel:
    name: str
    config: ModelConfig
    weight_dtype: str
    weight_bytes: float  # all weights as stored
    kv_dtype: str = "bf16"

    def decode_weight_bytes(self, batch: int) -> float:
        """Bytes a decode step of `batch` reads: the analytic count in the model's dtype, scaled to its real size
        (a GGUF file's tensors as they are)."""
        analytic = E.decode_weight_bytes(self.config, self.weight_dtype, batch)
        return analytic * self.weight_bytes / E.weight_bytes(self.config, self.weight_dtype)


def _allreduce_s(hw: Accelerator, tp: int, nbytes: float) -> float:
    if tp <= 1:
        return 0.0
    return hw.link_latency_us * 1e-6 + 2 * (tp - 1) / tp * nbytes / (hw.link_gbs * 1e9)


def _peak(hw: Accelerator, dtype: str) -> float:
    """GEMM FLOP/s the weights run at: fp8 weights on fp8 tensor cores where there are any, else bf16."""
    if dtype.lower() == "fp8" and hw.fp8_tflops:
        return hw.fp8_tflops * 1e12
    return hw.bf16_tflops * 1e12


class Layout:
    """One (tp, pp) layout's bounds."""

    def __init__(self, model: PlanModel, hw: Accelerator, inp: PlanInputs, tp: int, pp: int):
        self.model, self.hw, self.inp, self.tp, self.pp = model, hw, inp, tp, pp
        cfg = model.config
        self.ranks = tp * pp
        self.ctx = inp.prompt_len + inp.output_len // 2
        self.weights_per_rank = model.weight_bytes / self.ranks
        kv_heads_rank = math.ceil(cfg.num_kv_heads / tp)
        self.kv_share = kv_heads_rank / cfg.num_kv_heads / pp  # of the whole model's KV, per rank
        self.kv_per_token_rank = E.kv_bytes_per_token(cfg, model.kv_dtype) * self.kv_share
        free = hw.memory_gb * 1e9 * inp.memory_utilization - self.weights_per_rank - inp.reserve_gb * 1e9
        self.fits = free > 0
        self.kv_tokens_per_rank = max(0, int(free / self.kv_per_token_rank)) if self.fits else 0
        self.max_seqs = self.kv_tokens_per_rank // (inp.prompt_len + inp.output_len)
        self.peak = _peak(hw, model.weight_dtype) * inp.prefill_efficiency
        self.bw = hw.bandwidth_gbs * 1e9 * inp.decode_efficiency
        self.prefill_s = self._prefill_s()

    def _prefill_s(self) -> float:
        cfg, p = self.model.config, self.inp.prompt_len
        compute = E.prefill_flops(cfg, p) / (self.tp * self.peak)
        memory = self.model.decode_weight_bytes(p) / self.tp / self.bw
        comm = cfg.num_layers * 2 * _allreduce_s(self.hw, self.tp, p * cfg.hidden_size * 2)
        return max(compute, memory) + comm

    def tpot_s(self, batch: int) -> float:
        """Time per output token of a stage batch of `batch` sequences, the pipeline's stages in turn."""
        cfg = self.model.config
        layers = cfg.num_layers / self.pp
        weights = self.model.decode_weight_bytes(batch) / self.ranks
        kv = batch * E.kv_bytes_read(cfg, self.ctx, self.model.kv_dtype) * self.kv_share
        memory = (weights + kv) / self.bw
        compute = batch * E.decode_flops_per_token(cfg, self.ctx) / self.ranks / self.peak
        comm = layers * 2 * _allreduce_s(self.hw, self.tp, batch * cfg.hidden_size * 2)
        handoff = _allreduce_s(self.hw, 2, batch * cfg.hidden_size * 2) if self.pp > 1 else 0.0
        return self.pp * (max(memory, compute) + comm) + (self.pp - 1) * handoff

    def max_qps(self, batch: int) -> float:
        """The most requests/s one replica carries at stage batch `batch` within both SLOs (0: none)."""
        inp, p = self.inp, self.prefill_s
        tpot, out = self.tpot_s(batch), inp.output_len
        ttft_slo, tpot_slo = inp.slo_ttft_ms / 1000, inp.slo_tpot_ms / 1000
        if tpot > tpot_slo or ttft_slo <= tpot + p:
            return 0.0
        little = self.pp * batch / (out * tpot + self.pp * batch * p)
        by_tpot = (1 - tpot / tpot_slo) / p
        by_ttft = (1 - p / (ttft_slo - tpot)) / p
        return max(0.0, min(little, by_tpot, by_ttft))

    def batches(self) -> list[int]:
        cap = min(self.max_seqs // self.pp, self.inp.max_num_seqs)
        sizes = {b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if b <= cap} | ({cap} if cap else set())
        return sorted(sizes)

    def evaluate(self) -> dict:
        inp = self.inp
        best_b, best_q = 1, 0.0
        for b in self.batches():
            q = self.max_qps(b)
            if q > best_q:
                best_b, best_q = b, q
        meets = self.fits and best_q > 0
        replicas = math.ceil(inp.target_qps / best_q - 1e-9) if meets else 0
        res = {"tp": self.tp, "pp": self.pp, "ranks": self.ranks, "fits": self.fits, "meets_slo": meets,
               "weights_per_rank_gb": self.weights_per_rank / 1e9, "kv_bytes_per_token_rank": self.kv_per_token_rank,
               "kv_tokens_per_rank": self.kv_tokens_per_rank, "max_concurrent_seqs": self.max_seqs,
               "prefill_tok_s": inp.prompt_len / self.prefill_s, "prefill_ms": self.prefill_s * 1e3,
               "batch": best_b, "tpot_ms_at_batch": self.tpot_s(best_b) * 1e3, "tpot_ms_batch1": self.tpot_s(1) * 1e3,
               "decode_tok_s_at_batch": self.pp * best_b / self.tpot_s(best_b), "qps_per_replica": best_q,
               "replicas": replicas, "devices": replicas * self.ranks}
        res.update(self._at_target(replicas, best_b) if meets else {"ttft_ms": None, "tpot_ms": None})
        price = inp.price_per_hour
        res["usd_per_hour"] = price * res["devices"] if price is not None and meets else None
        tok_s = inp.target_qps * inp.output_len
        res["usd_per_million_output_tokens"] = E.cost_per_million(res["usd_per_hour"], tok_s)
        res["usd_per_million_tokens"] = E.cost_per_million(res["usd_per_hour"],
                                                           inp.target_qps * (inp.prompt_len + inp.output_len))
        return res

    def _at_target(self, replicas: int, max_batch: int) -> dict:
        """TTFT and TPOT each replica sees at its share of the target load (the batch it then runs: Little)."""
        q = self.inp.target_qps / replicas
        rho = q * self.prefill_s
        b = 1
        for _ in range(20):  # fixed point: the batch the load keeps busy at the TPOT that batch gives
            tpot_eff = self.tpot_s(b) / (1 - rho)
            b = min(max_batch, max(1, math.ceil(q * self.inp.output_len * tpot_eff / self.pp)))
        tpot = self.tpot_s(b)
        return {"ttft_ms": (self.prefill_s / (1 - rho) + tpot) * 1e3, "tpot_ms": tpot / (1 - rho) * 1e3,
                "batch_at_target": b, "prefill_utilization": rho}


def layouts(model: PlanModel, hw: Accelerator, inp: PlanInputs, cpu: bool = False) -> list[Layout]:
    cfg = model.config
    if cpu:
        return [Layout(model, hw, inp, 1, 1)]
    tps = [t for t in (1, 2, 4, 8, 16) if t <= min(inp.max_tp, hw.max_per_node) and cfg.num_heads % t == 0]
    pps = [p for p in (1, 2, 4, 8, 16) if p <= min(inp.max_pp, cfg.num_layers)]
    return [Layout(model, hw, inp, t, p) for t in tps for p in pps]


def choose(results: list[dict]) -> dict | None:
    """The cheapest layout meeting the SLOs ($/h where priced, else devices), then the fewest ranks per replica,
    then the lowest TTFT."""
    ok = [r for r in results if r["meets_slo"]]
    if not ok:
        return None
    return min(ok, key=lambda r: (r["usd_per_hour"] if r["usd_per_hour"] is not None else r["devices"],
                                  r["devices"], r["ranks"], r["ttft_ms"]))


def plan(model: PlanModel, hw: Accelerator, inp: PlanInputs, cpu: bool = False) -> dict:
    results = [lay.evaluate() for lay in layouts(model, hw, inp, cpu)]
    cfg = model.config
    p = E.param_counts(cfg)
    return {
        "model": {"name": model.name, "params": p.total, "weight_dtype": model.weight_dtype,
                  "weight_bytes": model.weight_bytes, "kv_dtype": model.kv_dtype,
                  "kv_bytes_per_token": E.kv_bytes_per_token(cfg, model.kv_dtype),
                  "decode_flops_per_token": E.decode_flops_per_token(cfg, inp.prompt_len + inp.output_len // 2),
                  "prefill_flops": E.prefill_flops(cfg, inp.prompt_len), "config": cfg.to_dict()},
        "hardware": asdict(hw), "inputs": asdict(inp), "layouts": results, "best": choose(results),
    }
