"""Presets (parameter counts from meta-device models) and config validation."""

import pytest
import torch

from llmtrain.models import (
    MLAConfig,
    RetentionConfig,
    RetentionLLM,
    build_model,
    count_parameters,
    create_model_config,
    mla_cache_bytes_per_token,
    preset_names,
    retention_state_bytes,
)
from llmtrain.models.config import TARGET_PARAMS

from .configs import small_mla, small_retention


@pytest.mark.parametrize("name", ["tiny", "small", "medium", "large", "7b", "mla-1b"])
def test_preset_parameter_counts_within_ten_percent(name):
    config = create_model_config(name)
    count = count_parameters(config)
    target = TARGET_PARAMS[name]
    assert abs(count - target) <= 0.10 * target, f"{name}: {count / 1e6:.1f}M vs target {target / 1e6:.0f}M"


def test_small_preset_shape_and_types():
    small = create_model_config("small")
    assert isinstance(small, RetentionConfig)
    assert (small.hidden_size, small.num_hidden_layers, small.head_dim) == (768, 12, 64)
    assert small.num_attention_heads * small.head_dim == small.hidden_size
    assert isinstance(create_model_config("mla-1b"), MLAConfig)
    assert create_model_config("1b").max_position_embeddings == 16384
    assert set(preset_names()) >= {"tiny", "small", "medium", "large", "7b", "mla-1b"}


def test_count_parameters_matches_a_real_model_and_counts_tied_weights_once():
    config = small_retention()
    model = RetentionLLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    untied = small_retention(tie_word_embeddings=False)
    assert count_parameters(untied) == count_parameters(config) + config.vocab_size * config.hidden_size


def test_meta_models_allocate_nothing():
    with torch.device("meta"):
        model = build_model(create_model_config("7b"))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_overrides_and_unknown_preset():
    assert create_model_config("tiny", vocab_size=8192).vocab_size == 8192
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        create_model_config("huge")


@pytest.mark.parametrize("field, value, message", [
    ("head_dim", 48, "head_dim must be one of"),
    ("num_key_value_heads", 3, "multiple of num_key_value_heads"),
    ("hidden_size", 0, "hidden_size must be a positive int"),
    ("vocab_size", 12.5, "vocab_size must be a positive int"),
    ("qk_norm", "layer", "qk_norm must be"),
    ("gate_half_life_range", (100.0, 10.0), "gate_half_life_range"),
    ("rms_norm_eps", -1.0, "rms_norm_eps must be a positive number"),
    ("chunk_size", 0, "chunk_size must be a positive int"),
])
def test_bad_retention_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        small_retention(**{field: value})


@pytest.mark.parametrize("field, value, message", [
    ("qk_rope_head_dim", 7, "qk_rope_head_dim must be a positive even int"),
    ("kv_lora_rank", -4, "kv_lora_rank must be a positive int"),
    ("rope_theta", 0.0, "rope_theta must be a positive number"),
    ("num_attention_heads", True, "num_attention_heads must be a positive int"),
])
def test_bad_mla_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        small_mla(**{field: value})


def test_build_model_rejects_other_configs():
    with pytest.raises(TypeError, match="RetentionConfig or MLAConfig"):
        build_model(object())
    with pytest.raises(ValueError, match="task must be one of"):
        build_model(small_mla(), task="translation")


def test_mla_cache_is_at_least_four_times_smaller_than_mha():
    config = create_model_config("mla-1b")
    sizes = mla_cache_bytes_per_token(config, torch.bfloat16)
    assert sizes["mla"] == (512 + 64) * 2 * config.num_hidden_layers
    assert sizes["mha"] == 2 * 2048 * 2 * config.num_hidden_layers
    assert sizes["ratio"] >= 4


def test_retention_state_bytes_formula():
    config = small_retention(num_key_value_heads=1)
    D = 32 * 33 // 2
    assert retention_state_bytes(config, batch_size=3) == 4 * 3 * 2 * 1 * (D * 32 + D)
