"""GPTQ: post-training quantization with second-order error compensation (Frantar et al. 2023).

For one linear layer with calibration inputs ``X`` the goal is ``min_Q ||X W^T - X Q^T||^2``. GPTQ quantizes
the weight one input column at a time and spreads each column's rounding error over the columns not yet
quantized, weighted by the inverse Hessian ``H^-1`` of that objective (``H = 2 X^T X``), so later columns
absorb what earlier ones lost. As in the paper:

- dampening: ``H += damp * mean(diag H) * I`` keeps the inverse well conditioned;
- the needed rows of ``H^-1`` come from the upper Cholesky factor of ``H^-1`` (numerically stable, no
  re-inversion after each column);
- lazy batch updates: errors are applied inside a block of ``block_size`` columns immediately and to the
  rest of the matrix once per block (a matmul), which is what makes it fast;
- act-order (optional): columns with large ``diag H`` (large activations) go first. Group parameters are
  then fitted up front on the original weight ("static groups") so every group keeps contiguous columns
  and the storage format does not change.

This module is the per-layer algorithm; collecting ``H`` layer by layer over a model lives in
:mod:`llmlab.quant.quantize`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmlab.errors import LLMLabError
from llmlab.quant.common import AffineQuantizer


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over the rows ``x`` of every input seen (fp64 sums for stability)."""

    def __init__(self, in_features: int):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float64)
        self.n = 0

    def add(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.H += x.T @ x
        self.n += x.shape[0]

    def hessian(self) -> Tensor:
        if self.n == 0:
            raise LLMLabError("GPTQ: no calibration inputs reached this layer")
        return (2.0 / self.n * self.H).float()


def gptq_quantize(
    weight: Tensor,
    H: Tensor,
    quantizer: AffineQuantizer,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``weight [N, K]`` given the Hessian ``H [K, K]`` of its inputs.

    Returns integer codes ``[N, K]`` (float tensor) and per-group ``scales``/``zeros`` ``[N, K/g]``, in the
    original column order. Scales come out in the quantizer's storage precision, so the error GPTQ
    compensates is the error of the stored weight.
    """
    W = weight.detach().float().clone()
    N, K = W.shape
    g = quantizer.group_size
    n_groups = K // g
    H = H.float().clone()
    dead = torch.diag(H) == 0  # inputs that are always zero: any weight works, use 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    scales = torch.zeros(N, n_groups)
    zeros = torch.zeros(N, n_groups)
    fitted = torch.zeros(n_groups, dtype=torch.bool)

    def fit(group: int, w: Tensor) -> None:
        s, z = quantizer.fit(w)
        scales[:, group] = s
        zeros[:, group] = z
        fitted[group] = True

    static = act_order or g >= K  # per-channel (one group) or act-order: fit every group up front
    if static:
        for grp in range(n_groups):
            fit(grp, W[:, grp * g : (grp + 1) * g])

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(K)
    try:
        L = torch.linalg.cholesky(H)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except torch.linalg.LinAlgError as exc:
        raise LLMLabError(
            f"GPTQ: Hessian is not positive definite even with damp={damp}; raise the dampening"
        ) from exc

    if not static:
        # Groups are fitted on the error-updated weight when reached, so each must lie within one block.
        block_size = max(g, block_size - block_size % g)
    codes = torch.zeros(N, K)
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            grp = col // g
            if not fitted[grp]:
                fit(grp, W1[:, i : i + g])
            w = W1[:, i]
            q = quantizer.quantize(w, scales[:, grp], zeros[:, grp])
            codes[:, col] = q
            err = (w - quantizer.dequantize(q, scales[:, grp], zeros[:, grp])) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, zeros
