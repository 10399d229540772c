"""RMSNorm+Linear forward generations side by side on a few small shapes (GPU): y and rstd of ro, v6ro
and v6 against the default path, and where y differs, which rows and columns (session 16: y wrong
with rstd right pointed at the A operand's addressing, not the sums)."""
import os, sys, torch
sys.path.insert(0, "tests/cuda")
import test_rmsnorm_linear_cuda as T
torch.set_printoptions(precision=4, linewidth=200)
for (n, k, m, bias) in [(1, 64, 32, False), (1, 64, 32, True), (37, 96, 80, False), (129, 256, 200, True), (1023, 2048, 2048, False)]:
    x, nw, w, b, dy = T.make(n, k, m, torch.bfloat16, bias, 3)
    os.environ.pop("LLMTRAIN_RMSLIN_FWD", None)
    base = T.call_native(x, nw, w, b, dy, 1e-6)
    for gen in ("ro", "v6ro", "v6"):
        os.environ["LLMTRAIN_RMSLIN_FWD"] = gen
        out = T.call_native(x, nw, w, b, dy, 1e-6)
        y, r = out[0].float(), out[1]
        yb, rb = base[0].float(), base[1]
        print(f"== {gen} n={n} k={k} m={m} bias={bias}: y rel {T.rel_err(y, yb):.3e} rstd rel {T.rel_err(r, rb):.3e} finite y {torch.isfinite(y).all().item()} rstd {torch.isfinite(r).all().item()}")
        if T.rel_err(y, yb) > 1e-2 or not torch.isfinite(y).all():
            print("  rstd ratio (first 8 rows):", (r / rb)[:8])
            bad = ((y - yb).abs() > 0.05 * yb.abs().max())
            print("  bad rows:", bad.any(1).nonzero().flatten()[:20].tolist(), " bad cols:", bad.any(0).nonzero().flatten()[:40].tolist())
            print("  y[0,:8]", y[0, :8]); print("  base[0,:8]", yb[0, :8])
            if bias: print("  y - base (row 0, first 8):", (y - yb)[0, :8], " bias:", b[:8].float())
