"""SFT on CPU: response-only loss, learning, exact resume (packed rows), bad input, the CLI."""

import os
import signal

import pytest
import torch

from llmtrain.data import load_tokenizer
from llmtrain.data.formats import PaddingCollator
from llmtrain.training.posttrain_data import DatasetFormatError, load_sft_examples, resolve_posttrain_source
from llmtrain.training.sft import SFTTrainer, response_loss
from llmtrain.training.posttrain_config import SFTConfig, load_posttrain_config
from tests.training.test_post_common import (COMMON, base_model_dir, metrics, write_jsonl, yes_no_policy,
                                             yes_no_sft_data)


def test_labels_cover_the_response_only_and_prompt_tokens_get_no_gradient():
    tokenizer = load_tokenizer()
    source = resolve_posttrain_source("dolly-sample")
    assert source.layout == "dolly"
    examples, _ = load_sft_examples(source, tokenizer, max_length=512, num_samples=4)
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    scored = batch["labels"][0][batch["labels"][0] != -100]
    assert tokenizer.decode(scored) == source_response(0) + "<|im_end|>"
    # the prompt (user turn and the assistant header) is never a target
    prompt_len = len(tokenizer.apply_chat_template([{"role": "user", "content": "x"}], add_generation_prompt=True,
                                                   tokenize=True, return_dict=True)["input_ids"])
    assert (batch["labels"][:, : prompt_len - 1] == -100).all()
    logits = torch.randn(*batch["labels"].shape, len(tokenizer), requires_grad=True)
    response_loss(logits, batch["labels"]).backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, batch["labels"] != -100)


def source_response(i):
    import json

    from llmtrain.data.assets import bundled_path

    return json.loads(bundled_path("dolly-sample").read_text().splitlines()[i])["response"]


def test_finetune_lowers_held_out_response_loss():
    model_dir, summary = yes_no_policy()
    assert summary["val_loss"]["last"] < summary["val_loss"]["first"] - 1.0
    assert summary["loss"]["last"] < summary["loss"]["first"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Is the sea blue?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    torch.manual_seed(0)
    out = model.generate(**prompt, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(("Yes", "No"))


def config(tmp_path, **overrides):
    values = dict(model_path=str(base_model_dir()), dataset=str(yes_no_sft_data()), output_dir=str(tmp_path),
                  max_steps=4, batch_size=2, learning_rate=1e-3, eval_interval=2, save_interval=2, packing=True,
                  **COMMON)
    values.update(overrides)
    return load_posttrain_config(SFTConfig, None, values)


def test_packed_rows_and_exact_resume(tmp_path):
    full = SFTTrainer(config(tmp_path / "full"))
    row = full.train_items[0]
    assert row["input_ids"].shape == (48,) and (row["position_ids"] == 0).sum() >= 2  # several examples per row
    full.train()

    def stop_at_2(trainer):
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary = SFTTrainer(config(tmp_path / "part"), callbacks=[stop_at_2]).train()
    assert summary["interrupted"] and summary["step"] == 2
    SFTTrainer(config(tmp_path / "part", resume="latest")).train()
    losses = lambda run: [(r["step"], r["loss"]) for r in metrics(run) if "loss" in r]  # noqa: E731
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert len(losses(tmp_path / "full")) == 4


@pytest.mark.parametrize("row, message", [
    ({"instruction": "Say hi."}, "missing field 'response'"),
    ({"instruction": "Say hi.", "context": "", "response": "   "}, "empty response"),
    ({"instruction": "word " * 80, "context": "", "response": "ok"}, "longer than the context"),
])
def test_bad_rows_raise_clear_errors(tmp_path, row, message):
    good = {"instruction": "Say hi.", "context": "", "response": "Hi!"}
    data = write_jsonl(tmp_path / "data.jsonl", [good, good, row])
    with pytest.raises(DatasetFormatError, match=rf"data.jsonl row 2: .*{message}"):
        SFTTrainer(config(tmp_path, dataset=str(data)))
    tokenizer = load_tokenizer()
    examples, dropped = load_sft_examples(resolve_posttrain_source(str(data)), tokenizer, 48, skip_invalid=True)
    assert len(examples) == 2 and sum(dropped.counts.values()) == 1


def test_unknown_keys_and_layouts_are_named(tmp_path):
    from llmtrain.training.config import ConfigError

    with pytest.raises(ConfigError, match="learning_rat: unknown key.*learning_rate"):
        load_posttrain_config(SFTConfig, None, {"learning_rat": 1})
    data = write_jsonl(tmp_path / "odd.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DatasetFormatError, match="cannot tell the layout"):
        resolve_posttrain_source(str(data))
    assert resolve_posttrain_source("databricks-dolly-15k").hub_path == "databricks/databricks-dolly-15k"
    assert resolve_posttrain_source("Anthropic/hh-rlhf").layout == "hh-rlhf"


def test_cli(tmp_path, monkeypatch):
    from llmtrain import cli

    if "llmtrain.training.posttrain_cli" not in cli.SUBCOMMAND_MODULES:
        monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", [*cli.SUBCOMMAND_MODULES, "llmtrain.training.posttrain_cli"])
    rc = cli.main(["sft", "--model_path", str(base_model_dir()), "--dataset", str(yes_no_sft_data()),
                   "--epochs", "1", "--max_steps", "2", "--batch_size", "4", "--learning_rate", "1e-5",
                   "--output_dir", str(tmp_path), "--max_length", "48", "--model_overrides", "{}",
                   "--device", "cpu", "--progress", "false"])
    assert rc == 0
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "latest.txt").exists()


def test_presets_load():
    from llmtrain.training.posttrain_config import DPOConfig, PPOConfig, RewardConfig

    assert load_posttrain_config(SFTConfig, "sft_dolly").dataset == "databricks-dolly-15k"
    assert load_posttrain_config(RewardConfig, "rlhf_reward").dataset == "Anthropic/hh-rlhf"
    assert load_posttrain_config(DPOConfig, "rlhf_dpo").beta == 0.1
    assert load_posttrain_config(PPOConfig, "rlhf_ppo", {"reward_model": "r"}).ppo_epochs == 4
