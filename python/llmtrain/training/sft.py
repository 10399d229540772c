"""Supervised fine-tuning: `llmtrain sft` and `finetune(...)`.

    from llmtrain.training import finetune
    finetune(model_path="runs/small/hf", dataset_name="databricks-dolly-15k", output_dir="runs/sft",
             epochs=3, batch_size=4, learning_rate=1e-5)

Examples go through the tokenizer's chat template; the loss is next-token cross entropy on the
assistant turns only (prompt, system and padding positions carry label -100). Batches are padded to
their longest example, or with packing=True filled back to back into rows of max_length (the models have
no per-document attention mask, so packed examples see their row-mates; the loss is unaffected in what
it scores). Evaluation reports the held-out response loss and perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llmtrain.data.formats import IGNORE_INDEX, PackingCollator, PaddingCollator
from llmtrain.training.logger import compute_perplexity
from llmtrain.training.posttrain_config import SFTConfig, load_posttrain_config
from llmtrain.training.posttrain_data import load_sft_examples, resolve_posttrain_source, split_held_out
from llmtrain.training.posttrain_loop import PostTrainer, load_model, model_inputs


def response_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy over scored (response) positions; labels are already shifted, -100 elsewhere."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class SFTTrainer(PostTrainer):
    method = "sft"

    def setup_data(self):
        cfg = self.cfg
        source = resolve_posttrain_source(cfg.dataset, cfg.dataset_format)
        examples, dropped = load_sft_examples(source, self.tokenizer, cfg.max_length, cfg.num_samples,
                                              cfg.skip_invalid)
        if dropped.counts:
            print(f"{cfg.dataset}: dropped {dropped}")
        self.dropped = dropped
        train, held_out = split_held_out(examples, cfg.eval_fraction, cfg.max_eval_examples, cfg.seed)
        self.pad_collate = PaddingCollator(self.tokenizer.pad_token_id)
        if cfg.packing:
            # Pack once, in a seeded order, so an epoch has a fixed number of rows; epochs shuffle rows.
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            packed = PackingCollator(cfg.max_length, self.tokenizer.pad_token_id)([train[i] for i in order])
            train = [{k: v[r] for k, v in packed.items()} for r in range(packed["input_ids"].shape[0])]
        return train, held_out

    def build_model(self):
        return load_model(self.cfg, self.tokenizer, self.cfg.model_path)

    def collate(self, items):
        if "labels" in items[0]:  # packed rows are already tensors
            return {k: torch.stack([item[k] for item in items]) for k in ("input_ids", "labels", "position_ids")}
        return self.pad_collate(items)

    def compute_loss(self, batch):
        logits = self.model(**model_inputs(batch)).logits
        loss = response_loss(logits, batch["labels"])
        # a tensor: float() here would wait for the device every micro-batch
        return loss, {"response_tokens": (batch["labels"] != IGNORE_INDEX).sum().float()}

    def evaluate(self) -> dict:
        total, count = 0.0, 0
        for batch in self.batches_of(self.eval_items, self.cfg.batch_size):
            logits = self.model(**model_inputs(batch)).logits
            total += response_loss(logits, batch["labels"], reduction="sum").item()
            count += int((batch["labels"] != IGNORE_INDEX).sum())
        loss = total / max(1, count)
        return {"loss": loss, "perplexity": compute_perplexity(loss)}


def run_sft(cfg: SFTConfig, callbacks=()) -> dict:
    from llmtrain.training.backends import select_backend

    if select_backend(cfg.backend) == "mlx":  # the MLX models and loop (llmtrain.mlx.sft); auto on macOS
        from llmtrain.mlx.sft import run_sft as run_mlx_sft

        return run_mlx_sft(cfg, callbacks)
    trainer = SFTTrainer(cfg, callbacks)
    if trainer.is_main:
        n = sum(p.numel() for p in trainer.module.parameters())
        print(f"sft: {n / 1e6:.1f}M parameters on {trainer.device}; {len(trainer.train_items)} train / "
              f"{len(trainer.eval_items)} held-out {'rows' if cfg.packing else 'examples'}; {trainer.total_steps} steps")
    summary = trainer.train()
    if trainer.is_main and not summary["interrupted"]:
        summary["model_dir"] = str(trainer.export_hf())
        print(f"metrics in {cfg.output_dir}/metrics.jsonl; model in {summary['model_dir']}")
    return summary


def finetune(model_path: str | None = None, dataset_name: str = "dolly-sample", output_dir: str = "runs/sft",
             config: str | None = None, callbacks=(), **overrides) -> dict:
    """Supervised fine-tuning from Python: the `llmtrain sft` options as keyword arguments.

    model_path: an HF model dir (a pretraining run's <output_dir>/hf); dataset_name: a bundled, catalog
    or local dataset; config: an optional YAML preset (e.g. "sft_dolly"). Returns the run summary (its
    "model_dir" holds the fine-tuned model and tokenizer).
    """
    values = dict(overrides, dataset=dataset_name, output_dir=output_dir)
    if model_path is not None:
        values["model_path"] = str(model_path)
    return run_sft(load_posttrain_config(SFTConfig, config, values), callbacks)
