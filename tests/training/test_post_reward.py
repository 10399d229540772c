"""Reward model: Bradley-Terry loss, held-out pairwise accuracy on a checkable rule, bad pairs, the CLI."""

import math

import pytest
import torch

from llmtrain.data import load_tokenizer
from llmtrain.training.posttrain_data import DatasetFormatError, load_preference_pairs, resolve_posttrain_source
from llmtrain.training.reward import bradley_terry_loss
from tests.training.test_post_common import write_jsonl, yes_no_reward_model


def test_bradley_terry_loss():
    same = torch.zeros(4)
    assert bradley_terry_loss(same, same).item() == pytest.approx(math.log(2))
    # it is the negative log-likelihood of "chosen wins" under P = sigmoid(r_c - r_r)
    c, r = torch.tensor([2.0, -1.0]), torch.tensor([0.0, 1.0])
    expected = -torch.log(torch.sigmoid(c - r)).mean()
    assert bradley_terry_loss(c, r).item() == pytest.approx(expected.item())


def test_reward_model_learns_the_rule_on_held_out_pairs():
    model_dir, summary = yes_no_reward_model()
    assert summary["val_accuracy"]["last"] >= 0.9
    assert summary["loss"]["last"] < summary["loss"]["first"]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = load_tokenizer(model_dir)

    def score(reply):  # a question and answers the training pairs never had
        conv = [{"role": "user", "content": "Is the lamp bright?"}, {"role": "assistant", "content": reply}]
        ids = tokenizer.apply_chat_template(conv, return_tensors="pt", return_dict=True)["input_ids"][:, :-1]
        return model(input_ids=ids).logits[0, 0].item()

    assert score("Yes, it is.") > score("No, it is.")


def test_preference_rows_are_checked(tmp_path):
    tokenizer = load_tokenizer()
    good = {"prompt": "Hi?", "chosen": "Hello!", "rejected": "Go away."}
    for bad, message in [({"prompt": "Hi?", "chosen": "Hello!", "rejected": ""}, "empty rejected response"),
                         ({"prompt": "Hi?", "chosen": "Hello!"}, "missing field 'rejected'"),
                         ({"prompt": "long " * 60, "chosen": "a", "rejected": "b"}, "longer than the context")]:
        source = resolve_posttrain_source(str(write_jsonl(tmp_path / "p.jsonl", [good, bad])))
        assert source.layout == "rewardbench"
        with pytest.raises(DatasetFormatError, match=rf"p.jsonl row 1: .*{message}"):
            load_preference_pairs(source, tokenizer, max_length=48)
    pairs, _ = load_preference_pairs(resolve_posttrain_source("hh-rlhf-sample"), tokenizer, 512, num_samples=2)
    chosen = pairs[0]["chosen"]
    scored = [t for t, m in zip(chosen["input_ids"], chosen["loss_mask"]) if m]
    assert tokenizer.decode(scored).startswith("Rinse it from the back")


def test_cli_trains_a_fresh_reward_model_on_hh_rlhf(tmp_path, monkeypatch):
    from llmtrain import cli

    if "llmtrain.training.posttrain_cli" not in cli.SUBCOMMAND_MODULES:
        monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", [*cli.SUBCOMMAND_MODULES, "llmtrain.training.posttrain_cli"])
    tiny = '{"num_hidden_layers": 1, "hidden_size": 64, "num_attention_heads": 2, "head_dim": 32, "intermediate_size": 128}'
    rc = cli.main(["rlhf", "train-reward", "--dataset", "hh-rlhf-sample", "--output_dir", str(tmp_path),
                   "--max_steps", "2", "--batch_size", "4", "--max_length", "160", "--skip_invalid", "true",
                   "--model_overrides", tiny, "--device", "cpu", "--progress", "false"])
    assert rc == 0 and (tmp_path / "hf" / "model.safetensors").exists()
    assert cli.main(["rlhf", "train-reward", "--dataset", "hh-rlhf-sample", "--bogus", "1"]) == 2
