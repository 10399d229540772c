"""Configuration: presets load, overrides apply with types, and errors name the key."""

import pytest

from llmtrain.training.config import ConfigError, configs_dir, load_config, parse_count, parse_overrides


@pytest.mark.parametrize("preset", ["quick_start", "small", "medium", "pretrain_5080", "longctx_5090"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.output_dir and cfg.seq_len > 0
    assert cfg.total_steps() >= 1


def test_documented_overrides():
    args = ["--model_size", "small", "--dataset", "fineweb-edu", "--num_tokens", "10B", "--batch_size", "8",
            "--seq_len", "2048", "--learning_rate", "3e-4", "--output_dir", "runs/x", "--compile"]
    cfg = load_config("quick_start", parse_overrides(args))
    assert (cfg.model_size, cfg.batch_size, cfg.seq_len, cfg.learning_rate, cfg.compile) == ("small", 8, 2048, 3e-4, True)
    cfg = load_config("quick_start", parse_overrides(["--max_steps", "none", "--num_tokens", "10B"]))
    assert cfg.total_steps() == 10**10 // (cfg.batch_size * cfg.seq_len)


@pytest.mark.parametrize("overrides,match", [
    ({"batch_sise": "8"}, "batch_sise: unknown key.*did you mean 'batch_size'"),
    ({"batch_size": "eight"}, "batch_size: expected int"),
    ({"batch_size": "0"}, "batch_size: must be >= 1"),
    ({"learning_rate": "-1"}, "learning_rate: must be > 0"),
    ({"backend": "jax"}, "backend: must be"),
    ({"num_tokens": "lots", "max_steps": "none"}, "num_tokens: expected a count"),
    ({"model_size": "huge"}, "model_size:"),
    ({"compile": "maybe"}, "compile: expected bool"),
    ({"device": "tpu"}, "device: must be"),
])
def test_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("quick_start", overrides)


def test_bad_yaml_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))
    other = tmp_path / "other.yaml"
    other.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(other))
    with pytest.raises(ConfigError, match="presets:"):
        load_config("no_such_preset")


def test_parse_count():
    assert parse_count("10B", "n") == 10**10
    assert parse_count("2.5M", "n") == 2_500_000
    assert parse_count("1e6", "n") == 10**6
    assert parse_count(1000, "n") == 1000


def test_ds_configs_are_present():
    """ZeRO-2 with the optimizer on the CPU (the default) and ZeRO-2 with it on the GPUs."""
    import json

    offload = json.loads((configs_dir() / "ds_config.json").read_text())["zero_optimization"]
    assert offload["stage"] == 2 and offload["offload_optimizer"]["device"] == "cpu"
    on_gpu = json.loads((configs_dir() / "ds_zero2.json").read_text())["zero_optimization"]
    assert on_gpu["stage"] == 2 and "offload_optimizer" not in on_gpu
