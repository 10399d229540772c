"""A tour of llmtrain's two fused ops on whatever device is here (CPU unless CUDA is present).

    python examples/ops_demo.py

Runs power retention (chunked training form and recurrent decoding form) and RMSNorm+Linear,
checks each against its float64 reference and prints timings.
"""

import time

import torch
import torch.nn.functional as F

import llmtrain.ops as ops
from llmtrain.ops.power_retention import reference as retention_ref
from llmtrain.ops.rmsnorm_linear import reference as rmsnorm_linear_ref


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    b, t, heads, kv_heads, d = 2, 512, 8, 2, 64
    q = torch.randn(b, t, heads, d, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(b, t, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, t, kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    log_g = F.logsigmoid(torch.randn(b, t, kv_heads, device=device) + 3).requires_grad_(True)

    start = time.perf_counter()
    y, state = ops.power_retention(q, k, v, log_g, return_state=True)
    y.float().square().mean().backward()
    elapsed = time.perf_counter() - start
    y_ref = retention_ref.quadratic(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), log_g.detach().cpu())
    print(f"power_retention  [b={b} t={t} heads={heads}/{kv_heads} d={d} {dtype}] on {device}: "
          f"forward+backward {elapsed * 1e3:.1f} ms, rel. error vs float64 {rel_err(y.cpu(), y_ref):.1e}")
    print(f"  state per KV head: {tuple(state.state.shape[2:])} (D = d(d+1)/2 = {d * (d + 1) // 2})")

    # Decoding: continue the sequence one token at a time from the returned state.
    with torch.no_grad():
        q1, k1, v1 = (x[:, -1:].detach().clone() for x in (q, k, v))
        start = time.perf_counter()
        y1, state = ops.power_retention_step(q1, k1, v1, log_g[:, -1:].detach(), state=state, inplace=True)
        print(f"  decode step for {b} sequences: {(time.perf_counter() - start) * 1e3:.2f} ms "
              f"(constant in the context length)")

    x = torch.randn(b * t, 512, device=device, dtype=dtype)
    g = torch.ones(512, device=device, dtype=dtype)
    w = torch.randn(1536, 512, device=device, dtype=dtype) / 512**0.5
    start = time.perf_counter()
    out = ops.rmsnorm_linear(x, g, w)
    elapsed = time.perf_counter() - start
    err = rel_err(out.cpu(), rmsnorm_linear_ref.rmsnorm_linear(x.cpu(), g.cpu(), w.cpu()))
    print(f"rmsnorm_linear   [{b * t}x512 -> 1536 {dtype}] on {device}: {elapsed * 1e3:.1f} ms, "
          f"rel. error vs float64 {err:.1e}")


if __name__ == "__main__":
    main()
