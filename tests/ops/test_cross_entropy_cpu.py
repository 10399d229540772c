"""linear_cross_entropy (chunked, no full logits) against the float64 reference and F.cross_entropy."""

import pytest
import torch
import torch.nn.functional as F

from llmtrain.ops.cross_entropy import default_chunk_rows, linear_cross_entropy
from llmtrain.ops.cross_entropy import reference as R
from tests.conftest import rel_err


def make(shape, hidden, vocab, dtype, gen, ignored=0.1):
    h = torch.randn(*shape, hidden, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=gen, dtype=torch.float64) / hidden**0.25).to(dtype)
    t = torch.randint(0, vocab, shape, generator=gen)
    t[torch.rand(shape, generator=gen) < ignored] = -100
    return h, w, t


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_reference(rng, dtype, tol, recompute, reduction):
    h, w, t = make((3, 37), 24, 101, dtype, rng)  # 111 rows in chunks of 16: a ragged last chunk
    h.requires_grad_(True), w.requires_grad_(True)
    got = linear_cross_entropy(h, w, t, reduction=reduction, chunk_rows=16, recompute=recompute)
    want = R.linear_cross_entropy(h, w, t, reduction=reduction)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(got, want) < tol
    cot = 0.5 + torch.rand((), generator=rng, dtype=torch.float64)  # a non-unit upstream gradient
    g_got = torch.autograd.grad(got * cot.to(got.dtype), (h, w))
    g_want = torch.autograd.grad(want * cot, (h, w))
    for a, b in zip(g_got, g_want):
        assert a.dtype == dtype and rel_err(a, b) < tol


def test_matches_f_cross_entropy_float64(rng):
    h, w, t = make((64,), 16, 50, torch.float64, rng)
    want = F.cross_entropy(h @ w.t(), t, ignore_index=-100)
    assert abs(linear_cross_entropy(h, w, t, chunk_rows=7).item() - want.item()) < 1e-12 * abs(want.item())


@pytest.mark.parametrize("recompute", [False, True])
def test_gradcheck(rng, recompute):
    h, w, t = make((2, 5), 6, 11, torch.float64, rng, ignored=0.2)
    h.requires_grad_(True), w.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, t, chunk_rows=3, recompute=recompute), (h, w))


def test_autocast_bf16_follows_f_linear(rng):
    h, w, t = make((40,), 32, 70, torch.float32, rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_cross_entropy(h, w, t, chunk_rows=8)
        logits = F.linear(h, w)
    assert logits.dtype == torch.bfloat16 and got.dtype == torch.float32
    want = F.cross_entropy(logits.float(), t)  # the unfused path under autocast
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, R.linear_cross_entropy(h, w, t)) < 2e-2


def test_no_grad_and_default_chunks(rng):
    assert default_chunk_rows(50304) % 64 == 0 and default_chunk_rows(10**9) == 64
    h, w, t = make((300,), 8, 20, torch.float64, rng)
    with torch.no_grad():
        got = linear_cross_entropy(h, w, t)
    assert rel_err(got, R.linear_cross_entropy(h, w, t)) < 1e-12


def test_bad_input(rng):
    h, w, t = make((4, 5), 8, 10, torch.float32, rng, ignored=0)
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :7], t)
    with pytest.raises(ValueError, match="targets must have shape"):
        linear_cross_entropy(h, w, t[:, :3])
    with pytest.raises(TypeError, match="integer class ids"):
        linear_cross_entropy(h, w, t.float())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, t, chunk_rows=0)
    bad = t.clone()
    bad[1, 2] = 10
    with pytest.raises(ValueError, match="target 10 is outside"):
        linear_cross_entropy(h, w, bad)


@pytest.mark.parametrize("preset", ["tiny", "mla-1b"])
def test_models_route_shift_labels(rng, preset):
    from llmtrain.models import build_model, create_model_config
    from llmtrain.training.trainer import lm_loss

    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=96, vocab_size=97)
    if preset == "mla-1b":
        small.update(q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    torch.manual_seed(0)
    model = build_model(create_model_config(preset, **small)).double()
    ids = torch.randint(0, 97, (2, 12), generator=rng)
    targets = torch.randint(0, 97, (2, 12), generator=rng)
    targets[0, :3] = -100
    fused = model(ids, shift_labels=targets)
    assert fused.logits is None  # never built
    logits = model(ids).logits
    want = F.cross_entropy(logits.reshape(-1, 97), targets.reshape(-1), ignore_index=-100)
    assert rel_err(fused.loss, want) < 1e-12
    assert rel_err(lm_loss(model, ids, targets), want) < 1e-12
    # HF-style labels keep returning logits (their loss is float32), and the fused path matches them
    labels_out = model(ids, labels=ids)
    assert labels_out.logits is not None
    assert rel_err(model(ids[:, :-1], shift_labels=ids[:, 1:]).loss, labels_out.loss) < 1e-6
    # the switch: fused_cross_entropy off builds the logits and gives the same loss
    model.config.fused_cross_entropy = False
    plain = model(ids, shift_labels=targets)
    assert plain.logits is not None and rel_err(plain.loss, want) < 1e-6  # float32 loss
    model.config.fused_cross_entropy = "no"
    with pytest.raises(ValueError, match="fused_cross_entropy must be true or false"):
        model(ids, shift_labels=targets)
