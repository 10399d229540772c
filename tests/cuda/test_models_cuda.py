"""Model pieces on a CUDA GPU: the half-precision RMSNorm path (q/k norms of the retention model)
against the float64 reference, and a retention model's bf16-autocast loss and gradients against
its float32 run. Skips cleanly where torch has no CUDA."""
import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.cuda

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from llmtrain.models import RetentionLLM, create_model_config  # noqa: E402
from llmtrain.models.layers import RMSNorm  # noqa: E402


def rel(out, ref):
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("autocast", [False, True])
def test_half_rms_norm_matches_float64(dtype, autocast):
    """bf16/fp16 CUDA inputs stay in their dtype (no float32 copy of x; float32 accumulation in
    torch's fused kernel): output in x's dtype, output and both gradients within half rounding."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(5, 333, 64, device="cuda", generator=g) * 3).to(dtype).requires_grad_(True)
    norm = RMSNorm(64, 1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(64, device="cuda", generator=g) + 0.5)
    dy = torch.randn(x.shape, device="cuda", generator=g).to(dtype)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        y = norm(x)
    assert y.dtype == dtype
    gx, gw = torch.autograd.grad(y, (x, norm.weight), dy)
    xd = x.detach().double().requires_grad_(True)
    wd = norm.weight.detach().double().requires_grad_(True)
    yd = F.rms_norm(xd, (64,), wd, 1e-6)
    rx, rw = torch.autograd.grad(yd, (xd, wd), dy.double())
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert rel(y, yd) < tol
    assert rel(gx, rx) < tol
    assert gw.dtype == torch.float32 and rel(gw, rw) < tol


def test_retention_model_autocast_matches_float32():
    """A tiny retention model (q/k RMS norms, CUDA power retention, fused cross-entropy): the bf16
    autocast loss and gradients agree with the float32 run of the same weights and tokens."""
    torch.manual_seed(0)
    model = RetentionLLM(create_model_config("tiny", num_hidden_layers=2, vocab_size=512)).cuda()
    ids = torch.randint(0, 512, (2, 300), device="cuda")
    losses, grads = {}, {}
    for amp in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = model(ids, labels=ids).loss
        loss.backward()
        losses[amp] = loss.item()
        grads[amp] = torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    assert abs(losses[True] - losses[False]) < 2e-2 * abs(losses[False])
    assert rel(grads[True], grads[False]) < 5e-2
