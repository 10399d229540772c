"""Learning-rate schedule: linear warmup, then cosine decay to min_lr."""

import math


def cosine_with_warmup(step: int, *, max_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1 + math.cos(math.pi * progress))
