"""`llmtrain bench memory`: the analytic peak-memory estimate (an estimate, not a measurement)."""

import json

import pytest

from llmtrain.bench.memory import count_parameters, estimate, mla_layer_bytes_per_token
from llmtrain.cli import main
from llmtrain.models import build_model, create_model_config
from llmtrain.training.config import apply, load_config


def test_parameter_count_from_the_meta_device_matches_the_real_model():
    c = create_model_config("mla-1b", hidden_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                            kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                            intermediate_size=128, vocab_size=128)
    assert count_parameters(c) == sum(p.numel() for p in build_model(c).parameters())


def test_mla_1b_layer_bytes_by_hand():
    c = create_model_config("mla-1b")
    # attention: 4*2048 + 2*(768+512+64) + 2*(768+512) + 2*16*192*2 + 2*16*128*2 + 4*16 + 2*16*128
    # mlp: 4*2048 + 2*2*5632 + 2*5632
    assert mla_layer_bytes_per_token(c, residual_bytes=4) == {"attention": 38080, "mlp": 41984, "total": 80064}


def test_presets_and_what_changes_the_estimate():
    cfg = load_config("pretrain_5080", {"max_steps": 1})
    ds = estimate(cfg)
    assert ds["backend"] == "deepspeed" and 0.9e9 < ds["params"] < 1.1e9
    assert ds["parts_gib"]["optimizer"] == 0 and ds["cpu_optimizer_gib"] > 10  # offloaded to the CPU
    assert ds["peak_gib"] == pytest.approx(sum(ds["parts_gib"].values()))
    assert ds["peak_gib"] < 14  # the target, as estimated (the GPU run measures it)
    torch_ = estimate(apply(cfg, {"backend": "torch"}, "test"))
    assert torch_["parts_gib"]["optimizer"] == pytest.approx(8 * ds["params"] / 2**30)
    assert torch_["peak_gib"] > ds["peak_gib"] + 10
    full = estimate(apply(cfg, {"activation_checkpointing": False}, "test"))
    assert full["parts_gib"]["activations"] > 5 * ds["parts_gib"]["activations"]
    double = estimate(apply(cfg, {"activation_checkpointing": False, "batch_size": 24}, "test"))
    assert double["parts_gib"]["activations"] == pytest.approx(2 * full["parts_gib"]["activations"])
    assert estimate(load_config("longctx_5090", {"max_steps": 1}))["peak_gib"] < 14


def test_cli_json_and_refusals(tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["bench", "memory", "--config", "longctx_5090", "--json", str(out)]) == 0
    assert "ESTIMATED peak" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["seq_len"] == 16384 and "analytic" in report["estimate"]
    assert main(["bench", "memory", "--config", "small"]) == 2
    assert "MLA model only" in capsys.readouterr().err
    assert main(["bench", "memory", "--config", "pretrain_5080", "--seq_len", "0"]) == 2
    assert "seq_len" in capsys.readouterr().err
    assert main(["bench", "memory", "--config", "pretrain_5080", "--world_size", "0"]) == 2
    assert "--world_size" in capsys.readouterr().err
