"""The MLX models against the torch models: shared weights give the same logits (both directions),
recurrent decoding equals the parallel forward, padding, generation, gradient checkpointing."""

from __future__ import annotations

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from llmtrain.mlx.models import (  # noqa: E402
    build_model,
    generate,
    load_pretrained,
    model_weights,
    save_pretrained,
    weight_aliases,
)
from llmtrain.mlx.ops import set_backend  # noqa: E402
from llmtrain.models import MLAForCausalLM, RetentionLLM, create_model_config  # noqa: E402

SMALL = dict(vocab_size=97, num_hidden_layers=2, hidden_size=64, intermediate_size=128)
RETENTION_CONFIGS = {
    "gqa-rms-tied": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, chunk_size=8),
    "l2-untied": dict(num_attention_heads=2, head_dim=32, qk_norm="l2", tie_word_embeddings=False),
    "none-d64": dict(num_attention_heads=2, head_dim=64, qk_norm="none"),
}
MLA_CONFIGS = {
    "untied": dict(num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=12, tie_word_embeddings=False),
    "tied": dict(num_attention_heads=3, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
                 qk_rope_head_dim=8, v_head_dim=16, tie_word_embeddings=True),
}
TOL = 2e-5  # fp32, relative to the largest logit


@pytest.fixture(autouse=True)
def pure_mlx_ops():
    set_backend("mlx")  # the CPU path; the Metal kernels are tested in test_metal_kernels.py
    yield
    set_backend(None)


