"""torch.compile of our models through the Trainer (`compile: true`) on the CPU at toy sizes: the
retention LLM and the MLA model, with the chunked fused cross-entropy and activation checkpointing,
trace without graph breaks and train to the same fp32 losses as eager."""

import pytest
import torch

from llmtrain.bench.train import RandomTokenData, _random_data
from llmtrain.training.config import TrainConfig

MODELS = {
    "retention": ("tiny", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                               intermediate_size=128, vocab_size=128)),
    "mla": ("mla-1b", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=32,
                           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                           intermediate_size=128, vocab_size=128)),
}


def losses(tmp_path, size, overrides, compile_model, steps=3):
    from llmtrain.training.trainer import Trainer

    cfg = TrainConfig(model_size=size, model_overrides=dict(overrides), dataset="random", device="cpu",
                      dtype="fp32", seq_len=32, batch_size=2, grad_accum=1, max_steps=steps + 1, num_tokens=None,
                      warmup_steps=1, eval_interval=10**9, save_interval=10**9, log_interval=10**9,
                      progress=False, activation_checkpointing=True, compile=compile_model,
                      stop_at_step=steps,  # stop before the final evaluation (a second, no-grad compile)
                      output_dir=str(tmp_path / f"c{int(compile_model)}")).validate()
    seen = []
    with _random_data(RandomTokenData(overrides["vocab_size"], 2, 32, seed=0)):
        trainer = Trainer(cfg)
    # the training log's MFU numerator is the bench's formula, token mixer included
    from llmtrain.bench.flops import flops_per_token

    n = sum(p.numel() for p in trainer.module.parameters())
    assert trainer.flops_per_token == flops_per_token(trainer.model_config, 32, n)["total"] > 6 * n * 0.5
    assert flops_per_token(trainer.model_config, 32, n)["mixer"] > 0
    backward = trainer.backend.backward
    trainer.backend.backward = lambda loss: (seen.append(loss.item()), backward(loss))[1]
    trainer.train()
    return seen


def check_matches_eager(tmp_path, name):
    size, overrides = MODELS[name]
    torch._dynamo.reset()
    eager = losses(tmp_path, size, overrides, False)
    compiled = losses(tmp_path, size, overrides, True)
    assert len(eager) == len(compiled) == 3 and eager[1] != eager[0]  # the optimizer steps change the loss
    assert compiled == pytest.approx(eager, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_training_matches_eager(tmp_path, name, monkeypatch):
    # Dynamo + AOTAutograd (fake-tensor tracing of our custom ops, the joint forward/backward graph,
    # checkpointing's recomputation) without Inductor's C++ code generation, which takes a minute on
    # a 2-core CPU; the Inductor run is the slow test below.
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="aot_eager", **kw))
    check_matches_eager(tmp_path, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_inductor_training_matches_eager(tmp_path, name):
    check_matches_eager(tmp_path, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_no_graph_breaks(name):
    from llmtrain.models import build_model, create_model_config

    size, overrides = MODELS[name]
    torch.manual_seed(0)
    model = build_model(create_model_config(size, **overrides))
    model.activation_checkpointing_enable()
    x = torch.randint(0, 128, (2, 32))
    explained = torch._dynamo.explain(lambda x, y: model(x, shift_labels=y).loss)(x, x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
