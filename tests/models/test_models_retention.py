"""Retention LLM: parallel forward == recurrent decoding, O(1) decode memory, padding, training paths."""

import pytest
import torch

from llmtrain.models import RetentionCache, RetentionLLM, retention_state_bytes
from llmtrain.models.hf import output_cache
from llmtrain.ops import feature_dim

from .configs import VOCAB, small_retention


def make_model(dtype=torch.float32, seed=0, **overrides):
    torch.manual_seed(seed)
    return RetentionLLM(small_retention(**overrides)).to(dtype).eval()


def tokens(batch, length, seed=1):
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def decode_one_by_one(model, ids):
    cache, logits = None, []
    for i in range(ids.shape[1]):
        out = model(ids[:, i:i + 1], past_key_values=cache, use_cache=True)
        cache = output_cache(out)
        logits.append(out.logits)
    return torch.cat(logits, dim=1), cache


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 1}, {"qk_norm": "l2"}, {"head_dim": 64}])
def test_parallel_forward_equals_token_by_token_decoding(dtype, tol, overrides):
    model = make_model(dtype, **overrides)
    ids = tokens(2, 13)
    with torch.no_grad():
        parallel = model(ids).logits
        stepped, cache = decode_one_by_one(model, ids)
    assert cache.seen_tokens == 13
    torch.testing.assert_close(stepped, parallel, atol=tol, rtol=tol)


def test_prefill_then_chunks_then_steps_equals_parallel():
    model = make_model(torch.float64, chunk_size=4)   # several kernel chunks inside the prefill
    ids = tokens(2, 17)
    with torch.no_grad():
        parallel = model(ids).logits
        first = model(ids[:, :9], use_cache=True)
        cache = output_cache(first)
        middle = model(ids[:, 9:12], past_key_values=cache)
        rest = [model(ids[:, i:i + 1], past_key_values=cache).logits for i in range(12, 17)]
    torch.testing.assert_close(torch.cat([first.logits, middle.logits, *rest], 1), parallel, atol=1e-10, rtol=1e-10)


def test_decode_memory_does_not_grow_with_context():
    config = small_retention(num_key_value_heads=1)
    model = RetentionLLM(config).eval()
    ids = tokens(1, 64)
    D = feature_dim(config.head_dim, 2)
    with torch.no_grad():
        out = model(ids[:, :4], use_cache=True)
        cache = output_cache(out)
        bytes_after_prompt = cache.nbytes()
        pointers = [cache.get_state(i).state.data_ptr() for i in range(config.num_hidden_layers)]
        for i in range(4, 64):
            model(ids[:, i:i + 1], past_key_values=cache)
    assert cache.seen_tokens == 64
    assert cache.nbytes() == bytes_after_prompt == retention_state_bytes(config)
    for i in range(config.num_hidden_layers):
        state = cache.get_state(i)
        assert tuple(state.state.shape) == (1, 1, D, config.head_dim)
        assert tuple(state.sum_of_keys.shape) == (1, 1, D)
        assert state.state.dtype == torch.float32
        assert state.state.data_ptr() == pointers[i], "decode steps must update the state in place"


def test_generate_keeps_a_constant_size_cache_and_reset_states_clears_it():
    model = make_model()
    ids = tokens(1, 5)
    short = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    short_bytes = output_cache(short).nbytes()
    long = model.generate(ids, max_new_tokens=40, do_sample=False, return_dict_in_generate=True,
                          eos_token_id=None)
    assert isinstance(output_cache(long), RetentionCache)
    assert output_cache(long).nbytes() == short_bytes
    assert long.sequences.shape[1] == 45
    assert model.recurrent_state is output_cache(long)
    held = model.recurrent_state.get_state(0).state
    model.reset_states()
    assert model.recurrent_state is None
    assert held.abs().sum() == 0


def test_left_padding_matches_unpadded_rows():
    model = make_model(torch.float64)
    ids = tokens(2, 9)
    padded = ids.clone()
    padded[0, :4] = 0
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        batch = model(padded, attention_mask=mask).logits
        alone = model(ids[:1, 4:]).logits
        full_row = model(ids[1:]).logits
    # exp(-30) of the pad tokens' state leaks through: far below float32 resolution
    torch.testing.assert_close(batch[0, 4:], alone[0], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(batch[1], full_row[0], atol=1e-12, rtol=1e-12)


def test_batched_generate_with_left_padding_matches_single_generation():
    model = make_model()
    ids = tokens(2, 8)
    padded = ids.clone()
    padded[0, :3] = 0
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    batch = model.generate(padded, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None)
    single = model.generate(ids[:1, 3:], max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert torch.equal(batch[0, 8:], single[0, 5:])


def test_loss_is_shifted_cross_entropy_and_logits_to_keep():
    model = make_model()
    ids = tokens(2, 10)
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    # the seam for a chunked loss: hidden states and the head, no full logits
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(model.lm_head(hidden), out.logits)
    torch.testing.assert_close(model(ids, logits_to_keep=1).logits, out.logits[:, -1:])


def test_backward_reaches_every_parameter_and_gradient_checkpointing_matches():
    model = make_model().train()
    ids = tokens(2, 12)
    model(ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_initialisation_scales_residual_projections_and_spreads_gates():
    config = small_retention(num_hidden_layers=8, hidden_size=256, num_attention_heads=8, intermediate_size=512,
                             num_key_value_heads=4)
    torch.manual_seed(0)
    model = RetentionLLM(config)
    attn = model.model.layers[0].attn
    assert abs(attn.qkvg_proj.weight.std().item() - 0.02) < 0.002
    assert abs(attn.o_proj.weight.std().item() - 0.02 / 4) < 0.001       # 0.02 / sqrt(2 * 8)
    keep_per_token = torch.sigmoid(attn.gate_bias)
    half_lives = -1 / torch.log2(keep_per_token)
    torch.testing.assert_close(half_lives[[0, -1]], torch.tensor(config.gate_half_life_range), rtol=1e-3, atol=0)


def test_wrong_cache_type_is_rejected():
    from transformers import DynamicCache

    model = make_model()
    with pytest.raises(TypeError, match="RetentionCache"):
        model(tokens(1, 3), past_key_values=DynamicCache())
