"""Sampling for the MLX models: prefill the prompt once, then one token at a time from the cache
(retention: a constant-size recurrent state per layer; MLA: the latent cache)."""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx

from llmtrain.mlx.models.lm import CausalLM


def sample_next_token(logits: mx.array, key: mx.array, temperature: float = 1.0, top_k: Optional[int] = None,
                      top_p: Optional[float] = None) -> mx.array:
    """Token ids [batch] from logits [batch, vocab]: greedy at temperature 0, else a sample from the
    softmax at ``temperature`` restricted to the ``top_k`` most likely tokens and to the smallest set
    whose probability reaches ``top_p`` (nucleus)."""
    if temperature == 0:
        return mx.argmax(logits, axis=-1)
    logits = logits.astype(mx.float32) / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth_largest = mx.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = mx.where(logits < kth_largest, -mx.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        mass_before = mx.cumsum(probs, axis=-1) - probs   # the most likely token always stays
        sorted_logits = mx.where(mass_before >= top_p, -mx.inf, sorted_logits)
        choice = mx.random.categorical(sorted_logits, key=key)
        return mx.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return mx.random.categorical(logits, key=key)


def generate(model: CausalLM, prompt_ids: Sequence[int] | mx.array, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Optional[int] = None, seed: int = 0) -> mx.array:
    """Prompt followed by up to ``max_new_tokens`` sampled tokens: [batch, prompt + new] int32.

    ``prompt_ids`` is [prompt] or [batch, prompt] (rows of equal length). Stops early once every row
    has produced ``eos_token_id``; rows that finished earlier keep emitting it.
    """
    ids = prompt_ids if isinstance(prompt_ids, mx.array) else mx.array(prompt_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"generate: prompt_ids must be a non-empty [prompt] or [batch, prompt], got {ids.shape}")
    ids = ids.astype(mx.int32)
    key = mx.random.key(seed)
    cache = model.make_cache()
    logits = model(ids, cache=cache, logits_to_keep=1)[:, -1]
    generated = [ids]
    finished = mx.zeros((ids.shape[0],), mx.bool_)
    for _ in range(max_new_tokens):
        key, sub = mx.random.split(key)
        token = sample_next_token(logits, sub, temperature, top_k, top_p).astype(mx.int32)
        if eos_token_id is not None:
            token = mx.where(finished, eos_token_id, token)
            finished = mx.logical_or(finished, token == eos_token_id)
        generated.append(token[:, None])
        if eos_token_id is not None and bool(mx.all(finished)):
            break
        logits = model(token[:, None], cache=cache)[:, -1]
        mx.eval(logits, cache.arrays())
    return mx.concatenate(generated, axis=1)
