"""AWQ (Lin et al. 2023): activation-aware weight quantization.

Per-input-channel scales s protect the weights that see large activations: W is quantized as Q(W diag(s)) and
the inverse scale is folded into the op before it (RMSNorm weight, the v rows for o_proj, the up rows for
down_proj), so the float model is unchanged and only the rounding moves. As in AutoAWQ:

* s = mean|x|^a / mean_w^(1-a) (duo scaling, normalised by sqrt(max * min)), a on a grid of 20 in [0, 1), the
  best a minimising the output error of the scaled-and-quantized linears; scale groups are (input_layernorm ->
  q/k/v), (v -> o), (post_attention_layernorm -> gate/up), (up -> down);
* then a clipping search: per output row and group, the largest |w| kept is shrunk by up to 45 % where that
  lowers the group's output error (q and k rows excluded);
* then group-wise round-to-nearest with integer zero points (the grid of rtn.affine_params);
* each layer's inputs come from the float model's previous layer.

Differences from AutoAWQ, both on purpose: the error of a candidate is the linear layer's output error computed
exactly from the input Gram matrix X^T X (no re-run of the attention / MLP block per candidate, so the search
costs nothing per calibration token), and with grouped-query attention the (v -> o) scales are shared by the
query heads of a KV head instead of being skipped. "No scaling" is always among the candidates, so AWQ never
does worse than round-to-nearest on its objective.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tokenloom.quant.rtn import fake_quantize_affine, quantize_affine


class InputStats:
    """Gram matrix X^T X / n and mean |x| per channel of a linear layer's inputs."""

    def __init__(self, k: int):
        self.G = torch.zeros(k, k)
        self.abs_sum = torch.zeros(k, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.G.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0).double()
        self.n += x.shape[0]

    @property
    def gram(self) -> torch.Tensor:
        return (self.G / max(self.n, 1)).float()

    @property
    def x_mean(self) -> torch.Tensor:
        return (self.abs_sum / max(self.n, 1)).float()


