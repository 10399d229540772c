"""``llmtrain generate``: stream a completion of a prompt from a saved model to the terminal.

The lead wires ``register`` into the ``llmtrain`` command (python/llmtrain/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a saved model, streaming tokens",
        description="Load a saved llmtrain model (save_pretrained directory) and stream a completion of --prompt.")
    p.add_argument("--model", required=True, help="model directory written by save_pretrained")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer directory, tokenizer.json or name (default: the model directory's, "
                        "else llmtrain's bundled BPE)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.1)
    p.add_argument("--greedy", action="store_true", help="pick the most likely token (no sampling)")
    p.add_argument("--seed", type=int, default=None, help="seed the sampler for a reproducible completion")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.set_defaults(func=run)


def load_tokenizer_for(model_dir: Path, tokenizer: str | None):
    """--tokenizer if given; else the one saved beside the model; else the bundled offline BPE."""
    try:
        from llmtrain.data import load_tokenizer
    except ImportError:  # the data package is optional for generation
        load_tokenizer = None
    if tokenizer is None and any((model_dir / f).exists() for f in TOKENIZER_FILES):
        tokenizer = str(model_dir)
    if load_tokenizer is not None:
        return load_tokenizer(tokenizer)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer in {model_dir}; pass --tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer)


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return torch.device(device), getattr(torch, dtype)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, TextStreamer

    import llmtrain.models  # noqa: F401  (registers the model types with AutoModelForCausalLM)

    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        print(f"llmtrain generate: {model_dir} is not a saved model (no config.json)", file=sys.stderr)
        return 1
    if args.max_new_tokens < 1:
        print("llmtrain generate: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    device, dtype = _device_and_dtype(args.device, args.dtype)
    try:
        tokenizer = load_tokenizer_for(model_dir, args.tokenizer)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    except (OSError, ValueError) as err:
        print(f"llmtrain generate: {err}", file=sys.stderr)
        return 1
    if len(tokenizer) > model.config.vocab_size:
        print(f"llmtrain generate: the tokenizer has {len(tokenizer)} tokens but the model only "
              f"{model.config.vocab_size}; pass the tokenizer it was trained with (--tokenizer)", file=sys.stderr)
        return 1

    inputs = tokenizer(args.prompt, return_tensors="pt").to(device)
    if inputs["input_ids"].shape[1] == 0:
        print("llmtrain generate: the prompt is empty after tokenisation", file=sys.stderr)
        return 2
    if args.seed is not None:
        torch.manual_seed(args.seed)
    sampling = dict(do_sample=False) if args.greedy else dict(
        do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    streamer = TextStreamer(tokenizer, skip_prompt=False, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            streamer=streamer, **sampling)
    return 0
