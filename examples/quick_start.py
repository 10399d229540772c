"""The quick start from Python: the tiny Retention LLM on the bundled Shakespeare corpus, on CPU.

    python examples/quick_start.py [--max_steps 200]

Same as `llmtrain pretrain` (the quick_start preset): prepares shards with the bundled tokenizer,
trains, evaluates, and prints the validation loss against the corpus's unigram entropy and a sample.
"""

import argparse

from llmtrain.training import pretrain

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--max_steps", type=int, default=None, help="override the preset's step count")
parser.add_argument("--output_dir", default="runs/quick_start")
args = parser.parse_args()

overrides = {"output_dir": args.output_dir}
if args.max_steps is not None:
    overrides["max_steps"] = args.max_steps
summary = pretrain("quick_start", **overrides)
print(f"finished at step {summary['step']}: last train loss {summary['loss']['last']:.3f}, "
      f"unigram entropy {summary['unigram_entropy']:.3f}")
