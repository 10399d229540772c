"""DPO: the loss at the reference, precomputed reference log-probs, a rising chosen-over-rejected margin."""

import math

import pytest
import torch

from llmtrain.training import train_dpo
from llmtrain.training.dpo import dpo_loss
from llmtrain.training.posttrain_loop import sequence_log_probs
from tests.training.test_post_common import COMMON, metrics, workdir, yes_no_policy, yes_no_preferences


def test_dpo_loss_and_log_probs():
    zeros = torch.zeros(3)
    loss, chosen, rejected = dpo_loss(zeros, zeros, zeros, zeros, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and chosen.abs().sum() == 0
    loss, chosen, rejected = dpo_loss(torch.tensor([-1.0]), torch.tensor([-5.0]), torch.tensor([-2.0]),
                                      torch.tensor([-3.0]), beta=0.5)
    assert chosen.item() == pytest.approx(0.5) and rejected.item() == pytest.approx(-1.0)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.5))))
    logits = torch.randn(1, 3, 5)
    labels = torch.tensor([[-100, 2, 4]])
    expected = torch.log_softmax(logits, -1)[0, 1, 2] + torch.log_softmax(logits, -1)[0, 2, 4]
    assert sequence_log_probs(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_dpo_raises_the_chosen_over_rejected_margin():
    policy_dir, _ = yes_no_policy()
    summary = train_dpo(str(policy_dir), dataset_name=str(yes_no_preferences()), output_dir=str(workdir() / "dpo"),
                        max_steps=12, batch_size=8, learning_rate=1e-3, eval_interval=6, save_interval=1000,
                        eval_fraction=0.2, beta=0.1, **COMMON)
    records = [r for r in metrics(workdir() / "dpo") if "reward_margin" in r]
    # step 1 runs the unchanged policy: its log-probs equal the precomputed reference ones
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert summary["val_reward_margin"]["last"] > 0.1
    assert summary["val_reward_accuracy"]["last"] >= 0.9
    assert summary["loss"]["last"] < math.log(2) - 0.05
    assert (workdir() / "dpo" / "hf" / "model.safetensors").exists()
