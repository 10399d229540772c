"""The whole pipeline on the bundled data, end to end, on CPU in a few minutes:

    data prepare -> pretrain -> SFT (Dolly-style sample) -> reward model (HH-RLHF-style) -> DPO -> generate

    python examples/full_pipeline.py [--workdir runs/pipeline] [--steps 60]

Each stage writes its run directory under --workdir and hands its Hugging Face export to the next.
"""

import argparse
import subprocess
import sys
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--workdir", default="runs/pipeline")
parser.add_argument("--steps", type=int, default=60, help="pretraining steps")
args = parser.parse_args()
work = Path(args.workdir)
small = "{num_hidden_layers: 4, hidden_size: 128, num_attention_heads: 2, intermediate_size: 352}"


def llmtrain(*argv):
    cmd = [sys.executable, "-m", "llmtrain", *map(str, argv)]
    print("\n$ llmtrain", " ".join(map(str, argv)), flush=True)
    subprocess.run(cmd, check=True)


llmtrain("data", "prepare", "shakespeare", "--out", work / "data")
llmtrain("pretrain", "--dataset", work / "data" / "shards" / "pretrain", "--max_steps", args.steps,
         "--batch_size", 8, "--seq_len", 128, "--learning_rate", "3e-3", "--eval_interval", args.steps,
         "--model_overrides", small, "--output_dir", work / "pretrain", "--progress", "false")
llmtrain("sft", "--model_path", work / "pretrain" / "hf", "--dataset", "dolly-sample", "--epochs", 1,
         "--batch_size", 4, "--learning_rate", "1e-3", "--output_dir", work / "sft")
llmtrain("rlhf", "train-reward", "--model_path", work / "sft" / "hf", "--dataset", "hh-rlhf-sample",
         "--epochs", 1, "--batch_size", 4, "--output_dir", work / "reward")
llmtrain("rlhf", "dpo", "--model_path", work / "sft" / "hf", "--dataset", "hh-rlhf-sample", "--epochs", 1,
         "--batch_size", 4, "--output_dir", work / "dpo")
llmtrain("generate", "--model", work / "dpo" / "hf", "--prompt", "ROMEO:", "--max-new-tokens", 40)
