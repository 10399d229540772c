"""The three float64 forms of power retention agree, and the feature map is the kernel's."""

import pytest
import torch

from llmtrain.ops.power_retention import reference as R
from tests.conftest import rel_err
from tests.ops.retention_inputs import make_inputs


def test_feature_map_is_squared_dot(rng):
    x = torch.randn(7, 13, generator=rng, dtype=torch.float64)
    y = torch.randn(7, 13, generator=rng, dtype=torch.float64)
    lhs = (R.sym_power_features(x) * R.sym_power_features(y)).sum(-1)
    assert R.sym_power_features(x).shape[-1] == 13 * 14 // 2 == R.feature_dim(13)
    torch.testing.assert_close(lhs, (x * y).sum(-1) ** 2, rtol=1e-12, atol=0)


@pytest.mark.parametrize("b,t,hq,hk,d,chunk", [(1, 1, 1, 1, 8, 4), (3, 37, 5, 5, 8, 8), (2, 50, 8, 2, 16, 16),
                                               (1, 64, 4, 1, 32, 64)])
@pytest.mark.parametrize("gating", [True, False])
@pytest.mark.parametrize("initial_state", [False, True])
def test_forms_agree(rng, b, t, hq, hk, d, chunk, gating, initial_state):
    q, k, v, log_g, state = make_inputs(b, t, hq, hk, d, dtype=torch.float64, gating=gating,
                                        initial_state=initial_state, gen=rng)
    yq = R.quadratic(q, k, v, log_g, initial_state=state)
    yc, (Sc, zc) = R.chunked(q, k, v, log_g, chunk_size=chunk, initial_state=state)
    yr, (Sr, zr) = R.recurrent(q, k, v, log_g, initial_state=state)
    Sf, zf = R.final_state(k, v, log_g, initial_state=state)
    assert rel_err(yc, yq) < 1e-10
    assert rel_err(yr, yq) < 1e-10
    for S, z in ((Sc, zc), (Sr, zr)):
        assert rel_err(S, Sf) < 1e-10 and rel_err(z, zf) < 1e-10


def test_matches_definition_literally(rng):
    """quadratic() against the formula written out element by element."""
    q, k, v, log_g, _ = make_inputs(1, 6, 2, 1, 4, dtype=torch.float64, gen=rng)
    s = 0.5
    G = log_g.cumsum(1)
    y = R.quadratic(q, k, v, log_g, scale=s)
    for h in range(2):
        for i in range(6):
            w = torch.stack([(s * q[0, i, h] @ k[0, j, 0]) ** 2 * torch.exp(G[0, i, 0] - G[0, j, 0])
                             for j in range(i + 1)])
            expect = (w[:, None] * v[0, : i + 1, 0]).sum(0) / w.sum()
            torch.testing.assert_close(y[0, i, h], expect, rtol=1e-12, atol=1e-12)


def test_chunked_state_continues_a_sequence(rng):
    """Running two halves with the state carried equals one run over the whole."""
    q, k, v, log_g, _ = make_inputs(2, 40, 4, 2, 8, dtype=torch.float64, gen=rng)
    y, _ = R.chunked(q, k, v, log_g, chunk_size=16)
    y1, st = R.chunked(q[:, :23], k[:, :23], v[:, :23], log_g[:, :23], chunk_size=16)
    y2, _ = R.chunked(q[:, 23:], k[:, 23:], v[:, 23:], log_g[:, 23:], chunk_size=16, initial_state=st)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12
