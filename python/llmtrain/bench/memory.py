"""``llmtrain bench memory``: an analytic estimate of one GPU's peak training memory for a preset.

An ESTIMATE, for the 16 GB question before a GPU run measures it (``llmtrain bench train
--memory_cap_gb 16``). It counts what torch's allocator holds at the backward's peak, per process:

- weights: fp32 (torch backend, bf16 autocast) or bf16 (DeepSpeed with bf16: the engine casts the
  module); the parameter count comes from building the real model on the meta device;
- autocast's bf16 weight copies (torch backend with bf16: each weight's cast is cached and saved for
  the backward);
- gradients: fp32, all of them (torch backend); DeepSpeed ZeRO-1/2 with optimizer offload keeps
  only its reduce buckets on the GPU (reduce_bucket_size elements, twice with overlap_comm);
  ZeRO without offload: a 1/world gradient partition plus the buckets (ZeRO-1 and -2 alike);
- optimizer state: AdamW's two fp32 moments on the GPU (torch), a 1/world partition plus fp32 master
  weights (ZeRO without offload), none (offload: in CPU memory, reported separately);
- activations of one micro-batch (bf16, residual stream in the weights' dtype), per token and layer
  from the MLA block's saved tensors (listed in ``mla_layer_bytes_per_token``), with FlashAttention's
  O(T) saved state (no T x T matrix). With activation checkpointing: every layer's input, plus one
  layer recomputed and its backward working set; without: every layer's saved tensors;
- the loss: the chunked cross-entropy's float32 logits chunk (+ its bf16 copy and gradient) and its
  float32 d_weight accumulator, and the final hidden states.
It leaves out: the CUDA context and kernels' workspace (cuBLAS, ~0.5-1 GB, outside torch's allocator
and outside set_per_process_memory_fraction's cap too), allocator fragmentation (reserved - allocated),
DeepSpeed's transient allgather of updated weights, and NCCL buffers. Only the MLA model is modelled:
the retention op's saved state is the kernel's own choice (llmtrain.ops.power_retention), so a
retention preset is refused rather than guessed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GIB = 2**30


class MemoryEstimateError(ValueError):
    """A preset or argument the estimate does not cover; the message names it."""


def count_parameters(model_config) -> int:
    """The model's parameter count (tied weights once), from the real modules built on the meta device."""
    import torch

    from llmtrain.models import build_model

    with torch.device("meta"):
        model = build_model(model_config)
    return sum(p.numel() for p in model.parameters())


def mla_layer_bytes_per_token(c, residual_bytes: int, act_bytes: int = 2) -> dict:
    """Bytes one MLA block saves for its backward, per token (bf16 activations under autocast)."""
    h, heads = c.hidden_size, c.num_attention_heads
    dn, dr, dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    a = act_bytes
    attention = (residual_bytes * h                                  # NormLinear input (the residual stream)
                 + a * (c.q_lora_rank + c.kv_lora_rank + dr)         # latent projection output
                 + a * (c.q_lora_rank + c.kv_lora_rank)              # the up projections' inputs
                 + a * heads * (dn + dr) * 2                         # q and the expanded k
                 + a * heads * dv * 2                                # v and the attention output
                 + 4 * heads                                         # FlashAttention's logsumexp
                 + a * heads * dv)                                   # o_proj's input (contiguous copy)
    mlp = (residual_bytes * h                                        # NormLinear input
           + a * 2 * c.intermediate_size                             # gate and up outputs
           + a * c.intermediate_size)                                # silu(gate) * up, the down input
    return {"attention": attention, "mlp": mlp, "total": attention + mlp}


def _ds_settings(cfg) -> dict:
    from llmtrain.training.backends import _resolve_ds_config

    path = _resolve_ds_config(cfg.ds_config)
    try:
        ds = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MemoryEstimateError(f"ds_config: cannot read {path} ({exc})") from exc
    zero = ds.get("zero_optimization", {})
    return {"stage": int(zero.get("stage", 0)),
            "offload": zero.get("offload_optimizer", {}).get("device") == "cpu",
            "reduce_bucket": int(float(zero.get("reduce_bucket_size", 5e8))),
            "overlap_comm": bool(zero.get("overlap_comm", False))}


