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
        if (x.dim() == 2 and x.shape[-1] % 16 == 0 and self.weight.dtype == x.dtype and x.stride(-1) == 1
                and (ops := cpu_ops.ops_for(x))):
            out = ops.rms_norm(x, residual, self.weight, self.eps)
            return out[0] if residual is None else (out[0], out[1])
        if residual is not None:
            x = x + residual
            return self._norm(x), x
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 then cast back before the weight, exactly as the reference implementations do.
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)