def torch_model(kind: str, name: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "retention":
        return RetentionLLM(create_model_config("tiny", **SMALL, **RETENTION_CONFIGS[name])).eval()
    return MLAForCausalLM(create_model_config("mla-1b", **SMALL, **MLA_CONFIGS[name])).eval()


ALL_MODELS = [("retention", n) for n in RETENTION_CONFIGS] + [("mla", n) for n in MLA_CONFIGS]


def token_ids(shape, seed=0, vocab=97):
    return np.random.default_rng(seed).integers(0, vocab, shape)


def torch_logits(model, ids, attention_mask=None):
    with torch.no_grad():
        mask = None if attention_mask is None else torch.tensor(attention_mask)
        return model(torch.tensor(ids), attention_mask=mask).logits.numpy()


def assert_logits_close(got, want, what=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: {got.shape} vs {want.shape}"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-3)
    assert err < TOL, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("kind,name", ALL_MODELS)
def test_torch_save_pretrained_loads_into_mlx_with_equal_logits(tmp_path, kind, name):
    model = torch_model(kind, name)
    model.save_pretrained(tmp_path)
    ported = load_pretrained(tmp_path)
    assert ported.num_parameters() == sum(p.numel() for p in model.parameters())
    ids = token_ids((2, 21))
    assert_logits_close(ported(mx.array(ids)), torch_logits(model, ids), f"{kind}-{name}")


@pytest.mark.parametrize("kind,name", [("retention", "gqa-rms-tied"), ("mla", "untied")])
def test_torch_trainer_checkpoint_loads_into_mlx(tmp_path, kind, name):
    from llmtrain.training.checkpoint import save_checkpoint

    model = torch_model(kind, name, seed=3)
    save_checkpoint(tmp_path, model=model, optimizer=None, step=5, epoch=0,
                    meta={"model_config": model.config.to_dict()})
    for path in (tmp_path, tmp_path / "checkpoint_epoch0_step5.safetensors"):  # run dir (latest) or a file
        ids = token_ids((1, 13), seed=1)
        assert_logits_close(load_pretrained(path)(mx.array(ids)), torch_logits(model, ids), str(path))


@pytest.mark.parametrize("kind,name", [("retention", "gqa-rms-tied"), ("retention", "l2-untied"), ("mla", "tied")])
def test_mlx_weights_load_into_torch_with_equal_logits(tmp_path, kind, name):
    from transformers import AutoModelForCausalLM

    config = torch_model(kind, name).config
    model = build_model(config, seed=11)
    assert ("lm_head.weight" in model_weights(model)) != config.tie_word_embeddings
    assert weight_aliases(model) == ({"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {})
    save_pretrained(model, tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(torch_model(kind, name))
    ids = token_ids((2, 17), seed=2)
    assert_logits_close(model(mx.array(ids)), torch_logits(reloaded, ids), f"{kind}-{name}")


def test_mlx_init_follows_the_torch_initialisation():
    config = create_model_config("tiny", **SMALL, num_attention_heads=2, head_dim=32)
    weights = model_weights(build_model(config, seed=0))
    torch_weights = torch_model("retention", "gqa-rms-tied").state_dict()
    np.testing.assert_allclose(np.array(weights["model.layers.0.attn.gate_bias"]),
                               RetentionLLM(config).state_dict()["model.layers.0.attn.gate_bias"].numpy(), rtol=1e-6)
    assert float(mx.std(weights["model.embed_tokens.weight"])) == pytest.approx(0.02, rel=0.1)
    assert float(mx.std(weights["model.layers.0.mlp.down_proj.weight"])) == pytest.approx(0.01, rel=0.1)  # 0.02/sqrt(4)
    assert np.all(np.array(weights["model.norm.weight"]) == 1)
    assert set(weights) == set(torch_weights) - {"lm_head.weight"}


@pytest.mark.parametrize("kind,name", [("retention", "gqa-rms-tied"), ("retention", "none-d64"), ("mla", "untied")])
def test_recurrent_decoding_equals_the_parallel_forward(kind, name):
    model = build_model(torch_model(kind, name).config, seed=5)
    ids = mx.array(token_ids((2, 14), seed=4))
    parallel = model(ids)
    cache = model.make_cache()
    pieces = [model(ids[:, :6], cache=cache)]                # prefill, then several tokens, then one at a time
    pieces.append(model(ids[:, 6:9], cache=cache))
    for i in range(9, 14):
        pieces.append(model(ids[:, i:i + 1], cache=cache))
    assert cache.offset == 14
    assert_logits_close(mx.concatenate(pieces, axis=1), parallel, f"{kind}-{name}")
    if kind == "retention":  # constant-size state: [b, kv_heads, D, d] + [b, kv_heads, D] per layer
        c = model.config
        d_feat = c.head_dim * (c.head_dim + 1) // 2
        assert cache.nbytes() == c.num_hidden_layers * 2 * c.num_key_value_heads * d_feat * (c.head_dim + 1) * 4


@pytest.mark.parametrize("kind,name", [("retention", "gqa-rms-tied"), ("mla", "untied")])
def test_left_padding_matches_torch(tmp_path, kind, name):
    model = torch_model(kind, name, seed=7)
    model.save_pretrained(tmp_path)
    ported = load_pretrained(tmp_path)
    ids = token_ids((2, 10), seed=5)
    mask = np.ones((2, 10), np.int64)
    mask[1, :4] = 0
    got = np.array(ported(mx.array(ids), attention_mask=mx.array(mask)))
    want = torch_logits(model, ids, mask)
    assert_logits_close(got[1, 4:], want[1, 4:], f"{kind}-{name} padded row")
    assert_logits_close(got[0], want[0], f"{kind}-{name} full row")


@pytest.mark.parametrize("kind,name", [("retention", "gqa-rms-tied"), ("mla", "untied")])
def test_generate_greedy_matches_argmax_of_the_parallel_forward(kind, name):
    model = build_model(torch_model(kind, name).config, seed=9)
    prompt = token_ids((2, 5), seed=6)
    out = generate(model, prompt, 6, temperature=0)
    assert out.shape == (2, 11) and np.array_equal(np.array(out[:, :5]), prompt)
    greedy_next = np.array(mx.argmax(model(out[:, :-1]), axis=-1))[:, 4:]
    assert np.array_equal(greedy_next, np.array(out[:, 5:]))
    # top_k=1 and a tiny nucleus are greedy too; sampling is reproducible by seed
    assert np.array_equal(np.array(generate(model, prompt, 6, top_k=1, seed=1)), np.array(out))
    assert np.array_equal(np.array(generate(model, prompt, 6, top_p=1e-6, seed=2)), np.array(out))
    a, b = (np.array(generate(model, prompt, 6, temperature=1.5, top_k=20, top_p=0.9, seed=3)) for _ in range(2))
    assert np.array_equal(a, b) and a.max() < 97


def test_generate_stops_at_eos():
    model = build_model(torch_model("retention", "gqa-rms-tied").config, seed=9)
    out = np.array(generate(model, [3, 4], 8, temperature=0))
    eos = int(out[0, 2])  # the first generated token
    stopped = np.array(generate(model, [3, 4], 8, temperature=0, eos_token_id=eos))
    assert stopped.shape == (1, 3) and stopped[0, -1] == eos


@pytest.mark.parametrize("kind,name", [("retention", "gqa-rms-tied"), ("mla", "untied")])
def test_gradient_checkpointing_gives_the_same_gradients(kind, name):
    import mlx.nn as nn

    model = build_model(torch_model(kind, name).config, seed=4)
    ids = mx.array(token_ids((2, 12), seed=8))

    def loss_fn(m):
        logits = m(ids[:, :-1])
        return nn.losses.cross_entropy(logits, ids[:, 1:], reduction="mean")

    plain_loss, plain_grads = nn.value_and_grad(model, loss_fn)(model)
    model.set_gradient_checkpointing(True)
    ckpt_loss, ckpt_grads = nn.value_and_grad(model, loss_fn)(model)
    assert float(ckpt_loss) == pytest.approx(float(plain_loss), rel=1e-6)
    from mlx.utils import tree_flatten

    for (name_a, a), (_, b) in zip(tree_flatten(plain_grads), tree_flatten(ckpt_grads)):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-6, err_msg=name_a)


def test_bfloat16_compute_with_float32_weights_tracks_float32():
    model = build_model(torch_model("retention", "gqa-rms-tied").config, seed=2)
    ids = mx.array(token_ids((1, 9), seed=3))
    full = model(ids)
    model.compute_dtype = mx.bfloat16
    half = model(ids)
    assert half.dtype == mx.bfloat16
    assert model.model.embed_tokens.weight.dtype == mx.float32
    err = float(mx.abs(half.astype(mx.float32) - full).max()) / float(mx.abs(full).max())
    assert err < 5e-2
