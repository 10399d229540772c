"""The end-of-run report of ``llmtrain pretrain``, shared by the torch and MLX trainers.

Framework-neutral: it imports neither torch nor MLX and reads the trainer only through what both
trainers (llmtrain.training.trainer.Trainer, llmtrain.mlx.trainer.MLXTrainer) provide:
``is_main``, ``data.unigram_entropy``, ``sample(prompt, max_new_tokens) -> str`` and
``export_hf() -> path``.
"""

from __future__ import annotations


def report_pretraining(cfg, trainer, summary: dict) -> dict:
    """After a run that finished (not interrupted, not stopped early), on the main process: compare the
    validation loss with the unigram entropy of the corpus, print a sample (``cfg.sample_tokens``) and
    export the model to Hugging Face format. Adds ``unigram_entropy`` to ``summary`` and returns it."""
    if not trainer.is_main or summary["interrupted"] or summary.get("stopped_early"):
        return summary
    entropy = trainer.data.unigram_entropy
    val = summary.get("val_loss", {}).get("last")
    if val is not None:
        print(f"validation loss {val:.3f} nats/token vs unigram entropy of the corpus {entropy:.3f} "
              f"({'below' if val < entropy else 'NOT below'} it by {entropy - val:.3f})")
    summary["unigram_entropy"] = entropy
    if cfg.sample_tokens:
        print("sample:", trainer.sample(cfg.sample_prompt, cfg.sample_tokens))
    path = trainer.export_hf()
    print(f"checkpoints, metrics.jsonl and loss.png in {cfg.output_dir}; Hugging Face export in {path}")
    return summary
