"""Direct Preference Optimization: `llmtrain rlhf dpo` (Rafailov et al., 2023).

With log-ratios rho(y) = log pi(y|x) - log pi_ref(y|x) summed over the response tokens,

    loss = -log sigmoid(beta * (rho(chosen) - rho(rejected)))      (label_smoothing blends in the flip)

The reference log-probs never change, so they are computed once before training, stored with each pair,
and the reference model is freed: training holds one model, like SFT. The implicit rewards
beta * rho(.) give the logged margins (chosen - rejected) and accuracies (chosen > rejected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.data.formats import PreferenceCollator
from llmtrain.training.posttrain_config import DPOConfig, load_posttrain_config
from llmtrain.training.posttrain_data import preference_splits
from llmtrain.training.posttrain_loop import PostTrainer, load_model, sequence_log_probs


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """(loss, chosen_rewards, rejected_rewards); inputs are per-pair summed response log-probs."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    logits = chosen_rewards - rejected_rewards
    losses = -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def pair_log_probs(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and rejected sides, in one forward pass over [2B, T]."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    mask = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    return sequence_log_probs(logits, labels).chunk(2)


class DPOTrainer(PostTrainer):
    method = "dpo"

    def setup_data(self):
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id)
        train, held_out = preference_splits(self.cfg, self.tokenizer)
        self.precompute_reference(train + held_out)
        return train, held_out

    @torch.no_grad()
    def precompute_reference(self, pairs: list[dict]) -> None:
        reference = load_model(self.cfg, self.tokenizer, self.cfg.reference_model or self.cfg.model_path)
        reference.to(self.device).eval()
        for start in range(0, len(pairs), self.cfg.batch_size):
            chunk = pairs[start:start + self.cfg.batch_size]
            batch = self.to_device(self.collator(chunk))
            with self.autocast():
                chosen, rejected = pair_log_probs(reference, batch)
            for pair, c, r in zip(chunk, chosen.tolist(), rejected.tolist()):
                pair["ref_chosen_logp"], pair["ref_rejected_logp"] = c, r
        del reference

    def build_model(self):
        return load_model(self.cfg, self.tokenizer, self.cfg.model_path)

    def collate(self, items):
        batch = self.collator(items)
        batch["ref_chosen_logp"] = torch.tensor([p["ref_chosen_logp"] for p in items])
        batch["ref_rejected_logp"] = torch.tensor([p["ref_rejected_logp"] for p in items])
        return batch

    def _loss(self, batch):
        chosen, rejected = pair_log_probs(self.model, batch)
        return dpo_loss(chosen, rejected, batch["ref_chosen_logp"], batch["ref_rejected_logp"],
                        self.cfg.beta, self.cfg.label_smoothing)

    def compute_loss(self, batch):
        loss, chosen, rejected = self._loss(batch)
        return loss, {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                      "reward_margin": (chosen - rejected).mean(),
                      "reward_accuracy": (chosen > rejected).float().mean()}

    def evaluate(self) -> dict:
        losses, margins = [], []
        for batch in self.batches_of(self.eval_items, self.cfg.batch_size):
            loss, chosen, rejected = self._loss(batch)
            losses.append(loss.item() * len(chosen))
            margins.append(chosen - rejected)
        margins = torch.cat(margins).float()
        return {"loss": sum(losses) / len(margins), "reward_margin": margins.mean().item(),
                "reward_accuracy": (margins > 0).float().mean().item()}


def run_dpo(cfg: DPOConfig, callbacks=()) -> dict:
    if cfg.model_path is None and cfg.reference_model is None:
        raise ValueError("dpo: set model_path (the SFT model to start from; it is also the reference)")
    trainer = DPOTrainer(cfg, callbacks)
    if trainer.is_main:
        print(f"dpo: {len(trainer.train_items)} train / {len(trainer.eval_items)} held-out pairs; beta {cfg.beta}; "
              f"{trainer.total_steps} steps")
    summary = trainer.train()
    if trainer.is_main and not summary["interrupted"]:
        summary["model_dir"] = str(trainer.export_hf())
    return summary


def train_dpo(model_path: str, dataset_name: str = "hh-rlhf-sample", output_dir: str = "runs/dpo",
              config: str | None = None, callbacks=(), **overrides) -> dict:
    """Python form of `llmtrain rlhf dpo`."""
    values = dict(overrides, model_path=str(model_path), dataset=dataset_name, output_dir=output_dir)
    return run_dpo(load_posttrain_config(DPOConfig, config, values), callbacks)
