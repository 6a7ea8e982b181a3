"""GPTQ (Frantar et al. 2022): layer-wise quantization that compensates each column's rounding error on the
not-yet-quantized columns through the inverse Hessian of the layer's reconstruction loss, H = 2 X^T X / n.

Follows the reference implementation (IST-DASLab/gptq `fasterquant`, as in AutoGPTQ / GPTQModel): dead inputs
zeroed, dampening `damp * mean(diag H)`, the upper Cholesky factor of H^-1, lazy batch updates over blocks of 128
columns, group parameters (min/max grid of rtn.affine_params) taken from the error-updated weights when a group
starts, and act-order (columns by decreasing diag H; the group of each column recorded in g_idx).

The model is processed layer by layer and, within a layer, "true-sequentially": the inputs of q/k/v, o,
gate/up and down are each collected after the linears before them are quantized, and the next layer sees the
quantized layer's outputs.
"""
from __future__ import annotations

import math

import torch

from tokenloom.quant.records import AffineQuant
from tokenloom.quant.rtn import affine_params, affine_quantize


class Hessian:
    """Running H = 2/n sum x x^T over the rows fed to add()."""

    def __init__(self, k: int):
        self.H = torch.zeros(k, k, dtype=torch.float32)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * math.sqrt(2 / self.n)
        self.H.addmm_(x.t(), x)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = False,
                  act_order: bool = True, damp: float = 0.01, block_size: int = 128) -> AffineQuant:
    """GPTQ of one weight [N, K] given the Hessian [K, K] of its inputs. Returns the record (q in the original
    column order, scale / zero per group, g_idx when act-order permuted the columns)."""
    W = w.detach().float().clone()
    n, k = W.shape
    H = H.detach().float().clone()
    maxq = 2**bits - 1
    g = group_size if group_size > 0 else k
    block_size = max(block_size, g) if g < k else block_size
    if g < k and block_size % g:
        block_size = g * math.ceil(block_size / g)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    n_groups = math.ceil(k / g)
    scale = torch.zeros(n, n_groups)
    zero = torch.zeros(n, n_groups)

    d = torch.arange(k)
    H[d, d] += damp * torch.mean(torch.diag(H))
    Hinv = _upper_cholesky_of_inverse(H)

    cur_s = cur_z = None
    if g >= k:  # one group per row: parameters from the whole row up front
        cur_s, cur_z = affine_params(W, bits, sym)
        scale[:, 0], zero[:, 0] = cur_s, cur_z
    # Work on W transposed, so a column of W is a contiguous row and the rank-1 updates touch contiguous memory.
    Wt = W.t().contiguous()
    Qt = torch.zeros_like(Wt)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0 and g < k:
                # params of the group starting here, from the current (error-updated) weights of the block
                cur_s, cur_z = affine_params(W1[i : i + g].t(), bits, sym)
                scale[:, col // g], zero[:, col // g] = cur_s, cur_z
            wcol = W1[i]
            q = affine_quantize(wcol, cur_s, cur_z, bits)
            Qt[col] = q
            err = (wcol - (q - cur_z) * cur_s) / Hinv1[i, i]
            W1[i:].addr_(Hinv1[i, i:], err, alpha=-1)
            Err1[i] = err
        Wt[i2:] -= Hinv[i1:i2, i2:].t() @ Err1
    Q = Qt.t()

    g_idx = None
    q = Q
    if perm is not None:
        inv = torch.argsort(perm)
        q = Q[:, inv]
        g_idx = (torch.arange(k) // g)[inv]
    return AffineQuant.from_zero(q.clamp(0, maxq), scale, zero, bits, g, g_idx)


def _upper_cholesky_of_inverse(H: torch.Tensor) -> torch.Tensor:
    """chol(H^-1, upper); adds more dampening if H is not positive definite in float32."""
    extra = 0.0
    mean_diag = torch.mean(torch.diag(H))
    for attempt in range(8):
        Hd = H if extra == 0 else H + torch.eye(H.shape[0]) * extra * mean_diag
        if attempt >= 4:
            Hd = Hd.double()  # float32 is what the reference uses; float64 as the last resort
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0 and torch.isfinite(U).all():
                return U.float()
        extra = 0.01 if extra == 0 else extra * 10
    raise RuntimeError("GPTQ: the Hessian is not positive definite even after dampening")


def layer_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    """Squared error of the layer output ||X W^T - X Wq^T||^2 / rows."""
    x = x.reshape(-1, x.shape[-1]).float()
    return float(((x @ (w.float() - wq.float()).t()) ** 2).sum() / x.shape[0])


# ---------------------------------------------------------------------------------------------------------
# the model


@torch.no_grad()
def gptq_quantize_model(model, samples: list[list[int]], opts, act_dtype, result, progress=False, keep=False):
    from tokenloom.quant.modules import (
        layer_iter,
        float_weight,
        get_module,
        is_moe,
        quantize_moe,
        swap_linear,
    )
    from tokenloom.model_executor.sequence_forward import SequenceRunners, capture_input

    runners = SequenceRunners(model)

    xs = [runners[len(s)].embed(torch.tensor(s)) for s in samples]
    errors = {}

    def quantize(name: str, hess: Hessian, inputs: list[torch.Tensor] | None = None):
        lin = get_module(model, name)
        w = float_weight(model, name)
        rec = gptq_quantize(w, hess.H, opts.bits, opts.group_size, opts.sym, opts.act_order, opts.damp)
        if inputs is not None and keep:
            errors[name] = layer_error(torch.cat(inputs[:4]), w, rec.dequantize())
        lin.weight.copy_(rec.dequantize().to(w.dtype))  # fake-quantized weights for the rest of calibration
        return rec

    for i, layer in layer_iter(model, "gptq", progress):
        pfx = f"layers.{i}."
        attn = layer.self_attn
        recs = {}
        # 1. q/k/v: inputs are the normed hidden states
        h1 = [layer.input_layernorm(x) for x in xs]
        hess = Hessian(h1[0].shape[-1])
        for h in h1:
            hess.add(h)
        recs["self_attn.qkv_proj"] = quantize(pfx + "self_attn.qkv_proj", hess)
        # 2. o: inputs are the attention outputs (with the quantized q/k/v)
        att = [capture_input(attn.o_proj, lambda h=h, layer=layer: runners[h.shape[0]].attention(layer, h))
               for h in h1]
        del h1
        hess = Hessian(att[0].shape[-1])
        for a in att:
            hess.add(a)
        recs["self_attn.o_proj"] = quantize(pfx + "self_attn.o_proj", hess)
        xs = [x + attn.o_proj(a) for x, a in zip(xs, att)]
        del att
        # 3. gate/up and 4. down
        h2 = [layer.post_attention_layernorm(x) for x in xs]
        if is_moe(layer):
            quantize_moe(model, i, opts, act_dtype, result, keep)
            xs = [x + layer.mlp(h) for x, h in zip(xs, h2)]
        else:
            mlp = layer.mlp
            hess = Hessian(h2[0].shape[-1])
            for h in h2:
                hess.add(h)
            recs["mlp.gate_up_proj"] = quantize(pfx + "mlp.gate_up_proj", hess)
            acts = [capture_input(mlp.down_proj, lambda h=h, mlp=mlp: mlp(h)) for h in h2]
            hess = Hessian(acts[0].shape[-1])
            for a in acts:
                hess.add(a)
            recs["mlp.down_proj"] = quantize(pfx + "mlp.down_proj", hess)
            xs = [x + mlp.down_proj(a) for x, a in zip(xs, acts)]
            del acts
        del h2
        for lname, rec in recs.items():
            swap_linear(model, pfx + lname, rec, act_dtype, opts, result, keep)
    result.extra["calibration_tokens"] = sum(len(s) for s in samples)
