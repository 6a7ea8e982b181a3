import torch
from torch import nn

from tokenloom.kernels import cpu_ops


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with a residual, (norm(x + residual), x + residual): the add fused into the same pass."""
        weight = self._kernel_weight(x)
        if (weight is not None and x.dim() == 2 and x.shape[-1] % 16 == 0 and x.stride(-1) == 1
                and (ops := cpu_ops.ops_for(x))):
            out = ops.rms_norm(x, residual, weight, self.eps)
            return out[0] if residual is None else (out[0], out[1])
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _kernel_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        """The weight the fused kernel multiplies by, when it computes exactly what _norm does (else None)."""
        return self.weight if self.weight.dtype == x.dtype else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 then cast back before the weight, exactly as the reference implementations do.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: the weight is stored centred on 0 and the row is scaled by (1 + weight), both in float32
    before the cast back (transformers' Gemma norms; Llama's casts before the weight)."""

    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        with torch.no_grad():
            self.weight.zero_()

    def _kernel_weight(self, x: torch.Tensor) -> torch.Tensor | None:
        # float32 rows: the same products as the fused kernel's with (1 + weight) as its weight
        return 1.0 + self.weight.float() if x.dtype == torch.float32 else None

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
