"""Shared pieces of the post-training tests: a tiny base model and a yes/no toy task.

The toy task has a rule one can check by eye: good answers start with "Yes", bad ones with "No". SFT on
a 50/50 mix gives a policy that says either; a reward model learns the rule from preference pairs; PPO
and DPO should then shift the policy towards "Yes". Built once per test session (each piece is cached)
in one temporary directory.
"""

import functools
import json
import random
import tempfile
from pathlib import Path

import torch

TINY = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 2, "head_dim": 32,
        "intermediate_size": 128}
COMMON = dict(model_overrides=TINY, device="cpu", progress=False, log_interval=1, max_length=48)

_SUBJECTS = ["the sky", "the sea", "a cat", "the moon", "this road", "the soup", "a river", "my plan", "the door",
             "your car", "the garden", "a song", "the test", "that book", "the bridge", "our team", "a cloud",
             "the coffee", "this chair", "the window"]
_ADJECTIVES = ["blue", "warm", "open", "ready", "quiet", "safe", "new", "good", "long", "clean"]
_TAILS = ["it is", "of course", "I think so", "that is right", "certainly", "it seems so", "very much",
          "as always"]


@functools.lru_cache(maxsize=None)
def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="llmtrain_posttrain_tests_"))


def question(i: int) -> str:
    return f"Is {_SUBJECTS[i % len(_SUBJECTS)]} {_ADJECTIVES[(i * 7 + i // len(_SUBJECTS)) % len(_ADJECTIVES)]}?"


def answer(yes: bool, rng: random.Random) -> str:
    return f"{'Yes' if yes else 'No'}, {rng.choice(_TAILS)}."


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@functools.lru_cache(maxsize=None)
def yes_no_sft_data() -> Path:
    """Dolly-layout instructions answered "Yes, ..." or "No, ..." half and half."""
    rng = random.Random(0)
    rows = [{"instruction": question(i), "context": "", "response": answer(i % 2 == 0, rng)} for i in range(120)]
    return write_jsonl(workdir() / "yes_no_sft.jsonl", rows)


@functools.lru_cache(maxsize=None)
def yes_no_preferences() -> Path:
    """Pairs (prompt, chosen, rejected) where the chosen answer starts with "Yes", the rejected with "No"."""
    rng = random.Random(1)
    rows = [{"prompt": question(i), "chosen": answer(True, rng), "rejected": answer(False, rng)} for i in range(160)]
    return write_jsonl(workdir() / "yes_no_pairs.jsonl", rows)


@functools.lru_cache(maxsize=None)
def base_model_dir() -> Path:
    """A fresh tiny Retention LLM saved like a pretraining run's <output_dir>/hf (model + tokenizer)."""
    from llmtrain.data import load_tokenizer
    from llmtrain.models import build_model, create_model_config

    tokenizer = load_tokenizer()
    config = create_model_config("tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, **TINY)
    torch.manual_seed(0)
    path = workdir() / "base_hf"
    build_model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def yes_no_policy() -> tuple[Path, dict]:
    """The base model fine-tuned on the yes/no SFT data: answers start with "Yes" or "No"."""
    from llmtrain.training import finetune

    summary = finetune(model_path=str(base_model_dir()), dataset_name=str(yes_no_sft_data()),
                       output_dir=str(workdir() / "sft"), max_steps=24, batch_size=8, learning_rate=1e-2,
                       warmup_steps=3, eval_interval=8, save_interval=1000, eval_fraction=0.1, **COMMON)
    return Path(summary["model_dir"]), summary


@functools.lru_cache(maxsize=None)
def yes_no_reward_model() -> tuple[Path, dict]:
    """A reward model trained on the yes/no pairs, starting from the base model's backbone."""
    from llmtrain.training import train_reward_model

    summary = train_reward_model(model_path=str(base_model_dir()), dataset_name=str(yes_no_preferences()),
                                 output_dir=str(workdir() / "reward"), max_steps=16, batch_size=8,
                                 learning_rate=3e-3, warmup_steps=2, eval_interval=8, save_interval=1000,
                                 eval_fraction=0.2, **COMMON)
    return Path(summary["model_dir"]), summary


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
