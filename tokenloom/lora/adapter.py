"""Reading a LoRA adapter onto a model's LoRA layers: PEFT directories (adapter_config.json and
adapter_model.safetensors) and llama.cpp GGUF adapters (general.type "adapter", adapter.type "lora").

Every problem is a LoRAError naming it, raised before the adapter is used: a path that is not an adapter, a rank
above max_lora_rank, a target module the model does not have (or that tokenloom does not adapt: embeddings, the
LM head), factors whose shapes or layers show another base model, features beyond plain LoRA (DoRA, biases,
modules_to_save).

Scaling: PEFT's lora_alpha / r (rsLoRA: lora_alpha / sqrt(r)), per module with rank_pattern / alpha_pattern;
llama.cpp's adapter.lora.alpha / r (no alpha: 1). The scale is folded into B once, here.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenloom.config import TokenloomError
from tokenloom.gguf.loader import read_tensor, unpermute_rows
from tokenloom.gguf.reader import open_gguf
from tokenloom.lora.layers import LoRATarget
from tokenloom.lora.request import LoRARequest


class LoRAError(TokenloomError, ValueError):
    """An adapter that cannot be used with this engine or model, said in words (an HTTP server answers 400)."""


@dataclass
class Factors:
    """One checkpoint module's factors: A [r, in], B [out, r], and the scale of B @ A."""
    module: str  # checkpoint (transformers) name, e.g. model.layers.0.self_attn.q_proj
    a: torch.Tensor
    b: torch.Tensor
    scale: float


@dataclass
class LoRAAdapter:
    """An adapter read and checked against the model, ready to be put in a slot."""
    request: LoRARequest
    format: str  # "peft" or "gguf"
    rank: int  # the largest rank over its modules
    target_modules: list[str]  # checkpoint module leaves it changes (q_proj, v_proj, ...)
    # our module -> (A [n, in], B^T [n, out], each packed slice's (first rank row, ranks)) in the model's dtype,
    # the slices' factors stacked, scales folded in
    weights: dict[str, tuple[torch.Tensor, torch.Tensor, list]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b, _ in self.weights.values())


UNSUPPORTED_TARGETS = ("embed_tokens", "lm_head")


def read_adapter(request: LoRARequest, model, targets: dict[str, LoRATarget], max_rank: int) -> LoRAAdapter:
    """Read the adapter `request` names and map it onto `targets` (lora_targets(model)); LoRAError if it does
    not fit. Reads files and builds new tensors only: safe off the engine thread."""
    path = Path(request.lora_path).expanduser()
    what = f"LoRA adapter '{request.lora_name}'"
    if not path.exists():
        raise LoRAError(f"{what}: no such file or directory: {path}")
    if path.is_dir():
        fmt, factors, listed = "peft", *_read_peft(path, what)
    else:
        fmt, factors, listed = "gguf", _read_gguf(path, what, model), []
    index = {ckpt: (ours, first, rows) for ours, t in targets.items() for ckpt, first, rows in t.parts}
    for name in listed:
        if not any(ckpt == name or ckpt.endswith("." + name) for ckpt in index):
            raise _unknown_module(what, name, model, index)
    if not factors:
        raise LoRAError(f"{what} holds no LoRA weights")
    for f in factors:
        if f.module not in index:
            raise _unknown_module(what, f.module, model, index)
    grouped: dict[str, list[tuple[Factors, int, int]]] = {}
    for f in factors:
        ours, first, rows = index[f.module]
        r = f.a.shape[0]
        if r > max_rank:
            raise LoRAError(f"{what} has rank {r} (in {f.module}), more than max_lora_rank {max_rank}: "
                            "start the engine with a larger max_lora_rank")
        if f.a.dim() != 2 or f.b.dim() != 2 or f.a.shape[1] != targets[ours].in_features or \
                tuple(f.b.shape) != (rows, r):
            raise LoRAError(f"{what} was made for a different base model: {f.module} has factors A "
                            f"{list(f.a.shape)} and B {list(f.b.shape)}, this model's layer takes "
                            f"{targets[ours].in_features} inputs to {rows} outputs")
        grouped.setdefault(ours, []).append((f, first, rows))
    dtype = model.norm.weight.dtype
    weights = {ours: _stack(parts, targets[ours].out_features, targets[ours].parts, dtype)
               for ours, parts in grouped.items()}
    leaves = sorted({f.module.rpartition(".")[2] for f in factors})
    return LoRAAdapter(request, fmt, max(f.a.shape[0] for f in factors), leaves, weights)


