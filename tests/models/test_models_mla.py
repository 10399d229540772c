"""MLA transformer: absorbed latent decoding == parallel SDPA forward, latent-only cache, padding, training."""

import pytest
import torch
from transformers import DynamicCache

from llmtrain.models import MLAForCausalLM, MLATransformer
from llmtrain.models.hf import output_cache
from llmtrain.models.mla import MultiHeadLatentAttention

from .configs import VOCAB, small_mla


def make_model(dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    return MLAForCausalLM(small_mla(**overrides)).to(dtype).eval()


def tokens(batch, length, seed=1):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_parallel_forward_equals_token_by_token_absorbed_decoding(dtype, tol):
    model = make_model(dtype)
    ids = tokens(2, 13)
    with torch.no_grad():
        parallel = model(ids).logits
        cache, stepped = None, []
        for i in range(13):
            out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
            cache = output_cache(out)
            stepped.append(out.logits)
    torch.testing.assert_close(torch.cat(stepped, 1), parallel, atol=tol, rtol=tol)


def test_decoding_never_expands_keys_or_values(monkeypatch):
    """After the prefill, the kv up-projection is only read as absorbed weights, never applied."""
    model = make_model(torch.float64)
    ids = tokens(1, 8)
    with torch.no_grad():
        cache = output_cache(model(ids[:, :5], use_cache=True))
        calls = []
        for layer in model.model.layers:
            monkeypatch.setattr(layer.attn.kv_up_proj, "forward", lambda x: calls.append(x) or 1 / 0)
        for i in range(5, 8):
            model(ids[:, i:i + 1], past_key_values=cache)
    assert calls == []


def test_cache_holds_only_latent_and_rotary_key():
    config = small_mla()
    model = MLATransformer(config).eval()
    ids = tokens(3, 7)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        model(tokens(3, 1, seed=2), past_key_values=output_cache(out))
    cache = output_cache(out)
    assert isinstance(cache, DynamicCache) and cache.get_seq_length() == 8
    for layer in cache.layers:
        assert tuple(layer.keys.shape) == (3, 1, 8, config.kv_lora_rank)
        assert tuple(layer.values.shape) == (3, 1, 8, config.qk_rope_head_dim)
    per_token = sum(l.keys[0, 0, 0].numel() + l.values[0, 0, 0].numel() for l in cache.layers)
    assert per_token == config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim)


def test_absorbed_multi_token_chunk_matches_parallel():
    model = make_model(torch.float64)
    ids = tokens(2, 12)
    with torch.no_grad():
        parallel = model(ids).logits
        first = model(ids[:, :5], use_cache=True)
        second = model(ids[:, 5:], past_key_values=output_cache(first))
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), parallel, atol=1e-10, rtol=1e-10)


def test_left_padding_matches_unpadded_rows_in_prefill_and_decode():
    model = make_model(torch.float64)
    ids = tokens(2, 9)
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[0, :4], mask[0, :4] = 0, 0
    nxt = tokens(2, 1, seed=5)
    with torch.no_grad():
        batch = model(padded, attention_mask=mask, use_cache=True)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1),
                     past_key_values=output_cache(batch))
        alone = model(torch.cat([ids[:1, 4:], nxt[:1]], 1)).logits
    torch.testing.assert_close(batch.logits[0, 4:], alone[0, :-1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(step.logits[0, 0], alone[0, -1], atol=1e-10, rtol=1e-10)
    assert torch.isfinite(batch.logits).all()


def test_rotary_makes_attention_depend_on_relative_position_only():
    """Shifting all positions by a constant leaves the outputs unchanged (RoPE is relative)."""
    model = make_model(torch.float64)
    ids = tokens(1, 6)
    base = torch.arange(6)[None]
    with torch.no_grad():
        a = model(ids, position_ids=base).logits
        b = model(ids, position_ids=base + 1000).logits
        c = model(ids, position_ids=base * 2).logits
    torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    assert (a - c).abs().max() > 1e-4


def test_loss_backward_and_gradient_checkpointing():
    model = make_model().train()
    ids = tokens(2, 10)
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_attention_scale_and_shapes():
    config = small_mla()
    attn = MultiHeadLatentAttention(config, 0)
    assert attn.softmax_scale == pytest.approx((config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5)
    assert attn.latent_proj.weight.shape == (config.q_lora_rank + config.kv_lora_rank + config.qk_rope_head_dim,
                                             config.hidden_size)
    assert attn.kv_up_proj.weight.shape == (config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim),
                                            config.kv_lora_rank)


def test_bad_cache_and_mask_are_rejected():
    model = make_model()
    with pytest.raises(TypeError, match="DynamicCache"):
        model(tokens(1, 3), past_key_values=object())
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(tokens(1, 3), attention_mask=torch.ones(1, 1, 3, 3))
