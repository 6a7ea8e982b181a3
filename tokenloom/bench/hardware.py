"""Tables the cost and planning figures start from: accelerators (memory, bandwidth, dense GEMM throughput,
interconnect) and common cloud instances ($/h on demand, what they hold), and a lookup that names the known
entries when a name is wrong.

Datasheet figures are the vendors' peak numbers (dense, no sparsity); real kernels reach a fraction of them,
which the planner applies as stated efficiency factors (bench/plan.py). Prices are on-demand list prices in a US
region as published around mid-2025 (AWS cut its P4/P5 prices in June 2025; spot, reserved and neocloud prices are
far lower); they drift, so pass --price-per-hour for real figures.
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenloom.config import TokenloomError


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_gb: float  # usable device memory, GB (1e9 bytes)
    bandwidth_gbs: float  # memory bandwidth, GB/s
    bf16_tflops: float  # dense bf16/fp16 tensor throughput
    fp8_tflops: float  # dense fp8 (0: none; int8/int4 weights then run at bf16 speed)
    link: str  # "nvlink", "pcie", "infinity-fabric": the path TP all-reduces take
    link_gbs: float  # per-device one-direction bandwidth of that link, GB/s
    link_latency_us: float  # per all-reduce fixed cost (launch + sync), microseconds
    max_per_node: int = 8  # devices a TP group may span within one node
    price_per_hour: float = 0.0  # $/device-hour, from the instance table (0: none known)


ACCELERATORS: dict[str, Accelerator] = {a.name.lower(): a for a in (
    Accelerator("H100", 80, 3350, 989, 1979, "nvlink", 450, 8, price_per_hour=98.32 / 8),
    Accelerator("H100-PCIe", 80, 2000, 756, 1513, "pcie", 64, 20),
    Accelerator("H200", 141, 4800, 989, 1979, "nvlink", 450, 8),  # no on-demand list price we trust: give one
    Accelerator("B200", 180, 8000, 2250, 4500, "nvlink", 900, 8),
    Accelerator("A100", 80, 2039, 312, 0, "nvlink", 300, 10, price_per_hour=40.97 / 8),
    Accelerator("A100-40GB", 40, 1555, 312, 0, "nvlink", 300, 10, price_per_hour=32.77 / 8),
    Accelerator("L40S", 48, 864, 362, 733, "pcie", 32, 25, price_per_hour=1.861),
    Accelerator("L4", 24, 300, 121, 242, "pcie", 32, 25, price_per_hour=0.805),
    Accelerator("A10G", 24, 600, 125, 0, "pcie", 32, 25, price_per_hour=1.006),  # A10 datasheet; A10G clocks lower
    Accelerator("MI300X", 192, 5300, 1307, 2615, "infinity-fabric", 448, 10),
)}


@dataclass(frozen=True)
class Instance:
    name: str
    price_per_hour: float  # on-demand list price, $/h (see the module docstring: it drifts)
    hardware: str  # what it holds, in words
    accelerator: str = ""  # key of ACCELERATORS ("" for a CPU instance)
    count: int = 0  # accelerators per instance
    vcpus: int = 0


INSTANCES: dict[str, Instance] = {i.name: i for i in (
    # AWS (us-east-1)
    Instance("c7i.xlarge", 0.1785, "4 vCPU Sapphire Rapids, 8 GiB", vcpus=4),
    Instance("c7i.8xlarge", 1.428, "32 vCPU Sapphire Rapids, 64 GiB", vcpus=32),
    Instance("c7i.48xlarge", 8.568, "192 vCPU Sapphire Rapids, 384 GiB", vcpus=192),
    Instance("m7i.xlarge", 0.2016, "4 vCPU Sapphire Rapids, 16 GiB", vcpus=4),
    Instance("m7i.8xlarge", 1.6128, "32 vCPU Sapphire Rapids, 128 GiB", vcpus=32),
    Instance("c7a.8xlarge", 1.6422, "32 vCPU EPYC Genoa, 64 GiB", vcpus=32),
    Instance("g5.xlarge", 1.006, "1x A10G 24 GB, 4 vCPU", "a10g", 1, 4),
    Instance("g6.xlarge", 0.805, "1x L4 24 GB, 4 vCPU", "l4", 1, 4),
    Instance("g6e.xlarge", 1.861, "1x L40S 48 GB, 4 vCPU", "l40s", 1, 4),
    Instance("p4d.24xlarge", 32.77, "8x A100 40 GB (NVLink), 96 vCPU", "a100-40gb", 8, 96),
    Instance("p4de.24xlarge", 40.97, "8x A100 80 GB (NVLink), 96 vCPU", "a100", 8, 96),
    Instance("p5.48xlarge", 98.32, "8x H100 80 GB SXM (NVLink), 192 vCPU", "h100", 8, 192),
    # GCP (us-central1)
    Instance("g2-standard-4", 0.7068, "1x L4 24 GB, 4 vCPU", "l4", 1, 4),
    Instance("a2-highgpu-1g", 3.673, "1x A100 40 GB, 12 vCPU", "a100-40gb", 1, 12),
    Instance("a2-ultragpu-1g", 5.069, "1x A100 80 GB, 12 vCPU", "a100", 1, 12),
    Instance("a3-highgpu-8g", 88.25, "8x H100 80 GB SXM (NVLink), 208 vCPU", "h100", 8, 208),
    # Azure (East US)
    Instance("NC24ads_A100_v4", 3.673, "1x A100 80 GB PCIe, 24 vCPU", "a100", 1, 24),
    Instance("ND96amsr_A100_v4", 32.77, "8x A100 80 GB (NVLink), 96 vCPU", "a100", 8, 96),
    Instance("ND96isr_H100_v5", 98.32, "8x H100 80 GB (NVLink), 96 vCPU", "h100", 8, 96),
)}


def accelerator(name: str) -> Accelerator:
    acc = ACCELERATORS.get(name.strip().lower())
    if acc is None:
        known = ", ".join(a.name for a in ACCELERATORS.values())
        raise TokenloomError(f"unknown accelerator '{name}' (known: {known})")
    return acc


def instance(name: str) -> Instance:
    found = INSTANCES.get(name) or next((i for k, i in INSTANCES.items() if k.lower() == name.strip().lower()), None)
    if found is None:
        raise TokenloomError(f"unknown instance '{name}' (known: {', '.join(INSTANCES)})")
    return found


def price_from_args(args) -> tuple[float | None, str]:
    """$/h of the machine a bench ran on: --price-per-hour, else --instance's list price, else None; and where it
    came from, in words."""
    price = getattr(args, "price_per_hour", None)
    name = getattr(args, "instance", None)
    if price is not None:
        if price < 0:
            raise TokenloomError(f"--price-per-hour must be >= 0, not {price:g}")
        return price, f"${price:g}/h (given)"
    if name:
        inst = instance(name)
        return inst.price_per_hour, f"${inst.price_per_hour:g}/h ({inst.name} on-demand list price: {inst.hardware})"
    return None, ""
