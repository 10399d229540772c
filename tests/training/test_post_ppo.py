"""PPO: the pieces (GAE, whitening, clipped losses, KL at the reference) and a run that raises the reward."""

import pytest
import torch

from llmtrain.training import train_ppo
from llmtrain.training.ppo import generalized_advantages, masked_whiten, ppo_losses
from tests.training.test_post_common import COMMON, metrics, workdir, yes_no_policy, yes_no_reward_model, yes_no_sft_data

PPO = dict(COMMON, max_length=32, max_prompt_length=24, max_new_tokens=6, rollout_batch_size=16, batch_size=8,
           ppo_epochs=2, learning_rate=2e-3, kl_coef=0.05, seed=1)


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0]])  # the 9.0 is past the response's end and must not count
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = generalized_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 - 0.4
    d1 = 0.0 + 0.9 * 0.4 - 0.2
    d0 = 0.0 + 0.9 * 0.2 - 0.5
    a2, a1 = d2, d1 + 0.45 * d2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 0.4, 0.0]]))
    whitened = masked_whiten(torch.randn(4, 7) * 3 + 2, torch.ones(4, 7))
    assert whitened.mean().abs() < 1e-5 and (whitened.var(unbiased=False) - 1).abs() < 1e-4


def test_clipped_losses():
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    adv = torch.tensor([[1.0, -1.0, 2.0]])
    values, returns, mask = torch.zeros(1, 3), torch.ones(1, 3), torch.ones(1, 3)
    same = ppo_losses(logp, logp, adv, values, values, returns, mask, 0.2, 0.2)
    assert same["clip_fraction"] == 0 and same["policy_loss"].item() == pytest.approx(-adv.mean().item())
    assert same["value_loss"].item() == pytest.approx(0.5) and same["approx_kl"] == 0
    # ratio 2 on every token: clipped where the advantage is positive (the objective would gain past 1.2)
    moved = ppo_losses(logp + torch.log(torch.tensor(2.0)), logp, adv, values + 1, values, returns, mask, 0.2, 0.2)
    assert moved["clip_fraction"].item() == pytest.approx(2 / 3)
    assert moved["policy_loss"].item() == pytest.approx(((-1.2) + 2.0 + (-2.4)) / 3)
    assert moved["value_clip_fraction"].item() == 1.0  # 1.0 - 0 > clip_range_value: the clipped error counts
    assert moved["value_loss"].item() == pytest.approx(0.5 * 0.8 ** 2)


def test_ppo_raises_the_reward_with_bounded_kl():
    policy_dir, _ = yes_no_policy()
    reward_dir, _ = yes_no_reward_model()
    out = workdir() / "ppo"
    summary = train_ppo(str(policy_dir), str(reward_dir), dataset_name=str(yes_no_sft_data()), output_dir=str(out),
                        max_steps=6, save_interval=3, **PPO)
    records = metrics(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    # the first rollout samples from the policy before any update, which is the reference: zero KL
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-2:]) / 2 > rewards[0] + 1.0, rewards
    assert all(r["kl"] < 15 for r in records), [r["kl"] for r in records]
    for r in records:
        assert 0 <= r["clip_fraction"] <= 1 and r["entropy"] > 0 and 1 <= r["response_length"] <= 6
    assert summary["step"] == 6 and (out / "hf" / "model.safetensors").exists() and (out / "value").is_dir()
    assert (out / "latest.txt").read_text().strip() == "checkpoint_epoch0_step6"


def test_cli_ppo_and_dpo(tmp_path, monkeypatch):
    from llmtrain import cli

    if "llmtrain.training.posttrain_cli" not in cli.SUBCOMMAND_MODULES:
        monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", [*cli.SUBCOMMAND_MODULES, "llmtrain.training.posttrain_cli"])
    policy_dir, _ = yes_no_policy()
    reward_dir, _ = yes_no_reward_model()
    common = ["--device", "cpu", "--progress", "false", "--model_overrides", "{}"]
    rc = cli.main(["rlhf", "ppo", "--model_path", str(policy_dir), "--reward_model", str(reward_dir),
                   "--dataset", "hh-rlhf-sample", "--output_dir", str(tmp_path / "ppo"), "--max_steps", "1",
                   "--rollout_batch_size", "4", "--batch_size", "4", "--max_new_tokens", "4", "--max_length", "200",
                   "--max_prompt_length", "196", "--skip_invalid", "true", *common])
    assert rc == 0 and len(metrics(tmp_path / "ppo")) == 1
    rc = cli.main(["rlhf", "dpo", "--model_path", str(policy_dir), "--dataset", "ultrafeedback-sample",
                   "--output_dir", str(tmp_path / "dpo"), "--max_steps", "1", "--batch_size", "2",
                   "--max_length", "256", "--skip_invalid", "true", *common])
    assert rc == 0 and (tmp_path / "dpo" / "hf").is_dir()
    assert cli.main(["rlhf", "ppo", "--model_path", str(policy_dir)]) == 2  # no reward model: a config error
