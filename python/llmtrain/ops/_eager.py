"""Eager calls of our custom ops without torch.library's Python dispatch.

Every op is a ``torch.library.custom_op`` forward / backward pair with fake implementations, so that
``torch.compile`` traces it into one graph. Called eagerly, that machinery (Python-level dispatch,
argument normalisation, the autograd wrapper) costs ~125 µs of host time per call, ~250 µs per
forward + backward (2-core CPU, tiny tensors: 406 µs against 150 µs for the same native calls). On an
H100 the RMSNorm+Linear forward + backward took ~1.0 ms of host time for 0.68 ms of kernels
(docs/perf.md, session 10), and a small training step waits on the host.
Outside tracing, ops run the same Python implementations through a plain ``torch.autograd.Function``
built from the custom op's own ``setup_context`` / ``backward``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def tracing(t: torch.Tensor) -> bool:
    """Whether the custom op must be called: under Dynamo, for fake / functional tensor subclasses, or
    inside a dispatch mode (make_fx, opcheck, FakeTensorMode)."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor or _get_current_dispatch_mode() is not None


def backward_op(ctx, op: Callable, impl: Callable) -> Callable:
    """The backward implementation a registered backward should call: the Python one when the eager
    autograd.Function ran the forward, else the custom op (traceable by AOTAutograd)."""
    return impl if getattr(ctx, "eager", False) else op


def autograd_function(name: str, forward: Callable, setup_context: Callable,
                      backward: Callable) -> type[torch.autograd.Function]:
    """An autograd.Function equivalent to ``custom_op(forward).register_autograd(backward,
    setup_context=setup_context)`` for eager calls (same implementation, same saved tensors)."""

    def fn_forward(ctx, *inputs):
        ctx.eager = True
        outputs = forward(*inputs)
        setup_context(ctx, inputs, outputs)
        return outputs

    def fn_backward(ctx, *grads):
        return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(fn_forward), "backward": staticmethod(fn_backward)})
