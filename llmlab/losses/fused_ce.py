"""Fused, chunked LM-head + cross-entropy: the loss and both gradients in one pass over row chunks.

The plain path materializes ``[tokens, vocab]`` logits, casts them to fp32, runs log-softmax, stores it for
backward, scatters the NLL gradient into a zero tensor of the same size and runs the log-softmax backward:
several full passes over the largest tensor of a small model's step. Here each chunk of rows computes its
logits, log-sum-exp, loss and ``softmax - onehot`` once, and immediately turns that into the gradients of the
hidden states and of the head weight, so no ``[tokens, vocab]`` tensor outlives its chunk and backward is a
multiply. On the 14M ``small-14m`` shape (vocab 8192, 2048 tokens, bf16) this took the head + loss forward and
backward from ~1.7 s to ~1.1 s on the (busy) 2-core CPU, with the same loss and gradients up to rounding; one
fp32 ``log_softmax`` per chunk and buffers reused across chunks then took it from ~316 ms to ~160 ms per step
(1 thread, profiler self time), about 40% of which is its three matmuls.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def _compute_dtype(t: Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


def _chunk_losses(h: Tensor, w: Tensor, labels: Tensor, chunk: int, want_grads: tuple[bool, bool]):
    """Loss sum, and (if asked) d loss / d h and d loss / d w, chunk by chunk.

    Per chunk: one matmul into a reused logits buffer, one fp32 ``log_softmax`` (a single vectorized kernel
    instead of amax/sub/exp/sum/log/add), the loss gathered from it, then ``softmax - onehot`` made in place
    (``exp_`` + a scatter of ``p_target - 1`` at the targets only) and two matmuls. Every [chunk, vocab]
    tensor lives in a buffer allocated once per call: on CPU a fresh 8-32 MB tensor per chunk costs more in
    page faults than the arithmetic done in it.
    """
    need_h, need_w = want_grads
    n, vocab = h.shape[0], w.shape[0]
    chunk = max(1, min(chunk, n))
    dev = h.device
    total = torch.zeros((), dtype=torch.float32, device=dev)
    grad_h = torch.empty_like(h) if need_h else None
    grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev) if need_w else None
    low = h.dtype != torch.float32
    logits_buf = torch.empty(chunk, vocab, dtype=h.dtype, device=dev)
    fp32_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=dev) if low else logits_buf
    logp_buf = torch.empty(chunk, vocab, dtype=torch.float32, device=dev)
    for start in range(0, n, chunk):
        hc, lc = h[start : start + chunk], labels[start : start + chunk]
        m = hc.shape[0]
        logits, logits32, logp = logits_buf[:m], fp32_buf[:m], logp_buf[:m]
        torch.mm(hc, w.T, out=logits)
        if low:
            logits32.copy_(logits)  # log-sum-exp and the loss in fp32, as F.cross_entropy(logits.float())
        torch.log_softmax(logits32, dim=1, out=logp)
        valid = lc != IGNORE_INDEX
        safe = lc.clamp(min=0)[:, None]
        target_logp = logp.gather(1, safe)
        total -= (target_logp.squeeze(1) * valid).sum()
        if not (need_h or need_w):
            continue
        grad = logp.exp_()  # softmax, in place of the log-probabilities
        grad.scatter_(1, safe, target_logp.exp_().sub_(1.0))  # minus the one-hot, at the targets only
        if not bool(valid.all()):
            grad[~valid] = 0.0
        if low:
            grad = logits.copy_(grad)  # the bf16 gradient reuses the logits buffer, whose job is done
        if need_h:
            torch.mm(grad, w, out=grad_h[start : start + m])
        if need_w:
            grad_w += grad.T @ hc  # rounded to the matmul dtype per chunk, summed in fp32
    return total, grad_h, grad_w


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, dtype: torch.dtype
    ) -> Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
            total, grad_h, grad_w = _chunk_losses(h, w, labels, chunk, needs)
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.dtypes = (hidden.dtype, weight.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = (grad_h * grad_out).to(ctx.dtypes[0]) if ctx.needs_input_grad[0] else None
        dw = (grad_w * grad_out).to(ctx.dtypes[1]) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int = 1024) -> Tensor:
    """``sum`` of next-token cross-entropy of ``hidden [N, d] @ weight[V, d].T`` against ``labels [N]``.

    Rows with label -100 are ignored. Matmuls run in the autocast dtype when autocast is on (bf16 on CPU),
    log-sum-exp and the loss in fp32, as the plain ``F.cross_entropy(logits.float())`` path does.
    """
    dtype = _compute_dtype(hidden)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, labels, chunk, dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunk_losses(hidden.to(dtype), weight.to(dtype), labels, chunk, (False, False))[0]


class _LogitsCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ready-made logits, with a backward written for ``torch.compile``.

    The autograd graph of ``F.cross_entropy(logits.float())`` backpropagates through NLL and log-softmax
    separately: inductor's fused backward then compares every column index with the target (twice, once for a
    row sum that is just ``-grad``) around the exponential, which made it the slowest elementwise kernel of
    the compiled ``small-14m`` step (13 ms of ~220). Here the forward keeps the bf16 logits and the fp32
    log-sum-exp, and the backward is one exponential per element plus a scatter of ``-grad`` at the targets
    only: 8 ms, and ~2% off the step.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        valid = labels != IGNORE_INDEX
        safe = torch.where(valid, labels, 0)
        logits32 = logits.float()
        lse = torch.logsumexp(logits32, dim=-1)
        target = logits32.gather(1, safe.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, lse, safe, valid)
        return torch.where(valid, lse - target, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, lse, safe, valid = ctx.saved_tensors
        row_grad = torch.where(valid, grad_out, 0.0)
        grad = (torch.exp(logits.float() - lse.unsqueeze(1)) * row_grad.unsqueeze(1)).to(logits.dtype)
        rows = torch.arange(grad.shape[0], device=grad.device)
        # (p_target - 1) * grad from fp32, not from the rounded p_target * grad, where p_target is near 1
        target_grad = (torch.exp(logits[rows, safe].float() - lse) - 1.0) * row_grad
        return grad.index_put((rows, safe), target_grad.to(grad.dtype)), None


def logits_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """``sum`` of cross-entropy of ``logits [N, V]`` (any float dtype) against ``labels [N]``, in fp32.

    The same value as ``F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")``;
    the gradient comes back in the logits' dtype. For compiled steps (see :class:`_LogitsCrossEntropy`).
    """
    return _LogitsCrossEntropy.apply(logits, labels)