def estimate(cfg, world_size: int = 1) -> dict:
    """Peak GPU memory of one training process for TrainConfig cfg, by component (bytes)."""
    from llmtrain.models import create_model_config
    from llmtrain.ops.cross_entropy import default_chunk_rows

    if world_size < 1:
        raise MemoryEstimateError(f"--world_size: must be >= 1, got {world_size}")
    c = create_model_config(cfg.model_size, **cfg.model_overrides)
    if c.model_type != "llmtrain_mla":
        raise MemoryEstimateError(f"--config: {cfg.model_size} is a {c.model_type} model; the estimate models "
                                  "the MLA model only (the retention kernel's saved state is its own)")
    n = count_parameters(c)
    bf16 = cfg.dtype in ("bf16", "auto", "fp16")
    backend = cfg.backend if cfg.backend in ("torch", "deepspeed") else "torch"
    if cfg.backend not in ("torch", "deepspeed", "auto"):
        raise MemoryEstimateError(f"--config: backend {cfg.backend!r} is not modelled (torch or deepspeed)")
    parts, notes = {}, []
    cpu = 0
    if backend == "deepspeed":
        ds = _ds_settings(cfg)
        w_bytes = 2 if bf16 else 4
        parts["weights"] = w_bytes * n
        buckets = ds["reduce_bucket"] * w_bytes * (2 if ds["overlap_comm"] else 1)
        if ds["stage"] not in (1, 2):
            raise MemoryEstimateError(f"ds_config: ZeRO stage {ds['stage']} is not modelled (1 or 2)")
        if ds["offload"]:
            parts["gradients"] = buckets
            parts["optimizer"] = 0
            cpu = 12 * n // world_size + 4 * n // world_size  # fp32 master + 2 moments, fp32 grad partition
            notes.append("ZeRO optimizer offload: fp32 master weights, moments and gradient partition in CPU memory")
        else:
            parts["gradients"] = 4 * n // world_size + buckets
            parts["optimizer"] = (8 + (4 if bf16 else 0)) * n // world_size
        parts["autocast_weight_copies"] = 0
        residual = w_bytes
    else:
        parts["weights"] = 4 * n
        parts["gradients"] = 4 * n
        parts["optimizer"] = 8 * n
        parts["autocast_weight_copies"] = 2 * n if bf16 else 0
        residual = 4
    act = 2 if bf16 else 4
    tokens = cfg.batch_size * cfg.seq_len
    per_layer = mla_layer_bytes_per_token(c, residual, act)["total"] * tokens
    layers = c.num_hidden_layers
    if cfg.activation_checkpointing:
        parts["activations"] = layers * residual * c.hidden_size * tokens + 2 * per_layer
        notes.append("activation checkpointing: every layer's input + one layer recomputed + its backward")
    else:
        parts["activations"] = layers * per_layer + per_layer
        notes.append("no checkpointing: every layer's saved tensors + one layer's backward working set")
    rows = min(default_chunk_rows(c.vocab_size), tokens)
    parts["loss"] = (rows * c.vocab_size * (4 + act + 4)          # float32 logits, bf16 copy, gradient
                     + 4 * c.vocab_size * c.hidden_size           # float32 d_weight accumulator
                     + 2 * residual * c.hidden_size * tokens)     # final hidden states and their gradient
    total = sum(parts.values())
    return {"model": cfg.model_size, "params": n, "backend": backend, "world_size": world_size,
            "seq_len": cfg.seq_len, "batch_size": cfg.batch_size,
            "activation_checkpointing": cfg.activation_checkpointing,
            "dtype": ("bf16" if cfg.dtype == "auto" else cfg.dtype) if bf16 else "fp32", "parts_gib": {k: v / GIB for k, v in parts.items()},
            "peak_gib": total / GIB, "cpu_optimizer_gib": cpu / GIB, "notes": notes,
            "estimate": "analytic (llmtrain.bench.memory): see its docstring for what it counts and leaves out"}


def run(args) -> int:
    from llmtrain.training.config import ConfigError, apply, load_config

    try:
        try:
            cfg = load_config(args.config, {"max_steps": 1})
            updates = {k: getattr(args, k) for k in ("seq_len", "batch_size", "backend")
                       if getattr(args, k) is not None}
            if args.activation_checkpointing is not None:
                updates["activation_checkpointing"] = args.activation_checkpointing
            cfg = apply(cfg, updates, "bench memory arguments").validate()
        except ConfigError as exc:
            raise MemoryEstimateError(f"--config: {exc}") from exc
        report = estimate(cfg, args.world_size)
    except MemoryEstimateError as exc:
        print(f"llmtrain bench memory: {exc}", file=sys.stderr)
        return 2
    print(f"{args.config}: {report['model']} ({report['params'] / 1e6:.0f}M params), {report['backend']}, "
          f"seq {report['seq_len']} x batch {report['batch_size']}, checkpointing "
          f"{report['activation_checkpointing']} -- ESTIMATED peak {report['peak_gib']:.2f} GiB per GPU")
    for k, v in report["parts_gib"].items():
        print(f"  {k:24s} {v:7.2f} GiB")
    if report["cpu_optimizer_gib"]:
        print(f"  (CPU memory for the offloaded optimizer: {report['cpu_optimizer_gib']:.2f} GiB)")
    print("  not counted: CUDA context/workspaces (~0.5-1 GB), fragmentation, NCCL buffers")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _bool(value: str) -> bool:
    from llmtrain.bench.train import _bool as parse

    return parse(value)


def register(sub) -> None:
    p = sub.add_parser("memory", help="ESTIMATE peak GPU training memory of a preset (analytic, no GPU needed)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="a pretraining YAML or preset, e.g. pretrain_5080")
    p.add_argument("--seq_len", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--backend", choices=["torch", "deepspeed"])
    p.add_argument("--activation_checkpointing", type=_bool, metavar="BOOL")
    p.add_argument("--world_size", type=int, default=1, help="processes sharing ZeRO partitions (default 1)")
    p.add_argument("--json", help="also write the estimate as JSON here")
    p.set_defaults(func=run)
