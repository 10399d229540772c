"""``linear_cross_entropy``: cross_entropy(hidden @ weight.T, targets) without the [tokens, vocab] logits.

The tokens are processed in chunks of rows: each chunk's logits are formed, reduced to its loss
(logsumexp in float32 or better), and dropped. The peak extra memory is one chunk's logits instead of
tokens x vocab (a 32K-token batch against a 50K vocabulary is 6.6 GB of float32 logits; a chunk is
~0.5 GB).

Gradients, two modes:
- default: when a gradient will be needed, the forward computes it in the same pass (softmax minus
  one-hot, then d_hidden and d_weight) and keeps it for the backward: three GEMMs in all, the same as
  an unfused lm_head + cross-entropy, and the chunk's logits are only formed once.
- ``recompute=True``: the forward only keeps the loss; the backward recomputes each chunk's logits
  (four GEMMs) and holds no gradient between forward and backward.
Both accumulate d_weight over chunks in float32 (or float64) and round once.

Registered as ``llmtrain::linear_ce_fwd`` / ``llmtrain::linear_ce_bwd`` custom ops, so the loop is one
opaque node under ``torch.compile``. Works on any device torch does (it is plain torch per chunk).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmtrain.ops import _eager, _native

# Logits elements per chunk (rows x vocab): 2^27 -> 0.5 GB of float32 logits (the gradient is formed in
# place) + its bf16 copy. Bigger than needed for memory on purpose: every chunk re-reads and re-writes
# the float32 d_weight accumulator (vocab x hidden), so fewer chunks cost less traffic.
CHUNK_ELEMENTS = 1 << 27


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk: CHUNK_ELEMENTS / vocab, a multiple of 64 (GEMM-friendly), at least 64."""
    return max(64, CHUNK_ELEMENTS // max(1, vocab_size) // 64 * 64)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n: int, rows: int):
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def _chunk(h: Tensor, w: Tensor, t: Tensor, ignore_index: int, dw: Tensor | None):
    """Loss sum of one chunk; with dw given, also its d_hidden (returned) and d_weight (added to dw)."""
    acc = _acc(h.dtype)
    logits = (h @ w.t()).to(acc)
    valid = t != ignore_index
    safe = torch.where(valid, t, torch.zeros_like(t))
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    if dw is None:
        return loss, None
    # d loss_sum / d logits = softmax - onehot(target), zero on ignored rows; built in place in `logits`.
    grad = logits.sub_(lse[:, None]).exp_()
    grad.scatter_add_(1, safe[:, None], -torch.ones_like(lse)[:, None])
    grad.mul_(valid[:, None].to(acc))
    grad = grad.to(h.dtype)
    dw.add_(grad.t() @ h)
    return loss, grad @ w


def _run(h, w, t, ignore_index, rows, want_grad):
    acc = _acc(h.dtype)
    loss = torch.zeros((), dtype=acc, device=h.device)
    dh = torch.empty_like(h) if want_grad else h.new_empty(0)
    dw = torch.zeros(w.shape, dtype=acc, device=w.device) if want_grad else None
    # The caller has already cast to the compute dtype; autocast must not recast the chunks' GEMMs.
    with torch.autocast(h.device.type, enabled=False):
        for a, b in _chunks(h.shape[0], rows):
            part, dh_part = _chunk(h[a:b], w, t[a:b], ignore_index, dw)
            loss += part
            if want_grad:
                dh[a:b] = dh_part
    return loss, dh, (dw.to(w.dtype) if want_grad else w.new_empty(0))


def _forward(h: Tensor, w: Tensor, t: Tensor, ignore_index: int, rows: int,
            with_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(loss_sum, d loss_sum/d h or empty, d loss_sum/d w or empty)."""
    return _run(h, w, t, ignore_index, rows, with_grad)


_fwd_op = torch.library.custom_op("llmtrain::linear_ce_fwd", _forward, mutates_args=())


@_fwd_op.register_fake
def _fwd_fake(h, w, t, ignore_index, rows, with_grad):
    loss = h.new_empty((), dtype=_acc(h.dtype))
    if with_grad:
        return loss, torch.empty_like(h), torch.empty_like(w)
    return loss, h.new_empty(0), w.new_empty(0)


def _backward_impl(h: Tensor, w: Tensor, t: Tensor, ignore_index: int, rows: int) -> tuple[Tensor, Tensor]:
    """(d loss_sum/d h, d loss_sum/d w), recomputing each chunk's logits."""
    _, dh, dw = _run(h, w, t, ignore_index, rows, True)
    return dh, dw


_bwd_op = torch.library.custom_op("llmtrain::linear_ce_bwd", _backward_impl, mutates_args=())


@_bwd_op.register_fake
def _bwd_fake(h, w, t, ignore_index, rows):
    return torch.empty_like(h), torch.empty_like(w)


def _setup_context(ctx, inputs, output):
    h, w, t, ignore_index, rows, with_grad = inputs
    ctx.with_grad, ctx.ignore_index, ctx.rows = with_grad, ignore_index, rows
    if with_grad:
        ctx.save_for_backward(output[1], output[2])
    else:
        ctx.save_for_backward(h, w, t)


def _backward(ctx, g_loss, _g_dh, _g_dw):
    if ctx.with_grad:
        dh, dw = ctx.saved_tensors
    else:
        h, w, t = ctx.saved_tensors
        bwd = _eager.backward_op(ctx, torch.ops.llmtrain.linear_ce_bwd, _backward_impl)
        dh, dw = bwd(h, w, t, ctx.ignore_index, ctx.rows)
    return (dh * g_loss.to(dh.dtype)), (dw * g_loss.to(dw.dtype)), None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)
_EagerFunction = _eager.autograd_function("LinearCrossEntropyFunction", _forward, _setup_context, _backward)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, *, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int | None = None,
                         recompute: bool = False) -> Tensor:
    """F.cross_entropy(hidden @ weight.T, targets) computed ``chunk_rows`` tokens at a time.

    hidden [..., H], weight [V, H] (an lm_head's weight, no bias), targets [...] integer class ids
    (``ignore_index`` rows count neither in the loss nor in the mean). reduction "mean" or "sum".
    Follows autocast like F.linear: under bf16 autocast the GEMMs run in bf16 and the logsumexp in
    float32; the loss is float32 (float64 for float64 inputs).
    """
    for name, x in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(x, Tensor):
            raise TypeError(f"linear_cross_entropy: {name} must be a torch.Tensor, got {type(x).__name__}")
    if hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError("linear_cross_entropy: hidden must be a floating tensor [..., hidden_size]")
    hsize = hidden.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != hsize:
        raise ValueError(f"linear_cross_entropy: weight must be [vocab, {hsize}], got {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets must have shape {tuple(hidden.shape[:-1])} "
                         f"(hidden without its last dim), got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError("linear_cross_entropy: hidden, weight and targets must be on one device")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0])
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy: chunk_rows must be a positive int, got {chunk_rows!r}")
    t = targets.reshape(-1).long()
    if not torch.compiler.is_compiling():  # a data-dependent check: one host sync, skipped when traced
        bad = (t != ignore_index) & ((t < 0) | (t >= weight.shape[0]))
        if bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: target {int(t[bad][0])} is outside [0, {weight.shape[0]}) "
                             f"and is not ignore_index ({ignore_index})")
    cast = _native.autocast_dtype(hidden)
    if cast is not None:
        hidden = hidden.to(cast)
    if weight.dtype != hidden.dtype:  # fp32 master weights with bf16 activations: compute in bf16
        weight = weight.to(hidden.dtype)
    h = hidden.reshape(-1, hsize).contiguous()
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad) and not recompute
    fwd = torch.ops.llmtrain.linear_ce_fwd if _eager.tracing(h) else _EagerFunction.apply
    loss_sum, _, _ = fwd(h, weight.contiguous(), t, int(ignore_index), int(chunk_rows), with_grad)
    if reduction == "sum":
        return loss_sum
    return loss_sum / (t != ignore_index).sum().to(loss_sum.dtype)