def _stack(parts: list[tuple[Factors, int, int]], out_features: int, slices: tuple, dtype: torch.dtype):
    """(A [n, in], B^T [n, out], per packed slice (first rank row, ranks)) of one of our layers: the slices' A
    stacked, each slice's scaled B^T in its own rows and output columns (zeros elsewhere)."""
    a = torch.cat([f.a.float() for f, _, _ in parts])
    bt = torch.zeros(a.shape[0], out_features)
    ranks = {first: (0, 0) for _, first, _ in slices}
    r0 = 0
    for f, first, rows in parts:
        r = f.a.shape[0]
        bt[r0 : r0 + r, first : first + rows] = (f.b.float() * f.scale).t()
        ranks[first] = (r0, r)
        r0 += r
    return a.to(dtype).contiguous(), bt.to(dtype).contiguous(), [ranks[first] for _, first, _ in slices]


def _unknown_module(what: str, module: str, model, index: dict) -> LoRAError:
    m = re.search(r"layers\.(\d+)\.", module)
    layers = model.config.num_layers
    if m and int(m.group(1)) >= layers:
        return LoRAError(f"{what} was made for a different base model: it changes layer {m.group(1)} "
                         f"({module}), this model has {layers} layers")
    leaf = module.rpartition(".")[2]
    if ".experts." in module:
        return LoRAError(f"{what} targets {module}: LoRA on mixture-of-experts experts is not supported")
    if leaf in UNSUPPORTED_TARGETS:
        return LoRAError(f"{what} targets {module}: LoRA on {', '.join(UNSUPPORTED_TARGETS)} is not supported "
                         "(only the decoder layers' linear layers)")
    known = sorted({ckpt.rpartition(".")[2] for ckpt in index})
    return LoRAError(f"{what} targets module '{module}', which does not exist in this model "
                     f"(its LoRA targets: {', '.join(known)})")


# ---- PEFT ------------------------------------------------------------------------------------------------

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")


def _read_peft(path: Path, what: str) -> tuple[list[Factors], list[str]]:
    """(factors, the config's target_modules when listed by name)."""
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise LoRAError(f"{what}: {path} is not a PEFT adapter directory (no adapter_config.json)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise LoRAError(f"{what}: cannot read {cfg_path}: {exc}") from None
    _check_peft_config(cfg, what)
    tensors = _peft_tensors(path, what)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if m is None:
            raise _peft_extra(what, key)
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    alpha_default, alpha_pattern = cfg.get("lora_alpha", 8), cfg.get("alpha_pattern") or {}
    factors = []
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"{what}: {module} has lora_{'A' if 'A' in ab else 'B'} but not its pair")
        r = ab["A"].shape[0]  # the module's rank (rank_pattern's, where one applies)
        alpha = float(_pattern(alpha_pattern, module, alpha_default))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        factors.append(Factors(module, ab["A"], ab["B"], scale))
    listed = cfg.get("target_modules")
    return factors, (list(listed) if isinstance(listed, (list, tuple)) else [])


