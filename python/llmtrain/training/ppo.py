"""PPO against a learned reward: `llmtrain rlhf ppo` (Ziegler et al. 2019, Ouyang et al. 2022).

Four models: the policy (trained), a value model (trained; our backbone with a per-token score head,
started from the reward model), the frozen reference (the starting policy) and the frozen reward model.
One iteration:

1. Rollout: sample responses to a batch of prompts with `policy.generate` (left-padded prompts; retention
   models decode with their O(1) recurrent state). Score each prompt + response with the reward model.
2. Per-token rewards: -kl_coef * (log pi - log pi_ref) at every response token, plus the score at the
   last one. Advantages by GAE(gamma, lam) over the value model's estimates; whitened.
3. ppo_epochs passes over the rollouts in minibatches: clipped policy loss, clipped value loss.

Logged per iteration: reward (the score), kl (summed per response), entropy, clip fraction, value loss.
Policy and value model share one optimizer and one checkpoint (a PolicyAndValue module).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import nn

from llmtrain.training import checkpoint as ckpt
from llmtrain.training.backends import make_backend
from llmtrain.training.logger import TrainingLogger
from llmtrain.training.posttrain_config import PPOConfig, load_posttrain_config
from llmtrain.training.posttrain_data import load_prompts, resolve_posttrain_source
from llmtrain.training.posttrain_loop import load_model, load_posttrain_tokenizer
from llmtrain.training.schedule import cosine_with_warmup
from llmtrain.training.trainer import _StopFlag, autocast_dtype, end_of_step, resolve_device, seed_everything


# -- the math -----------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def generalized_advantages(rewards, values, mask, gamma: float, lam: float):
    """GAE over response tokens: A_t = sum_k (gamma lam)^k delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t.
    Positions after a response ends have zero reward and value, so they contribute nothing."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def ppo_losses(new_logp, old_logp, advantages, new_values, old_values, returns, mask, clip_range, clip_range_value):
    """Clipped surrogate policy loss and clipped value loss (masked means), with their clip fractions."""
    ratio = torch.exp(new_logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    values_clipped = old_values + (new_values - old_values).clamp(-clip_range_value, clip_range_value)
    value_unclipped = (new_values - returns) ** 2
    value_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.maximum(value_unclipped, value_clipped), mask)
    return {"policy_loss": policy_loss, "value_loss": value_loss,
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "value_clip_fraction": masked_mean((value_clipped > value_unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean((new_logp - old_logp) ** 2, mask)}


class PolicyAndValue(nn.Module):
    """The two trained models as one module: one optimizer, one checkpoint."""

    def __init__(self, policy: nn.Module, value_model: nn.Module):
        super().__init__()
        self.policy, self.value_model = policy, value_model

    def values(self, input_ids, attention_mask) -> torch.Tensor:
        """A value per position, from the score head applied to every hidden state (not just the last)."""
        hidden = self.value_model.model(input_ids=input_ids, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state
        return self.value_model.score(hidden).squeeze(-1).float()

    def forward(self, input_ids, attention_mask):
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        return logits, self.values(input_ids, attention_mask)


# -- the trainer ---------------------------------------------------------------------------------------

class PPOTrainer:
    method = "ppo"

    def __init__(self, cfg: PPOConfig, callbacks=()):
        self.cfg, self.callbacks = cfg, list(callbacks)
        self.device = resolve_device(cfg, 0)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.out_dir = Path(cfg.output_dir)
        seed_everything(cfg.seed)
        self.tokenizer = load_posttrain_tokenizer(cfg)
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if self.eos_id is None or self.eos_id == self.tokenizer.unk_token_id:
            self.eos_id = self.tokenizer.eos_token_id  # a chat template without ChatML's end-of-turn token
        self.pad_id = self.tokenizer.pad_token_id
        source = resolve_posttrain_source(cfg.dataset, cfg.dataset_format)
        self.prompts, dropped = load_prompts(source, self.tokenizer, cfg.max_prompt_length, cfg.num_samples,
                                             cfg.skip_invalid)
        if dropped.counts:
            print(f"{cfg.dataset}: dropped {dropped}")
        self.steps_per_epoch = len(self.prompts) // cfg.rollout_batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(f"{cfg.dataset}: {len(self.prompts)} prompts, fewer than one rollout batch "
                             f"(rollout_batch_size {cfg.rollout_batch_size})")
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch

        policy = load_model(cfg, self.tokenizer, cfg.model_path)
        self.reference = copy.deepcopy(policy).requires_grad_(False).eval().to(self.device)
        self.reward_model = load_model(cfg, self.tokenizer, cfg.reward_model, task="sequence-classification")
        self.reward_model.requires_grad_(False).eval().to(self.device)
        value_model = load_model(cfg, self.tokenizer, cfg.value_model or cfg.reward_model, task="sequence-classification")
        torch.manual_seed(cfg.seed)
        self.module = PolicyAndValue(policy, value_model).to(self.device)
        self.backend = make_backend(cfg.backend, self.module, dataclasses.replace(cfg, grad_accum=1), self.device, 1, 0)
        self.step = 0
        if cfg.resume:
            path = self.out_dir if cfg.resume == "latest" else Path(cfg.resume)
            meta = ckpt.load_checkpoint(self.module, path, "latest" if cfg.resume == "latest" else cfg.resume,
                                        restore_rng=True)
            if meta.get("method") != self.method:
                raise ckpt.CheckpointError(f"{meta['path']}: a {meta.get('method')} checkpoint, not ppo")
            self.backend.weights_loaded()  # e.g. DeepSpeed refreshes its fp32 master partitions
            ckpt.load_optimizer_state(self.backend.optimizer_for_checkpoint(), meta)
            self.step = int(meta["step"])
        self.logger = TrainingLogger(self.out_dir, append=bool(cfg.resume))
        if cfg.resume:
            self.logger.truncate_after(self.step)

    def autocast(self):
        import contextlib

        return torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def prompt_batch(self, step: int) -> list[list[int]]:
        epoch, within = divmod(step, self.steps_per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch))
        n = self.cfg.rollout_batch_size
        return [self.prompts[i] for i in order[within * n:(within + 1) * n].tolist()]

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]]) -> dict:
        """Sample, score and turn into per-token advantages and returns (everything the update needs)."""
        cfg, policy = self.cfg, self.module.policy
        width = max(len(p) for p in prompts)
        prompt_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.device)
        prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        policy.eval()
        with self.autocast():
            sequences = policy.generate(input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=True,
                                        max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                        top_k=cfg.top_k, top_p=1.0, eos_token_id=self.eos_id,
                                        pad_token_id=self.pad_id)
        policy.train()
        responses = sequences[:, width:].clone()
        is_eos = responses == self.eos_id
        after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
        responses[after_eos] = self.pad_id
        mask = (~after_eos).float()
        input_ids = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, (~after_eos).long()], 1)
        with self.autocast():
            logits, values = self.module(input_ids, attention_mask)
            ref_logits = self.reference(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            scores = self.reward_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()
        # position t predicts token t + 1: the response is predicted from width - 1 to the second-to-last
        logprobs = token_log_probs(logits[:, width - 1:-1] / cfg.temperature, responses)
        ref_logprobs = token_log_probs(ref_logits[:, width - 1:-1] / cfg.temperature, responses)
        values = values[:, width - 1:-1]
        finished = is_eos.any(1)
        scores = scores - cfg.missing_eos_penalty * (~finished).float()
        kl = (logprobs - ref_logprobs) * mask
        rewards = -cfg.kl_coef * kl
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(prompts), device=self.device), last] += scores
        advantages, returns = generalized_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "responses": responses, "mask": mask,
                "width": width, "logprobs": logprobs, "values": values, "advantages": advantages,
                "returns": returns, "scores": scores, "kl": kl.sum(1), "finished": finished.float()}

    def update(self, rollout: dict) -> dict:
        """ppo_epochs passes of minibatch steps over one rollout batch; returns averaged statistics."""
        cfg, w = self.cfg, rollout["width"]
        stats: dict[str, list[float]] = {}
        for _ in range(cfg.ppo_epochs):
            for idx in torch.randperm(len(rollout["scores"]), device=self.device).split(cfg.batch_size):
                mask = rollout["mask"][idx]
                with self.autocast():
                    logits, values = self.module(rollout["input_ids"][idx], rollout["attention_mask"][idx])
                logits = logits[:, w - 1:-1] / cfg.temperature
                new_logp = token_log_probs(logits, rollout["responses"][idx])
                losses = ppo_losses(new_logp, rollout["logprobs"][idx], rollout["advantages"][idx],
                                    values[:, w - 1:-1], rollout["values"][idx], rollout["returns"][idx], mask,
                                    cfg.clip_range, cfg.clip_range_value)
                loss = losses["policy_loss"] + cfg.vf_coef * losses["value_loss"]
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {self.step}: non-finite PPO loss; lower the learning rate")
                self.backend.backward(loss)
                losses["grad_norm"] = torch.as_tensor(self.backend.step())
                with torch.no_grad():
                    losses["entropy"] = masked_mean(entropy_from_logits(logits), mask)
                for k, v in losses.items():
                    stats.setdefault(k, []).append(float(v.detach()))
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def save(self) -> Path:
        # the backend's view (a ZeRO optimizer's partitions gathered into per-parameter state), as the
        # pretraining and post-training loops save; PPO itself runs one process
        weights, optimizer = self.backend.checkpoint_state()
        meta = {"method": self.method, "config": dataclasses.asdict(self.cfg)}
        return ckpt.save_checkpoint(self.out_dir, model=self.module, optimizer=optimizer, model_state=weights,
                                    step=self.step, epoch=self.step // self.steps_per_epoch, meta=meta,
                                    keep_last=self.cfg.keep_last)

    def train(self) -> dict:
        cfg = self.cfg
        progress = None
        if cfg.progress:
            from tqdm import tqdm

            progress = tqdm(total=self.total_steps, initial=self.step, desc="ppo", dynamic_ncols=True)
        with _StopFlag() as stop:
            while self.step < self.total_steps:
                lr = cosine_with_warmup(self.step, max_lr=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                                        total_steps=self.total_steps, min_lr=cfg.learning_rate * cfg.min_lr_ratio)
                self.backend.set_lr(lr)
                rollout = self.rollout(self.prompt_batch(self.step))
                stats = self.update(rollout)
                self.step += 1
                record = {"reward": rollout["scores"].mean().item(), "reward_std": rollout["scores"].std().item(),
                          "kl": rollout["kl"].mean().item(),
                          "non_score_reward": -cfg.kl_coef * rollout["kl"].mean().item(),
                          "response_length": rollout["mask"].sum(1).mean().item(),
                          "eos_fraction": rollout["finished"].mean().item(), "lr": lr, **stats}
                if self.step % cfg.log_interval == 0 or self.step == self.total_steps:
                    self.logger.log(self.step, record)
                if progress:
                    progress.set_postfix({"reward": f"{record['reward']:.3f}", "kl": f"{record['kl']:.3f}"},
                                         refresh=False)
                    progress.update(1)
                if end_of_step(self, stop):
                    break
        if progress:
            progress.close()
        summary = {"step": self.step, "interrupted": stop.signal is not None, **self.logger.get_summary()}
        self.logger.plot(keys=("reward", "kl"))
        self.logger.close()
        return summary

    def export_hf(self) -> Path:
        path = self.out_dir / "hf"
        self.module.policy.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        self.module.value_model.save_pretrained(self.out_dir / "value")
        return path


def run_ppo(cfg: PPOConfig, callbacks=()) -> dict:
    if cfg.model_path is None:
        raise ValueError("ppo: set model_path (the SFT policy to start from; it is also the reference)")
    trainer = PPOTrainer(cfg, callbacks)
    print(f"ppo: {len(trainer.prompts)} prompts, {cfg.rollout_batch_size} per rollout; {trainer.total_steps} "
          f"iterations of {cfg.ppo_epochs} epochs")
    summary = trainer.train()
    if not summary["interrupted"]:
        summary["model_dir"] = str(trainer.export_hf())
    return summary


def train_ppo(model_path: str, reward_model: str, dataset_name: str = "hh-rlhf-sample", output_dir: str = "runs/ppo",
              config: str | None = None, callbacks=(), **overrides) -> dict:
    """Python form of `llmtrain rlhf ppo`."""
    values = dict(overrides, model_path=str(model_path), reward_model=str(reward_model), dataset=dataset_name,
                  output_dir=output_dir)
    return run_ppo(load_posttrain_config(PPOConfig, config, values), callbacks)
