"""Which W column does each x column meet in the v6 GEMM? One-hot x rows, g = 1, random W:
y[r, :] = rstd_r * W[:, pi(k_r)] if the kernel only permutes k."""
import os, sys, torch
sys.path.insert(0, "tests/cuda")
import test_rmsnorm_linear_cuda as T
torch.manual_seed(0)
n, k, m = 16, 64, 32
w = torch.randn(m, k, device="cuda").to(torch.bfloat16)
nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
dy = torch.randn(n, m, device="cuda").to(torch.bfloat16)
for gen in ("v6ro", "v6"):
    os.environ["LLMTRAIN_RMSLIN_FWD"] = gen
    found = []
    for k0 in range(0, 64, 1):
        x = torch.zeros(n, k, device="cuda", dtype=torch.bfloat16)
        for r in range(n):
            x[r, (k0 + 5 * r) % 64] = 1.0
        y = T.call_native(x, nw, w, None, dy, 1e-6)[0].float() / 8.0  # rstd = 8
        row = []
        for r in range(n):
            err = (y[r][:, None] - w.float()).abs().max(0).values  # vs every W column
            best = int(err.argmin())
            row.append((best, round(float(err[best]), 3), round(float(y[r].abs().max()), 3)))
        found.append(row)
    print(f"== {gen}: x row r hot at k = (k0 + 5 r) % 64 -> (best W column, max abs residual, max |y|)")
    for k0, row in enumerate(found[:64]):
        print(k0, row[:4])
