"""Float64 reference for linear_cross_entropy: full logits, then F.cross_entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear_cross_entropy(hidden, weight, targets, ignore_index: int = -100, reduction: str = "mean"):
    logits = hidden.double().reshape(-1, hidden.shape[-1]) @ weight.double().t()
    return F.cross_entropy(logits, targets.reshape(-1), ignore_index=ignore_index, reduction=reduction)
