"""Reward models: `llmtrain rlhf train-reward`.

The sequence-classification model (our backbone + a one-output score head read at each sequence's last
token) scores prompt + response. Trained with the Bradley-Terry loss on preference pairs,

    loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected)),

i.e. the likelihood of the human choice when P(chosen > rejected) = sigmoid of the score difference.
Evaluation reports pairwise accuracy (how often chosen outscores rejected) on held-out pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.data.formats import PreferenceCollator
from llmtrain.training.posttrain_config import RewardConfig, load_posttrain_config
from llmtrain.training.posttrain_data import preference_splits
from llmtrain.training.posttrain_loop import PostTrainer, load_model


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    return -F.logsigmoid(chosen_rewards.float() - rejected_rewards.float()).mean()


def score_pairs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected sides, in one forward pass over [2B, T]."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    rewards = model(input_ids=ids, attention_mask=mask).logits[:, 0]
    return rewards.chunk(2)


class RewardTrainer(PostTrainer):
    method = "reward"

    def setup_data(self):
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id)
        return preference_splits(self.cfg, self.tokenizer)

    def build_model(self):
        return load_model(self.cfg, self.tokenizer, self.cfg.model_path, task="sequence-classification")

    def collate(self, items):
        return self.collator(items)

    def compute_loss(self, batch):
        chosen, rejected = score_pairs(self.model, batch)
        loss = bradley_terry_loss(chosen, rejected)
        return loss, {"accuracy": (chosen > rejected).float().mean(), "margin": (chosen - rejected).mean()}

    def evaluate(self) -> dict:
        chosen, rejected = [], []
        for batch in self.batches_of(self.eval_items, self.cfg.batch_size):
            c, r = score_pairs(self.model, batch)
            chosen.append(c.float())
            rejected.append(r.float())
        chosen, rejected = torch.cat(chosen), torch.cat(rejected)
        return {"loss": bradley_terry_loss(chosen, rejected).item(),
                "accuracy": (chosen > rejected).float().mean().item(),
                "margin": (chosen - rejected).mean().item()}


def run_reward_training(cfg: RewardConfig, callbacks=()) -> dict:
    trainer = RewardTrainer(cfg, callbacks)
    if trainer.is_main:
        print(f"reward model: {len(trainer.train_items)} train / {len(trainer.eval_items)} held-out pairs; "
              f"{trainer.total_steps} steps")
    summary = trainer.train()
    if trainer.is_main and not summary["interrupted"]:
        summary["model_dir"] = str(trainer.export_hf())
        if trainer.eval_items:
            print(f"held-out pairwise accuracy {summary['val_accuracy']['last']:.1%}; model in {summary['model_dir']}")
    return summary


def train_reward_model(model_path: str | None = None, dataset_name: str = "hh-rlhf-sample",
                       output_dir: str = "runs/reward", config: str | None = None, callbacks=(), **overrides) -> dict:
    """Python form of `llmtrain rlhf train-reward`; without model_path a fresh model_size model is used."""
    values = dict(overrides, dataset=dataset_name, output_dir=output_dir)
    if model_path is not None:
        values["model_path"] = str(model_path)
    return run_reward_training(load_posttrain_config(RewardConfig, config, values), callbacks)
