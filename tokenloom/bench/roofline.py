"""This machine's roofs, measured with the threads tokenloom runs on: memory read bandwidth and dense GEMM
throughput (bf16 and fp32 torch.mm), kept in $TOKENLOOM_HOME/roofline.json so that every bench report can
compare its rates with them without measuring again (`tokenloom bench roofline` measures afresh).

Bandwidth: torch sums and bf16 matrix-vector products (reads) and copies over buffers four times the last-level
cache (at least 1 GiB, so the cache cannot serve them), several rounds; a noisy machine only ever slows a round down, so the roof is the best
round. The read bandwidth is the roof for decoding (a decode step reads its weights); the copy figure counts
bytes read plus written, as STREAM's copy does, and is reported beside it. GEMM: square matrices of a few sizes,
best of the rounds at the best size (oneDNN, AMX where the CPU has it).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from tokenloom.bench.economics import Roofs
from tokenloom.config import tokenloom_home

ROOF_FIELDS = ("read_bandwidth", "copy_bandwidth", "gemm_bf16", "gemm_fp32")


def cache_path() -> Path:
    return Path(os.environ.get("TOKENLOOM_ROOFLINE") or tokenloom_home() / "roofline.json")


def llc_bytes() -> int:
    """Size of the largest CPU cache (Linux sysfs; 0 where unknown)."""
    best = 0
    for idx in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (idx / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * mult)
        except ValueError:
            continue
    return best


def _available_bytes() -> int:
    from tokenloom.worker.kv_cache import available_memory

    return available_memory(torch.device("cpu"))


def buffer_bytes() -> int:
    """A buffer the cache cannot hold: 4x the LLC, at least 1 GiB, at most a sixth of the free memory."""
    want = max(1 << 30, 4 * llc_bytes())
    return int(min(want, _available_bytes() // 6))


def _best_rate(fn, amount: float, rounds: int) -> float:
    fn()  # first touch, page faults, kernel selection
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = max(best, amount / (time.perf_counter() - start))
    return best


def measure_bandwidth(nbytes: int | None = None, rounds: int = 6) -> dict:
    """Read and copy bandwidth over buffers of nbytes, bytes/s, best of `rounds`. Read: the faster of a float32
    sum and a bfloat16 matrix-vector product (a decode step's own access pattern) over the buffer."""
    n = (nbytes or buffer_bytes()) // 4 // 4096 * 4096
    a = torch.ones(n)
    read = _best_rate(lambda: a.sum(), 4.0 * n, rounds)
    matrix, vector = a.view(torch.bfloat16).view(-1, 4096), torch.ones(4096, dtype=torch.bfloat16)
    gemv = _best_rate(lambda: torch.mv(matrix, vector), 4.0 * n, rounds)
    b = torch.empty_like(a)
    copy = _best_rate(lambda: b.copy_(a), 8.0 * n, rounds)
    del a, b, matrix
    return {"read": max(read, gemv), "read_sum": read, "read_gemv": gemv, "copy": copy, "buffer_bytes": 4 * n}


def measure_gemm(dtype: torch.dtype, sizes: tuple[int, ...] = (1024, 2048, 4096), rounds: int = 3) -> dict:
    """Dense torch.mm FLOP/s of square matrices, best size and round."""
    per_size = {}
    for s in sizes:
        x, y = torch.randn(s, s).to(dtype), torch.randn(s, s).to(dtype)
        per_size[s] = _best_rate(lambda: torch.mm(x, y), 2.0 * s ** 3, rounds)
    best = max(per_size, key=per_size.get)
    return {"flops": per_size[best], "size": best, "per_size": per_size}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_key(threads: int) -> str:
    return f"{cpu_name()}|{os.cpu_count()} cpus|{threads} threads|torch {torch.__version__}"


def measure(threads: int | None = None, fp32_sizes: tuple[int, ...] = (1024, 2048),
            buffer: int | None = None) -> dict:
    """Every roof, measured now with `threads` torch threads (default: the current setting)."""
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    bw = measure_bandwidth(buffer)
    bf16 = measure_gemm(torch.bfloat16)
    fp32 = measure_gemm(torch.float32, fp32_sizes)
    return {"cpu": cpu_name(), "threads": torch.get_num_threads(), "llc_bytes": llc_bytes(),
            "read_bandwidth": bw["read"], "copy_bandwidth": bw["copy"], "buffer_bytes": bw["buffer_bytes"],
            "gemm_bf16": bf16["flops"], "gemm_bf16_size": bf16["size"], "gemm_fp32": fp32["flops"],
            "gemm_fp32_size": fp32["size"], "measured_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "seconds": time.perf_counter() - start}


def roofs_of(m: dict) -> Roofs:
    return Roofs(bandwidth=m["read_bandwidth"], gemm_bf16=m["gemm_bf16"], gemm_fp32=m["gemm_fp32"],
                 source=f"measured {m['measured_at']}, {m['threads']} threads", llc_bytes=m.get("llc_bytes", 0))


def machine_roofs(refresh: bool = False, buffer: int | None = None) -> tuple[Roofs, dict]:
    """This machine's roofs at the current thread count: from the cache ($TOKENLOOM_ROOFLINE, else
    $TOKENLOOM_HOME/roofline.json), else measured (a few seconds) and cached. A measurement made again keeps
    the best figure of each roof seen on this machine (load from other processes only ever lowers one; the
    last round's figures are kept as `last`). Returns the Roofs and the raw measurement."""
    path = cache_path()
    key = _cache_key(torch.get_num_threads())
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    old = cached.get(key) if isinstance(cached.get(key), dict) else None
    if not refresh and old is not None:
        return roofs_of(old), old
    if not refresh:
        print(f"measuring this machine's memory bandwidth and GEMM throughput once (cached in {path}) ...",
              file=sys.stderr, flush=True)
    m = measure(buffer=buffer)
    m["last"] = {f: m[f] for f in ROOF_FIELDS}
    if old is not None:
        for f in ROOF_FIELDS:
            m[f] = max(m[f], old.get(f, 0.0))
    cached[key] = m
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    except OSError:  # a read-only home: the figures still serve this run
        pass
    return roofs_of(m), m
