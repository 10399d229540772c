"""Random inputs for power retention tests: never zeros, gates in the forget range."""

import torch
import torch.nn.functional as F

from llmtrain.ops.power_retention.reference import feature_dim


def make_inputs(b, t, hq, hk, d, *, dtype=torch.float32, gating=True, initial_state=False, gen=None,
                requires_grad=False):
    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, k, v = randn(b, t, hq, d), randn(b, t, hk, d), randn(b, t, hk, d)
    log_g = F.logsigmoid(randn(b, t, hk) + 3.0) if gating else None
    state = None
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if initial_state:
        D = feature_dim(d)
        # a plausible state: the state of a random prefix
        kp, vp = randn(b, 16, hk, d), randn(b, 16, hk, d)
        from llmtrain.ops.power_retention.reference import final_state

        S, z = final_state(kp, vp, F.logsigmoid(randn(b, 16, hk) + 3.0))
        state = (S.to(acc), z.to(acc))
        assert S.shape == (b, hk, D, d)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    log_g = log_g.to(acc) if log_g is not None else None
    if requires_grad:
        for x in (q, k, v, log_g, *(state or ())):
            if x is not None:
                x.requires_grad_(True)
    return q, k, v, log_g, state