def _check_peft_config(cfg: dict, what: str) -> None:
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise LoRAError(f"{what} is a {kind} adapter; only LoRA adapters are supported")
    if cfg.get("use_dora"):
        raise LoRAError(f"{what} is a DoRA adapter, which is not supported")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{what} saves whole modules ({', '.join(cfg['modules_to_save'])}), which is not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise LoRAError(f"{what} trains biases, which is not supported")
    if cfg.get("layer_replication"):
        raise LoRAError(f"{what} replicates layers, which is not supported")


def _peft_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    st, pt = path / "adapter_model.safetensors", path / "adapter_model.bin"
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st))
        if pt.is_file():
            return torch.load(str(pt), map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt file: its reader's own words
        raise LoRAError(f"{what}: cannot read its weights: {type(exc).__name__}: {exc}") from None
    raise LoRAError(f"{what}: {path} has no adapter_model.safetensors (or adapter_model.bin)")


def _peft_extra(what: str, key: str) -> LoRAError:
    if any(f".{leaf}." in f".{key}" for leaf in UNSUPPORTED_TARGETS):  # PEFT saves these layers whole as well
        return LoRAError(f"{what} changes {key}: LoRA on {', '.join(UNSUPPORTED_TARGETS)} is not supported "
                         "(only the decoder layers' linear layers)")
    if "lora_embedding_" in key:
        return LoRAError(f"{what} adapts the token embeddings ({key}), which is not supported")
    if "lora_magnitude_vector" in key:
        return LoRAError(f"{what} is a DoRA adapter ({key}), which is not supported")
    return LoRAError(f"{what} holds a tensor that is no LoRA factor: {key}")


def _pattern(patterns: dict, module: str, default):
    """PEFT's alpha_pattern (rank_pattern alike): the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


# ---- GGUF (llama.cpp) ----------------------------------------------------------------------------------

_SAME_ARCH = {"mistral": "llama", "mixtral": "llama"}  # llama.cpp writes these as llama


def _read_gguf(path: Path, what: str, model) -> list[Factors]:
    try:
        reader = open_gguf(path)
    except TokenloomError as exc:
        raise LoRAError(f"{what}: {exc}") from None
    meta = reader.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise LoRAError(f"{what}: {path} is not a LoRA adapter (general.type '{meta.get('general.type')}', "
                        f"adapter.type '{meta.get('adapter.type')}'; want 'adapter' and 'lora')")
    arch, ours = str(meta.get("general.architecture")), model.config.architecture
    if _SAME_ARCH.get(arch, arch) != _SAME_ARCH.get(ours, ours):
        raise LoRAError(f"{what} was made for a different base model: a {arch} adapter, this model is {ours}")
    names = model.gguf_tensor_names
    if names is None:
        raise LoRAError(f"{what}: this model's architecture ({ours}) has no GGUF tensor names")
    alpha = float(meta.get("adapter.lora.alpha") or 0.0)
    pairs: dict[str, dict[str, object]] = {}
    for t in reader.tensors:
        base, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise LoRAError(f"{what} holds a tensor that is no LoRA factor: {t.name}")
        pairs.setdefault(base, {})[part] = t
    factors = []
    for base, ab in pairs.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise LoRAError(f"{what}: {base} has {next(iter(ab))} but not its pair")
        ckpt = names.checkpoint_name(base)
        if ckpt is None or not ckpt.endswith(".weight"):
            raise LoRAError(f"{what} targets '{base}', which does not exist in this model")
        a, b = read_tensor(reader, ab["lora_a"]), read_tensor(reader, ab["lora_b"])
        if a.dim() != 2 or b.dim() != 2:
            raise LoRAError(f"{what}: {base} has factors of shapes {list(a.shape)} and {list(b.shape)}")
        heads = names.permuted_heads(base, model.config)
        if heads and b.shape[0] % (2 * heads) == 0:  # convert_lora_to_gguf.py permutes B's rows as the base's
            b = unpermute_rows(b, heads)
        r = a.shape[0]
        factors.append(Factors(ckpt.removesuffix(".weight"), a, b, alpha / r if alpha else 1.0))
    return factors