def output_error(w: torch.Tensor, wq: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean squared output error per token, sum over outputs: tr(D G D^T) with D = wq - w."""
    d = (wq - w).float()
    return float(((d @ gram) * d).sum())


def w_mean(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """AutoAWQ's weight statistic: |w| normalised by its group's max |w|, averaged over output rows -> [K]."""
    n, k = w.shape
    g = group_size if group_size > 0 else k
    groups = math.ceil(k / g)
    wa = F.pad(w.abs().float(), (0, groups * g - k)).reshape(n, groups, g)
    wa = wa / (wa.amax(dim=-1, keepdim=True) + 1e-6)
    return wa.reshape(n, -1)[:, :k].mean(0)


def search_scales(w: torch.Tensor, x_mean: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int,
                  grid: int = 20, expand: torch.Tensor | None = None,
                  max_rows: int = 128) -> tuple[torch.Tensor, float, float]:
    """Best per-channel scales for weight w [N, K]. With `expand`, the scales live on fewer channels
    (x_mean is given per channel of the small space) and w's columns use scales[expand].
    Returns (scales in the small space, best error, error without scaling)."""
    w = w.float()
    wm = w_mean(w, group_size)
    if w.shape[0] > max_rows:  # the error is a sum over rows: estimate it on a fixed random subset
        rows = torch.randperm(w.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]
        w = w[rows.sort().values]
    if expand is not None:
        m = int(expand.max()) + 1
        cnt = torch.bincount(expand, minlength=m).float()
        wm = torch.zeros(m).index_add_(0, expand, wm) / cnt
    base = output_error(w, fake_quantize_affine(w, bits, group_size), gram)
    best, best_s = base, torch.ones_like(x_mean)
    for i in range(grid):
        a = i / grid
        s = (x_mean.pow(a) / (wm.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        sc = s if expand is None else s[expand]
        wq = fake_quantize_affine(w * sc, bits, group_size) / sc
        err = output_error(w, wq, gram)
        if err < best:
            best, best_s = err, s
    return best_s, best, base


def search_clip(w: torch.Tensor, gram: torch.Tensor, bits: int, group_size: int, grid: int = 20,
                max_shrink: float = 0.5, rows_per_step: int = 1024) -> torch.Tensor:
    """Per (row, group) clip value max|w| * (1 - i/grid), i < max_shrink * grid, minimising the group's output
    error d^T G_gg d. Returns the clipped weights."""
    w = w.float()
    n, k = w.shape
    g = group_size if group_size > 0 else k
    groups = math.ceil(k / g)
    kp = groups * g
    gp = F.pad(gram, (0, kp - k, 0, kp - k))
    blocks = torch.stack([gp[j * g : (j + 1) * g, j * g : (j + 1) * g] for j in range(groups)])  # [G, g, g]
    out = torch.empty_like(w)
    for r0 in range(0, n, rows_per_step):
        wr = F.pad(w[r0 : r0 + rows_per_step], (0, kp - k)).reshape(-1, groups, g)
        org_max = wr.abs().amax(dim=-1, keepdim=True)
        best_err = torch.full(wr.shape[:2], float("inf"))
        best_max = org_max.clone()
        for i in range(int(max_shrink * grid)):
            mx = org_max * (1 - i / grid)
            cur = torch.clamp(wr, -mx, mx)
            wq = fake_quantize_affine(cur.reshape(cur.shape[0], -1)[:, :k], bits, g)
            d = F.pad(wq, (0, kp - k)).reshape(wr.shape) - wr
            err = torch.einsum("ngi,gij,ngj->ng", d, blocks, d)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better[..., None], mx, best_max)
        clipped = torch.clamp(wr, -best_max, best_max)
        out[r0 : r0 + rows_per_step] = clipped.reshape(clipped.shape[0], -1)[:, :k]
    return out


@torch.no_grad()
def awq_quantize_model(model, samples: list[list[int]], opts, act_dtype, result, progress=False, keep=False):
    from tokenloom.quant.modules import (
        layer_iter,
        float_weight,
        is_moe,
        quantize_moe,
        swap_linear,
    )
    from tokenloom.model_executor.sequence_forward import SequenceRunners

    runners = SequenceRunners(model)

    bits, gs = opts.bits, opts.group_size
    xs = [runners[len(s)].embed(torch.tensor(s)) for s in samples]
    report = {}
    for i, layer in layer_iter(model, "awq", progress):
        attn, moe = layer.self_attn, is_moe(layer)
        names = ["qkv", "o"] + ([] if moe else ["gate_up", "down"])
        stats: dict[str, InputStats] = {}

        def hook(name, stats=stats):
            def fn(mod, args):
                x = args[0]
                if name not in stats:
                    stats[name] = InputStats(x.shape[-1])
                stats[name].add(x)
            return fn

        mods = {"qkv": attn.qkv_proj, "o": attn.o_proj}
        if not moe:
            mods.update(gate_up=layer.mlp.gate_up_proj, down=layer.mlp.down_proj)
        handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
        try:
            xs = [runners[x.shape[0]].layer(layer, x) for x in xs]  # float layer: next layer's inputs
        finally:
            for h in handles:
                h.remove()

        # --- scale search (on the original weights), then fold the scales into the preceding ops
        for n in names:
            float_weight(model, f"layers.{i}." + {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                                                  "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj"}[n])
        w_qkv = attn.qkv_proj.weight.detach().float()
        s1, e1, b1 = search_scales(w_qkv, stats["qkv"].x_mean, stats["qkv"].gram, bits, gs, opts.awq_grid)
        # v -> o, shared over the query heads of each KV head
        D, G = attn.head_dim, attn.num_heads // attn.num_kv_heads
        cols = torch.arange(attn.q_size)
        expand = (cols // D // G) * D + cols % D
        xm = stats["o"].x_mean
        xm_kv = torch.zeros(attn.kv_size).index_add_(0, expand, xm) / G
        w_o = attn.o_proj.weight.detach().float()
        s2, e2, b2 = search_scales(w_o, xm_kv, stats["o"].gram, bits, gs, opts.awq_grid, expand=expand)
        _fold(layer.input_layernorm.weight, None, s1, attn.qkv_proj.weight)
        v_rows = slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)
        _fold_rows(attn.qkv_proj, v_rows, s2)
        _scale_cols(attn.o_proj.weight, s2[expand])
        grams = {"qkv": stats["qkv"].gram / torch.outer(s1, s1), "o": stats["o"].gram / torch.outer(s2[expand], s2[expand])}
        report[f"layers.{i}.qkv"] = (e1, b1)
        report[f"layers.{i}.o"] = (e2, b2)
        if not moe:
            mlp = layer.mlp
            inter = mlp.down_proj.weight.shape[1]
            s3, e3, b3 = search_scales(mlp.gate_up_proj.weight.detach().float(), stats["gate_up"].x_mean,
                                       stats["gate_up"].gram, bits, gs, opts.awq_grid)
            s4, e4, b4 = search_scales(mlp.down_proj.weight.detach().float(), stats["down"].x_mean,
                                       stats["down"].gram, bits, gs, opts.awq_grid)
            _fold(layer.post_attention_layernorm.weight, None, s3, mlp.gate_up_proj.weight)
            _fold_rows(mlp.gate_up_proj, slice(inter, 2 * inter), s4)
            _scale_cols(mlp.down_proj.weight, s4)
            grams["gate_up"] = stats["gate_up"].gram / torch.outer(s3, s3)
            grams["down"] = stats["down"].gram / torch.outer(s4, s4)
            report[f"layers.{i}.gate_up"] = (e3, b3)
            report[f"layers.{i}.down"] = (e4, b4)
        del stats

        # --- clipping, then round-to-nearest
        for n in names:
            lin = mods[n]
            w = lin.weight.detach().float()
            if n == "qkv":  # q and k rows are not clipped (attention scores are sensitive to them)
                v0 = attn.q_size + attn.kv_size
                w = torch.cat([w[:v0], search_clip(w[v0:], grams[n], bits, gs)])
            else:
                w = search_clip(w, grams[n], bits, gs)
            rec = quantize_affine(w, bits, gs, sym=False)
            full = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_up_proj",
                    "down": "mlp.down_proj"}[n]
            swap_linear(model, f"layers.{i}.{full}", rec, act_dtype, opts, result, keep)
        if moe:
            quantize_moe(model, i, opts, act_dtype, result, keep)
    result.extra["calibration_tokens"] = sum(len(s) for s in samples)
    result.extra["awq_search"] = report


def _fold(prev_weight: torch.Tensor, prev_bias, s: torch.Tensor, weight: torch.Tensor) -> None:
    """prev op's output channels / s, the linear's input columns * s."""
    prev_weight.copy_((prev_weight.float() / s).to(prev_weight.dtype))
    if prev_bias is not None:
        prev_bias.copy_((prev_bias.float() / s).to(prev_bias.dtype))
    _scale_cols(weight, s)


def _scale_cols(weight: torch.Tensor, s: torch.Tensor) -> None:
    weight.copy_((weight.float() * s[None, :]).to(weight.dtype))


def _fold_rows(linear, rows: slice, s: torch.Tensor) -> None:
    w = linear.weight
    w[rows] = (w[rows].float() / s[:, None]).to(w.dtype)
    if linear.bias is not None:
        linear.bias[rows] = (linear.bias[rows].float() / s).to(linear.bias.dtype)
