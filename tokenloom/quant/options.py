"""Quantization settings: the methods, their options (validated), the "int4-g64" spec strings, and the result."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from tokenloom.config import TokenloomError


METHODS = ("int8", "int4", "gptq", "awq", "nf4", "gguf")
LINEAR_NAMES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@dataclass
class QuantOptions:
    method: str = "int8"
    bits: int = 0  # 0 = the method's default (8 for int8, 4 otherwise)
    group_size: int = 128  # int4 / gptq / awq; -1 = one group per row
    sym: bool = False  # symmetric grid (zero point 2^(bits-1)) for int4 / gptq
    act_order: bool = True  # gptq: quantize columns in decreasing Hessian diagonal order
    damp: float = 0.01  # gptq: dampening, fraction of the mean Hessian diagonal
    block_size: int = 64  # nf4 absmax block
    double_quant: bool = False  # nf4
    lm_head: str = "int8"  # int8 | same | none
    n_samples: int = 128  # calibration windows (gptq / awq)
    seq_len: int = 256  # tokens per calibration window
    calib: str | None = None  # calibration text file (default: the corpus' calibration part)
    corpus: str = "moby-dick"
    seed: int = 0
    awq_grid: int = 20
    use_kernel: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise TokenloomError(f"unknown quantization method '{self.method}' (choose from: {', '.join(METHODS)})")
        if not self.bits:
            self.bits = 8 if self.method == "int8" else 4
        if self.method in ("int4", "gptq", "awq") and self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise TokenloomError(f"{self.method}: bits must be 2..8, got {self.bits}")
        if self.method == "awq" and self.bits != 4:
            raise TokenloomError("awq: only 4-bit is supported (the AutoAWQ GEMM format)")
        if self.method == "int8" and self.bits != 8:
            raise TokenloomError("int8: bits must be 8 (use int4 --bits N for other widths)")
        if self.group_size == 0 or self.group_size < -1:
            raise TokenloomError("group_size must be positive or -1 (per row)")
        if self.lm_head not in ("int8", "same", "none"):
            raise TokenloomError(f"lm_head must be int8, same or none, got '{self.lm_head}'")


def parse_method(spec: str) -> tuple[str, dict]:
    """"int4-g64" -> ("int4", {"group_size": 64}); "gptq-b3" -> ("gptq", {"bits": 3}); "nf4-dq"."""
    parts = spec.strip().lower().replace(":", "-").split("-")
    method, opts = parts[0], {}
    for p in parts[1:]:
        if m := re.fullmatch(r"g(\d+)", p):
            opts["group_size"] = int(m.group(1))
        elif m := re.fullmatch(r"b(\d+)|(\d+)bit", p):
            opts["bits"] = int(m.group(1) or m.group(2))
        elif p == "dq":
            opts["double_quant"] = True
        elif p == "sym":
            opts["sym"] = True
        elif p == "noact":
            opts["act_order"] = False
        elif p:
            raise TokenloomError(f"cannot parse quantization option '{p}' in '{spec}'")
    return method, opts


@dataclass
class QuantizeResult:
    options: QuantOptions
    seconds: float
    records: dict = field(default_factory=dict)  # module path -> record (kept when return_records=True)
    biases: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
